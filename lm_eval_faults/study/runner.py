"""Fault sweeps: a grid of fault specs evaluated on ONE loaded model, resumable point by point.

    lm-eval-faults sweep --model_args pretrained=...,dtype=float16 --tasks mmlu_faults \\
        --p 1e-9:1e-1 --targets embedding,attention,mlp,norm,lm_head --seeds 3 --run_dir runs/x

Why one process: loading a 7B model takes longer than evaluating a point on a small task, and
`FaultyHFLM.set_faults` restores the clean weights exactly in O(faults), so the grid is walked
with one load and one `TaskManager`. The run directory
(`run_dir.py`) makes it resumable; the grid (`grid.py`) says which points to run.

The grid is the product faults x sites x targets x layer groups x p x seeds, plus one clean
baseline (p=0). Each record follows the schema documented in `lm_eval_faults.study.metrics`.

Every point is evaluated with lm-eval's per-sample outputs, and each faulty record carries a
`"drift"` entry: per task, how far its answers moved from the clean model's (`drift.py`), which
shows damage even where accuracy cannot move (a small model at chance on MMLU). The clean
model's samples are kept in `baseline_samples.json` so a resumed sweep need not re-run it.

Where points are evaluated is a `PointEvaluator`: `LocalEvaluator` (this process, one model) or
`ray_pool.RayPool` (Ray actors, one model each, `run_sweep(..., ray=RayOptions())`). Either way
`run_sweep` alone writes the run directory, so lock, fsync and resume do not depend on it.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from lm_eval_faults.core.spec import FaultSpec
from lm_eval_faults.study.drift import TaskDrift, compare_samples
from lm_eval_faults.study.grid import (
    SweepConfig,
    SweepConfigError,
    SweepPoint,
    check_selections,
    plan_points,
    preflight_sweep,
)
from lm_eval_faults.study.progress import ProgressLine
from lm_eval_faults.study.run_dir import RunDir

if TYPE_CHECKING:
    from lm_eval.tasks import TaskManager

    from lm_eval_faults.harness.model import FaultyHFLM
    from lm_eval_faults.study.ray_pool import RayOptions


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


# --------------------------------------------------------------------------- drift against the baseline

BASELINE_SAMPLES_FILE = "baseline_samples.json"
"""The clean model's per-sample outputs in a run directory: a resumed sweep compares with them."""

SAMPLE_KEYS = ("doc_id", "filter", "filtered_resps", "doc_hash", "metrics")
"""What `compare_samples` reads of a sample (plus the per-sample metric values): docs, prompts and
raw responses are left out, which keeps the baseline file a fraction of lm-eval's own."""

DRIFT_FIELDS = (
    "output_type",
    "filter",
    "matched",
    "only_clean",
    "only_faulty",
    "mismatched",
    "nonfinite",
    "flips",
    "agreement",
    "ties",
    "tie_kept",
    "greedy_changes",
    "mean_abs_delta_ll",
    "mean_kl",
    "exact_agreement",
    "diverged",
    "mean_first_divergence",
    "perplexity_ratio",
    "perplexity_unit",
)
"""The `TaskDrift` aggregates a record keeps per task (plus `metric_deltas`); None = does not apply."""


@dataclass
class CleanSamples:
    """The baseline's samples per task, stripped to what drift needs, with each task's output type."""

    samples: dict[str, list[dict[str, Any]]]
    output_types: dict[str, str] = field(default_factory=dict)


def strip_sample(sample: dict[str, Any]) -> dict[str, Any]:
    """The parts of an lm-eval sample that `compare_samples` reads."""
    kept = {key: sample[key] for key in SAMPLE_KEYS if key in sample}
    kept.update({name: sample[name] for name in sample.get("metrics") or [] if name in sample})
    return kept


def clean_samples_of(results: dict[str, Any]) -> CleanSamples:
    """The stripped samples and output types of a `simple_evaluate(..., log_samples=True)` result."""
    samples = {task: [strip_sample(sample) for sample in task_list] for task, task_list in (results.get("samples") or {}).items()}
    return CleanSamples(samples, output_types(results))


def output_types(results: dict[str, Any]) -> dict[str, str]:
    """Each task's lm-eval output_type from the results' configs, so drift need not infer it."""
    types = {}
    for task, task_config in (results.get("configs") or {}).items():
        value = (task_config or {}).get("output_type")
        if isinstance(value, str):
            types[task] = value
    return types


