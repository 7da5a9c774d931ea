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
* Headline values (AWRCL, thresholds, rankings) use the seed-mean curve. The AWRCL interval comes
  from per-seed AWRCLs computed on the same x grid, so its mean equals the headline value when
  every seed covers the whole grid. Thresholds get no interval: a seed that never crosses has no
  threshold, so a per-seed average is ill-defined.
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
RANK_KEYS: tuple[str, ...] = ("awrcl_p", "awrcl_count", "threshold_p", "threshold_count")
ALL_LAYERS = "all"
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
        if isinstance(value, (int, float))
        and not isinstance(value, bool)
        and not name.endswith("_stderr")
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
        raise ValueError("no baseline record (\"baseline\": true) in the results")
    common = set(task_scores(baselines[0]))
    for record in baselines[1:]:
        common &= set(task_scores(record))
    return sorted(common)


def baseline_score(records: Sequence[Mapping[str, Any]], tasks: Sequence[str]) -> float:
    """Mean score of the baseline records (several clean runs are averaged)."""
    baselines = baseline_records(records)
    if not baselines:
        raise ValueError("no baseline record (\"baseline\": true) in the results")
    return float(np.mean([record_score(r, tasks) for r in baselines]))


def relative_change(baseline: float, faulty: float | np.ndarray) -> float | np.ndarray:
    """(baseline - faulty) / baseline: the fraction of clean accuracy lost to faults.

    NaN when the baseline is zero, because a model with no accuracy cannot lose a fraction.
    """
    faulty = np.asarray(faulty, dtype=float)
    if baseline == 0 or not math.isfinite(baseline):
        change = np.full(faulty.shape, math.nan)
    else:
        change = (baseline - faulty) / baseline
    return float(change) if change.ndim == 0 else change


# --------------------------------------------------------------------------- seed statistics

# Two-sided 95% Student-t critical values t_{0.975, df} for df = 1..30.
_T975 = (
    12.706205, 4.302653, 3.182446, 2.776445, 2.570582, 2.446912, 2.364624, 2.306004,
    2.262157, 2.228139, 2.200985, 2.178813, 2.160369, 2.144787, 2.131450, 2.119905,
    2.109816, 2.100922, 2.093024, 2.085963, 2.079614, 2.073873, 2.068658, 2.063899,
    2.059539, 2.055529, 2.051831, 2.048407, 2.045230, 2.042272,
)
_Z975 = 1.959963984540054


def t_critical_95(df: int) -> float:
    """Two-sided 95% Student-t critical value, without scipy.

    Tabulated up to 30 degrees of freedom; beyond that the Cornish-Fisher expansion around
    the normal quantile, which agrees with the exact value to better than 1e-7 there.
    """
    if df < 1:
        raise ValueError(f"degrees of freedom must be >= 1, got {df}")
    if df <= len(_T975):
        return _T975[df - 1]
    z = _Z975
    g1 = (z**3 + z) / 4
    g2 = (5 * z**5 + 16 * z**3 + 3 * z) / 96
    g3 = (3 * z**7 + 19 * z**5 + 17 * z**3 - 15 * z) / 384
    g4 = (79 * z**9 + 776 * z**7 + 1482 * z**5 - 1920 * z**3 - 945 * z) / 92160
    return z + g1 / df + g2 / df**2 + g3 / df**3 + g4 / df**4


@dataclass(frozen=True)
class SeedStats:
    """Mean of a quantity over seeds with its 95% t-interval.

    `n` counts the finite values used. With n = 1 the interval is NaN (one seed says nothing
    about seed-to-seed spread); with n = 0 everything is NaN.
    """

    mean: float
    ci_low: float
    ci_high: float
    n: int

    @property
    def half_width(self) -> float:
        """Distance from the mean to either interval end (NaN without an interval)."""
        return self.ci_high - self.mean


