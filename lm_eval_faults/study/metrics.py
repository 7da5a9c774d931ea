"""Sweep analysis: from `results.jsonl` records to AWRCL, 50%-drop thresholds and rankings.

Reproduces the metrics of "Specified Backup for Fragile Parts of LLM" (UCLA): the relative
change in accuracy, its weighted average over the fault-rate grid (AWRCL), against the rate p
and against the number of injected faults, and the smallest p / fault count at which accuracy
has fallen by half. Numpy only, so that a results file can be analysed on a machine without
torch or lm-eval.

Conventions, stated once here because every function below relies on them:

* A record's *score* is the mean over tasks of each task's primary metric (`primary_metric`).
  The task set is the baseline's; a faulty record that lacks one of those tasks scores NaN and
  is left out of curves, because a mean over a different task set is not comparable.
* Relative change is computed on the score, ``(baseline - faulty) / baseline``: positive means
  accuracy was lost.
* A *series* is every record sharing (fault, site, target, layers); its *grid* is the distinct
  p values, each aggregated over seeds.
* Headline values (AWRCL, thresholds, rankings) use the seed-mean curve. Thresholds get no
  interval: a seed that never crosses has no threshold, so a per-seed average is ill-defined.
* Intervals (scores, relative changes, AWRCL) are 95% percentile intervals of a parametric
  two-level bootstrap, because a score varies for two reasons: which fault map a seed drew,
  and which documents the task happened to ask. Each replicate resamples the seeds with
  replacement, redraws each resampled seed's per-task accuracy as Binomial(n, acc)/n, redraws
  the baseline the same way, and recomputes the statistic. Every replicate is a possible
  value, so intervals stay inside the bounds (accuracy in [0, 1], relative change in
  [1 - 1/baseline, 1]) where a Student-t interval over 2-3 seeds did not. The document count n
  is the record's ``samples`` entry, or is inferred from a proportion and its stderr. The
  generator seed is fixed, so a report is reproducible. Coverage, measured by simulation, is in
  docs/sweep_intervals.md: about 95% when document sampling dominates, but below 90% with 2-3
  seeds whose fault maps differ much more than the documents do.
"""

from __future__ import annotations

import json
import math
import re
import warnings
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np

Record = dict[str, Any]
Weighting = Literal["uniform", "log_p", "p"]
CountUnit = Literal["elements", "bits"]
RankBy = Literal["awrcl_p", "awrcl_count", "threshold_p", "threshold_count"]

WEIGHTINGS: tuple[str, ...] = ("uniform", "log_p", "p")
PRIMARY_METRICS: tuple[str, ...] = ("acc", "acc_norm", "exact_match")
RANK_KEYS: tuple[RankBy, ...] = ("awrcl_p", "awrcl_count", "threshold_p", "threshold_count")
ALL_LAYERS = "all"
NO_PROTECTION = "none"
RESULTS_FILE = "results.jsonl"
"""A sweep run directory's results file: one JSON record per finished point."""


class MalformedRecordError(ValueError):
    """A line of a results file that is not a JSON object with a `point_id`, and is not the
    tolerated partial last line."""


# --------------------------------------------------------------------------- loading


def load_records(path: str | Path, *, skip_malformed: bool = False) -> list[Record]:
    """Read a sweep's results JSONL, one record per finished point.

    A killed sweep can leave its last line half-written, so an unparsable *last* line is
    skipped with a warning. Any other malformed line raises `MalformedRecordError` naming the
    line: silently dropping a point would bias AWRCL without anyone noticing. Pass
    ``skip_malformed=True`` to skip (with a warning) such lines instead, e.g. when a resumed
    sweep appended a new record onto an old partial line.

    Records are keyed by `point_id`; when a point appears twice (it was re-run), the later
    line wins, because it is the newer result. Order of first appearance is kept.
    """
    path = Path(path)
    lines = path.read_text(encoding="utf-8").splitlines()
    last = max((i for i, line in enumerate(lines) if line.strip()), default=-1)
    records: dict[str, Record] = {}
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        problem = _record_problem(line)
        if problem is None:
            record = json.loads(line)
            records[str(record["point_id"])] = record
            continue
        where = f"{path}:{i + 1}: {problem}"
        if i == last:
            warnings.warn(f"skipping partial last line {where}", stacklevel=2)
        elif skip_malformed:
            warnings.warn(f"skipping malformed line {where}", stacklevel=2)
        else:
            raise MalformedRecordError(where)
    return list(records.values())


