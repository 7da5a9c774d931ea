"""A sweep record's drift from the clean model pooled over its tasks, and each series' drift curve (flip rate, KL)."""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from lm_eval_faults.study import plots
from lm_eval_faults.study.bootstrap import Sampling, SeedStats, bootstrap_rng, bootstrap_scores, percentile_interval
from lm_eval_faults.study.series import Series


@dataclass(frozen=True)
class PointDrift:
    """A record's drift from the clean model, pooled over its tasks.

    `changed` counts answers the faults changed among `compared` samples: a different choice
    for tasks with choices, different generated text for generative ones. `kl` is the mean
    KL(clean ‖ faulted) over the choices, over every finite choice sample of every task."""

    changed: int
    compared: int
    kl: float | None

    @property
    def flip_rate(self) -> float | None:
        """Share of compared answers that changed; None when nothing could be compared."""
        return self.changed / self.compared if self.compared else None


def record_drift(record: Mapping[str, Any]) -> PointDrift | None:
    """The pooled drift of a record; None for a record without `drift` (the baseline, old sweeps)."""
    drift = record.get("drift")
    if not isinstance(drift, Mapping):
        return None
    changed = compared = 0
    kl_sum = kl_weight = 0.0
    for task in drift.values():
        n = int(task.get("matched") or 0)
        answers = task.get("flips") if task.get("flips") is not None else task.get("diverged")
        if answers is not None and n:
            changed, compared = changed + int(answers), compared + n
        finite = n - int(task.get("nonfinite") or 0)
        if isinstance(task.get("mean_kl"), (int, float)) and finite > 0:
            kl_sum, kl_weight = kl_sum + float(task["mean_kl"]) * finite, kl_weight + finite
    return PointDrift(changed, compared, kl_sum / kl_weight if kl_weight else None)


def drift_curve(series: Series, by_id: Mapping[str, Mapping[str, Any]]) -> plots.DriftCurve:
    """A series' flip rate (seed mean, two-level bootstrap interval) and KL (seed mean, min to
    max over seeds) at each of its grid rates."""
    by_p: dict[float, list[PointDrift]] = defaultdict(list)
    for pt in series.points:
        drift = record_drift(by_id.get(pt.point_id, {}))
        if drift is not None:
            by_p[pt.p].append(drift)
    grid = [g.p for g in series.grid]
    return plots.DriftCurve(
        key=series.key,
        p=np.array(grid, dtype=float),
        flip_rate=tuple(flip_rate_stats(by_p.get(p, [])) for p in grid),
        kl=tuple(kl_stats(by_p.get(p, [])) for p in grid),
    )


def flip_rate_stats(drifts: Sequence[PointDrift]) -> SeedStats:
    """Seed-mean flip rate with the accuracy's interval machinery: a flip rate is a proportion of
    the compared documents, so seeds are resampled and each rate redrawn as Binomial(n, rate)/n."""
    rates = [d.flip_rate for d in drifts if d.flip_rate is not None]
    if not rates:
        return SeedStats(math.nan, math.nan, math.nan, 0)
    n = max(d.compared for d in drifts)
    sampling = Sampling(("flips",), np.array([n]), np.array([0.0]))
    values = np.array(rates, dtype=float)[:, None, None]
    replicates = bootstrap_scores(values, sampling, bootstrap_rng())[:, 0]
    return percentile_interval(replicates, float(np.mean(rates)), len(rates), (0.0, 1.0))


def kl_stats(drifts: Sequence[PointDrift]) -> SeedStats:
    """Seed-mean KL with the min and max over seeds in place of an interval (a KL is no
    proportion to redraw); no band with a single seed."""
    values = [d.kl for d in drifts if d.kl is not None]
    if not values:
        return SeedStats(math.nan, math.nan, math.nan, 0)
    if len(values) == 1:
        return SeedStats(values[0], math.nan, math.nan, 1)
    return SeedStats(float(np.mean(values)), min(values), max(values), len(values))
