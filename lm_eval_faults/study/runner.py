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
model's samples (`baseline.py`) are kept in the run directory's `baseline_samples.json` so a
resumed sweep need not re-run it.

Where points are evaluated is an `evaluation.PointEvaluator`: `LocalEvaluator` (this process, one model) or
`ray_pool.RayPool` (Ray actors, one model each, `run_sweep(..., ray=RayOptions())`). Either way
`run_sweep` alone writes the run directory, so lock, fsync and resume do not depend on it.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lm_eval_faults.study.baseline import CleanSamples
from lm_eval_faults.study.evaluation import LocalEvaluator, PointEvaluator, PointResult
from lm_eval_faults.study.grid import SweepConfig, SweepPoint, preflight_sweep
from lm_eval_faults.study.progress import ProgressLine
from lm_eval_faults.study.run_dir import RunDir

if TYPE_CHECKING:
    from lm_eval.tasks import TaskManager

    from lm_eval_faults.harness.model import FaultyHFLM
    from lm_eval_faults.study.ray_pool import RayOptions


def resume_clean_samples(directory: RunDir, points: list[SweepPoint], done: set[str], evaluator: PointEvaluator) -> CleanSamples | None:
    """The clean samples a resumed sweep compares with: the saved file, else (a run directory from
    before drift was recorded) the baseline evaluated again, once, without a second record. None
    while the baseline has still to run (it will provide them) or when no faulty point is left."""
    baseline = next((point for point in points if point.baseline), None)
    if baseline is None or baseline.point_id not in done:
        return None
    clean = directory.load_baseline()
    if clean is not None or all(point.point_id in done for point in points):
        return clean
    print(
        f"lm-eval-faults sweep: {directory.baseline.name} is missing; evaluating the clean model again once for its samples "
        "(the baseline record is kept), so the remaining points get drift figures",
        file=sys.stderr,
    )
    clean = evaluator.clean_samples(baseline)
    directory.save_baseline(clean)
    return clean


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
                directory.save_baseline(clean)
            keep(result)
        for result in evaluator.evaluate([point for point in pending if not point.baseline], clean):
            keep(result)