def _record_problem(line: str) -> str | None:
    """Why a line is not a usable record, or None when it is."""
    try:
        record = json.loads(line)
    except json.JSONDecodeError as exc:
        return f"invalid JSON ({exc.msg})"
    if not isinstance(record, dict):
        return "not a JSON object"
    if "point_id" not in record:
        return "no point_id"
    return None


# --------------------------------------------------------------------------- scores


def primary_metric(task_metrics: Mapping[str, Any]) -> tuple[str, float] | None:
    """The one metric that stands for a task: acc, else acc_norm, else exact_match, else the
    first numeric non-stderr metric. None when the task reports nothing numeric.

    Accuracy comes first because the study reports accuracy; stderr entries are never chosen
    because they measure the metric's uncertainty, not the model.
    """
    numeric = {
        name: float(value)
        for name, value in task_metrics.items()
        if isinstance(value, (int, float)) and not isinstance(value, bool) and not name.endswith("_stderr")
    }
    for name in PRIMARY_METRICS:
        if name in numeric:
            return name, numeric[name]
    for name, value in numeric.items():
        return name, value
    return None


def task_scores(record: Mapping[str, Any]) -> dict[str, tuple[str, float]]:
    """Each task's primary (metric name, value) in a record; tasks with no numeric metric are
    omitted."""
    scores = {}
    for task, task_metrics in (record.get("metrics") or {}).items():
        chosen = primary_metric(task_metrics or {})
        if chosen is not None:
            scores[task] = chosen
    return scores


def record_score(record: Mapping[str, Any], tasks: Sequence[str]) -> float:
    """Mean primary metric over `tasks`; NaN if the record lacks any of them, so that points
    evaluated on a different task set never enter a curve."""
    scores = task_scores(record)
    if not tasks or any(task not in scores for task in tasks):
        return math.nan
    return float(np.mean([scores[task][1] for task in tasks]))


def baseline_records(records: Iterable[Mapping[str, Any]]) -> list[Mapping[str, Any]]:
    """The clean (p = 0) records; a sweep normally has exactly one."""
    return [r for r in records if r.get("baseline")]


def baseline_tasks(records: Sequence[Mapping[str, Any]]) -> list[str]:
    """Tasks scored in every baseline record, sorted; they define the score of every point.

    Raises ValueError when there is no baseline, since no relative change exists without one.
    """
    baselines = baseline_records(records)
    if not baselines:
        raise ValueError('no baseline record ("baseline": true) in the results')
    common = set(task_scores(baselines[0]))
    for record in baselines[1:]:
        common &= set(task_scores(record))
    return sorted(common)


def baseline_score(records: Sequence[Mapping[str, Any]], tasks: Sequence[str]) -> float:
    """Mean score of the baseline records (several clean runs are averaged)."""
    baselines = baseline_records(records)
    if not baselines:
        raise ValueError('no baseline record ("baseline": true) in the results')
    return float(np.mean([record_score(r, tasks) for r in baselines]))


def relative_change(baseline: float, faulty: float | np.ndarray) -> float | np.ndarray:
    """(baseline - faulty) / baseline: the fraction of clean accuracy lost to faults.

    NaN when the baseline is zero, because a model with no accuracy cannot lose a fraction.
    """
    faulty = np.asarray(faulty, dtype=float)
    change = np.full(faulty.shape, math.nan) if baseline == 0 or not math.isfinite(baseline) else (baseline - faulty) / baseline
    return float(change) if change.ndim == 0 else change


# --------------------------------------------------------------------------- intervals

BOOTSTRAP_REPLICATES = 2000
"""Replicates of the two-level bootstrap; enough that the 2.5/97.5 percentiles move by well
under the interval width between generator seeds."""
BOOTSTRAP_SEED = 20240521
"""Fixed generator seed: the same results file always gives the same report."""
PROPORTION_METRICS = frozenset(PRIMARY_METRICS)
"""Metrics that are a fraction of documents answered correctly, so Binomial(n, value)/n is
their sampling distribution; other metrics (perplexities) are not redrawn."""


