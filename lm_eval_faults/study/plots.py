"""Figures of a fault sweep, drawn from the seed-aggregated series of `metrics.build_series`.

Uses matplotlib's object API on an Agg canvas rather than pyplot, so importing this module
never changes the process-wide backend and works without a display. Every function writes one
PNG and returns its path.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from lm_eval_faults.study.metrics import (
    GridPoint,
    SeedStats,
    Series,
    SeriesKey,
    layer_sort_key,
)

if TYPE_CHECKING:
    from lm_eval_faults.study.pareto import Tolerance

_KEY_FIELDS = ("fault", "site", "target", "layers", "protection")

ACCURACY_LABEL = "accuracy (higher is better)"
"""Y label of score plots: says which way is good, since the relative-change plots run the other way."""
RELCHANGE_LABEL = "relative accuracy loss (1 = all lost, 0 = none, < 0 = gain)"
"""Y label of relative-change plots: (baseline - faulty) / baseline, so up means accuracy lost."""

FLIP_LABEL = "answer flips vs clean (0 = none, 1 = all)"
"""Y label of the flip-rate panel: the share of answers the faults changed, so up means damage."""
KL_LABEL = "KL(clean ‖ faulted) over choices, nats"
"""Y label of the KL panel (log scale): 0 means the faulted model's choice distribution is the clean one."""
FLIP_BAND = "band: 95% interval (seeds, documents)"
KL_BAND = "band: min to max over seeds; KL = 0 not drawn (log axis)"

SCORE_LIMITS = (0.0, 1.0)
"""Scores are accuracies or exact-match rates."""
RELCHANGE_LIMITS = (-math.inf, 1.0)
"""A score cannot fall below 0, so the relative change cannot exceed 1."""


def series_labels(keys: Sequence[SeriesKey]) -> list[str]:
    """Legend labels naming only what differs between the plotted series, so a per-component
    figure reads "attention", "mlp" rather than repeating the fault and site on every line."""
    varying = [f for f in _KEY_FIELDS if len({getattr(k, f) for k in keys}) > 1] or ["target"]
    return [" ".join(getattr(k, f) if f == "target" else f"{f}={getattr(k, f)}" for f in varying) for k in keys]


def plot_accuracy_vs_p(
    series: Sequence[Series],
    baseline: float,
    out_path: str | Path,
    *,
    chance: float | None = None,
    title: str | None = None,
) -> Path:
    """Score (mean primary metric over tasks) against fault rate, one line per series, with the
    clean score as a horizontal reference and, if given, the chance level below it."""
    fig, ax = _new_axes()
    for s, label in zip(series, series_labels([s.key for s in series]), strict=True):
        _mean_with_band(ax, s.p, [g.score for g in s.grid], label, limits=SCORE_LIMITS)
    ax.axhline(baseline, color="black", linestyle="--", linewidth=1, label="baseline (p=0)")
    if chance is not None:
        ax.axhline(chance, color="grey", linestyle=":", linewidth=1, label="chance")
    ax.set_xscale("log")
    ax.set_xlabel("fault rate p")
    ax.set_ylabel(ACCURACY_LABEL)
    return _save(fig, ax, out_path, title)


def plot_relchange_vs_p(
    series: Sequence[Series],
    out_path: str | Path,
    *,
    fraction: float = 0.5,
    title: str | None = None,
) -> Path:
    """Relative accuracy change against fault rate, with the threshold level marked so the
    crossings reported in the tables can be read off the figure."""
    fig, ax = _new_axes()
    for s, label in zip(series, series_labels([s.key for s in series]), strict=True):
        _mean_with_band(ax, s.p, [g.relchange for g in s.grid], label, limits=RELCHANGE_LIMITS)
    _threshold_line(ax, fraction)
    ax.set_xscale("log")
    ax.set_xlabel("fault rate p")
    ax.set_ylabel(RELCHANGE_LABEL)
    return _save(fig, ax, out_path, title)