def point_drift(clean: CleanSamples, results: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Aggregate drift of every task the point and the baseline both sampled (no per-sample lists)."""
    types = {**output_types(results), **clean.output_types}
    drift = {}
    for task, samples in (results.get("samples") or {}).items():
        if task in clean.samples:
            drift[task] = drift_summary(compare_samples(clean.samples[task], samples, types.get(task), task=task))
    return drift


def drift_summary(task: TaskDrift) -> dict[str, Any]:
    """A task's drift as strict JSON: the aggregates of `DRIFT_FIELDS` and the metric changes,
    non-finite floats (an overflowing perplexity ratio) as None, so any JSON reader takes it."""
    summary = {name: _json_number(getattr(task, name)) for name in DRIFT_FIELDS}
    summary["metric_deltas"] = {name: _json_number(value) for name, value in task.metric_deltas.items()}
    return summary


def _json_number(value: Any) -> Any:
    """`value`, except a non-finite float, which becomes None."""
    return None if isinstance(value, float) and not math.isfinite(value) else value


def save_clean_samples(path: Path, clean: CleanSamples) -> None:
    """Write the baseline's samples atomically (temporary file, fsync, rename): a kill leaves the
    old file or the new one, never half of one."""
    data = json.dumps({"output_types": clean.output_types, "samples": clean.samples}, default=_jsonable).encode("utf-8")
    temporary = path.with_name(path.name + ".tmp")
    with open(temporary, "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(temporary, path)


def _jsonable(value: Any) -> Any:
    """numpy scalars and arrays as Python values; anything else as its text."""
    return value.tolist() if hasattr(value, "tolist") else str(value)


def load_clean_samples(path: Path) -> CleanSamples | None:
    """The baseline samples saved in a run directory; None when absent or unreadable."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as error:
        print(f"lm-eval-faults sweep: ignoring unreadable {path} ({error})", file=sys.stderr)
        return None
    if not isinstance(data, dict) or not isinstance(data.get("samples"), dict):
        return None
    return CleanSamples(data["samples"], dict(data.get("output_types") or {}))


def resume_clean_samples(directory: RunDir, points: list[SweepPoint], done: set[str], evaluator: PointEvaluator) -> CleanSamples | None:
    """The clean samples a resumed sweep compares with: the saved file, else (a run directory from
    before drift was recorded) the baseline evaluated again, once, without a second record. None
    while the baseline has still to run (it will provide them) or when no faulty point is left."""
    baseline = next((point for point in points if point.baseline), None)
    if baseline is None or baseline.point_id not in done:
        return None
    path = directory.path / BASELINE_SAMPLES_FILE
    clean = load_clean_samples(path)
    if clean is not None or all(point.point_id in done for point in points):
        return clean
    print(
        f"lm-eval-faults sweep: {path.name} is missing; evaluating the clean model again once for its samples "
        "(the baseline record is kept), so the remaining points get drift figures",
        file=sys.stderr,
    )
    clean = evaluator.clean_samples(baseline)
    save_clean_samples(path, clean)
    return clean


def evaluation_score(lm: FaultyHFLM, tasks: list[str], task_manager: TaskManager, limit: float | None = None) -> float:
    """Evaluate `lm` as it stands (faults included) on `tasks`: their mean primary metric.
    `task_manager` is built once by the caller: indexing lm-eval's tasks takes seconds."""
    import lm_eval

    from lm_eval_faults.study.metrics import record_score

    with quiet_lm_eval():
        results = lm_eval.simple_evaluate(model=lm, tasks=tasks, limit=limit, task_manager=task_manager, log_samples=False)
    return record_score({"metrics": task_metrics(results["results"])}, tasks)


def record_fault_counts(lm: FaultyHFLM, spec: FaultSpec) -> dict[str, Any]:
    """Injected and expected faults (elements hit, bits faulted) over the spec's sites, and
    non-finite weights and requests, degenerate requests (flat logits or tied choices: a
    collapsed model whose answer is the tie-break) and all requests per task, from the model's
    `FaultReport`."""
    report = lm.report
    parts = [part for part, on in (("weights", spec.on_weights), ("activations", spec.on_activations)) if on]
    totals = [report.totals(part) for part in parts]

    def total(name: str) -> float:
        return sum(t[name] for t in totals)

    return {
        "injected": {"elements": int(total("hit_elements")), "bits": int(total("fault_bits"))},
        "expected": {"elements": round(total("expected_elements"), 3), "bits": round(total("expected_bits"), 3)},
        "nonfinite": {
            "weights": int(report.totals("weights")["nonfinite_created"]),
            "activations": int(report.totals("activations")["nonfinite_created"]),
            "requests": dict(report.nonfinite_requests),
        },
        "degenerate": {"requests": dict(report.degenerate_requests)},
        "requests": dict(report.requests),
        **({"protection_counts": report.protection_summary()} if spec.protected else {}),
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


@dataclass
class SweepRun:
    """What one call of `run_sweep` did."""

    run_dir: Path
    ran: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    report: Path | None = None
    retries: int = 0
    """Evaluations started again because the Ray actor running them died (0 in one process)."""


def run_sweep(
    run_dir: str | Path,
    config: SweepConfig,
    *,
    lm: FaultyHFLM | None = None,
    task_manager: TaskManager | None = None,
    ray: RayOptions | None = None,
    on_point: Callable[[dict[str, Any]], None] | None = None,
    report: bool = True,
    progress: bool = True,
) -> SweepRun:
    """Run (or resume) the sweep `config` in `run_dir`; returns which points ran and which were done.

    `lm` reuses an already loaded clean `FaultyHFLM` built from the same `model_args` (it is
    left clean afterwards); `task_manager` reuses an lm-eval `TaskManager`. `ray` evaluates the
    points on Ray actors instead (`ray_pool.RayOptions`; each actor loads its own model, so `lm`
    and `task_manager` do not apply). `on_point` is called with each record once it is safely on disk.
    """
    directory = RunDir(run_dir)
    outcome = SweepRun(directory.path)
    # What the input alone tells is checked before the model loads and before sweep.json is pinned
    # (a caller's own `lm` may differ from model_args, so it is not checked against them). A new
    # run directory is checked before it is even created, so a refused command leaves nothing;
    # an existing one first says whether it holds another configuration, or none.
    fresh = not directory.config.exists() and not directory.results.exists()
    if lm is None and fresh:
        preflight_sweep(config)
    with directory.claim(config):
        if lm is None and not fresh:
            preflight_sweep(config)
        done = directory.finished()
        evaluator = _open_evaluator(config, lm, task_manager, ray)
        try:
            _run_points(directory, config, evaluator, done, outcome, on_point, progress)
        finally:
            evaluator.close()
    if report:
        from lm_eval_faults.study.sweep_report import build_report

        outcome.report = build_report(directory.path)
    return outcome


def _open_evaluator(config: SweepConfig, lm: FaultyHFLM | None, task_manager: TaskManager | None, ray: RayOptions | None) -> PointEvaluator:
    if ray is None:
        return LocalEvaluator(config, lm, task_manager)
    if lm is not None or task_manager is not None:
        raise ValueError("run_sweep: lm and task_manager are for a sweep in this process; each Ray actor loads its own")
    from lm_eval_faults.study.ray_pool import RayPool

    return RayPool(config, ray)


def _run_points(
    directory: RunDir,
    config: SweepConfig,
    evaluator: PointEvaluator,
    done: set[str],
    outcome: SweepRun,
    on_point: Callable[[dict[str, Any]], None] | None,
    progress: bool,
) -> None:
    """Plan, pin the config, then evaluate what is not done: the baseline first, because every
    other point's drift is measured against its samples, then the rest in whatever order the
    evaluator finishes them. Each record is appended (fsync) here, by this process only."""
    points = evaluator.plan()
    directory.save_config(config, [point.point_id for point in points])
    outcome.skipped = [point.point_id for point in points if point.point_id in done]
    pending = [point for point in points if point.point_id not in done]
    clean = resume_clean_samples(directory, points, done, evaluator)
    bar = ProgressLine("lm-eval-faults sweep", len(points), done=len(outcome.skipped), enabled=progress)

    def keep(result: PointResult) -> None:
        record = result.record
        directory.append(record)
        outcome.ran.append(record["point_id"])
        outcome.retries += int(record.get("retries", 0))
        bar.advance(record["point_id"])
        if on_point is not None:
            on_point(record)

    with bar:
        for result in evaluator.evaluate([point for point in pending if point.baseline], None):
            if result.clean is not None:
                clean = result.clean
                save_clean_samples(directory.path / BASELINE_SAMPLES_FILE, clean)
            keep(result)
        for result in evaluator.evaluate([point for point in pending if not point.baseline], clean):
            keep(result)


def _decoder_stack_size(lm: FaultyHFLM) -> int | None:
    from lm_eval_faults.core.sites.targets import decoder_layers

    stack = decoder_layers(lm.model)
    return len(stack[1]) if stack else None


def _task_manager(config: SweepConfig) -> TaskManager:
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=list(config.include_path) or None)
