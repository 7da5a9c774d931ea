"""`faulty_hf`: lm-eval's `hf` model with counted, reproducible faults, and nothing else changed.

A thin subclass of `HFLM`: it takes its fault keys out of `model_args` (validated before the model
loads), hands every other key to `HFLM` untouched, injects after loading, and reports through
`get_model_info()`, which lm-eval writes into the results JSON under `config`. When no fault is
active (p=0) it adds no hook and no code path: results are bit-identical to `--model hf`.
"""

from __future__ import annotations

import contextlib
import inspect
import logging
import math
import os
import sys
import warnings
from collections.abc import Iterator, Mapping
from typing import Any

import numpy as np
import torch
from lm_eval.api.instance import Instance
from lm_eval.api.model import CacheHook
from lm_eval.api.registry import register_model
from lm_eval.models.huggingface import HFLM
from transformers import LogitsProcessor, LogitsProcessorList

from lm_eval_faults.core.fault_map import FaultMap
from lm_eval_faults.core.injection import Injection, live_injections
from lm_eval_faults.core.injectors.activations import Rows
from lm_eval_faults.core.protection.clamping import ActivationBounds
from lm_eval_faults.core.random.streams import request_key, row_keys
from lm_eval_faults.core.report import FaultReport, SiteStats
from lm_eval_faults.core.spec import FAULT_KEYS, FaultSpec, parse_arg_string, parse_fault_args
from lm_eval_faults.harness.autoload import COMMAND_LINE_MODEL_ARGS
from lm_eval_faults.harness.calibration import bounds_key, calibrated_bounds, swapped
from lm_eval_faults.harness.lm_eval_silencing import install_quiet_git_hash
from lm_eval_faults.harness.package_data import demo_model_dir
from lm_eval_faults.harness.preflight import check_against_config, check_as_written, check_fault_files, check_keys, read_config
from lm_eval_faults.harness.request_cache import CountedCache, cache_table
from lm_eval_faults.harness.request_counts import RequestCounts, tied_choices

logger = logging.getLogger(__name__)

HFLM_ARGUMENTS = frozenset(inspect.signature(HFLM.__init__).parameters) - {"self", "kwargs"}


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


def combined_report(injections: list[Injection]) -> FaultReport:
    """One report for several injections stacked on a model: the specs side by side, every
    faulted site of each (a tensor faulted twice appears twice, so the totals add up)."""
    if len(injections) == 1:
        return injections[0].report
    return FaultReport.stacked([injection.report for injection in injections])


RATE_KEYS = ("p", "p01", "p10", "replay")
"""The keys that make faults happen: without one, every other fault key describes nothing."""


def _warn_without_rate(model_args: Mapping[str, Any]) -> None:
    """Fault keys given but no rate: the run is the clean model, which a user who wrote
    `fault=stuck1,bits=exponent` would otherwise read as "stuck-at-1 in the exponent is harmless"."""
    chosen = [key for key in model_args if key in FAULT_KEYS and key != "seed"]
    if chosen and not any(key in model_args for key in RATE_KEYS):
        warnings.warn(
            f"lm_eval_faults: model_args set {', '.join(chosen)} but no rate (p=, or p01=/p10=): p=0, NO FAULTS are injected",
            stacklevel=3,
        )