def plot_relchange_vs_count(
    series: Sequence[Series],
    out_path: str | Path,
    *,
    fraction: float = 0.5,
    count_label: str = "injected faults (seed mean)",
    title: str | None = None,
) -> Path:
    """Relative accuracy change against the number of faults actually injected.

    Parts differ in size, so at equal p a large part receives more faults; this view compares
    parts per fault rather than per rate. Grid points with no injected fault have no place on
    the log axis and are not drawn.
    """
    fig, ax = _new_axes()
    for s, label in zip(series, series_labels([s.key for s in series]), strict=True):
        _mean_with_band(ax, s.mean_injected, [g.relchange for g in s.grid], label, limits=RELCHANGE_LIMITS)
    _threshold_line(ax, fraction)
    ax.set_xscale("log")
    ax.set_xlabel(count_label)
    ax.set_ylabel(RELCHANGE_LABEL)
    return _save(fig, ax, out_path, title)


def plot_layer_bars(
    series: Sequence[Series],
    p: float,
    out_path: str | Path,
    *,
    title: str | None = None,
) -> Path:
    """Relative change of each layer group at one fault rate, as bars with 95% interval error bars.

    Raises ValueError when no series was run at `p` (matched with a relative tolerance of
    1e-6, since p values round-trip through JSON).
    """
    bars = [(s, g) for s in series if (g := grid_point_at(s, p)) is not None]
    if not bars:
        raise ValueError(f"no series has a grid point at p={p:g}")
    bars.sort(key=lambda sg: (layer_sort_key(sg[0].key.layers), sg[0].key))
    labels = series_labels([s.key for s, _ in bars])
    stats = [g.relchange for _, g in bars]
    fig, ax = _new_axes()
    positions = np.arange(len(bars))
    ax.bar(
        positions,
        [st.mean for st in stats],
        yerr=_yerr(stats),
        capsize=4,
        color="tab:blue",
    )
    crowded = len(bars) > 6
    ax.set_xticks(positions, labels, rotation=30 if crowded else 0, ha="right" if crowded else "center")
    ax.axhline(0, color="black", linewidth=0.8)
    ax.set_axisbelow(True)
    ax.set_xlabel("layer group")
    ax.set_ylabel(f"{RELCHANGE_LABEL}, p={p:g}")
    return _save(fig, ax, out_path, title, legend=False)


@dataclass(frozen=True)
class DriftCurve:
    """One series' drift from the clean model at each fault rate it ran, aggregated over seeds.

    `flip_rate` carries a 95% interval; `kl` carries the min and max over seeds as its "interval",
    since a KL is not a proportion the bootstrap could redraw."""

    key: SeriesKey
    p: np.ndarray
    flip_rate: tuple[SeedStats, ...]
    kl: tuple[SeedStats, ...]

    def has_flips(self) -> bool:
        """Whether any grid point has a flip rate (tasks with choices or generated text)."""
        return any(math.isfinite(st.mean) for st in self.flip_rate)

    def has_kl(self) -> bool:
        """Whether any grid point has a KL (tasks with choices)."""
        return any(math.isfinite(st.mean) for st in self.kl)


def plot_drift_vs_p(
    series: Sequence[Series],
    curves: Sequence[DriftCurve],
    baseline: float,
    out_path: str | Path,
    *,
    chance: float | None = None,
    title: str | None = None,
) -> Path:
    """Score, then drift from the clean model, against fault rate; see `drift_figure`."""
    fig = drift_figure(series, curves, baseline, chance=chance, title=title)
    return _write(fig, out_path)