@dataclass(frozen=True)
class SeedStats:
    """An estimate over seeds with its 95% interval from the two-level bootstrap.

    `mean` is the plain estimate (seed mean, or the statistic of the seed-mean curve), `n` the
    number of seeds that entered it. The interval is NaN when nothing varies: one seed of a
    metric whose document count is unknown. With one seed but a known document count, the
    interval covers only which documents were asked, not which fault map was drawn.
    """

    mean: float
    ci_low: float
    ci_high: float
    n: int

    @property
    def half_width(self) -> float:
        """Half the interval's width (NaN without an interval); the interval need not be
        symmetric about the mean, since it respects the metric's bounds."""
        return (self.ci_high - self.ci_low) / 2


def mean_only(values: Iterable[float]) -> SeedStats:
    """The finite values' mean with no interval: for quantities such as injected counts, whose
    spread over seeds is reported as data, not as uncertainty of a score."""
    arr = np.asarray([v for v in values if v is not None], dtype=float)
    arr = arr[np.isfinite(arr)]
    mean = float(arr.mean()) if arr.size else math.nan
    return SeedStats(mean, math.nan, math.nan, int(arr.size))


@dataclass(frozen=True)
class Sampling:
    """What the bootstrap needs to redraw scores: the scored tasks, each task's number of
    documents (0 where the metric is not a proportion or the count is unknown, so that task is
    held at its observed value), and the baseline's per-task values."""

    tasks: tuple[str, ...]
    sizes: np.ndarray
    base_values: np.ndarray

    @property
    def bounded(self) -> bool:
        """Whether every task is a redrawn proportion, so scores lie in [0, 1]."""
        return bool(self.sizes.size) and bool((self.sizes > 0).all())


def task_sizes(records: Sequence[Mapping[str, Any]], tasks: Sequence[str]) -> dict[str, int]:
    """Documents per task: the recorded ``samples`` count, else inferred from a proportion and
    its standard error (lm-eval's stderr of a mean of 0/1 values is sqrt(v(1-v)/(n-1))), taking
    the most frequent inference over records, since n is fixed within a sweep. 0 = unknown."""
    sizes: dict[str, int] = {}
    for task in tasks:
        recorded = [int(n) for r in records if (n := (r.get("samples") or {}).get(task))]
        if recorded:
            sizes[task] = max(set(recorded), key=recorded.count)
            continue
        inferred = [n for r in records if (n := _inferred_size(r, task))]
        sizes[task] = max(set(inferred), key=inferred.count) if inferred else 0
    return sizes


def _inferred_size(record: Mapping[str, Any], task: str) -> int | None:
    """n from a proportion's value and stderr; None when either is missing or degenerate."""
    task_metrics = (record.get("metrics") or {}).get(task) or {}
    chosen = primary_metric(task_metrics)
    if chosen is None or chosen[0] not in PROPORTION_METRICS:
        return None
    value, stderr = chosen[1], task_metrics.get(f"{chosen[0]}_stderr")
    if not isinstance(stderr, (int, float)) or not stderr > 0 or not 0 < value < 1:
        return None
    return round(value * (1 - value) / stderr**2 + 1)


def sampling_of(records: Sequence[Mapping[str, Any]], tasks: Sequence[str]) -> Sampling:
    """The `Sampling` of a sweep: a task is redrawn only if its primary metric is a proportion
    in every baseline record and its document count is known."""
    sizes = task_sizes(records, tasks)
    baselines = baseline_records(records)
    redrawn = []
    for task in tasks:
        names = {task_scores(b)[task][0] for b in baselines}
        redrawn.append(sizes[task] if names <= PROPORTION_METRICS else 0)
    base_values = np.array([np.mean([task_scores(b)[task][1] for b in baselines]) for task in tasks], dtype=float)
    return Sampling(tuple(tasks), np.array(redrawn, dtype=int), base_values)


