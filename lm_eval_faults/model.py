"""`faulty_hf`: lm-eval's `hf` model with counted, reproducible faults, and nothing else changed.

A thin subclass of `HFLM`: it takes its fault keys out of `model_args` (validated before the model
loads), hands every other key to `HFLM` untouched, injects after loading, and reports through
`get_model_info()`, which lm-eval writes into the results JSON under `config`. When no fault is
active (p=0) it adds no hook and no code path: results are bit-identical to `--model hf`.
"""

from __future__ import annotations

import inspect
import logging
import math
import sys
from collections import Counter
from typing import Any

import torch
from lm_eval.api.instance import Instance
from lm_eval.api.registry import register_model
from lm_eval.models.huggingface import HFLM
from transformers import LogitsProcessor, LogitsProcessorList

from lm_eval_faults.injection import Injection
from lm_eval_faults.paths import demo_model_dir
from lm_eval_faults.report import FaultReport, SiteStats
from lm_eval_faults.spec import FaultSpec, parse_fault_args

logger = logging.getLogger(__name__)

HFLM_ARGUMENTS = frozenset(inspect.signature(HFLM.__init__).parameters) - {"self", "kwargs"}


class NonFiniteLogitsGuard(LogitsProcessor):
    """Flags generation rows whose logits went non-finite and makes them safe to sample from.

    NaN becomes 0, +Inf the largest finite value, and an all -Inf row uniform, so greedy and
    sampled decoding never raise ("probability tensor contains inf/nan") on a damaged model.
    """

    def __init__(self) -> None:
        self.flagged: torch.Tensor | None = None

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        finite = torch.isfinite(scores)
        bad_rows = ~finite.all(dim=-1)
        self.flagged = bad_rows if self.flagged is None else self.flagged | bad_rows
        scores = torch.nan_to_num(scores, nan=0.0, posinf=torch.finfo(scores.dtype).max, neginf=-math.inf)
        hopeless = torch.isneginf(scores).all(dim=-1, keepdim=True)
        return torch.where(hopeless, torch.zeros_like(scores), scores)


