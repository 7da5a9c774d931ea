"""AWRCL and the fraction-drop threshold: one number each for how fragile one relative-change curve is.

Why AWRCL: the average weighted relative change loss of "Specified Backup for Fragile Parts of
LLM" summarises a curve over the whole fault-rate grid; the threshold says where it breaks.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Literal

import numpy as np

Weighting = Literal["uniform", "log_p", "p"]
WEIGHTINGS: tuple[str, ...] = ("uniform", "log_p", "p")


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
