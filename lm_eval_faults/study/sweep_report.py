"""Turn a finished (or interrupted) sweep's `results.jsonl` into figures and a Markdown report.

Works from the results file alone, so a report can be rebuilt anywhere, at any time, and again
while a sweep is still running: it then covers the points finished so far.

Series are grouped into the study's two kinds of experiment, each becoming a set of figures
and a ranking: *components* (layers = "all", one line per target) within a fault model and
site, and *layer groups* (layers other than "all", one line per group) within a fault model,
site and target.
"""

from __future__ import annotations

import math
import re
import warnings
from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from lm_eval_faults.study import plots
from lm_eval_faults.study.awrcl import WEIGHTINGS, Weighting
from lm_eval_faults.study.bootstrap import (
    BOOTSTRAP_REPLICATES,
    BOOTSTRAP_SEED,
    Sampling,
    SeedStats,
    bootstrap_scores,
    percentile_interval,
    sampling_of,
)
from lm_eval_faults.study.metrics import baseline_records, baseline_tasks, record_score, relative_change, task_scores
from lm_eval_faults.study.pareto import DEFAULT_TOLERANCE, Tolerance, pareto_section, protection_families, tolerances
from lm_eval_faults.study.rankings import RANK_KEYS, Ranking, SeriesSummary, rankings, summarize_series
from lm_eval_faults.study.records import RESULTS_FILE, load_records
from lm_eval_faults.study.run_dir import planned_point_ids
from lm_eval_faults.study.series import ALL_LAYERS, CountUnit, Series, SeriesKey, build_series, series_key

REPORT_FILE = "report.md"
FIGURES_DIR = "figures"

_RANK_TITLES = {
    "awrcl_p": "AWRCL vs p",
    "awrcl_count": "AWRCL vs injected",
    "threshold_p": "p at {drop} drop",
    "threshold_count": "injected at {drop} drop",
}


def build_report(
    run_dir: str | Path,
    p_for_layer_bars: float | None = None,
    weighting: Weighting = "uniform",
    *,
    fraction: float = 0.5,
    count: CountUnit = "elements",
    chance: float | None = None,
    tolerance: float = DEFAULT_TOLERANCE,
) -> Path:
    """Read `run_dir/results.jsonl`, write `run_dir/figures/*.png` and `run_dir/report.md`.

    `p_for_layer_bars` picks the fault rate of the layer-group bar charts; by default it is
    `default_layer_bar_p` of each layer family. `weighting` is the AWRCL weighting (see
    `metrics.grid_weights`), `fraction` the relative drop that defines the threshold, `count`
    whether injected faults are counted as values ("elements") or bits, and `chance` an
    optional chance-level line on the accuracy plots, `tolerance` the relative drop within which
    a protection scheme counts as holding (the Pareto chart). Returns the report's path.
    """
    if weighting not in WEIGHTINGS:
        raise ValueError(f"unknown weighting {weighting!r}; choose one of {WEIGHTINGS}")
    run_dir = Path(run_dir)
    records = grid_records(run_dir)
    tasks = baseline_tasks(records)
    baseline, series = build_series(records, tasks=tasks, count=count)
    summaries = [summarize_series(s, weighting=weighting, fraction=fraction) for s in series]
    by_id = {str(r["point_id"]): r for r in records}
    marks = grid_marks(series, by_id)
    figures = _draw_figures(series, baseline, run_dir / FIGURES_DIR, p_for_layer_bars, fraction, count, chance, by_id, marks)
    protection_tables = _protection_figures(series, baseline, run_dir / FIGURES_DIR, tolerance, chance, by_id, figures, marks)
    text = "\n".join(
        [
            _header(records, series, tasks, baseline, weighting, fraction, count, sampling_of(records, tasks)),
            _summary_section(series, summaries, fraction, records),
            _ranking_section(summaries, fraction),
            pareto_section(protection_tables, tolerance),
            _figure_section(figures, run_dir),
            _points_section(records, tasks, baseline, count),
        ]
    )
    report = run_dir / REPORT_FILE
    report.write_text(text, encoding="utf-8")
    return report


