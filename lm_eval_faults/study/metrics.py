"""A record's score and its relative change to the baseline: what every curve, interval and ranking is built on.

The sweep analysis goes from `results.jsonl` records (`records`) to scores (here), series over
the fault-rate grid (`series`) with bootstrap intervals (`bootstrap`), AWRCL and 50%-drop
thresholds (`awrcl`) and rankings (`rankings`).

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

import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np

PRIMARY_METRICS: tuple[str, ...] = ("acc", "acc_norm", "exact_match")


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
