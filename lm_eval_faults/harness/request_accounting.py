"""The request counts of one `faulty_hf` evaluation: what to count, when to start over, how ranks add up.

`RequestCounts` holds the figures; this module decides them from lm-eval's traffic. A result is
non-finite when its log-likelihood is NaN/Inf or its generation's logits were; degenerate when
every position scoring it had a flat (constant) next-token distribution, or its document's best
choices tie, or every generation step was flat. The counters cover one evaluation (lm-eval reads
the report once, at its end), and with data parallelism they are summed over the ranks, so every
rank reports the run's totals.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from lm_eval.api.instance import Instance
from transformers import LogitsProcessor

from lm_eval_faults.core.report import FaultReport, ReportPart, SiteStats
from lm_eval_faults.harness.request_cache import CountedCache, RequestFlags
from lm_eval_faults.harness.request_counts import RequestCounts, tied_choices
from lm_eval_faults.harness.row_keying import Tokens


class NonFiniteLogitsGuard(LogitsProcessor):
    """Flags generation rows whose logits went non-finite or flat, and makes them safe to sample from.

    NaN becomes 0, +Inf the largest finite value, and an all -Inf row uniform, so greedy and
    sampled decoding never raise ("probability tensor contains inf/nan") on a damaged model.
    """

    def __init__(self) -> None:
        self.flagged: torch.Tensor | None = None
        self.flat: torch.Tensor | None = None

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        finite = torch.isfinite(scores)
        bad_rows = ~finite.all(dim=-1)
        flat_rows = scores.amax(dim=-1) == scores.amin(dim=-1)  # a constant next-token distribution
        self.flagged = bad_rows if self.flagged is None else self.flagged | bad_rows
        self.flat = flat_rows if self.flat is None else self.flat & flat_rows  # flat at every step
        safe = torch.nan_to_num(scores, nan=0.0, posinf=torch.finfo(scores.dtype).max, neginf=-math.inf)
        hopeless = torch.isneginf(safe).all(dim=-1, keepdim=True)
        return torch.where(hopeless, torch.zeros_like(safe), safe)  # type: ignore[return-value]


def merged_activations(parts: list[dict[str, SiteStats]]) -> dict[str, SiteStats]:
    """Activation sites of several reports (or ranks) summed by name, without touching the parts."""
    merged = ReportPart.stacked([ReportPart(part, per_call=True) for part in parts]).stats
    assert isinstance(merged, dict)  # a per-call part keeps its records by module
    return merged


class RequestAccounting:
    """Counts one evaluation's requests per task, and stores each answer's flags for the request cache.

    `world_size` and `faults_report` (the report of the faults on the model now) serve the merge
    over data-parallel ranks, which every rank reaches together, once per request type.
    """

    def __init__(self, world_size: int, faults_report: Callable[[], FaultReport]) -> None:
        self._world_size = world_size
        self._faults_report = faults_report
        self.cache: CountedCache | None = None
        self._reported = False
        self._last_flat: list[bool] = []
        self._generation_flags: list[tuple[Tokens, bool, bool]] = []
        self.reset()

    def reset(self) -> None:
        """Fresh counters: new faults, or a new evaluation."""
        self._counts = RequestCounts()
        self._flat_positions: dict[Tokens, np.ndarray] = {}
        self._rank_merged: tuple[dict[str, SiteStats], RequestCounts] | None = None

    def new_evaluation(self) -> None:
        """The first request after the report was read starts a new evaluation."""
        if self._reported:
            self._reported = False
            self.reset()

    def mark_reported(self) -> None:
        self._reported = True

    # -- degeneracy of scored requests ------------------------------------------------------

    def start_scoring(self) -> None:
        self._last_flat = []

    def forget_flat_positions(self) -> None:
        self._flat_positions = {}

    def note_flat_positions(self, rows: list[list[int]], lengths: list[int], logits: torch.Tensor) -> None:
        """Keep the flat positions of the rows with any (rare unless the model collapsed)."""
        flat = (logits.amax(dim=-1) == logits.amin(dim=-1)).cpu().numpy()
        for row, length, row_flat in zip(rows, lengths, flat, strict=True):
            if row_flat[:length].any():
                self._flat_positions[tuple(row[:length])] = row_flat[:length]

    def note_scored(self, inputs: list[Tokens], requests: list) -> None:
        """For each scored request, whether every position scoring its continuation (the input's
        last ones) was flat: the model then said nothing about this answer. A flat context
        position alone does not count."""
        self._last_flat = [
            self._scored_positions_flat(model_input, len(continuation))
            for model_input, (_, _, continuation) in zip(inputs, requests, strict=True)
        ]

    def _scored_positions_flat(self, model_input: Tokens, scored: int) -> bool:
        flat = self._flat_positions.get(model_input)
        return flat is not None and bool(flat[len(model_input) - scored :].all())

    def degenerate(self, requests: list[Instance], logprobs: list[float]) -> list[bool]:
        """Requests scored flat, or tied for their document's best choice."""
        tied = tied_choices(logprobs, [(r.task_name or "", r.doc_id) for r in requests])
        return [flat or tie for flat, tie in zip(self._last_flat, tied, strict=True)]

    # -- counting ----------------------------------------------------------------------------

    def count(self, attr: str, requests: list[Instance], nonfinite: list[bool], degenerate: list[bool]) -> None:
        """Count requests of request type `attr` with their flags, then merge the ranks."""
        for request, bad, flat in zip(requests, nonfinite, degenerate, strict=False):
            task = request.task_name or ""
            self._counts.count(task, bad, flat)
            if self.cache is not None:
                self.cache.remember(attr, request.args, (task, bad, flat))
        self.merge_ranks()

    def count_served(self, flags: RequestFlags) -> None:
        """An answer the request cache served: counted with the flags it had when computed."""
        task, nonfinite, degenerate = flags
        self._counts.count(task, bool(nonfinite), bool(degenerate), cached=True)

    def start_generation(self) -> None:
        self._generation_flags = []

    def note_generation(self, prompts: list[Tokens], guard: NonFiniteLogitsGuard) -> None:
        """One `_model_generate` batch's rows, flagged by its guard."""
        if guard.flagged is not None and guard.flat is not None:
            self._generation_flags.extend(zip(prompts, guard.flagged.tolist(), guard.flat.tolist(), strict=False))

    def count_generations(self, task: str, requests: list[Instance], prompt_of: Callable[[Instance], Tokens]) -> None:
        """Charge the generated rows' flags to their task (exact sums), and to their request by
        prompt tokens (`prompt_of`) for the request cache's memory."""
        self._counts.count_rows(task, len(requests), [(bad, flat) for _, bad, flat in self._generation_flags])
        if self.cache is None:
            return
        flags_by_prompt = {prompt: (bad, flat) for prompt, bad, flat in self._generation_flags}
        for request in requests:
            bad, flat = flags_by_prompt.get(prompt_of(request), (False, False))
            self.cache.remember("generate_until", request.args, (task, bad, flat))

    # -- ranks and the report ----------------------------------------------------------------

    def merge_ranks(self) -> None:
        """Sum counters and activation sites over data-parallel ranks."""
        if self._world_size <= 1 or not torch.distributed.is_initialized():
            return
        current = self._faults_report()
        current.settle()
        gathered: list[Any] = [None] * self._world_size
        torch.distributed.all_gather_object(gathered, (current.activations, self._counts))
        counts = RequestCounts()
        for _, rank_counts in gathered:
            counts.add(rank_counts)
        self._rank_merged = (merged_activations([rank_activations for rank_activations, _ in gathered]), counts)

    def fill(self, report: FaultReport) -> None:
        """Put this evaluation's request counts (and, across ranks, the summed activation sites) on a settled report."""
        activations, counts = self._rank_merged or (report.activations, self._counts)
        report.activations = activations
        report.set_request_counts(**counts.as_dicts())
