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
from collections.abc import Mapping
from typing import Any

import torch
from lm_eval.api.instance import Instance
from lm_eval.api.model import CacheHook
from lm_eval.api.registry import register_model
from lm_eval.models.huggingface import HFLM
from transformers import LogitsProcessorList

from lm_eval_faults.core.fault_map import FaultMap
from lm_eval_faults.core.injection import Injection, live_injections
from lm_eval_faults.core.protection.clamping import ActivationBounds
from lm_eval_faults.core.report import FaultReport
from lm_eval_faults.core.sites.registry import site_kind
from lm_eval_faults.core.sites.rows import Rows
from lm_eval_faults.core.spec import FAULT_KEYS, FaultSpec, parse_arg_string, parse_fault_args
from lm_eval_faults.core.storage.codecs import FILE
from lm_eval_faults.harness.autoload import COMMAND_LINE_MODEL_ARGS
from lm_eval_faults.harness.calibration import bounds_key, calibrated_bounds, swapped
from lm_eval_faults.harness.gguf_storage import attach_gguf_storage, gguf_path
from lm_eval_faults.harness.lm_eval_silencing import install_quiet_git_hash
from lm_eval_faults.harness.package_data import demo_model_dir
from lm_eval_faults.harness.preflight import check_against_config, check_as_written, check_fault_files, check_keys, read_config
from lm_eval_faults.harness.request_accounting import NonFiniteLogitsGuard, RequestAccounting
from lm_eval_faults.harness.request_cache import CountedCache, cache_table
from lm_eval_faults.harness.row_keying import ScoringRows, generation_rows, prompt_tokens, scoring_inputs, scoring_rows

logger = logging.getLogger(__name__)

