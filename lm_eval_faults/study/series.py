"""Series: a sweep's faulty records grouped by (fault, site, target, layers), each fault rate aggregated over seeds.

Why: a curve, an AWRCL or a ranking compares series, never single points; see the conventions in
`metrics` for how seeds and tasks enter.
"""

from __future__ import annotations

import math
import re
from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np

from lm_eval_faults.study.bootstrap import (
    Sampling,
    SeedStats,
    bootstrap_baseline,
    bootstrap_rng,
    bootstrap_scores,
    mean_only,
    percentile_interval,
    relchange_bounds,
    sampling_of,
)
from lm_eval_faults.study.grid import NO_PROTECTION
from lm_eval_faults.study.metrics import baseline_score, baseline_tasks, record_score, relative_change, task_scores

CountUnit = Literal["elements", "bits"]
ALL_LAYERS = "all"


@dataclass(frozen=True, order=True)
class SeriesKey:
    """What a series holds fixed: the fault model, where it hits, and which part of the model."""

    fault: str
    site: str
    target: str
    layers: str
    protection: str = NO_PROTECTION

    @property
    def label(self) -> str:
        """Short human-readable name, e.g. ``bitflip/weights attention layers=all``."""
        text = f"{self.fault}/{self.site} {self.target} layers={self.layers}"
        return text if self.protection == NO_PROTECTION else f"{text} [{self.protection}]"

    @property
    def scope(self) -> str:
        """The fault model and its protection: what the series of one ranking or figure share."""
        text = f"{self.fault}/{self.site}"
        return text if self.protection == NO_PROTECTION else f"{text} [{self.protection}]"


@dataclass(frozen=True)
class Point:
    """One faulty record reduced to the numbers the analysis needs."""

    point_id: str
    p: float
    seed: int
    score: float
    relchange: float
    injected: float
    values: tuple[float, ...] = ()
    """Per-task primary metric, in the order of `Sampling.tasks`: what the bootstrap redraws."""


@dataclass(frozen=True)
class GridPoint:
    """One fault rate of a series, aggregated over its seeds."""

    p: float
    score: SeedStats
    relchange: SeedStats
    injected: SeedStats


@dataclass(frozen=True)
class Series:
    """All points of one (fault, site, target, layers), with the seed-aggregated grid."""

    key: SeriesKey
    points: tuple[Point, ...]
    grid: tuple[GridPoint, ...]
    baseline: float = math.nan
    sampling: Sampling | None = None

    @property
    def p(self) -> np.ndarray:
        """Grid fault rates, ascending."""
        return np.array([g.p for g in self.grid])

    @property
    def mean_injected(self) -> np.ndarray:
        """Seed-mean injected count at each grid point: the x axis of the count-based metrics."""
        return np.array([g.injected.mean for g in self.grid])

    @property
    def mean_relchange(self) -> np.ndarray:
        """Seed-mean relative change at each grid point."""
        return np.array([g.relchange.mean for g in self.grid])

    @property
    def seeds(self) -> list[int]:
        """Seeds present in the series, sorted."""
        return sorted({pt.seed for pt in self.points})

    def value_cube(self) -> np.ndarray:
        """Per-task values as (seeds, grid, tasks), NaN where a seed has no scored point."""
        return _value_cube(self.points, [g.p for g in self.grid], self.sampling)


def series_key(record: Mapping[str, Any]) -> SeriesKey:
    """The series a record belongs to."""
    return SeriesKey(
        fault=str(record.get("fault")),
        site=str(record.get("site")),
        target=str(record.get("target")),
        layers=str(record.get("layers", ALL_LAYERS)),
        protection=str(record.get("protection", NO_PROTECTION)),
    )


def injected_count(record: Mapping[str, Any], count: CountUnit = "elements") -> float:
    """Faults actually injected by a record, counted as faulty values (`elements`, defined for
    every fault model) or flipped bits (`bits`); NaN when not recorded."""
    value = (record.get("injected") or {}).get(count)
    return math.nan if value is None else float(value)


