"""A self-contained HTML page of clean and faulted texts side by side (no scripts, no network).

One section per prompt: the prompt, then one row per faulted text, the clean text on the left and
the faulted one on the right, each with the pieces from the first divergence on highlighted (the
clean text's in green: what was lost; the faulted text's in red: what replaced it), and the row's
failure class and figures above it. `generate` and `drift --html` both write it.
"""

from __future__ import annotations

import html
from collections.abc import Sequence
from dataclasses import dataclass, field

from lm_eval_faults.study.text_failures import FAILURE_CLASSES

CLASS_COLOURS = {
    "identical": "#2e7d32",
    "diverged": "#1565c0",
    "repetitive": "#ef6c00",
    "gibberish": "#c62828",
    "empty": "#6a1b9a",
    "collapsed": "#4e342e",
    "non-finite": "#000000",
}
assert set(CLASS_COLOURS) == set(FAILURE_CLASSES)

STYLE = """
body { font-family: system-ui, sans-serif; margin: 1.5em; color: #222; max-width: 1400px; }
h1 { font-size: 1.4em; } h2 { font-size: 1.1em; margin-top: 2em; border-bottom: 1px solid #ccc; }
.prompt { background: #f4f4f4; padding: .5em .8em; white-space: pre-wrap; border-radius: 4px; }
.row { margin: 1em 0 1.5em; }
.head { font-size: .9em; margin-bottom: .3em; }
.badge { color: #fff; padding: .1em .5em; border-radius: 3px; font-weight: 600; margin-right: .6em; }
.label { font-family: ui-monospace, monospace; margin-right: .8em; }
.figures { color: #555; }
.pair { display: grid; grid-template-columns: 1fr 1fr; gap: .8em; }
.text { white-space: pre-wrap; border: 1px solid #ddd; padding: .5em .7em; border-radius: 4px; font-size: .92em; }
.text h3 { margin: 0 0 .3em; font-size: .8em; color: #777; font-weight: 600; text-transform: uppercase; }
.lost { background: #c8e6c9; } .new { background: #ffcdd2; }
.first { outline: 2px solid #c62828; }
table.summary { border-collapse: collapse; font-size: .9em; } .summary td, .summary th { border: 1px solid #ddd; padding: .2em .5em; }
"""


@dataclass(frozen=True)
class FaultedView:
    """One faulted text: its label (the spec), pieces, where it diverges, class and figures."""

    label: str
    pieces: Sequence[str]
    diverges_at: int | None
    clean_diverges_at: int | None
    failure: str
    figures: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class PromptView:
    title: str
    prompt: str
    clean_pieces: Sequence[str]
    faulted: Sequence[FaultedView]


def highlighted(pieces: Sequence[str], start: int | None, css: str) -> str:
    """The pieces as HTML, those from `start` on in a span of class `css` (the first outlined)."""
    if start is None:
        return html.escape("".join(pieces))
    before = html.escape("".join(pieces[:start]))
    if start >= len(pieces):
        return before
    first = f'<span class="{css} first">{html.escape(pieces[start]) or "&#8203;"}</span>'
    rest = html.escape("".join(pieces[start + 1 :]))
    return f'{before}{first}<span class="{css}">{rest}</span>'


def _row(clean_pieces: Sequence[str], view: FaultedView) -> str:
    colour = CLASS_COLOURS.get(view.failure, "#555")
    figures = " · ".join(f"{html.escape(name)} {html.escape(value)}" for name, value in view.figures.items())
    faulted = highlighted(view.pieces, view.diverges_at, "new") or "<em>(empty)</em>"
    return (
        f'<div class="row" data-failure="{html.escape(view.failure)}"><div class="head">'
        f'<span class="badge" style="background:{colour}">{html.escape(view.failure)}</span>'
        f'<span class="label">{html.escape(view.label)}</span><span class="figures">{figures}</span></div>'
        f'<div class="pair"><div class="text clean"><h3>clean</h3>{highlighted(clean_pieces, view.clean_diverges_at, "lost")}</div>'
        f'<div class="text faulted"><h3>faulted</h3>{faulted}</div></div></div>'
    )


def _summary(views: Sequence[PromptView]) -> str:
    labels = list(dict.fromkeys(item.label for view in views for item in view.faulted))
    head = "".join(f"<th>{html.escape(label)}</th>" for label in labels)
    rows = []
    for number, view in enumerate(views, 1):
        by_label = {item.label: item.failure for item in view.faulted}
        cells = "".join(
            f'<td style="color:{CLASS_COLOURS.get(by_label.get(label, ""), "#555")}">{html.escape(by_label.get(label, "-"))}</td>'
            for label in labels
        )
        rows.append(f"<tr><th>{number}</th>{cells}</tr>")
    return f'<table class="summary"><tr><th>prompt</th>{head}</tr>{"".join(rows)}</table>'


def side_by_side_page(title: str, views: Sequence[PromptView], notes: Sequence[str] = ()) -> str:
    """The whole page as one string."""
    sections = []
    for number, view in enumerate(views, 1):
        rows = "".join(_row(view.clean_pieces, item) for item in view.faulted)
        sections.append(
            f'<section><h2>{number}. {html.escape(view.title)}</h2><div class="prompt">{html.escape(view.prompt)}</div>{rows}</section>'
        )
    note_html = "".join(f"<p>{html.escape(note)}</p>" for note in notes)
    return (
        f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>'
        f"<style>{STYLE}</style></head><body><h1>{html.escape(title)}</h1>{note_html}"
        f"{_summary(views)}{''.join(sections)}</body></html>\n"
    )