@register_model("faulty_hf")
class FaultyHFLM(HFLM):
    """`HFLM` plus a fault injector configured by the fault keys of `model_args`."""

    injection: Injection

    def __init__(self, pretrained: Any = None, **kwargs: Any) -> None:
        spec, hf_kwargs = parse_fault_args(kwargs, passthrough=HFLM_ARGUMENTS)
        _warn_without_rate(kwargs)
        if pretrained is None:
            pretrained = str(demo_model_dir())
            print(f"lm_eval_faults: no `pretrained` given; using the embedded demo model at {pretrained}", file=sys.stderr)
        check_as_written(COMMAND_LINE_MODEL_ARGS)
        config = read_config({**hf_kwargs, "pretrained": pretrained})
        check_keys(hf_kwargs, HFLM_ARGUMENTS, config)
        check_against_config(spec, hf_kwargs, config)
        check_fault_files(spec, hf_kwargs, config)
        super().__init__(pretrained=pretrained, **hf_kwargs)
        install_quiet_git_hash()  # no "fatal: not a git repository" when lm_eval runs outside a checkout
        self._gguf_file = hf_kwargs.get("gguf_file")
        self._cache: CountedCache | None = None
        self._generation_flags: list[tuple[tuple[int, ...], bool, bool]] = []
        self._known_inputs: set[tuple[int, ...]] = set()
        self._last_flat: list[bool] = []
        self.print_report = True
        self._activation_bounds: ActivationBounds | None = None
        self._pending: FaultSpec | None = None
        self._evaluation_reported = False
        self._inject(spec)

    @classmethod
    def create_from_arg_string(cls, arg_string: str, additional_config: dict | None = None) -> FaultyHFLM:
        """A `model_args` string: refuse a key given twice, and check fault values as written
        (lm-eval's parser would keep the last duplicate and turn p=1e-400 into 0 silently)."""
        args = parse_arg_string(arg_string)
        parse_fault_args(args, passthrough=args)
        return super().create_from_arg_string(arg_string, additional_config)

    # -- faults --------------------------------------------------------------------------

    @property
    def spec(self) -> FaultSpec:
        return self._pending or self.injection.spec

    def set_faults(self, spec: FaultSpec) -> Injection:
        """Restore the clean weights (O(k)) and inject `spec` instead: sweeps never reload."""
        self.injection.restore()
        return self._inject(spec)

    def replay_faults(self, fault_map: FaultMap | None) -> Injection:
        """Restore the clean weights (O(k)) and replay exactly `fault_map` (None: stay clean)."""
        if fault_map is None:
            return self.set_faults(FaultSpec())
        self.injection.restore()
        self._reset_counts()
        self.injection = Injection.replay(self.model, fault_map)
        return self.injection

    def _reset_counts(self) -> None:
        self._counts = RequestCounts()
        self._flat_positions: dict[tuple[int, ...], np.ndarray] = {}
        self._rank_merged: tuple[dict[str, SiteStats], RequestCounts] | None = None

    def _inject(self, spec: FaultSpec) -> Injection:
        """Inject `spec` into the (clean) model, with fresh request counters. Range restriction on
        activations waits, with the model clean, for the first requests to calibrate on."""
        self._reset_counts()
        needs_bounds = spec.active and "activations" in spec.clamp and self._activation_bounds is None
        self._pending = spec if needs_bounds else None
        self.injection = Injection.apply(
            self.model, FaultSpec() if needs_bounds else spec, progress=self.rank == 0, activation_bounds=self._activation_bounds
        )
        return self.injection

    def _calibrate(self, request_type: str, requests: list[Instance]) -> None:
        """Record clean output bounds on these requests (or read them from the cache), then inject."""
        if self._pending is None:
            return
        pending, self._pending = self._pending, None  # the calibration pass runs the clean model
        key = bounds_key(self.model_identity(), request_type, requests)
        with swapped(self, "cache_hook", CacheHook(None)):
            self._activation_bounds = calibrated_bounds(
                self.model, key, lambda: getattr(HFLM, request_type)(self, requests, disable_tqdm=self.rank != 0)
            )
        self._inject(pending)

    @property
    def _live(self) -> list[Injection]:
        """Every injection on the model now: ours, and any applied from outside (a replayed subset)."""
        return live_injections(self.model)

    @property
    def _faulted(self) -> bool:
        """Whether the model carries faults now, whoever put them there: the checks and counts of a
        faulted run apply (an outside `Injection.replay` on a p=0 `faulty_hf` is a faulted run)."""
        return self.spec.active or bool(self._live)

    @property
    def _faults_activations(self) -> bool:
        return any(injection.spec.active and injection.spec.on_activations for injection in self._live)

    def _next_forward(self, rows: Rows | None) -> None:
        for injection in self._live:
            injection.next_forward(rows)

    def _new_evaluation(self) -> None:
        """Counters describe one evaluation: lm-eval reads the report once, at its end
        (`get_model_info`), so the first request after that read starts a new one."""
        if self._evaluation_reported:
            self._evaluation_reported = False
            self._reset_counts()

    # -- batching: probes are clean, a request's faults do not depend on its batch ------------

    def _detect_batch_size(self, requests=None, pos: int = 0):
        """lm-eval's `--batch_size auto` probe forwards: fault-free and uncounted."""
        with contextlib.ExitStack() as stack:
            for injection in self._live:
                stack.enter_context(injection.paused())
            return super()._detect_batch_size(requests, pos)

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, override_bs: int | None = None):
        """Remember each request's model input, so `_model_call` can tell padding from tokens; flag
        requests whose every scored position got a flat (constant) next-token distribution."""
        if not self._faulted:
            return super()._loglikelihood_tokens(requests, disable_tqdm=disable_tqdm, override_bs=override_bs)
        # The input lm-eval builds for each request: (context + continuation), left-truncated, last token dropped.
        inputs = [tuple((context + continuation)[-(self.max_length + 1) :][:-1]) for _, context, continuation in requests]
        self._known_inputs, self._flat_positions = set(inputs), {}
        try:
            results = super()._loglikelihood_tokens(requests, disable_tqdm=disable_tqdm, override_bs=override_bs)
        finally:
            self._known_inputs = set()
        self._last_flat = [
            self._scored_positions_flat(model_input, len(continuation))
            for model_input, (_, _, continuation) in zip(inputs, requests, strict=True)
        ]
        return results

    def _scored_positions_flat(self, model_input: tuple[int, ...], scored: int) -> bool:
        """Whether every position scoring the continuation (the input's last `scored`) was flat:
        the model then said nothing about this answer. A flat context position alone does not count."""
        flat = self._flat_positions.get(model_input)
        return flat is not None and bool(flat[len(model_input) - scored :].all())

    def _model_call(self, inps: torch.Tensor, attn_mask=None, labels=None) -> torch.Tensor:
        """One scoring forward. With activation faults, each row draws its own faults, keyed by
        its tokens, on its real positions only (lm-eval right-pads rows with token 0)."""
        if not self._faulted or attn_mask is not None:
            return super()._model_call(inps, attn_mask=attn_mask, labels=labels)
        rows = inps.tolist()
        lengths = [self._real_length(row) for row in rows]
        if self._faults_activations:
            keys = np.array([request_key(row[:length]) for row, length in zip(rows, lengths, strict=True)], dtype=np.uint64)
            self._next_forward(Rows(keys, np.zeros(len(rows), dtype=np.int64), np.array(lengths, dtype=np.int64), inps.shape[1]))
        try:
            logits = super()._model_call(inps)
        finally:
            self._next_forward(None)
        flat = (logits.amax(dim=-1) == logits.amin(dim=-1)).cpu().numpy()
        for row, length, row_flat in zip(rows, lengths, flat, strict=True):
            if row_flat[:length].any():  # kept only for rows with a flat position: rare unless collapsed
                self._flat_positions[tuple(row[:length])] = row_flat[:length]
        return logits

    def _real_length(self, row: list[int]) -> int:
        """The row's length without lm-eval's right padding: the shortest known input it starts with
        once trailing zeros are stripped (rows of unknown inputs count as unpadded)."""
        length = len(row)
        while length and row[length - 1] == 0:
            length -= 1
        for candidate in range(length, len(row) + 1):
            if tuple(row[:candidate]) in self._known_inputs:
                return candidate
        return len(row)

    def _faults_report(self) -> FaultReport:
        """The report of the faults on the model now (ours, or those replayed on it from outside)."""
        live = self._live
        return combined_report(live) if live else self.injection.report

    @property
    def report(self) -> FaultReport:
        """The fault report of the faults on the model now, with the request counts of this
        evaluation (summed over data-parallel ranks)."""
        report = self._faults_report()
        report.settle()
        activations, counts = self._rank_merged or (report.activations, self._counts)
        report.activations = activations
        report.set_request_counts(**counts.as_dicts())
        return report

    # -- request types: count non-finite and degenerate results per task -----------------------

    def loglikelihood(self, requests: list[Instance], disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        self._new_evaluation()
        self._calibrate("loglikelihood", requests)
        self._last_flat = []
        results = super().loglikelihood(requests, disable_tqdm=disable_tqdm)
        logprobs = [logprob for logprob, _ in results]
        degenerate = [False] * len(requests)  # p=0 is `hf` exactly: no checks on the clean model
        if self._faulted:
            tied = tied_choices(logprobs, [(r.task_name or "", r.doc_id) for r in requests])
            degenerate = [flat or tie for flat, tie in zip(self._last_flat, tied, strict=True)]
        self._count("loglikelihood", requests, [not math.isfinite(x) for x in logprobs], degenerate)
        return results

    def loglikelihood_rolling(self, requests: list[Instance], disable_tqdm: bool = False) -> list[float]:
        self._new_evaluation()
        self._calibrate("loglikelihood_rolling", requests)
        results = super().loglikelihood_rolling(requests, disable_tqdm=disable_tqdm)
        self._count("loglikelihood_rolling", requests, [not math.isfinite(x) for x in results], [False] * len(requests))
        return results

    def generate_until(self, requests: list[Instance], disable_tqdm: bool = False) -> list[str]:
        self._new_evaluation()
        self._calibrate("generate_until", requests)
        if not self._faulted:
            clean = super().generate_until(requests, disable_tqdm=disable_tqdm)
            self._count("generate_until", requests, [False] * len(requests), [False] * len(requests))
            return clean
        # With faults, generate task by task: the guard's flagged rows are charged to their task
        # (exact sums), and to their request by prompt tokens (for the request cache's memory).
        results: list[str | None] = [None] * len(requests)
        by_task: dict[str, list[int]] = {}
        for index, request in enumerate(requests):
            by_task.setdefault(request.task_name or "", []).append(index)
        for task, indices in by_task.items():
            self._generation_flags = []
            outputs = super().generate_until([requests[i] for i in indices], disable_tqdm=disable_tqdm)
            for index, output in zip(indices, outputs, strict=False):
                results[index] = output
            self._counts.count_rows(task, len(indices), [(bad, flat) for _, bad, flat in self._generation_flags])
            if self._cache is not None:
                self._remember_generations(task, [requests[i] for i in indices])
        self._merge_ranks()
        return [result or "" for result in results]

    def _remember_generations(self, task: str, requests: list[Instance]) -> None:
        """Store each request's flags for the request cache, found by its prompt tokens."""
        assert self._cache is not None
        flags_by_prompt = {prompt: (bad, flat) for prompt, bad, flat in self._generation_flags}
        for request in requests:
            prompt = tuple(self.tok_batch_encode([request.args[0]])[0][0].tolist())
            bad, flat = flags_by_prompt.get(prompt, (False, False))
            self._cache.remember("generate_until", request.args, (task, bad, flat))

    def _model_generate(self, context, max_length: int, stop: list[str], **generation_kwargs) -> torch.Tensor:
        if not self._faulted:
            return super()._model_generate(context, max_length, stop, **generation_kwargs)
        guard = NonFiniteLogitsGuard()
        processors = LogitsProcessorList([*generation_kwargs.pop("logits_processor", []), guard])
        mask = generation_kwargs.get("attention_mask")
        mask = torch.ones_like(context) if mask is None else mask
        prompts = [tuple(row[keep].tolist()) for row, keep in zip(context.cpu(), mask.cpu().bool(), strict=False)]
        with self._generation_rows(prompts):
            output = super()._model_generate(context, max_length, stop, logits_processor=processors, **generation_kwargs)
        if guard.flagged is not None and guard.flat is not None:
            self._generation_flags.extend(zip(prompts, guard.flagged.tolist(), guard.flat.tolist(), strict=False))
        return output

    @contextlib.contextmanager
    def _generation_rows(self, prompts: list[tuple[int, ...]]) -> Iterator[None]:
        """Key each row's activation faults by its own prompt tokens and decoding step, on its
        real (not left-padding) positions: generation faults do not depend on the batch either."""
        if not self._faults_activations:
            yield
            return
        base = np.array([request_key(prompt) for prompt in prompts], dtype=np.uint64)
        step = 0

        def before_forward(module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
            nonlocal step
            ids = kwargs.get("input_ids", args[0] if args else None)
            if ids is None:
                return
            length = ids.shape[1]
            valid = kwargs.get("attention_mask")
            valid = torch.ones_like(ids) if valid is None else valid[:, -length:]
            starts = (length - valid.sum(dim=1)).cpu().numpy().astype(np.int64)
            keys = row_keys(step, base)
            self._next_forward(Rows(keys, starts, np.full(len(base), length, dtype=np.int64), length))
            step += 1

        handle = self.model.register_forward_pre_hook(before_forward, with_kwargs=True)
        try:
            yield
        finally:
            handle.remove()
            self._next_forward(None)

    def _count(self, attr: str, requests: list[Instance], nonfinite: list[bool], degenerate: list[bool]) -> None:
        for request, bad, flat in zip(requests, nonfinite, degenerate, strict=False):
            task = request.task_name or ""
            self._counts.count(task, bad, flat)
            if self._cache is not None:
                self._cache.remember(attr, request.args, (task, bad, flat))
        self._merge_ranks()

    def _count_served(self, flags: tuple[str, bool, bool]) -> None:
        """An answer the request cache served: counted with the flags it had when computed."""
        task, nonfinite, degenerate = flags
        self._counts.count(task, bool(nonfinite), bool(degenerate), cached=True)

    def _merge_ranks(self) -> None:
        """Sum counters over data-parallel ranks (all ranks reach here together, once per request type)."""
        if self.world_size <= 1 or not torch.distributed.is_initialized():
            return
        current = self._faults_report()
        current.settle()
        local = (current.activations, self._counts)
        gathered: list[Any] = [None] * self.world_size
        torch.distributed.all_gather_object(gathered, local)
        activations: dict[str, SiteStats] = {}
        counts = RequestCounts()
        for rank_activations, rank_counts in gathered:
            for name, stats in rank_activations.items():
                if name in activations:
                    activations[name].add(stats)
                else:
                    activations[name] = SiteStats(**vars(stats))
            counts.add(rank_counts)
        self._rank_merged = (activations, counts)

    # -- lm-eval integration -----------------------------------------------------------------

    def set_cache_hook(self, cache_hook) -> None:
        """`--use_cache`: a table per (model identity, fault spec), and served answers counted."""
        super().set_cache_hook(cache_hook)
        dbdict = getattr(cache_hook, "dbdict", None)
        if dbdict is not None:
            table = cache_table(self.model_identity(), self.spec.fingerprint())
            self._cache = CountedCache(dbdict, table, self._count_served)

    def model_identity(self) -> dict[str, Any]:
        """What decides this model's answers besides the faults: where it came from and how it was loaded."""
        pretrained = (
            self.pretrained if isinstance(self.pretrained, str) else getattr(self.model.config, "_name_or_path", type(self.model).__name__)
        )
        if isinstance(pretrained, str) and os.path.exists(pretrained):
            pretrained = os.path.realpath(pretrained)
        return {
            "pretrained": pretrained,
            "revision": self.revision,
            "dtype": str(self.model.dtype),
            "peft": self.peft,
            "gguf_file": self._gguf_file,
            "class": type(self.model).__name__,
        }

    def get_model_info(self) -> dict:
        """lm-eval's model info plus the fault report; also prints the report's summary table."""
        info = super().get_model_info()
        report = self.report
        if self._faulted:
            report.check_not_silent("activations")
        if self.print_report:
            print(report.format_table(), file=sys.stderr)
        info["fault_injection"] = report.to_dict()
        self._evaluation_reported = True
        return info