def drift_figure(
    series: Sequence[Series],
    curves: Sequence[DriftCurve],
    baseline: float,
    *,
    chance: float | None = None,
    title: str | None = None,
) -> Figure:
    """Panels sharing the p axis: the score on top, the answer-flip rate and the mean KL (log
    scale) under it, each present when some curve has it. Drift moves where the score cannot
    (a model at chance level), so reading them together tells "no effect" from "no signal".
    A series keeps its colour in every panel; the legend is on the score panel."""
    panels = 1 + any(c.has_flips() for c in curves) + any(c.has_kl() for c in curves)
    fig = Figure(figsize=(7, 2.8 * panels + 0.6), layout="constrained")
    FigureCanvasAgg(fig)
    axes = list(np.atleast_1d(fig.subplots(panels, 1, sharex=True)))
    colors = {s.key: f"C{i}" for i, s in enumerate(series)}
    colors.update({c.key: f"C{len(colors) + i}" for i, c in enumerate(c for c in curves if c.key not in colors)})
    score_ax = axes.pop(0)
    for s, label in zip(series, series_labels([s.key for s in series]), strict=True):
        _mean_with_band(score_ax, s.p, [g.score for g in s.grid], label, limits=SCORE_LIMITS, color=colors[s.key])
    score_ax.axhline(baseline, color="black", linestyle="--", linewidth=1, label="baseline (p=0)")
    if chance is not None:
        score_ax.axhline(chance, color="grey", linestyle=":", linewidth=1, label="chance")
    score_ax.set_ylabel(ACCURACY_LABEL)
    if any(c.has_flips() for c in curves):
        _drift_panel(axes.pop(0), curves, colors, "flip_rate", FLIP_LABEL, FLIP_BAND)
    if any(c.has_kl() for c in curves):
        _drift_panel(axes.pop(0), curves, colors, "kl", KL_LABEL, KL_BAND, log=True)
    all_axes = fig.axes
    all_axes[0].set_xscale("log")
    all_axes[-1].set_xlabel("fault rate p")
    for ax in all_axes:
        ax.grid(True, which="major", alpha=0.3)
    if title:
        all_axes[0].set_title(title)
    if score_ax.get_legend_handles_labels()[0]:
        score_ax.legend(fontsize="small")
    return fig


def _drift_panel(
    ax: Axes,
    curves: Sequence[DriftCurve],
    colors: dict[SeriesKey, str],
    quantity: str,
    ylabel: str,
    band: str,
    *,
    log: bool = False,
) -> None:
    """One drift quantity of every curve, with its band; on a log axis only positive values, and
    on a linear one when every value is 0 (a sweep whose faults never moved the choices)."""
    log = log and any(st.mean > 0 for curve in curves for st in getattr(curve, quantity))  # all zero: a log axis has no room
    for curve in curves:
        stats: tuple[SeedStats, ...] = getattr(curve, quantity)
        limits = (0.0, math.inf) if log else (0.0, 1.0)
        _mean_with_band(ax, curve.p, stats, "", limits=limits, color=colors[curve.key], positive=log)
    if log:
        ax.set_yscale("log")
    else:
        ax.set_ylim(bottom=-0.02)
    ax.set_ylabel(ylabel)
    ax.text(0.01, 0.97, band, transform=ax.transAxes, fontsize="x-small", va="top", color="dimgrey")


def grid_point_at(series: Series, p: float) -> GridPoint | None:
    """The grid point of `series` at fault rate `p`, or None if that rate was not run."""
    for g in series.grid:
        if math.isclose(g.p, p, rel_tol=1e-6):
            return g
    return None


