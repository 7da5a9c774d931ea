"""Per-task request counts of one run: how many, how many non-finite or degenerate, how many cached.

A damaged model can fail loudly (NaN/Inf log-likelihoods) or quietly: finite but flat logits, so
every choice ties and accuracy reads as the first choice's share, indistinguishable from chance
by accuracy alone. Both are counted per task, next to the requests, so a collapsed model never
passes for a chance-level one. Cached answers are counted too, with the flags they had when they
were computed, so a rerun served from `--use_cache` reports the same figures.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

FIELDS = ("requests", "nonfinite", "degenerate", "cached")


@dataclass
class RequestCounts:
    """Counters per task name; all ranks' counts add up (`add`)."""

    requests: Counter[str] = field(default_factory=Counter)
    nonfinite: Counter[str] = field(default_factory=Counter)
    degenerate: Counter[str] = field(default_factory=Counter)
    cached: Counter[str] = field(default_factory=Counter)

    def count(self, task: str, nonfinite: bool, degenerate: bool, cached: bool = False) -> None:
        self.requests[task] += 1
        self.nonfinite[task] += int(nonfinite)
        self.degenerate[task] += int(degenerate and not nonfinite)
        self.cached[task] += int(cached)

    def count_rows(self, task: str, requests: int, rows: list[tuple[bool, bool]]) -> None:
        """`requests` requests of `task` whose (non-finite, degenerate) flags come per generated row,
        in an order that does not match the requests' (lm-eval reorders generation batches)."""
        self.requests[task] += requests
        for nonfinite, degenerate in rows:
            self.nonfinite[task] += int(nonfinite)
            self.degenerate[task] += int(degenerate and not nonfinite)

    def add(self, other: RequestCounts) -> None:
        for name in FIELDS:
            getattr(self, name).update(getattr(other, name))

    def as_dicts(self) -> dict[str, dict[str, int]]:
        """{field: {task: count}} with every task of `requests` present in every field."""
        tasks = sorted(self.requests)
        return {name: {task: getattr(self, name)[task] for task in tasks} for name in FIELDS}


def tied_choices(logprobs: list[float], groups: list[tuple[str, int]]) -> list[bool]:
    """Requests whose document's best log-likelihood is shared by two or more choices.

    `groups` holds each request's (task, doc_id). A tie for the top decides the argmax by order
    alone: the answer is the first choice's, not the model's.
    """
    members: dict[tuple[str, int], list[int]] = {}
    for index, group in enumerate(groups):
        members.setdefault(group, []).append(index)
    tied = [False] * len(logprobs)
    for indices in members.values():
        if len(indices) < 2:
            continue
        values = [logprobs[i] for i in indices]
        if values.count(max(values)) >= 2:
            for i in indices:
                tied[i] = True
    return tied