def seed_stats(values: Iterable[float]) -> SeedStats:
    """Mean and 95% confidence interval (Student t, sample std with ddof=1); NaNs are ignored
    because a NaN marks a seed that could not be scored, not a value."""
    arr = np.asarray([v for v in values if v is not None], dtype=float)
    arr = arr[np.isfinite(arr)]
    n = int(arr.size)
    if n == 0:
        return SeedStats(math.nan, math.nan, math.nan, 0)
    mean = float(arr.mean())
    if n == 1:
        return SeedStats(mean, math.nan, math.nan, 1)
    half = t_critical_95(n - 1) * float(arr.std(ddof=1)) / math.sqrt(n)
    return SeedStats(mean, mean - half, mean + half, n)


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
    x = np.asarray(x, dtype=float)
    r = np.asarray(relchange, dtype=float)
    keep = np.isfinite(r) & ~np.isnan(x)
    x, r = x[keep], r[keep]
    order = np.argsort(x, kind="stable")
    x, r = x[order], r[order]
    if r.size == 0:
        return math.nan
    if r.size == 1:
        return float(r[0])
    w = grid_weights(x, weighting)
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
    x = np.asarray(x, dtype=float)
    r = np.asarray(relchange, dtype=float)
    keep = (x > 0) & np.isfinite(r)
    x, r = x[keep], r[keep]
    order = np.argsort(x, kind="stable")
    x, r = x[order], r[order]
    crossed = np.flatnonzero(r >= fraction)
    if crossed.size == 0:
        return None
    i = int(crossed[0])
    if i == 0:
        return float(x[0])
    lo, hi = math.log10(x[i - 1]), math.log10(x[i])
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

    @property
    def label(self) -> str:
        """Short human-readable name, e.g. ``bitflip/weights attention layers=all``."""
        return f"{self.fault}/{self.site} {self.target} layers={self.layers}"


@dataclass(frozen=True)
class Point:
    """One faulty record reduced to the numbers the analysis needs."""

    point_id: str
    p: float
    seed: int
    score: float
    relchange: float
    injected: float


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


def series_key(record: Mapping[str, Any]) -> SeriesKey:
    """The series a record belongs to."""
    return SeriesKey(
        fault=str(record.get("fault")),
        site=str(record.get("site")),
        target=str(record.get("target")),
        layers=str(record.get("layers", ALL_LAYERS)),
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
            )
        )
    series = []
    for key in sorted(grouped, key=lambda k: (k.fault, k.site, k.target, layer_sort_key(k.layers))):
        points = tuple(sorted(grouped[key], key=lambda pt: (pt.p, pt.seed)))
        series.append(Series(key=key, points=points, grid=_aggregate_grid(points)))
    return base, series


def _aggregate_grid(points: Sequence[Point]) -> tuple[GridPoint, ...]:
    """Seed statistics at each distinct p (points must be sorted by p)."""
    by_p: dict[float, list[Point]] = defaultdict(list)
    for pt in points:
        by_p[pt.p].append(pt)
    grid = []
    for p, group in by_p.items():
        scored = [pt for pt in group if math.isfinite(pt.score)]
        grid.append(
            GridPoint(
                p=p,
                score=seed_stats(pt.score for pt in scored),
                relchange=seed_stats(pt.relchange for pt in scored),
                injected=seed_stats(pt.injected for pt in group),
            )
        )
    return tuple(grid)


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


def summarize_series(
    series: Series, *, weighting: Weighting = "uniform", fraction: float = 0.5
) -> SeriesSummary:
    """AWRCL against p and against the seed-mean injected count, and the `fraction`-drop
    thresholds on the seed-mean curve."""
    p, counts = series.p, series.mean_injected
    per_seed_p, per_seed_count = [], []
    for seed in series.seeds:
        r = _seed_relchange(series, seed)
        per_seed_p.append(awrcl(p, r, weighting))
        per_seed_count.append(awrcl(counts, r, weighting))
    return SeriesSummary(
        key=series.key,
        awrcl_p=seed_stats(per_seed_p),
        awrcl_count=seed_stats(per_seed_count),
        threshold_p=threshold_crossing(p, series.mean_relchange, fraction),
        threshold_count=threshold_crossing(counts, series.mean_relchange, fraction),
        n_seeds=len(series.seeds),
    )


def _seed_relchange(series: Series, seed: int) -> np.ndarray:
    """One seed's relative change on the series grid; NaN where that seed has no point."""
    by_p = {pt.p: pt.relchange for pt in series.points if pt.seed == seed}
    return np.array([by_p.get(g.p, math.nan) for g in series.grid])


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
        missing = value is None or not math.isfinite(value)
        signed = 0.0 if missing else (-value if descending else value)
        return missing, signed, getattr(s.key, label)

    ordered = sorted(summaries, key=sort_key)
    return tuple(
        RankRow(rank=i + 1, label=getattr(s.key, label), value=rank_value(s, by))
        for i, s in enumerate(ordered)
    )


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
        families[("component", f"{k.fault}/{k.site}, layers={k.layers}", "target")].append(s)
        if k.layers != ALL_LAYERS:
            families[("layer group", f"{k.fault}/{k.site}, target={k.target}", "layers")].append(s)
    return [
        Ranking(title=title, kind=kind, by=by, rows=rank(members, by, label))
        for (kind, title, label), members in sorted(families.items())
        if len(members) > 1
    ]


def layer_sort_key(label: str) -> tuple[int, str]:
    """Sort layer-group labels like "0-3", "4-7", "12-15" numerically, "all" last."""
    match = re.match(r"\d+", label)
    return (int(match.group()) if match else 1 << 30, label)
