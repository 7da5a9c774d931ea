"""Figures of a fault sweep, drawn from the seed-aggregated series of `series.build_series`.

Uses matplotlib's object API on an Agg canvas rather than pyplot, so importing this module
never changes the process-wide backend and works without a display. Every function writes one
PNG and returns its path.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.typing import ColorType

from lm_eval_faults.study.bootstrap import SeedStats
from lm_eval_faults.study.series import GridPoint, Series, SeriesKey, layer_sort_key

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
KL_BAND = "band: min to max over seeds"
KL_FLOOR_NOTE = "KL = 0 drawn at the floor {floor:.2g} (▽), a decade under the smallest positive value shown"
"""Said on the KL panel whenever a zero sits on its log axis: a point there is no measured value."""

COLLAPSED = "collapsed"
"""Mark of a grid point where, in some seed, most requests were degenerate or non-finite
(`collapse.is_collapsed`): its score is the tie-break's pick, not the model's answer."""
NONFINITE = "nonfinite"
"""Mark of a grid point where, in some seed, every request was non-finite (all NaN)."""
MARK_STYLES = {
    NONFINITE: {"marker": "X", "color": "darkred", "markersize": 9, "label": "all non-finite (score is the tie-break)"},
    COLLAPSED: {"marker": "x", "color": "red", "markersize": 13, "label": "collapsed (most requests degenerate or non-finite)"},
}
"""How a marked grid point is drawn over its line, and its legend entry; the thin cross is the
larger, so both kinds stay visible where two series are marked at one point."""
GridMarks = Mapping[SeriesKey, Sequence[str | None]]
"""Per series, one mark (`COLLAPSED`, `NONFINITE` or None) per grid point, in `Series.grid` order."""

_DUPLICATE_STYLES = (("--", "s"), (":", "^"), ("-.", "D"), ((0, (1, 3)), "v"))
"""Line style and hollow marker of a series drawn on top of an identical earlier one."""

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
    marks: GridMarks | None = None,
) -> Path:
    """Score (mean primary metric over tasks) against fault rate, one line per series, with the
    clean score as a horizontal reference and, if given, the chance level below it. `marks`
    flags collapsed grid points (see `MARK_STYLES`); identical series are told apart (see
    `_draw_series`)."""
    fig, ax = _new_axes()
    _draw_series(ax, _lines(series, lambda s: (s.p, [g.score for g in s.grid]), marks), SCORE_LIMITS)
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
    marks: GridMarks | None = None,
) -> Path:
    """Relative accuracy change against fault rate, with the threshold level marked so the
    crossings reported in the tables can be read off the figure."""
    fig, ax = _new_axes()
    _draw_series(ax, _lines(series, lambda s: (s.p, [g.relchange for g in s.grid]), marks), RELCHANGE_LIMITS)
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
    marks: GridMarks | None = None,
) -> Path:
    """Relative accuracy change against the number of faults actually injected.

    Parts differ in size, so at equal p a large part receives more faults; this view compares
    parts per fault rather than per rate. Grid points with no injected fault have no place on
    the log axis and are not drawn.
    """
    fig, ax = _new_axes()
    _draw_series(ax, _lines(series, lambda s: (s.mean_injected, [g.relchange for g in s.grid]), marks), RELCHANGE_LIMITS)
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
    marks: GridMarks | None = None,
) -> Path:
    """Relative change of each layer group at one fault rate, as bars with 95% interval error bars,
    a cross on the bar of a collapsed point (`marks`, see `MARK_STYLES`).

    Raises ValueError when no series was run at `p` (matched with a relative tolerance of
    1e-6, since p values round-trip through JSON).
    """
    bars = [(s, i) for s in series if (i := _grid_index(s, p)) is not None]
    if not bars:
        raise ValueError(f"no series has a grid point at p={p:g}")
    bars.sort(key=lambda si: (layer_sort_key(si[0].key.layers), si[0].key))
    labels = series_labels([s.key for s, _ in bars])
    stats = [s.grid[i].relchange for s, i in bars]
    fig, ax = _new_axes()
    positions = np.arange(len(bars))
    ax.bar(
        positions,
        [st.mean for st in stats],
        yerr=_yerr(stats),
        capsize=4,
        color="tab:blue",
    )
    bar_marks = [((marks or {}).get(s.key) or [None] * len(s.grid))[i] for s, i in bars]
    _marks(ax, _Line(positions, stats, "", marks=bar_marks), np.ones(len(bars), dtype=bool), positions, np.array([st.mean for st in stats]))
    crowded = len(bars) > 6
    ax.set_xticks(positions, labels, rotation=30 if crowded else 0, ha="right" if crowded else "center")
    ax.axhline(0, color="black", linewidth=0.8)
    ax.set_axisbelow(True)
    ax.set_xlabel("layer group")
    ax.set_ylabel(f"{RELCHANGE_LABEL}, p={p:g}")
    return _save(fig, ax, out_path, title, legend=any(bar_marks))


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
    marks: GridMarks | None = None,
) -> Path:
    """Score, then drift from the clean model, against fault rate; see `drift_figure`."""
    fig = drift_figure(series, curves, baseline, chance=chance, title=title, marks=marks)
    return _write(fig, out_path)


def drift_figure(
    series: Sequence[Series],
    curves: Sequence[DriftCurve],
    baseline: float,
    *,
    chance: float | None = None,
    title: str | None = None,
    marks: GridMarks | None = None,
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
    _draw_series(score_ax, _lines(series, lambda s: (s.p, [g.score for g in s.grid]), marks, colors), SCORE_LIMITS)
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
    _legend(score_ax)
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
    """One drift quantity of every curve, with its band; on a linear axis when every value is 0
    (a sweep whose faults never moved the choices), else on a log one with zeros (a mean, or a
    seed's minimum that is the band's lower edge) drawn at a floor a decade under the smallest
    positive value, and said so, rather than dropped off the axis. Coinciding curves get the
    score panel's treatment and their own legend here, since these lines carry no labels."""
    stats_of: dict[SeriesKey, tuple[SeedStats, ...]] = {c.key: getattr(c, quantity) for c in curves}
    values = np.array([v for stats in stats_of.values() for st in stats for v in (st.mean, st.ci_low, st.ci_high)], dtype=float)
    positive = values[np.isfinite(values) & (values > 0)]
    floor = float(positive.min()) / 10 if log and positive.size else None  # all zero: a log axis has no room
    lines = [_Line(c.p, stats_of[c.key], "", colors[c.key]) for c in curves]
    named = series_labels([c.key for c in curves])
    coinciding = _draw_series(ax, lines, (0.0, math.inf) if floor else (0.0, 1.0), floor=floor, names=named)
    if floor is not None:
        ax.set_yscale("log")
        if np.any(values[np.isfinite(values)] <= 0):
            band = f"{band}\n{KL_FLOOR_NOTE.format(floor=floor)}"
    else:
        ax.set_ylim(bottom=-0.02)
    ax.set_ylabel(ylabel)
    ax.text(0.01, 0.97, band, transform=ax.transAxes, fontsize="x-small", va="top", color="dimgrey")
    if coinciding:
        _legend(ax, fontsize="x-small", loc="lower right")