@register_model("faulty_hf")
class FaultyHFLM(HFLM):
    """`HFLM` plus a fault injector configured by the fault keys of `model_args`."""

    def __init__(self, pretrained: Any = None, **kwargs: Any) -> None:
        spec, hf_kwargs = parse_fault_args(kwargs, passthrough=HFLM_ARGUMENTS)
        if pretrained is None:
            pretrained = str(demo_model_dir())
            print(f"lm_eval_faults: no `pretrained` given; using the embedded demo model at {pretrained}", file=sys.stderr)
        super().__init__(pretrained=pretrained, **hf_kwargs)
        self._current_task: str | None = None
        self.print_report = True
        self._inject(spec)

    # -- faults --------------------------------------------------------------------------

    @property
    def spec(self) -> FaultSpec:
        return self.injection.spec

    def set_faults(self, spec: FaultSpec) -> Injection:
        """Restore the clean weights (O(k)) and inject `spec` instead: sweeps never reload."""
        self.injection.restore()
        return self._inject(spec)

    def _inject(self, spec: FaultSpec) -> Injection:
        """Inject `spec` into the (clean) model, with fresh request counters."""
        self._nonfinite_requests: Counter[str] = Counter()
        self._requests: Counter[str] = Counter()
        self._rank_merged: tuple[dict[str, SiteStats], Counter, Counter] | None = None
        self.injection = Injection(self.model, spec, progress=self.rank == 0)
        return self.injection

    @property
    def report(self) -> FaultReport:
        """The fault report, with request counts (summed over data-parallel ranks)."""
        report = self.injection.report
        activations, nonfinite, requests = self._rank_merged or (report.activations, self._nonfinite_requests, self._requests)
        report.activations = activations
        report.nonfinite_requests = dict(nonfinite)
        report.requests = dict(requests)
        return report

    # -- request types: count non-finite results per task -----------------------------------

    def loglikelihood(self, requests: list[Instance], disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        results = super().loglikelihood(requests, disable_tqdm=disable_tqdm)
        self._count(requests, [not math.isfinite(logprob) for logprob, _ in results])
        return results

    def loglikelihood_rolling(self, requests: list[Instance], disable_tqdm: bool = False) -> list[float]:
        results = super().loglikelihood_rolling(requests, disable_tqdm=disable_tqdm)
        self._count(requests, [not math.isfinite(logprob) for logprob in results])
        return results

    def generate_until(self, requests: list[Instance], disable_tqdm: bool = False) -> list[str]:
        if not self.spec.active:
            results = super().generate_until(requests, disable_tqdm=disable_tqdm)
            self._count(requests, [False] * len(requests))
            return results
        # With faults, generate task by task so non-finite rows can be charged to their task.
        results: list[str | None] = [None] * len(requests)
        by_task: dict[str, list[int]] = {}
        for index, request in enumerate(requests):
            by_task.setdefault(request.task_name or "", []).append(index)
        for task, indices in by_task.items():
            self._current_task = task
            outputs = super().generate_until([requests[i] for i in indices], disable_tqdm=disable_tqdm)
            for index, output in zip(indices, outputs):
                results[index] = output
            self._requests[task] += len(indices)
        self._current_task = None
        self._merge_ranks()
        return results  # type: ignore[return-value]

    def _model_generate(self, context, max_length: int, stop: list[str], **generation_kwargs) -> torch.Tensor:
        if not self.spec.active:
            return super()._model_generate(context, max_length, stop, **generation_kwargs)
        guard = NonFiniteLogitsGuard()
        processors = LogitsProcessorList([*generation_kwargs.pop("logits_processor", []), guard])
        output = super()._model_generate(context, max_length, stop, logits_processor=processors, **generation_kwargs)
        if guard.flagged is not None:
            self._nonfinite_requests[self._current_task or ""] += int(guard.flagged.sum())
        return output

    def _count(self, requests: list[Instance], nonfinite: list[bool]) -> None:
        for request, bad in zip(requests, nonfinite):
            self._requests[request.task_name or ""] += 1
            self._nonfinite_requests[request.task_name or ""] += int(bad)
        self._merge_ranks()

    def _merge_ranks(self) -> None:
        """Sum counters over data-parallel ranks (all ranks reach here together, once per request type)."""
        if self.world_size <= 1 or not torch.distributed.is_initialized():
            return
        local = (self.injection.report.activations, self._nonfinite_requests, self._requests)
        gathered: list[Any] = [None] * self.world_size
        torch.distributed.all_gather_object(gathered, local)
        activations: dict[str, SiteStats] = {}
        nonfinite: Counter[str] = Counter()
        requests: Counter[str] = Counter()
        for rank_activations, rank_nonfinite, rank_requests in gathered:
            for name, stats in rank_activations.items():
                if name in activations:
                    activations[name].add(stats)
                else:
                    activations[name] = SiteStats(**vars(stats))
            nonfinite.update(rank_nonfinite)
            requests.update(rank_requests)
        self._rank_merged = (activations, nonfinite, requests)

    # -- lm-eval integration -----------------------------------------------------------------

    def set_cache_hook(self, cache_hook) -> None:
        """Keep `--use_cache` results of different fault specs apart.

        lm-eval's CachingLM keys its sqlite cache on the request alone. We move its table to one
        named after the spec's fingerprint, so a cached answer is only ever served to the spec
        that produced it; a clean spec keeps lm-eval's default table, shared with `--model hf`.
        """
        super().set_cache_hook(cache_hook)
        dbdict = getattr(cache_hook, "dbdict", None)
        if dbdict is not None and self.spec.active:
            filename = dbdict.filename
            dbdict.close()
            type(dbdict).__init__(dbdict, filename, tablename=f"faulty_hf_{self.spec.fingerprint()}", autocommit=True)

    def get_model_info(self) -> dict:
        """lm-eval's model info plus the fault report; also prints the report's summary table."""
        info = super().get_model_info()
        report = self.report
        if self.spec.active:
            report.check_not_silent("activations")
        if self.print_report:
            print(report.format_table(), file=sys.stderr)
        info["fault_injection"] = report.to_dict()
        return info
