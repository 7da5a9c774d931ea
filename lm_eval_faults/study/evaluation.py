"""One sweep point evaluated on one model: its faults injected, lm-eval run, its record built.

Why a module of its own: the single-process sweep (`runner.run_sweep`) and every Ray actor
(`ray_pool.PointWorker`) run the same `LocalEvaluator`, and both need `PointResult` and the
`PointEvaluator` interface; kept here, neither of them imports the other to get them.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

from lm_eval_faults.core.spec import FaultSpec
from lm_eval_faults.study.baseline import CleanSamples, clean_samples_of, point_drift
from lm_eval_faults.study.grid import SweepConfig, SweepConfigError, SweepPoint, check_selections, plan_points

if TYPE_CHECKING:
    from lm_eval.tasks import TaskManager

    from lm_eval_faults.core.report import FaultReport
    from lm_eval_faults.harness.model import FaultyHFLM


def load_clean_model(config: SweepConfig) -> FaultyHFLM:
    """The clean model (p=0), loaded once for the whole sweep."""
    from lm_eval_faults.harness.model import FaultyHFLM

    extra = {"batch_size": config.batch_size, "max_batch_size": config.max_batch_size, "device": sweep_device(config)}
    lm = FaultyHFLM.create_from_arg_obj(config.hf_args(), extra)
    lm.print_report = False  # one table per point would bury the progress bar; the report has them all
    return lm


def sweep_device(config: SweepConfig) -> str:
    """The configured device, else what `lm_eval` picks: cuda when available, else cpu. The
    HF model's own default is cuda, which crashes a CPU-only machine; the default is resolved
    here rather than stored, so sweep.json still says what the user wrote."""
    if config.device:
        return config.device
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def quiet_lm_eval() -> contextlib.AbstractContextManager[None]:
    """Keep the command's output to its own progress line while lm-eval runs (no nested bars,
    repeated warnings or `git describe` noise): `harness.lm_eval_silencing.silenced_lm_eval`."""
    from lm_eval_faults.harness.lm_eval_silencing import silenced_lm_eval

    return silenced_lm_eval()


@dataclass
class PointResult:
    """One evaluated point: its record, and for the baseline the clean samples later points are compared with."""

    record: dict[str, Any]
    clean: CleanSamples | None = None


def evaluate_point(
    lm: FaultyHFLM,
    point: SweepPoint,
    config: SweepConfig,
    task_manager: TaskManager,
    clean: CleanSamples | None = None,
) -> PointResult:
    """Inject `point`'s faults (restoring the previous point's first) and evaluate: one record.

    A faulty point's record gets its drift against `clean` (none when `clean` is None); the
    point's own samples are dropped on return, so memory stays flat over a long sweep."""
    started = time.perf_counter()
    results = _evaluate(lm, point.spec, config, task_manager)
    record = {
        "point_id": point.point_id,
        "baseline": point.baseline,
        **point.labels(),
        **record_fault_counts(lm, point.spec),
        "metrics": task_metrics(results["results"]),
        "samples": task_samples(results),
    }
    if point.baseline:
        outcome = PointResult(record, clean_samples_of(results))
    else:
        if clean is not None:
            record["drift"] = point_drift(clean, results)
        outcome = PointResult(record)
    record["elapsed_s"] = round(time.perf_counter() - started, 3)
    return outcome


def _evaluate(lm: FaultyHFLM, spec: FaultSpec, config: SweepConfig, task_manager: TaskManager) -> dict[str, Any]:
    """lm-eval's results for `spec`, with the per-sample outputs that drift is computed from."""
    import lm_eval

    lm.set_faults(spec)
    return lm_eval.simple_evaluate(
        model=lm,
        tasks=list(config.tasks),
        num_fewshot=config.num_fewshot,
        limit=config.limit,
        task_manager=task_manager,
        gen_kwargs=config.gen_kwargs,
        apply_chat_template=config.apply_chat_template,
        fewshot_as_multiturn=config.fewshot_as_multiturn,
        system_instruction=config.system_instruction,
        bootstrap_iters=config.bootstrap_iters,
        random_seed=config.random_seed,
        log_samples=True,
    )


def evaluation_score(lm: FaultyHFLM, tasks: list[str], task_manager: TaskManager, limit: float | None = None) -> float:
    """Evaluate `lm` as it stands (faults included) on `tasks`: their mean primary metric.
    `task_manager` is built once by the caller: indexing lm-eval's tasks takes seconds."""
    import lm_eval

    from lm_eval_faults.study.metrics import record_score

    with quiet_lm_eval():
        results = lm_eval.simple_evaluate(model=lm, tasks=tasks, limit=limit, task_manager=task_manager, log_samples=False)
    return record_score({"metrics": task_metrics(results["results"])}, tasks)


def _storage_summary(report: FaultReport) -> Callable[[], dict[str, Any]] | None:
    """The stored form's summary of a `storage=` run (bits per weight, weights changed), if any."""
    return next((part.storage for part in report.parts.values() if part.storage is not None), None)


