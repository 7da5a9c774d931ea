"""The report's Markdown: header, thresholds and AWRCL per series, rankings, figure list and points table."""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from lm_eval_faults.core.report import stored_bits_per_weight
from lm_eval_faults.study.awrcl import Weighting
from lm_eval_faults.study.bootstrap import BOOTSTRAP_REPLICATES, Sampling, SeedStats
from lm_eval_faults.study.collapse import degenerate_requests, is_collapsed
from lm_eval_faults.study.drift_curves import record_drift
from lm_eval_faults.study.metrics import baseline_records, record_score, relative_change, task_scores
from lm_eval_faults.study.rankings import RANK_KEYS, Ranking, SeriesSummary, rankings
from lm_eval_faults.study.records import RESULTS_FILE
from lm_eval_faults.study.series import CountUnit, Series, series_key

_RANK_TITLES = {
    "awrcl_p": "AWRCL vs p",
    "awrcl_count": "AWRCL vs injected",
    "threshold_p": "p at {drop} drop",
    "threshold_count": "injected at {drop} drop",
}


def _retries_note(records: Sequence[Mapping[str, Any]]) -> str:
    """ " N point(s) evaluated again ..." when a Ray sweep lost points to dead actors (records' `retries`), else ""."""
    retried = [int(r.get("retries", 0)) for r in records if r.get("retries")]
    return f" {len(retried)} point(s) evaluated again after a Ray actor died ({sum(retried)} retries)." if retried else ""


def _storage_lines(base: Mapping[str, Any]) -> list[str]:
    """The stored form of a `storage=` sweep: its baseline is that storage at p = 0."""
    summary = base.get("storage")
    if not summary:
        return []
    storage = next(iter(summary.values()))["storage"]
    bits = stored_bits_per_weight(summary)
    return [
        f"- **Stored as {storage}** ({bits:.2f} stored bits per weight): the baseline is that storage at p = 0, its "
        "quantization error included; p is the probability per stored bit."
    ]


def header_section(
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
        *_storage_lines(base),
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


def summary_section(
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


def ranking_section(summaries: Sequence[SeriesSummary], fraction: float) -> str:
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


def figure_section(figures: Sequence[tuple[str, Path | str]], run_dir: Path) -> str:
    lines = ["## Figures", ""]
    for caption, target in figures:
        if isinstance(target, Path):
            link = target.relative_to(run_dir).as_posix()
            lines += [f"### {caption}", "", f"![{caption}]({link})", ""]
        else:
            lines += [f"### {caption}", "", f"Not drawn: {target}.", ""]
    return "\n".join(lines)


def points_section(
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
