"""The report's figures: which series are drawn together, and every PNG a report links to.

Why apart from the Markdown: a figure family (components of one fault/site, layer groups of one
target, protection schemes of one series) is a choice of what to compare; `report_sections` only
lists what was drawn, or why it was not.
"""

from __future__ import annotations

import re
from collections import defaultdict
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from lm_eval_faults.study import plots
from lm_eval_faults.study.collapse import is_collapsed
from lm_eval_faults.study.drift_curves import drift_curve, record_drift
from lm_eval_faults.study.pareto import Tolerance, protection_families, tolerances
from lm_eval_faults.study.series import ALL_LAYERS, CountUnit, Series


def protection_figures(
    series: Sequence[Series],
    baseline: float,
    out_dir: Path,
    tolerance: float,
    chance: float | None,
    by_id: Mapping[str, Mapping[str, Any]],
    figures: list[tuple[str, Path | str]],
    marks: plots.GridMarks,
    fixed: str = "",
) -> dict[str, list[Tolerance]]:
    """For series that differ only in protection: score vs p for all schemes in one figure, and
    the Pareto chart of tolerated p against overhead (appended to `figures`); returns the tables.
    `fixed` (the sweep's fixed fault keys, e.g. a pattern) goes into the figures' titles."""
    tables = {}
    for family, members in protection_families(series).items():
        slug = _slug(family)
        title = f"{family}, {fixed}" if fixed else family
        accuracy = plots.plot_accuracy_vs_p(
            members, baseline, out_dir / f"accuracy_vs_p__protections__{slug}.png", chance=chance, title=title, marks=marks
        )
        rows = tolerances(members, by_id, tolerance, is_collapsed)
        pareto = plots.plot_pareto(rows, out_dir / f"pareto__{slug}.png", tolerance=tolerance, title=title)
        figures += [(f"{title}: score vs p, by protection", accuracy), (f"{title}: tolerated p vs storage overhead", pareto)]
        tables[title] = rows
    return tables


def figure_families(series: Sequence[Series]) -> dict[str, list[Series]]:
    """Series drawn together, keyed by a title: components of one fault/site (layers = all),
    and layer groups of one fault/site/target."""
    families: dict[str, list[Series]] = defaultdict(list)
    for s in series:
        k = s.key
        if k.layers == ALL_LAYERS:
            families[f"{k.scope} components"].append(s)
        else:
            families[f"{k.scope} target={k.target} layer groups"].append(s)
    return dict(sorted(families.items()))


def default_layer_bar_p(series: Sequence[Series], fraction: float = 0.5) -> float | None:
    """The fault rate where layer groups are best told apart: the smallest rate run by every
    group at which some group has lost `fraction` of its accuracy (damage has just become
    visible), else the largest common rate. None when the groups share no rate."""
    common = set.intersection(*({g.p for g in s.grid} for s in series)) if series else set()
    for p in sorted(common):
        if any(g.p == p and g.relchange.mean >= fraction for s in series for g in s.grid):
            return p
    return max(common, default=None)


def draw_figures(
    series: Sequence[Series],
    baseline: float,
    out_dir: Path,
    p_for_layer_bars: float | None,
    fraction: float,
    count: CountUnit,
    chance: float | None,
    by_id: Mapping[str, Mapping[str, Any]],
    marks: plots.GridMarks,
) -> list[tuple[str, Path | str]]:
    """All figures as (caption, path), or (caption, reason) where a figure could not be drawn;
    collapsed grid points are marked on every figure (`marks`)."""
    figures: list[tuple[str, Path | str]] = []
    for title, members in figure_families(series).items():
        slug = _slug(title)
        accuracy = plots.plot_accuracy_vs_p(
            members, baseline, out_dir / f"accuracy_vs_p__{slug}.png", chance=chance, title=title, marks=marks
        )
        figures.append((f"{title}: score vs p", accuracy))
        drift = _drift_figure(members, by_id, baseline, out_dir / f"drift_vs_p__{slug}.png", chance, title, marks)
        figures.append((f"{title}: score and drift from the clean model vs p", drift))
        if baseline == 0:  # relative change to a clean score of 0 is undefined: say so, draw nothing
            reason = "undefined: the clean score is 0, so no relative change can be taken (the score figures above hold)"
            figures += [(f"{title}: relative change vs p", reason), (f"{title}: relative change vs injected {count}", reason)]
        else:
            by_p = plots.plot_relchange_vs_p(members, out_dir / f"relchange_vs_p__{slug}.png", fraction=fraction, title=title, marks=marks)
            by_count = plots.plot_relchange_vs_count(
                members,
                out_dir / f"relchange_vs_count__{slug}.png",
                fraction=fraction,
                count_label=f"injected {count} (seed mean)",
                title=title,
                marks=marks,
            )
            figures += [
                (f"{title}: relative change vs p", by_p),
                (f"{title}: relative change vs injected {count}", by_count),
            ]
        if members[0].key.layers != ALL_LAYERS:
            figures.append(_layer_bars(members, title, slug, out_dir, p_for_layer_bars, fraction, marks))
    return figures


def _drift_figure(
    members: Sequence[Series],
    by_id: Mapping[str, Mapping[str, Any]],
    baseline: float,
    path: Path,
    chance: float | None,
    title: str,
    marks: plots.GridMarks,
) -> Path | str:
    """The score-and-drift figure of one family, or why there is none."""
    curves = [drift_curve(s, by_id) for s in members]
    if not any(record_drift(by_id.get(pt.point_id, {})) for s in members for pt in s.points):
        return "no point of this family recorded drift (a sweep from before drift was recorded)"
    if not any(c.has_flips() or c.has_kl() for c in curves):
        return "its tasks have no answers to flip and no choices for a KL (e.g. rolling log-likelihood); see `drift` in the results"
    return plots.plot_drift_vs_p(members, curves, baseline, path, chance=chance, title=title, marks=marks)


def _layer_bars(
    members: Sequence[Series],
    title: str,
    slug: str,
    out_dir: Path,
    p: float | None,
    fraction: float,
    marks: plots.GridMarks,
) -> tuple[str, Path | str]:
    """The bar chart of one layer family at `p` (or its default rate), or why there is none."""
    if p is None:
        p = default_layer_bar_p(members, fraction)
    if p is None:
        return f"{title}: relative change per layer group", "the layer groups share no fault rate"
    caption = f"{title}: relative change per layer group at p={p:g}"
    if not any(plots.grid_point_at(s, p) for s in members):
        return caption, f"no layer group was run at p={p:g}"
    path = plots.plot_layer_bars(members, p, out_dir / f"layer_bars__{slug}.png", title=f"{title}, p={p:g}", marks=marks)
    return caption, path


def _slug(text: str) -> str:
    """A file-name-safe form of a figure title."""
    return re.sub(r"[^A-Za-z0-9.-]+", "_", text).strip("_")