def build_series(
    records: Sequence[Mapping[str, Any]],
    *,
    tasks: Sequence[str] | None = None,
    count: CountUnit = "elements",
) -> tuple[float, list[Series]]:
    """Group faulty records into series and aggregate each fault rate over seeds.

    Returns the baseline score and the series sorted by key. `tasks` defaults to the
    baseline's tasks (see the conventions in `metrics`). Points that score NaN stay in `Series.points`
    (they are part of the run) but do not contribute to the grid statistics.
    """
    tasks = list(tasks) if tasks is not None else baseline_tasks(records)
    base = baseline_score(records, tasks)
    sampling = sampling_of(records, tasks)
    grouped: dict[SeriesKey, list[Point]] = defaultdict(list)
    for record in records:
        if record.get("baseline"):
            continue
        score = record_score(record, tasks)
        grouped[series_key(record)].append(
            Point(
                point_id=str(record["point_id"]),
                p=float(record["p"]),
                seed=int(record.get("seed", 0)),
                score=score,
                relchange=float(relative_change(base, score)),
                injected=injected_count(record, count),
                values=_task_values(record, tasks),
            )
        )
    series = []
    for key in sorted(grouped, key=lambda k: (k.fault, k.site, k.target, layer_sort_key(k.layers))):
        points = tuple(sorted(grouped[key], key=lambda pt: (pt.p, pt.seed)))
        grid = _aggregate_grid(points, base, sampling)
        series.append(Series(key=key, points=points, grid=grid, baseline=base, sampling=sampling))
    return base, series


def _task_values(record: Mapping[str, Any], tasks: Sequence[str]) -> tuple[float, ...]:
    """A record's primary metric per task (NaN where missing), for the bootstrap."""
    scores = task_scores(record)
    return tuple(scores[task][1] if task in scores else math.nan for task in tasks)


def _value_cube(points: Sequence[Point], grid_p: Sequence[float], sampling: Sampling | None) -> np.ndarray:
    """(seeds, grid, tasks) per-task values of scored points; NaN elsewhere."""
    seeds = sorted({pt.seed for pt in points})
    n_tasks = len(sampling.tasks) if sampling else 0
    cube = np.full((len(seeds), len(grid_p), n_tasks), math.nan)
    column = {p: j for j, p in enumerate(grid_p)}
    for pt in points:
        if math.isfinite(pt.score) and pt.p in column and len(pt.values) == n_tasks:
            cube[seeds.index(pt.seed), column[pt.p]] = pt.values
    return cube


def _aggregate_grid(points: Sequence[Point], baseline: float, sampling: Sampling) -> tuple[GridPoint, ...]:
    """Seed means and two-level bootstrap intervals at each distinct p (points sorted by p)."""
    by_p: dict[float, list[Point]] = defaultdict(list)
    for pt in points:
        by_p[pt.p].append(pt)
    grid = []
    for p, group in by_p.items():
        scored = [pt for pt in group if math.isfinite(pt.score)]
        score, relchange = _point_intervals(scored, p, baseline, sampling)
        grid.append(GridPoint(p=p, score=score, relchange=relchange, injected=mean_only(pt.injected for pt in group)))
    return tuple(grid)


def _point_intervals(scored: Sequence[Point], p: float, baseline: float, sampling: Sampling) -> tuple[SeedStats, SeedStats]:
    """Score and relative-change intervals of one grid point from the same replicates."""
    n = len(scored)
    score_mean = float(np.mean([pt.score for pt in scored])) if n else math.nan
    change_mean = float(relative_change(baseline, score_mean))
    if not n:
        return SeedStats(math.nan, math.nan, math.nan, 0), SeedStats(math.nan, math.nan, math.nan, 0)
    rng = bootstrap_rng()
    scores = bootstrap_scores(_value_cube(scored, [p], sampling), sampling, rng)[:, 0]
    base = bootstrap_baseline(sampling, rng)
    varies = n >= 2 or bool(sampling.sizes.any())
    score_bounds = (0.0, 1.0) if sampling.bounded else (-math.inf, math.inf)
    with np.errstate(divide="ignore", invalid="ignore"):
        changes = np.where(base != 0, (base - scores) / base, math.nan)
    return (
        percentile_interval(scores, score_mean, n, score_bounds, varies=varies),
        percentile_interval(changes, change_mean, n, relchange_bounds(baseline, sampling), varies=varies),
    )


def layer_sort_key(label: str) -> tuple[int, str]:
    """Sort layer-group labels like "0-3", "4-7", "12-15" numerically, "all" last."""
    match = re.match(r"\d+", label)
    return (int(match.group()) if match else 1 << 30, label)