def grid_records(run_dir: Path) -> list[dict[str, Any]]:
    """The run's records, less malformed lines (a sweep sets them aside on resume; the report
    only reads) and records of points its grid never planned, each left out with a warning."""
    records = load_records(run_dir / RESULTS_FILE, skip_malformed=True)
    planned = planned_point_ids(run_dir)
    if planned is None:
        return records
    foreign = [str(record["point_id"]) for record in records if str(record["point_id"]) not in planned]
    if foreign:
        warnings.warn(
            f"{run_dir / RESULTS_FILE}: leaving out {len(foreign)} record(s) of points not in this sweep's grid (first: {foreign[0]!r})",
            stacklevel=3,
        )
    return [record for record in records if str(record["point_id"]) in planned]


# --------------------------------------------------------------------------- figures


def _protection_figures(
    series: Sequence[Series],
    baseline: float,
    out_dir: Path,
    tolerance: float,
    chance: float | None,
    by_id: Mapping[str, Mapping[str, Any]],
    figures: list[tuple[str, Path | str]],
    marks: plots.GridMarks,
) -> dict[str, list[Tolerance]]:
    """For series that differ only in protection: score vs p for all schemes in one figure, and
    the Pareto chart of tolerated p against overhead (appended to `figures`); returns the tables."""
    tables = {}
    for title, members in protection_families(series).items():
        slug = _slug(title)
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


