"""The side-by-side page of two lm-eval runs of a generative task (`drift --html`).

The texts come from the runs' `--log_samples` files, with no model at hand: pieces are the
tokenizer-independent tokens `sample_drift` counts divergence in (each with the whitespace before
it, so the pieces join back to the text), and a failure class is one of those that need no
perplexity or logits (`text_failures`: identical, empty, repetitive, diverged).
"""

from __future__ import annotations

import re

from lm_eval_faults.study.drift import DriftReport
from lm_eval_faults.study.sample_drift import ROLLING, SampleDrift
from lm_eval_faults.study.side_by_side import FaultedView, PromptView
from lm_eval_faults.study.text_failures import failure_class, first_divergence

PIECE_RE = re.compile(r"\s*(?:\w+|[^\w\s])")


def text_pieces(text: str) -> list[str]:
    """`sample_drift.tokens(text)`, each with the whitespace before it; trailing whitespace joins the last."""
    pieces = PIECE_RE.findall(text)
    rest = text[sum(map(len, pieces)) :]
    if rest:
        pieces = [*pieces[:-1], pieces[-1] + rest] if pieces else [rest]
    return pieces


def drift_views(report: DriftReport, limit: int = 50) -> tuple[list[PromptView], list[str]]:
    """Views of the generative samples, those that diverged first, at most `limit` per task; and notes
    on what was left out."""
    views: list[PromptView] = []
    notes: list[str] = []
    for task in report.tasks:
        if task.output_type != "generate_until" or task.output_type == ROLLING:
            continue
        samples = [s for s in task.samples if s.clean_text is not None and s.faulty_text is not None]
        samples.sort(key=lambda s: (bool(s.identical), str(s.doc_id)))
        if len(samples) > limit:
            notes.append(f"{task.label}: {len(samples) - limit} of {len(samples)} samples left out (--html_limit {limit})")
        views.extend(_view(task.label, sample) for sample in samples[:limit])
    return views, notes


def text_view(label: str, clean_text: str, faulted_text: str, figures: dict[str, str] | None = None) -> FaultedView:
    """One faulted text against the clean one, with no model at hand: divergence by word, and a
    class that needs no logits (`drift --html` and a sweep's page alike)."""
    clean_words = [piece.strip() for piece in text_pieces(clean_text)]
    pieces = text_pieces(faulted_text)
    words = [piece.strip() for piece in pieces]
    position = first_divergence(clean_words, words)
    failure = failure_class(clean_words, words, faulted_text, clean_text)
    shown = {"diverges at word": "-" if position is None else str(position), **(figures or {})}
    return FaultedView(label, pieces, position, position, failure, shown)


def _view(label: str, sample: SampleDrift) -> PromptView:
    clean_text = sample.clean_text or ""
    deltas = {name: f"{delta:+.3g}" for name, delta in sample.metric_deltas.items()}
    faulted = text_view("faulted run", clean_text, sample.faulty_text or "", deltas)
    return PromptView(f"{label}, doc {sample.doc_id}", sample.prompt or "(prompt not logged)", text_pieces(clean_text), [faulted])