def grid_point_at(series: Series, p: float) -> GridPoint | None:
    """The grid point of `series` at fault rate `p`, or None if that rate was not run."""
    i = _grid_index(series, p)
    return None if i is None else series.grid[i]


def _grid_index(series: Series, p: float) -> int | None:
    """Where fault rate `p` sits in `series.grid` (relative tolerance 1e-6), or None."""
    return next((i for i, g in enumerate(series.grid) if math.isclose(g.p, p, rel_tol=1e-6)), None)


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


@dataclass(frozen=True)
class _Line:
    """One series as drawn: x, the seed statistics at each x, its legend label (empty for none),
    colour (None: the axes' next) and per-point marks (None: none)."""

    x: np.ndarray
    stats: Sequence[SeedStats]
    label: str
    color: str | None = None
    marks: Sequence[str | None] | None = None


def _lines(
    series: Sequence[Series],
    data: Callable[[Series], tuple[np.ndarray, Sequence[SeedStats]]],
    marks: GridMarks | None,
    colors: Mapping[SeriesKey, str] | None = None,
) -> list[_Line]:
    """The series as labelled lines, `data` picking x and the statistics of each."""
    labels = series_labels([s.key for s in series])
    return [_Line(*data(s), label, (colors or {}).get(s.key), (marks or {}).get(s.key)) for s, label in zip(series, labels, strict=True)]


