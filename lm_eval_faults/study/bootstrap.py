"""The two-level parametric bootstrap: 95% intervals over fault maps (seeds) and documents (Binomial redraws).

Why this and not a Student-t interval: see the conventions in `metrics`; coverage is measured in
docs/sweep_intervals.md.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from lm_eval_faults.study.metrics import PRIMARY_METRICS, baseline_records, primary_metric, task_scores

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


def bootstrap_rng() -> np.random.Generator:
    """A generator seeded with `BOOTSTRAP_SEED`, new for each statistic, so each report number is reproducible on its own."""
    return np.random.default_rng(BOOTSTRAP_SEED)