HFLM_ARGUMENTS = frozenset(inspect.signature(HFLM.__init__).parameters) - {"self", "kwargs"}


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
    """`HFLM` plus a fault injector configured by the fault keys of `model_args`.

    Its own jobs are the fault lifecycle and the report; its overrides of `HFLM` hand row keying
    (`row_keying`) and request counting (`request_accounting`) to helpers it composes.
    """

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
        self._pretrained = pretrained
        self._file_storage_attached = False
        self._accounting = RequestAccounting(self.world_size, self._faults_report)
        self._scoring_rows = ScoringRows()
        self.print_report = True
        self._activation_bounds: ActivationBounds | None = None
        self._pending: FaultSpec | None = None
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
        self._accounting.reset()
        self.prepare_storage(str(fault_map.spec.get("storage", "none")))
        self.injection = Injection.replay(self.model, fault_map)
        return self.injection

    def _inject(self, spec: FaultSpec) -> Injection:
        """Inject `spec` into the (clean) model, with fresh request counters. Range restriction on
        activations waits, with the model clean, for the first requests to calibrate on."""
        self._accounting.reset()
        self.prepare_storage(spec.storage if spec.replay is None else str(FaultMap.load(spec.replay).spec.get("storage", "none")))
        needs_bounds = spec.active and "activations" in spec.clamp and self._activation_bounds is None
        self._pending = spec if needs_bounds else None
        self.injection = Injection.apply(
            self.model, FaultSpec() if needs_bounds else spec, progress=self.rank == 0, activation_bounds=self._activation_bounds
        )
        return self.injection

    def prepare_storage(self, storage: str) -> None:
        """Before the first `storage=file` injection, replay of one's map, or check of what a
        sweep's `storage=file` points select: give the weights the blocks of the GGUF file they
        were loaded from (once; the blocks stay attached, unfaulted, for later points)."""
        if storage == FILE and not self._file_storage_attached:
            attach_gguf_storage(self.model, gguf_path(str(self._pretrained), str(self._gguf_file)))
            self._file_storage_attached = True

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
    def _faults_per_call(self) -> bool:
        """Whether a live injection faults a site per forward call (activations, the KV cache),
        whose faults are keyed by the request rows each forward declares."""
        return any(injection.spec.active and any(site_kind(name).per_call for name in injection.spec.sites) for injection in self._live)

    def _next_forward(self, rows: Rows | None) -> None:
        for injection in self._live:
            injection.next_forward(rows)

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
        inputs = scoring_inputs(requests, self.max_length)
        self._accounting.forget_flat_positions()
        with self._scoring_rows.scoring(inputs):
            results = super()._loglikelihood_tokens(requests, disable_tqdm=disable_tqdm, override_bs=override_bs)
        self._accounting.note_scored(inputs, requests)
        return results

    def _model_call(self, inps: torch.Tensor, attn_mask=None, labels=None) -> torch.Tensor:
        """One scoring forward. With activation or KV-cache faults, each row draws its own faults,
        keyed by its tokens, on its real positions only (lm-eval right-pads rows with token 0)."""
        if not self._faulted or attn_mask is not None:
            return super()._model_call(inps, attn_mask=attn_mask, labels=labels)
        rows = inps.tolist()
        lengths = [self._scoring_rows.real_length(row) for row in rows]
        if self._faults_per_call:
            self._next_forward(scoring_rows(rows, lengths, inps.shape[1]))
        try:
            logits = super()._model_call(inps)
        finally:
            self._next_forward(None)
        self._accounting.note_flat_positions(rows, lengths, logits)
        return logits

    # -- request types: count non-finite and degenerate results per task -----------------------

    def loglikelihood(self, requests: list[Instance], disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        self._accounting.new_evaluation()
        self._calibrate("loglikelihood", requests)
        self._accounting.start_scoring()
        results = super().loglikelihood(requests, disable_tqdm=disable_tqdm)
        logprobs = [logprob for logprob, _ in results]
        # p=0 is `hf` exactly: no checks on the clean model
        degenerate = self._accounting.degenerate(requests, logprobs) if self._faulted else [False] * len(requests)
        self._accounting.count("loglikelihood", requests, [not math.isfinite(x) for x in logprobs], degenerate)
        return results

    def loglikelihood_rolling(self, requests: list[Instance], disable_tqdm: bool = False) -> list[float]:
        self._accounting.new_evaluation()
        self._calibrate("loglikelihood_rolling", requests)
        results = super().loglikelihood_rolling(requests, disable_tqdm=disable_tqdm)
        self._accounting.count("loglikelihood_rolling", requests, [not math.isfinite(x) for x in results], [False] * len(requests))
        return results

    def generate_until(self, requests: list[Instance], disable_tqdm: bool = False) -> list[str]:
        self._accounting.new_evaluation()
        self._calibrate("generate_until", requests)
        if not self._faulted:
            clean = super().generate_until(requests, disable_tqdm=disable_tqdm)
            self._accounting.count("generate_until", requests, [False] * len(requests), [False] * len(requests))
            return clean
        # With faults, generate task by task: the guard's flagged rows are charged to their task
        # (exact sums), and to their request by prompt tokens (for the request cache's memory).
        results: list[str | None] = [None] * len(requests)
        by_task: dict[str, list[int]] = {}
        for index, request in enumerate(requests):
            by_task.setdefault(request.task_name or "", []).append(index)
        for task, indices in by_task.items():
            self._accounting.start_generation()
            outputs = super().generate_until([requests[i] for i in indices], disable_tqdm=disable_tqdm)
            for index, output in zip(indices, outputs, strict=False):
                results[index] = output
            self._accounting.count_generations(
                task, [requests[i] for i in indices], lambda request: tuple(self.tok_batch_encode([request.args[0]])[0][0].tolist())
            )
        self._accounting.merge_ranks()
        return [result or "" for result in results]

    def _model_generate(self, context, max_length: int, stop: list[str], **generation_kwargs) -> torch.Tensor:
        if not self._faulted:
            return super()._model_generate(context, max_length, stop, **generation_kwargs)
        guard = NonFiniteLogitsGuard()
        processors = LogitsProcessorList([*generation_kwargs.pop("logits_processor", []), guard])
        prompts = prompt_tokens(context, generation_kwargs.get("attention_mask"))
        keyed = (
            generation_rows(self.model, prompts, self._next_forward, context.shape[1])
            if self._faults_per_call
            else contextlib.nullcontext()
        )
        with keyed:
            output = super()._model_generate(context, max_length, stop, logits_processor=processors, **generation_kwargs)
        self._accounting.note_generation(prompts, guard)
        return output

    # -- lm-eval integration and the report ----------------------------------------------------

    def set_cache_hook(self, cache_hook) -> None:
        """`--use_cache`: a table per (model identity, fault spec), and served answers counted."""
        super().set_cache_hook(cache_hook)
        dbdict = getattr(cache_hook, "dbdict", None)
        if dbdict is not None:
            table = cache_table(self.model_identity(), self.spec.fingerprint())
            self._accounting.cache = CountedCache(dbdict, table, self._accounting.count_served)

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
        self._accounting.fill(report)
        return report

    def get_model_info(self) -> dict:
        """lm-eval's model info plus the fault report; also prints the report's summary table.
        Counters describe one evaluation: lm-eval reads this once, at its end, so the first
        request after it starts a new one."""
        info = super().get_model_info()
        report = self.report
        if self._faulted:
            for name, part in report.parts.items():
                if part.per_call:  # persistent sites were checked when injected
                    report.check_not_silent(name)
        if self.print_report:
            print(report.format_table(), file=sys.stderr)
        info["fault_injection"] = report.to_dict()
        self._accounting.mark_reported()
        return info