def _draw_series(
    ax: Axes,
    lines: Sequence[_Line],
    limits: tuple[float, float],
    *,
    floor: float | None = None,
    names: Sequence[str] | None = None,
) -> bool:
    """Draw each line with its band and marks; return whether any lines coincided.

    A line whose drawn points equal an earlier line's would hide under it, so it is drawn on
    top dashed with large hollow markers and labelled "mlp (= attention)" (`names` name the
    lines for that when they carry no label). Marked points get a cross and one legend entry
    per kind (see `MARK_STYLES`). `floor` is for a log axis: values <= 0 are drawn there with
    a hollow down-triangle, band edges clipped to it.
    """
    names = names or [line.label for line in lines]
    drawn: list[tuple[np.ndarray, np.ndarray, str]] = []
    twins = 0
    for line, name in zip(lines, names, strict=True):
        x, mean, shown, at_floor = _drawn_points(line, floor)
        twin = next((other for ox, om, other in drawn if x.size and np.array_equal(ox, x) and np.array_equal(om, mean)), None)
        drawn.append((x, mean, name))
        style: dict[str, Any] = {"marker": "o", "markersize": 3, "linestyle": "-"}
        if twin is not None:
            linestyle, marker = _DUPLICATE_STYLES[twins % len(_DUPLICATE_STYLES)]
            twins += 1
            style = {"marker": marker, "markersize": 7, "markerfacecolor": "none", "linestyle": linestyle, "zorder": 2.5}
        label = f"{name} (= {twin})" if twin is not None else line.label
        (drawn_line,) = ax.plot(x, mean, label=label or None, color=line.color, **style)
        _band(ax, line, shown, limits, floor, drawn_line.get_color())
        if at_floor.any():
            ax.plot(x[at_floor], mean[at_floor], "v", markersize=7, markerfacecolor="none", color=drawn_line.get_color())
        if line.marks is not None:
            _marks(ax, line, shown, x, mean)
    return twins > 0


def _drawn_points(line: _Line, floor: float | None) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """x and mean of the points a line draws (positive x, finite mean; on a log axis values
    <= 0 moved to `floor`), the mask of those points in the line's own order, and which of the
    drawn points sit at the floor."""
    x = np.asarray(line.x, dtype=float)
    mean = np.array([st.mean for st in line.stats], dtype=float)
    shown = (x > 0) & np.isfinite(mean)
    zero = (mean <= 0) if floor is not None else np.zeros_like(shown)
    if floor is not None:
        mean = np.where(zero, floor, mean)
    return x[shown], mean[shown], shown, zero[shown]


def _band(ax: Axes, line: _Line, shown: np.ndarray, limits: tuple[float, float], floor: float | None, color: ColorType) -> None:
    """The shaded interval where it exists. The bootstrap intervals already respect the metric's
    bounds (see `bootstrap`); clipping to `limits` is a guard for results analysed with other
    intervals, dropped when the values are not the metric the limits describe (a perplexity)."""
    x = np.asarray(line.x, dtype=float)
    mean = np.array([st.mean for st in line.stats], dtype=float)
    finite = mean[np.isfinite(mean)]
    if finite.size and (finite.min() < limits[0] or finite.max() > limits[1]):
        limits = (-math.inf, math.inf)
    low = np.clip(np.array([st.ci_low for st in line.stats], dtype=float), *limits)
    high = np.clip(np.array([st.ci_high for st in line.stats], dtype=float), *limits)
    if floor is not None:
        low, high = np.maximum(low, floor), np.maximum(high, floor)
    band = shown & np.isfinite(low) & np.isfinite(high)
    if band.any():
        ax.fill_between(x[band], low[band], high[band], color=color, alpha=0.2)


def _marks(ax: Axes, line: _Line, shown: np.ndarray, x: np.ndarray, mean: np.ndarray) -> None:
    """A cross on each marked point, with one legend entry per kind on the axes."""
    marks = np.array([m or "" for m in line.marks or ()], dtype=object)[shown]
    seen = set(ax.get_legend_handles_labels()[1])
    for kind, style in MARK_STYLES.items():
        hit = marks == kind
        if hit.any():
            label = style["label"] if style["label"] not in seen else None
            ax.plot(
                x[hit],
                mean[hit],
                linestyle="none",
                marker=style["marker"],
                markersize=style["markersize"],
                color=style["color"],
                zorder=3,
                label=label,
            )


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
    if legend:
        _legend(ax)
    ax.grid(True, which="major", alpha=0.3)
    return _write(fig, out_path)


def _legend(ax: Axes, **kwargs: Any) -> None:
    """The axes' legend (if it has entries), the series first and the marks' entries last, so a
    mark drawn with the first marked series does not split the list of series."""
    handles, labels = ax.get_legend_handles_labels()
    if not handles:
        return
    mark_labels = [str(style["label"]) for style in MARK_STYLES.values()]
    order = sorted(
        range(len(labels)), key=lambda i: (labels[i] in mark_labels, mark_labels.index(labels[i]) if labels[i] in mark_labels else i)
    )
    ax.legend([handles[i] for i in order], [labels[i] for i in order], **{"fontsize": "small", **kwargs})


def _write(fig: Figure, out_path: str | Path) -> Path:
    """Save `fig` as a PNG, creating its folder."""
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_path, format="png", dpi=120)
    return out_path