def plot_pareto(rows: Sequence[Tolerance], out_path: str | Path, *, tolerance: float, title: str | None = None) -> Path:
    """Tolerated fault rate against storage overhead, one marker per scheme, frontier joined."""
    fig, ax = _new_axes()
    markers = {"": "o", "≥": "^", "<": "v"}
    seen: dict[float, int] = {}
    for row in rows:
        ax.scatter(100 * row.overhead, row.tolerated_p, marker=markers[row.bound], s=40, zorder=3)
        stacked = seen.get(row.tolerated_p, 0)  # labels at one height step down, so they don't overprint
        seen[row.tolerated_p] = stacked + 1
        offset = (5, 4 - 9 * stacked)
        ax.annotate(row.protection, (100 * row.overhead, row.tolerated_p), textcoords="offset points", xytext=offset, fontsize="x-small")
    frontier = [r for r in rows if r.frontier]
    ax.step(
        [100 * r.overhead for r in frontier],
        [r.tolerated_p for r in frontier],
        where="post",
        color="black",
        alpha=0.4,
        label="Pareto frontier",
    )
    ax.set_yscale("log")
    ax.set_xscale("symlog", linthresh=1.0)
    ax.set_xlabel("storage overhead (% of the protected weights' bits)")
    ax.set_ylabel(f"highest p within {tolerance:.0%} of clean")
    ax.plot([], [], "^", color="grey", label="held at every p of the grid (≥)")
    ax.plot([], [], "v", color="grey", label="failed at the first p (<)")
    return _save(fig, ax, out_path, title)


def _new_axes() -> tuple[Figure, Axes]:
    fig = Figure(figsize=(7, 4.5), layout="constrained")
    FigureCanvasAgg(fig)
    return fig, fig.add_subplot()


def _mean_with_band(
    ax: Axes,
    x: np.ndarray,
    stats: Sequence[SeedStats],
    label: str,
    limits: tuple[float, float] = (-math.inf, math.inf),
    *,
    color: str | None = None,
    positive: bool = False,
) -> None:
    """Seed-mean line with markers and a shaded band where the interval exists.

    The bootstrap intervals already respect the metric's bounds (see `metrics`); clipping to
    `limits` is kept as a guard for results analysed with other intervals. `positive` drops
    values <= 0, which have no place on a log axis.
    """
    x = np.asarray(x, dtype=float)
    mean = np.array([st.mean for st in stats])
    finite = mean[np.isfinite(mean)]
    if finite.size and (finite.min() < limits[0] or finite.max() > limits[1]):
        limits = (-math.inf, math.inf)  # not the metric the limits describe (e.g. a perplexity)
    low = np.clip(np.array([st.ci_low for st in stats]), *limits)
    high = np.clip(np.array([st.ci_high for st in stats]), *limits)
    shown = (x > 0) & np.isfinite(mean) & ((mean > 0) if positive else True)
    (line,) = ax.plot(x[shown], mean[shown], marker="o", markersize=3, label=label or None, color=color)
    band = shown & np.isfinite(low) & np.isfinite(high)
    if band.any():
        ax.fill_between(x[band], low[band], high[band], color=line.get_color(), alpha=0.2)


def _threshold_line(ax: Axes, fraction: float) -> None:
    ax.axhline(fraction, color="red", linestyle=":", linewidth=1, label=f"{fraction:.0%} drop")


def _yerr(stats: Sequence[SeedStats]) -> np.ndarray | None:
    """Asymmetric error-bar lengths, zero where no interval exists (a single seed); None when
    no bar has an interval, so that single-seed charts carry no meaningless zero-length caps."""
    if not any(math.isfinite(st.ci_low) for st in stats):
        return None
    below = [max(st.mean - st.ci_low, 0.0) if math.isfinite(st.ci_low) else 0.0 for st in stats]
    above = [max(st.ci_high - st.mean, 0.0) if math.isfinite(st.ci_high) else 0.0 for st in stats]
    return np.array([below, above])


def _save(fig: Figure, ax: Axes, out_path: str | Path, title: str | None, *, legend: bool = True) -> Path:
    if title:
        ax.set_title(title)
    if legend and ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize="small")
    ax.grid(True, which="major", alpha=0.3)
    return _write(fig, out_path)


def _write(fig: Figure, out_path: str | Path) -> Path:
    """Save `fig` as a PNG, creating its folder."""
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_path, format="png", dpi=120)
    return out_path
