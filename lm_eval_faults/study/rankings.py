"""Rankings: each series' headline numbers (AWRCL with intervals, thresholds), and series ordered from most to least fragile."""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np

from lm_eval_faults.study.awrcl import Weighting, awrcl, awrcl_rows, threshold_crossing
from lm_eval_faults.study.bootstrap import (
    SeedStats,
    bootstrap_baseline,
    bootstrap_rng,
    bootstrap_scores,
    percentile_interval,
    relchange_bounds,
)
from lm_eval_faults.study.series import ALL_LAYERS, Series, SeriesKey

RankBy = Literal["awrcl_p", "awrcl_count", "threshold_p", "threshold_count"]
RANK_KEYS: tuple[RankBy, ...] = ("awrcl_p", "awrcl_count", "threshold_p", "threshold_count")


@dataclass(frozen=True)
class SeriesSummary:
    """The headline numbers of one series (see the conventions in `metrics` for how seeds enter)."""

    key: SeriesKey
    awrcl_p: SeedStats
    awrcl_count: SeedStats
    threshold_p: float | None
    threshold_count: float | None
    n_seeds: int


def summarize_series(series: Series, *, weighting: Weighting = "uniform", fraction: float = 0.5) -> SeriesSummary:
    """AWRCL against p and against the seed-mean injected count, each with a two-level
    bootstrap interval, and the `fraction`-drop thresholds on the seed-mean curve.

    The headline AWRCL is that of the seed-mean relative-change curve; each bootstrap replicate
    recomputes it from a replicate curve (seeds resampled, documents redrawn, baseline redrawn),
    so one interval carries both sources of variance and the AWRCL's bounds.
    """
    p, counts = series.p, series.mean_injected
    n_seeds = len(series.seeds)
    changes = _replicate_relchanges(series)
    bounds = relchange_bounds(series.baseline, series.sampling) if series.sampling else (-math.inf, math.inf)
    varies = n_seeds >= 2 or (series.sampling is not None and bool(series.sampling.sizes.any()))

    def interval(x: np.ndarray) -> SeedStats:
        estimate = awrcl(x, series.mean_relchange, weighting)
        replicates = awrcl_rows(x, changes, weighting) if changes is not None else np.array([])
        return percentile_interval(replicates, estimate, n_seeds, bounds, varies=varies and changes is not None)

    return SeriesSummary(
        key=series.key,
        awrcl_p=interval(p),
        awrcl_count=interval(counts),
        threshold_p=threshold_crossing(p, series.mean_relchange, fraction),
        threshold_count=threshold_crossing(counts, series.mean_relchange, fraction),
        n_seeds=n_seeds,
    )


def _replicate_relchanges(series: Series) -> np.ndarray | None:
    """Bootstrap replicates of the seed-mean relative-change curve, (replicates, grid); None
    for a series built without sampling information."""
    if series.sampling is None or not series.points:
        return None
    rng = bootstrap_rng()
    scores = bootstrap_scores(series.value_cube(), series.sampling, rng)
    base = bootstrap_baseline(series.sampling, rng)[:, None]
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(base != 0, (base - scores) / base, math.nan)


@dataclass(frozen=True)
class RankRow:
    """One place in a ranking: rank 1 is the most fragile."""

    rank: int
    label: str
    value: float | None


@dataclass(frozen=True)
class Ranking:
    """Members of one comparable family ordered by one criterion.

    `title` names what is held fixed (e.g. ``bitflip/weights, layers=all``) and `kind` what
    varies: ``"component"`` (targets) or ``"layer group"``.
    """

    title: str
    kind: str
    by: str
    rows: tuple[RankRow, ...]


def rank_value(summary: SeriesSummary, by: RankBy) -> float | None:
    """The number a ranking sorts on: AWRCL mean, or a threshold (None when never reached)."""
    if by == "awrcl_p":
        return summary.awrcl_p.mean
    if by == "awrcl_count":
        return summary.awrcl_count.mean
    if by == "threshold_p":
        return summary.threshold_p
    if by == "threshold_count":
        return summary.threshold_count
    raise ValueError(f"unknown ranking criterion {by!r}; choose one of {RANK_KEYS}")


def rank(summaries: Sequence[SeriesSummary], by: RankBy, label: str) -> tuple[RankRow, ...]:
    """Order summaries from most to least fragile.

    Higher AWRCL is more fragile; a lower threshold is more fragile (it breaks sooner). Series
    that never reached the threshold, or whose AWRCL is NaN, rank last. `label` is the
    SeriesKey field that names each row ("target" or "layers").
    """
    descending = by.startswith("awrcl")

    def sort_key(s: SeriesSummary) -> tuple[bool, float, str]:
        value = rank_value(s, by)
        if value is None or not math.isfinite(value):
            return True, 0.0, getattr(s.key, label)
        return False, -value if descending else value, getattr(s.key, label)

    ordered = sorted(summaries, key=sort_key)
    return tuple(RankRow(rank=i + 1, label=getattr(s.key, label), value=rank_value(s, by)) for i, s in enumerate(ordered))


def rankings(summaries: Sequence[SeriesSummary], by: RankBy) -> list[Ranking]:
    """Every ranking the study asks for, under one criterion.

    Components are compared within the same (fault, site, layers) — the paper's per-component
    experiment uses layers = "all"; layer groups within the same (fault, site, target), for
    layer groups other than "all". Families with a single member are not rankings and are left
    out.
    """
    families: dict[tuple[str, str, str], list[SeriesSummary]] = defaultdict(list)
    for s in summaries:
        k = s.key
        families[("component", f"{k.scope}, layers={k.layers}", "target")].append(s)
        if k.layers != ALL_LAYERS:
            families[("layer group", f"{k.scope}, target={k.target}", "layers")].append(s)
    return [
        Ranking(title=title, kind=kind, by=by, rows=rank(members, by, label))
        for (kind, title, label), members in sorted(families.items())
        if len(members) > 1
    ]