def _draw_figures(
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


# --------------------------------------------------------------------------- drift


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
    replicates = bootstrap_scores(values, sampling, np.random.default_rng(BOOTSTRAP_SEED))[:, 0]
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


# --------------------------------------------------------------------------- sections


def _retries_note(records: Sequence[Mapping[str, Any]]) -> str:
    """ " N point(s) evaluated again ..." when a Ray sweep lost points to dead actors (records' `retries`), else ""."""
    retried = [int(r.get("retries", 0)) for r in records if r.get("retries")]
    return f" {len(retried)} point(s) evaluated again after a Ray actor died ({sum(retried)} retries)." if retried else ""


def _header(
    records: Sequence[Mapping[str, Any]],
    series: Sequence[Series],
    tasks: Sequence[str],
    baseline: float,
    weighting: Weighting,
    fraction: float,
    count: CountUnit,
    sampling: Sampling,
) -> str:
    base = baseline_records(records)[0]
    scores = task_scores(base)
    n_points = sum(len(s.points) for s in series)
    lines = [
        "# Fault-sweep report",
        "",
        (
            f"From `{RESULTS_FILE}`: {len(records)} records — {len(records) - n_points} baseline, "
            f"{n_points} faulty points in {len(series)} series." + _retries_note(records)
        ),
        "",
        (
            f"- **Score** of a point: mean over the baseline's {len(tasks)} task(s) of each task's "
            "primary metric (acc, else acc_norm, else exact_match, else the first numeric metric)."
        ),
        f"- **Baseline score** (p = 0): {_num(baseline)}.",
        "- **Relative change** = (baseline − faulty) / baseline; positive means accuracy lost.",
        (
            f"- **AWRCL** = Σ wᵢ·changeᵢ / Σ wᵢ over the p grid, weighting `{weighting}`; "
            f'"vs injected" uses the seed-mean number of injected {count} as the grid instead of p '
            "(only the weights depend on the grid, so under `uniform` the two are equal)."
        ),
        (
            f"- **Threshold**: smallest p (or injected count) where the seed-mean relative change "
            f'first reaches {fraction:.0%}, interpolated in log scale; "≤" marks a drop already '
            "reached at the first grid point (an upper bound)."
        ),
        (
            "- **Intervals**: 95% percentile intervals of a two-level bootstrap "
            f"({BOOTSTRAP_REPLICATES} replicates, fixed seed): seeds resampled with replacement "
            "(which fault maps were drawn), then each task's accuracy redrawn as Binomial(n, acc)/n "
            f"(which documents were asked; n per task: {_sizes(sampling)}), the baseline likewise. "
            "They respect the bounds: accuracy in [0, 1], relative change in [1 − 1/baseline, 1]. "
            "With one seed they cover document sampling only; n/a where nothing can be redrawn. "
            "See docs/sweep_intervals.md."
        ),
        (
            "- **Drift** from the clean model, sample by sample (figures `drift_vs_p__*`, points table): "
            "the **flip rate** is the share of answers the faults changed (another choice, or other "
            "generated text), pooled over tasks, with the interval above; **KL** is the mean "
            "KL(clean ‖ faulted) of the softmax over the choices, its band the min to max over seeds. "
            "Both are 0 when no fault changed anything, and they move even where accuracy sits at chance."
        ),
        "",
        "## Baseline",
        "",
        _table(["task", "metric", "value"], [[t, *_pair(scores[t])] for t in tasks]),
    ]
    return "\n".join(lines)


def _summary_section(
    series: Sequence[Series],
    summaries: Sequence[SeriesSummary],
    fraction: float,
    records: Sequence[Mapping[str, Any]],
) -> str:
    drop = f"{fraction:.0%}"
    by_id = {str(r["point_id"]): r for r in records}
    rows = []
    for s, summary in zip(series, summaries, strict=True):
        k = s.key
        rows.append(
            [
                k.fault,
                k.site,
                k.target,
                k.layers,
                str(summary.n_seeds),
                _threshold(summary.threshold_p, s.p, s.mean_relchange),
                _threshold(summary.threshold_count, s.mean_injected, s.mean_relchange),
                _stats(summary.awrcl_p),
                _stats(summary.awrcl_count),
                _collapsed_points(s, by_id),
            ]
        )
    headers = [
        "fault",
        "site",
        "target",
        "layers",
        "seeds",
        f"p at {drop} drop",
        f"injected at {drop} drop",
        "AWRCL vs p [95% CI]",
        "AWRCL vs injected [95% CI]",
        "collapsed points",
    ]
    return "\n".join(["", "## Thresholds and AWRCL per series", "", _table(headers, rows)])


def _ranking_section(summaries: Sequence[SeriesSummary], fraction: float) -> str:
    """One table per family, a column per criterion; rank 1 is the most fragile."""
    by_family: dict[tuple[str, str], dict[str, Ranking]] = defaultdict(dict)
    for by in RANK_KEYS:
        for ranking in rankings(summaries, by):
            by_family[(ranking.kind, ranking.title)][by] = ranking
    lines = ["", "## Rankings (1 = most fragile)", ""]
    if not by_family:
        lines.append("No family has two or more members to rank.")
    drop = f"{fraction:.0%}"
    for (kind, title), per_by in by_family.items():
        n = len(next(iter(per_by.values())).rows)
        rows = [[str(i + 1)] + [_rank_cell(per_by[by].rows[i].label, per_by[by].rows[i].value) for by in RANK_KEYS] for i in range(n)]
        headers = ["rank"] + [_RANK_TITLES[by].format(drop=drop) for by in RANK_KEYS]
        lines += [f"### {kind.capitalize()}s — {title}", "", _table(headers, rows), ""]
    return "\n".join(lines)


def _figure_section(figures: Sequence[tuple[str, Path | str]], run_dir: Path) -> str:
    lines = ["## Figures", ""]
    for caption, target in figures:
        if isinstance(target, Path):
            link = target.relative_to(run_dir).as_posix()
            lines += [f"### {caption}", "", f"![{caption}]({link})", ""]
        else:
            lines += [f"### {caption}", "", f"Not drawn: {target}.", ""]
    return "\n".join(lines)


def _points_section(
    records: Sequence[Mapping[str, Any]],
    tasks: Sequence[str],
    baseline: float,
    count: CountUnit,
) -> str:
    """Every record, baseline first, with expected-vs-injected counts where the sweep
    recorded an expectation, and the non-finite tallies."""
    units = ("elements", "bits")
    has_expected = any(r.get("expected") for r in records)
    headers = ["point_id", "p", "seed", "score", "rel. change"]
    for unit in units:
        headers.append(f"injected {unit}")
        if has_expected:
            headers.append(f"expected {unit}")
    headers += ["flip rate vs clean", "KL vs clean", "non-finite weights", "non-finite requests", "degenerate requests", "elapsed s"]
    ordered = sorted(
        records,
        key=lambda r: (not r.get("baseline"), series_key(r), float(r.get("p", 0)), r.get("seed", 0)),
    )
    rows = []
    for r in ordered:
        score = record_score(r, tasks)
        row = [
            str(r["point_id"]),
            _value(r.get("p")),
            str(r.get("seed", "")),
            _num(score),
            _num(float(relative_change(baseline, score))),
        ]
        for unit in units:
            row.append(_value((r.get("injected") or {}).get(unit)))
            if has_expected:
                row.append(_value((r.get("expected") or {}).get(unit)))
        nonfinite = r.get("nonfinite") or {}
        row += [
            *_drift_cells(r),
            _value(nonfinite.get("weights")),
            _requests(nonfinite.get("requests")),
            _degenerate(r),
            _value(r.get("elapsed_s")),
        ]
        rows.append(row)
    note = (
        f"Counts are as recorded; thresholds and AWRCL above use `{count}`. "
        "Activation-site counts are totals over the run. Degenerate requests had flat logits or "
        "tied choices; a point is **collapsed** when most of its requests are degenerate or non-finite, "
        "so its accuracy is the first-choice tie-break, not chance and not knowledge. Flip rate: answers changed of "
        'those compared (share); the baseline is the reference ("ref"). "—": not recorded (older sweeps) '
        "or not applicable (no choices for a KL)."
    )
    return "\n".join(["## Points", "", note, "", _table(headers, rows), ""])


def _drift_cells(record: Mapping[str, Any]) -> list[str]:
    """Flip-rate and KL cells: ``3/40 (0.075)``, "ref" for the baseline, "—" when not recorded."""
    if record.get("baseline"):
        return ["ref", "ref"]
    drift = record_drift(record)
    if drift is None:
        return ["—", "—"]
    flips = f"{drift.changed}/{drift.compared} ({_num(drift.flip_rate)})" if drift.compared else "—"
    return [flips, _value(drift.kl)]


# --------------------------------------------------------------------------- formatting


def _table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    def line(cells: Sequence[str]) -> str:
        return "| " + " | ".join(str(c).replace("|", "\\|") for c in cells) + " |"

    return "\n".join([line(headers), line(["---"] * len(headers)), *map(line, rows)])


def _num(x: float | None) -> str:
    return "n/a" if x is None or not math.isfinite(x) else f"{x:.4g}"


def _value(x: Any) -> str:
    """A recorded or computed value: numbers compactly, absent ones as a dash."""
    if x is None:
        return "—"
    if isinstance(x, (int, float)) and not isinstance(x, bool):
        return _num(float(x)) if isinstance(x, float) else str(x)
    return str(x)


def _pair(metric: tuple[str, float]) -> list[str]:
    return [metric[0], _num(metric[1])]


def _rank_cell(label: str, value: float | None) -> str:
    return f"{label} ({'not reached' if value is None else _num(value)})"


def _stats(s: SeedStats) -> str:
    if not math.isfinite(s.mean):
        return "n/a"
    if not math.isfinite(s.ci_low):
        return f"{s.mean:.4g}"
    return f"{s.mean:.4g} [{s.ci_low:.4g}, {s.ci_high:.4g}]"


def _threshold(value: float | None, x: np.ndarray, relchange: np.ndarray) -> str:
    """A threshold, marked "≤" when the first usable grid point had already crossed."""
    if value is None:
        return "not reached"
    usable = x[(x > 0) & np.isfinite(relchange)]
    prefix = "≤ " if usable.size and value <= usable.min() else ""
    return f"{prefix}{value:.3g}"


def _sizes(sampling: Sampling) -> str:
    """Documents per task as used by the bootstrap, e.g. ``faults_demo 160``; "not redrawn"
    marks a task whose metric is not a proportion or whose count is unknown."""
    return ", ".join(f"{task} {n}" if n else f"{task} not redrawn" for task, n in zip(sampling.tasks, sampling.sizes.tolist(), strict=True))


def degenerate_requests(record: Mapping[str, Any]) -> tuple[int, int] | None:
    """(degenerate requests, all requests) summed over tasks; None for a record from before
    degenerate requests were recorded, which is unknown rather than zero."""
    degenerate = (record.get("degenerate") or {}).get("requests")
    if degenerate is None:
        return None
    return sum(degenerate.values()), sum((record.get("requests") or {}).values())


def is_collapsed(record: Mapping[str, Any]) -> bool | None:
    """Whether most of a point's requests were degenerate or non-finite (None when not recorded):
    its accuracy then measures the tie-break (NaN log-likelihoods included), not the model."""
    counts = degenerate_requests(record)
    if counts is None:
        return None
    nonfinite = sum(((record.get("nonfinite") or {}).get("requests") or {}).values())
    return counts[1] > 0 and 2 * (counts[0] + nonfinite) > counts[1]


def point_mark(record: Mapping[str, Any]) -> str | None:
    """How a figure marks a point: `plots.NONFINITE` when every request was non-finite,
    `plots.COLLAPSED` when `is_collapsed`, else None (also when not recorded)."""
    counts = degenerate_requests(record)
    if counts is None or not is_collapsed(record):
        return None
    nonfinite = sum(((record.get("nonfinite") or {}).get("requests") or {}).values())
    return plots.NONFINITE if nonfinite >= counts[1] else plots.COLLAPSED


def grid_marks(series: Sequence[Series], by_id: Mapping[str, Mapping[str, Any]]) -> dict[SeriesKey, tuple[str | None, ...]]:
    """Per series, the mark of each grid point: the worst of its seeds' `point_mark`s, since a
    seed mean with one collapsed seed is already not the model's answer."""
    order = (plots.NONFINITE, plots.COLLAPSED)
    result = {}
    for s in series:
        by_p: dict[float, set[str]] = defaultdict(set)
        for pt in s.points:
            if (mark := point_mark(by_id.get(pt.point_id, {}))) is not None:
                by_p[pt.p].add(mark)
        result[s.key] = tuple(next((m for m in order if m in by_p.get(g.p, set())), None) for g in s.grid)
    return result


def _degenerate(record: Mapping[str, Any]) -> str:
    """Degenerate-request cell: ``collapsed (n of m degenerate)``, a count, or "—" if unknown."""
    counts = degenerate_requests(record)
    if counts is None:
        return "—"
    if is_collapsed(record):
        nonfinite = sum(((record.get("nonfinite") or {}).get("requests") or {}).values())
        return f"**collapsed** ({counts[0]} degenerate, {nonfinite} non-finite of {counts[1]})"
    return _requests(record["degenerate"]["requests"])


def _collapsed_points(series: Series, by_id: Mapping[str, Mapping[str, Any]]) -> str:
    """``k of N`` collapsed points of a series; "—" when none of its records say."""
    flags = [is_collapsed(by_id[pt.point_id]) for pt in series.points if pt.point_id in by_id]
    known = [flag for flag in flags if flag is not None]
    return f"{sum(known)} of {len(known)}" if known else "—"


def _requests(requests: Mapping[str, int] | None) -> str:
    """Total non-finite requests with the per-task breakdown, e.g. ``3 (mmlu: 2, arc: 1)``."""
    if not requests:
        return "0" if requests is not None else "—"
    detail = ", ".join(f"{task}: {n}" for task, n in sorted(requests.items()))
    return f"{sum(requests.values())} ({detail})"