def record_fault_counts(lm: FaultyHFLM, spec: FaultSpec) -> dict[str, Any]:
    """Injected and expected faults (elements hit, bits faulted) over the spec's sites, and
    non-finite weights and requests, degenerate requests (flat logits or tied choices: a
    collapsed model whose answer is the tie-break) and all requests per task, from the model's
    `FaultReport`."""
    report = lm.report
    totals = [report.totals(part) for part in spec.sites if part in report.parts]

    def total(name: str) -> float:
        return sum(t[name] for t in totals)

    return {
        "injected": {"elements": int(total("hit_elements")), "bits": int(total("fault_bits"))},
        "expected": {"elements": round(total("expected_elements"), 3), "bits": round(total("expected_bits"), 3)},
        "nonfinite": {
            **{part: int(report.totals(part)["nonfinite_created"]) for part in report.parts},
            "requests": dict(report.nonfinite_requests),
        },
        "degenerate": {"requests": dict(report.degenerate_requests)},
        "requests": dict(report.requests),
        **({"protection_counts": report.protection_summary()} if spec.protected else {}),
        **({"storage": storage()} if (storage := _storage_summary(report)) is not None else {}),
    }


def task_samples(results: dict[str, Any]) -> dict[str, int]:
    """Documents evaluated per task (lm-eval's effective `n-samples`): the n of the bootstrap's
    Binomial(n, acc)/n, which cannot be inferred from a stderr when acc is 0 or 1."""
    return {
        task: int(counts["effective"])
        for task, counts in (results.get("n-samples") or {}).items()
        if isinstance(counts, dict) and counts.get("effective") is not None
    }


def task_metrics(results: dict[str, dict[str, Any]]) -> dict[str, dict[str, float]]:
    """lm-eval's per-task metrics, with the default filter's `,none` suffix dropped.

    lm-eval names every metric `metric,filter`; keys without a comma (`alias`, `sample_len`)
    are bookkeeping and are left out, so they can never be mistaken for a score.
    """
    return {
        task: {metric.removesuffix(",none"): value for metric, value in values.items() if "," in metric} for task, values in results.items()
    }


class PointEvaluator(Protocol):
    """Where a sweep's points are evaluated: `LocalEvaluator` (this process) or `ray_pool.RayPool`
    (Ray actors). `run_sweep` writes every file itself, so the evaluator never decides what is
    durable; it only turns points into results."""

    def plan(self) -> list[SweepPoint]:
        """The sweep's points, each checked against the loaded model before anything is written."""
        ...

    def clean_samples(self, baseline: SweepPoint) -> CleanSamples:
        """The clean model's samples, evaluated again (a run directory that lost its samples file)."""
        ...

    def evaluate(self, points: Sequence[SweepPoint], clean: CleanSamples | None) -> Iterator[PointResult]:
        """Evaluate `points`, yielding each result as soon as it is done, in any order."""
        ...

    def close(self) -> None:
        """Release the model(s); a caller's model is left clean."""
        ...


class LocalEvaluator:
    """The points one after another on one model in this process (also what each Ray actor runs)."""

    def __init__(self, config: SweepConfig, lm: FaultyHFLM | None = None, task_manager: TaskManager | None = None) -> None:
        self.config = config
        self.lm = lm if lm is not None else load_clean_model(config)
        self._task_manager = task_manager

    @property
    def task_manager(self) -> TaskManager:
        """Built on first use: indexing lm-eval's tasks takes seconds, which a grid rejected by `plan` need not wait for."""
        if self._task_manager is None:
            self._task_manager = _task_manager(self.config)
        return self._task_manager

    def plan(self) -> list[SweepPoint]:
        if self.lm.world_size > 1:
            raise SweepConfigError("sweeps run in one process per model; data-parallel launches are not supported (use --ray)")
        points = plan_points(self.config, _decoder_stack_size(self.lm))
        check_selections(points, self.lm)
        return points

    def clean_samples(self, baseline: SweepPoint) -> CleanSamples:
        with quiet_lm_eval():
            return clean_samples_of(_evaluate(self.lm, baseline.spec, self.config, self.task_manager))

    def evaluate(self, points: Sequence[SweepPoint], clean: CleanSamples | None) -> Iterator[PointResult]:
        for point in points:
            with quiet_lm_eval():
                result = evaluate_point(self.lm, point, self.config, self.task_manager, clean)
            yield result

    def close(self) -> None:
        self.lm.set_faults(FaultSpec())


def _decoder_stack_size(lm: FaultyHFLM) -> int | None:
    from lm_eval_faults.core.sites.targets import decoder_layers

    stack = decoder_layers(lm.model)
    return len(stack[1]) if stack else None


def _task_manager(config: SweepConfig) -> TaskManager:
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=list(config.include_path) or None)