def _redraw(values: np.ndarray, sizes: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Binomial(n, v)/n for each per-task proportion v (last axis = tasks); tasks with n = 0
    keep their value and NaN stays NaN."""
    n = np.broadcast_to(sizes, values.shape)
    finite = np.isfinite(values)
    probability = np.where(finite & (n > 0), np.clip(np.nan_to_num(values), 0.0, 1.0), 0.0)
    drawn = rng.binomial(np.maximum(n, 1), probability) / np.maximum(n, 1)
    return np.where(finite & (n > 0), drawn, values)


def bootstrap_scores(values: np.ndarray, sampling: Sampling, rng: np.random.Generator, reps: int = BOOTSTRAP_REPLICATES) -> np.ndarray:
    """Replicates of the seed-mean score curve, shape (reps, grid).

    `values` is (seeds, grid, tasks), NaN where a seed lacks a point. Level one resamples the
    seeds with replacement (which fault maps were drawn); level two redraws every resampled
    seed's per-task accuracy from Binomial(n, acc)/n (which documents were asked). A seed is
    resampled as a whole across the grid, keeping the pairing of its points.
    """
    n_seeds = values.shape[0]
    picked = values[rng.integers(0, n_seeds, size=(reps, n_seeds))]
    per_seed = _redraw(picked, sampling.sizes, rng).mean(axis=-1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # a grid point no resampled seed reached
        return np.nanmean(per_seed, axis=1)


def bootstrap_baseline(sampling: Sampling, rng: np.random.Generator, reps: int = BOOTSTRAP_REPLICATES) -> np.ndarray:
    """Replicates of the baseline score: the clean run has no fault map, only documents."""
    return _redraw(np.broadcast_to(sampling.base_values, (reps, len(sampling.tasks))), sampling.sizes, rng).mean(axis=-1)


def relchange_bounds(baseline: float, sampling: Sampling) -> tuple[float, float]:
    """What (baseline - faulty) / baseline can be when scores lie in [0, 1]: from
    1 - 1/baseline (faulty = 1) to 1 (faulty = 0); unbounded for unbounded metrics."""
    if not sampling.bounded or not baseline > 0:
        return -math.inf, math.inf
    return 1 - 1 / baseline, 1.0


def percentile_interval(
    replicates: np.ndarray,
    estimate: float,
    n: int,
    bounds: tuple[float, float] = (-math.inf, math.inf),
    *,
    varies: bool = True,
) -> SeedStats:
    """The 2.5/97.5 percentiles of the finite replicates, clipped to `bounds`, the values the
    statistic can take. NaN when nothing was resampled (`varies` false) or nothing is finite."""
    finite = replicates[np.isfinite(replicates)]
    if not varies or finite.size < 2 or not math.isfinite(estimate):
        return SeedStats(estimate, math.nan, math.nan, n)
    low, high = np.clip(np.percentile(finite, [2.5, 97.5]), *bounds)
    return SeedStats(estimate, float(low), float(high), n)


def _rng() -> np.random.Generator:
    return np.random.default_rng(BOOTSTRAP_SEED)


# --------------------------------------------------------------------------- AWRCL and thresholds


def grid_weights(x: Sequence[float] | np.ndarray, weighting: Weighting = "uniform") -> np.ndarray:
    """Weights w_i of the AWRCL average over grid positions `x` (p, or an injected count).

    The paper leaves w_i unspecified, so three are offered:

    * ``"uniform"``: w_i = 1. Every grid point counts the same; on a log-uniform grid this is
      the plain mean the paper's plots suggest.
    * ``"log_p"``: trapezoid weights in log10 x, w_i = (l_{i+1} - l_{i-1}) / 2 with half
      intervals at the ends, i.e. AWRCL becomes the mean height of the curve over the log axis;
      it stops a densely sampled region from dominating. Points with x <= 0 have no position on
      a log axis and get weight 0.
    * ``"p"``: w_i = x_i. Emphasises high rates, where faults are actually frequent.

    `x` must be sorted ascending.
    """
    x = np.asarray(x, dtype=float)
    if weighting == "uniform":
        return np.ones_like(x)
    if weighting == "p":
        return np.where(x > 0, x, 0.0)
    if weighting == "log_p":
        weights = np.zeros_like(x)
        positive = np.flatnonzero(x > 0)
        logs = np.log10(x[positive])
        if logs.size > 1:
            edges = np.concatenate(([logs[0]], (logs[1:] + logs[:-1]) / 2, [logs[-1]]))
            weights[positive] = np.diff(edges)
        return weights
    raise ValueError(f"unknown weighting {weighting!r}; choose one of {WEIGHTINGS}")


def awrcl(
    x: Sequence[float] | np.ndarray,
    relchange: Sequence[float] | np.ndarray,
    weighting: Weighting = "uniform",
) -> float:
    """Average Weighted Relative Change Loss: sum_i w_i r_i / sum_i w_i over the grid.

    One number for how fragile a part is across all fault rates. Points whose relative change
    is NaN are dropped first. A single point's AWRCL is its own relative change under any
    weighting (there is nothing to average); NaN when all weights are zero or nothing is left.
    """
    xs = np.asarray(x, dtype=float)
    r = np.asarray(relchange, dtype=float)
    keep = np.isfinite(r) & ~np.isnan(xs)
    xs, r = xs[keep], r[keep]
    order = np.argsort(xs, kind="stable")
    xs, r = xs[order], r[order]
    if r.size == 0:
        return math.nan
    if r.size == 1:
        return float(r[0])
    w = grid_weights(xs, weighting)
    total = w.sum()
    if total <= 0:
        return math.nan
    return float((w * r).sum() / total)


def threshold_crossing(
    x: Sequence[float] | np.ndarray,
    relchange: Sequence[float] | np.ndarray,
    fraction: float = 0.5,
) -> float | None:
    """Smallest x at which accuracy has first dropped by `fraction` of the baseline.

    Walks the grid upward and stops at the first point with relative change >= fraction. The
    crossing is placed by linear interpolation in log10 x between that point and the one
    before it (whose relative change is below the level). If the very first grid point has
    already crossed, the answer is that x: it is only an upper bound, because nothing below
    the grid was measured. None if no point crosses. Points with x <= 0 (no log position) or
    NaN relative change are ignored.
    """
    xs = np.asarray(x, dtype=float)
    r = np.asarray(relchange, dtype=float)
    keep = (xs > 0) & np.isfinite(r)
    xs, r = xs[keep], r[keep]
    order = np.argsort(xs, kind="stable")
    xs, r = xs[order], r[order]
    crossed = np.flatnonzero(r >= fraction)
    if crossed.size == 0:
        return None
    i = int(crossed[0])
    if i == 0:
        return float(xs[0])
    lo, hi = math.log10(xs[i - 1]), math.log10(xs[i])
    t = (fraction - r[i - 1]) / (r[i] - r[i - 1])
    return float(10 ** (lo + t * (hi - lo)))


# --------------------------------------------------------------------------- series


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
    baseline's tasks (see the module notes). Points that score NaN stay in `Series.points`
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
    rng = _rng()
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


# --------------------------------------------------------------------------- summaries and rankings


@dataclass(frozen=True)
class SeriesSummary:
    """The headline numbers of one series (see the module notes for how seeds enter)."""

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
    rng = _rng()
    scores = bootstrap_scores(series.value_cube(), series.sampling, rng)
    base = bootstrap_baseline(series.sampling, rng)[:, None]
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(base != 0, (base - scores) / base, math.nan)


def awrcl_rows(x: Sequence[float] | np.ndarray, relchange: np.ndarray, weighting: Weighting = "uniform") -> np.ndarray:
    """`awrcl` of every row of a (rows, grid) array over the same grid `x`.

    Rows without NaN share one weight vector, so they are one matrix product; the few rows
    with a missing grid point (a resample without any seed there) fall back to `awrcl`.
    """
    x = np.asarray(x, dtype=float)
    out = np.full(relchange.shape[0], math.nan)
    complete = np.isfinite(relchange).all(axis=1)
    keep = ~np.isnan(x)
    order = np.argsort(x[keep], kind="stable")
    xs, rows = x[keep][order], relchange[complete][:, keep][:, order]
    if xs.size == 1:
        out[complete] = rows[:, 0]
    elif xs.size > 1 and (total := grid_weights(xs, weighting).sum()) > 0:
        out[complete] = rows @ grid_weights(xs, weighting) / total
    for i in np.flatnonzero(~complete):
        out[i] = awrcl(x, relchange[i], weighting)
    return out


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


def layer_sort_key(label: str) -> tuple[int, str]:
    """Sort layer-group labels like "0-3", "4-7", "12-15" numerically, "all" last."""
    match = re.match(r"\d+", label)
    return (int(match.group()) if match else 1 << 30, label)
