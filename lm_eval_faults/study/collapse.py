"""Collapsed points: records whose requests were mostly degenerate or non-finite, and how figures mark them.

Why: such a point's accuracy is lm-eval's first-choice tie-break, not the model's answer, so the
report flags it in its tables and on every figure.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Mapping, Sequence
from typing import Any

from lm_eval_faults.study import plots
from lm_eval_faults.study.series import Series, SeriesKey


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
