"""What protection buys: the highest fault rate each scheme tolerates, against its storage cost.

A scheme *tolerates* p when the seed-mean score stays within `tolerance` (relative) of the clean
score at p and at every smaller rate of the grid: the first rate where it drops out ends the
range, so a lucky point above a failure never counts. When a scheme holds at every rate of the
grid, its tolerated p is only a lower bound ("≥"); when it fails at the first rate, an upper
bound ("<"). The Pareto frontier holds the schemes that no other scheme beats on both cost and
tolerated p.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from lm_eval_faults.study.grid import NO_PROTECTION
from lm_eval_faults.study.series import Series

DEFAULT_TOLERANCE = 0.05


@dataclass(frozen=True)
class Tolerance:
    """One scheme's place on the chart."""

    protection: str
    overhead: float
    tolerated_p: float
    bound: str
    """"" (measured), "≥" (held at every grid rate) or "<" (failed at the first)."""
    frontier: bool = False

    @property
    def label(self) -> str:
        return f"{self.bound}{self.tolerated_p:.3g}"


def tolerated_p(series: Series, tolerance: float = DEFAULT_TOLERANCE, collapsed: Collection[float] = ()) -> tuple[float, str]:
    """(highest tolerated grid rate, bound marker) of one series. A rate in `collapsed` (most
    seeds' requests degenerate or non-finite) fails whatever its score: a model answering by
    tie-break can sit within tolerance of a baseline near chance, and must not count as holding."""
    p, relchange = series.p, series.mean_relchange
    failed = np.flatnonzero(~(relchange <= tolerance) | np.isin(p, list(collapsed)))  # NaN counts as a failure
    if not len(failed):
        return float(p[-1]), "≥"
    first = failed[0]
    return (float(p[first]), "<") if first == 0 else (float(p[first - 1]), "")


def series_overhead(series: Series, by_id: Mapping[str, Mapping[str, Any]]) -> float:
    """The storage overhead a series' records report (0 for unprotected series)."""
    values = [
        by_id[point.point_id].get("protection_counts", {}).get("overhead")
        for point in series.points
        if point.point_id in by_id and by_id[point.point_id].get("protection_counts")
    ]
    values = [v for v in values if v is not None]
    return float(np.mean(values)) if values else 0.0


def protection_families(series: Sequence[Series]) -> dict[str, list[Series]]:
    """Series that differ only in protection, keyed by what they share; only families that
    compare a protection with something."""
    families: dict[str, list[Series]] = defaultdict(list)
    for s in series:
        k = s.key
        families[f"{k.fault}/{k.site} {k.target} layers={k.layers}"].append(s)
    return {title: members for title, members in sorted(families.items()) if any(m.key.protection != NO_PROTECTION for m in members)}


def collapsed_rates(
    series: Series, by_id: Mapping[str, Mapping[str, Any]], is_collapsed: Callable[[Mapping[str, Any]], bool | None]
) -> set[float]:
    """The grid rates at which most of the series' seeds collapsed."""
    votes: dict[float, list[bool]] = defaultdict(list)
    for point in series.points:
        if point.point_id in by_id:
            votes[point.p].append(bool(is_collapsed(by_id[point.point_id])))
    return {p for p, v in votes.items() if sum(v) * 2 > len(v)}


def tolerances(
    members: Sequence[Series],
    by_id: Mapping[str, Mapping[str, Any]],
    tolerance: float,
    is_collapsed: Callable[[Mapping[str, Any]], bool | None] = lambda record: False,
) -> list[Tolerance]:
    """Each scheme's overhead and tolerated p, with the Pareto frontier marked."""
    rows = []
    for s in members:
        p, bound = tolerated_p(s, tolerance, collapsed_rates(s, by_id, is_collapsed))
        rows.append(Tolerance(s.key.protection, series_overhead(s, by_id), p, bound))

    def dominated(row: Tolerance) -> bool:
        return any(
            other.overhead <= row.overhead
            and other.tolerated_p >= row.tolerated_p
            and (other.overhead, other.tolerated_p) != (row.overhead, row.tolerated_p)
            for other in rows
        )

    rows = [Tolerance(r.protection, r.overhead, r.tolerated_p, r.bound, frontier=not dominated(r)) for r in rows]
    return sorted(rows, key=lambda r: (r.overhead, r.tolerated_p))


def percent(share: float) -> str:
    """An overhead as a percentage with three significant digits: 2 values per tensor is 0.000406%, not 0.00%."""
    return f"{100 * share:.3g}%"


def pareto_section(members_by_title: Mapping[str, Sequence[Tolerance]], tolerance: float) -> str:
    """The report's table of schemes: overhead, tolerated p and whether on the frontier."""
    if not members_by_title:
        return ""
    lines = [
        "## Protection: tolerated fault rate vs storage overhead",
        "",
        f"Tolerated p: the highest grid rate at which the seed-mean score stays within {tolerance:.0%} of clean, "
        "at it and at every smaller rate. ≥: held at every rate of the grid; <: failed at the first.",
        "",
    ]
    for title, rows in members_by_title.items():
        lines += [f"### {title}", "", "| protection | overhead | tolerated p | Pareto frontier |", "|---|---|---|---|"]
        lines += [f"| {r.protection} | {percent(r.overhead)} | {r.label} | {'yes' if r.frontier else ''} |" for r in rows]
        lines.append("")
    return "\n".join(lines)
