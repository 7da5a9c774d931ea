"""The drift report as lines for a terminal: a per-task table, then the metric changes and the notes."""

from __future__ import annotations

from typing import Any

from lm_eval_faults.core.text_table import Column, text_table
from lm_eval_faults.study.drift import DriftReport
from lm_eval_faults.study.sample_drift import GENERATIVE, ROLLING, TaskDrift

SHORT_TYPES = {"multiple_choice": "mc", "loglikelihood": "ll", ROLLING: "rolling", GENERATIVE: "gen"}


def _cell(value: float | str | None) -> float | str:
    """A table cell: numbers as they are, '-' for what does not apply or is unknown."""
    return "-" if value is None else value


def _row(task: TaskDrift) -> list[Any]:
    """One table row."""
    n = task.matched
    changed = task.flips if task.flips is not None else task.diverged
    flips = None if changed is None else f"{changed}/{n}"
    ties = None if task.ties is None else f"{task.ties}/{n}"
    tie_kept = None if task.tie_kept is None else f"{task.tie_kept}/{n}"
    agreement = task.exact_agreement if task.agreement is None else task.agreement
    return [
        task.label,
        SHORT_TYPES.get(task.output_type, task.output_type),
        n,
        task.only_clean + task.only_faulty,
        _cell(flips),
        _cell(agreement),
        _cell(ties),
        _cell(tie_kept),
        _cell(task.mean_abs_delta_ll),
        _cell(task.mean_kl),
        task.nonfinite,
        _cell(task.mean_first_divergence),
        _cell(task.perplexity_ratio),
        _cell(task.degenerate_requests),
        _cell(task.nonfinite_requests),
    ]


def format_drift_table(report: DriftReport) -> list[str]:
    """The per-task table, then the metric changes and the notes, as lines for a terminal."""
    width = max([len("task"), *(len(task.label) for task in report.tasks)]) + 2
    columns = [
        Column("task", width, align="<"),
        Column("type", 8, align="<"),
        Column("n", 6, ","),
        Column("unmatched", 10, ","),
        Column("flips/diff", 11),
        Column("agree", 7, ".3f"),
        Column("ties", 10),
        Column("tie-kept", 10),
        Column("|Δll|", 10, ".4g"),
        Column("KL", 10, ".4g"),
        Column("nonfin samples", 15, ","),
        Column("1st div", 8, ".3g"),
        Column("ppl ratio", 10, ".4g"),
        Column("degen requests", 15, ","),
        Column("nonfin requests", 16, ","),
    ]
    lines = text_table(columns, [_row(task) for task in report.tasks])
    lines.extend(_metric_lines(report))
    lines.extend(_note_lines(report))
    return lines


def _metric_lines(report: DriftReport) -> list[str]:
    """Mean per-sample change of each task metric (faulted − clean)."""
    lines = []
    for task in report.tasks:
        if task.metric_deltas:
            changes = ", ".join(f"{name} {value:+.4g}" for name, value in task.metric_deltas.items())
            lines.append(f"  {task.label}: {changes}")
    return ["", "metric change (faulted − clean, mean over matched samples):", *lines] if lines else []


def _note_lines(report: DriftReport) -> list[str]:
    """The report's and the tasks' notes."""
    notes = list(report.notes)
    notes += [f"task only in the clean run: {name}" for name in report.only_clean_tasks]
    notes += [f"task only in the faulted run: {name}" for name in report.only_faulty_tasks]
    notes += [f"{task.label}: {note}" for task in report.tasks for note in task.notes]
    if any(task.perplexity_unit not in (None, "document") for task in report.tasks):
        units = sorted({task.perplexity_unit for task in report.tasks if task.perplexity_unit})
        notes.append(f"ppl ratio = perplexity(faulted) / perplexity(clean), per {'/'.join(units)}")
    return ["", "notes:", *(f"  {note}" for note in notes)] if notes else []
