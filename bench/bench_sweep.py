"""Wall time of one `lm-eval-faults sweep` against the same points as separate `lm_eval` runs.

    python bench/bench_sweep.py [--limit 4] [--workdir DIR]

Both sides are whole commands run as subprocesses, so both pay interpreter start-up, imports,
model loading and lm-eval's task indexing; the sweep pays them once, the separate runs once per
point. The grid is the baseline plus 3 rates x 3 targets (10 evaluations). It uses the embedded
demo model and `faults_demo` when `lm_eval_faults/demo_model` exists, else the tiny llama and
tiny task of `tests/tiny.py`. It also checks that both ways give the same primary metric at
every point, since a fast sweep that measured something else would be worthless.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))

from lm_eval_faults.harness.package_data import demo_model_dir  # noqa: E402
from lm_eval_faults.study.grid import SweepConfig, plan_points  # noqa: E402
from lm_eval_faults.study.metrics import primary_metric  # noqa: E402
from lm_eval_faults.study.records import load_records  # noqa: E402

P_GRID = "1e-4:1e-2"
TARGETS = "attention,mlp,lm_head"


def model_and_task(workdir: Path) -> tuple[str, str, str]:
    """(model directory, task, include path): the demo model when it is built, else a tiny one."""
    if (demo_model_dir() / "config.json").exists():
        return str(demo_model_dir()), "faults_demo", ""
    from tiny import save_tiny_model, write_tiny_task

    return str(save_tiny_model(workdir / "model")), "tiny_colors", str(write_tiny_task(workdir / "tasks"))


def timed(command: list[str], env: dict[str, str]) -> float:
    started = time.perf_counter()
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--limit", default="4", help="documents per task")
    parser.add_argument("--workdir", type=Path, default=None, help="keep models and outputs here (default: a temporary directory)")
    parser.add_argument(
        "--threads", default="1", help="torch CPU threads for both sides (spinning threads distort timings on a busy machine)"
    )
    options = parser.parse_args()
    env = {**os.environ, "OMP_NUM_THREADS": options.threads, "MKL_NUM_THREADS": options.threads, "TOKENIZERS_PARALLELISM": "false"}
    workdir = options.workdir or Path(tempfile.mkdtemp(prefix="bench_sweep_"))
    workdir.mkdir(parents=True, exist_ok=True)
    model, task, include = model_and_task(workdir)
    common = ["--tasks", task, "--limit", options.limit, "--device", "cpu", "--batch_size", "1"]
    common += ["--include_path", include] if include else []

    runs = Path(tempfile.mkdtemp(prefix="runs_", dir=workdir))  # fresh, so nothing is resumed
    run_dir = runs / "sweep"
    sweep_command = [
        sys.executable,
        "-m",
        "lm_eval_faults.cli",
        "sweep",
        "--model_args",
        f"pretrained={model}",
        "--p",
        P_GRID,
        "--targets",
        TARGETS,
        "--run_dir",
        str(run_dir),
        "--no_report",
        "--no_progress",
        *common,
    ]
    sweep_s = timed(sweep_command, env)

    config = SweepConfig(model_args=f"pretrained={model}", tasks=task, p=P_GRID, targets=TARGETS)
    points = plan_points(config, n_layers=None)
    separate_s = 0.0
    separate_scores = {}
    for index, point in enumerate(points):
        spec = point.spec.to_dict()
        fault_args = "" if point.baseline else f",p={spec['p']},fault={spec['fault']},target={spec['target']},seed={spec['seed']}"
        out = runs / "separate" / f"{index:02d}"
        separate_s += timed(
            [
                sys.executable,
                "-m",
                "lm_eval",
                "--model",
                "faulty_hf",
                "--model_args",
                f"pretrained={model}{fault_args}",
                "--output_path",
                str(out),
                *common,
            ],
            env,
        )
        results = json.loads(next(out.rglob("results_*.json")).read_text())["results"][task]
        separate_scores[point.point_id] = primary_metric({k.removesuffix(",none"): v for k, v in results.items() if "," in k})

    sweep_scores = {r["point_id"]: primary_metric(r["metrics"][task]) for r in load_records(run_dir / "results.jsonl")}
    mismatches = [pid for pid in separate_scores if separate_scores[pid] != sweep_scores.get(pid)]
    print(
        f"model {model}, task {task}, limit {options.limit}, {options.threads} thread(s), {len(points)} evaluations (baseline + {len(points) - 1} faulty points)"
    )
    print(f"one sweep process:       {sweep_s:7.1f} s  ({sweep_s / len(points):.2f} s per evaluation)")
    print(f"separate lm_eval runs:   {separate_s:7.1f} s  ({separate_s / len(points):.2f} s per evaluation)")
    print(f"ratio separate / sweep:  {separate_s / sweep_s:7.2f}x")
    print("same primary metric at every point" if not mismatches else f"MISMATCHED POINTS: {mismatches}")


if __name__ == "__main__":
    main()
