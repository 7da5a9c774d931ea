"""Wall time of one sweep on Ray actors (`--ray --ray_actors 2`) against the same sweep in one process.

    python bench/bench_ray.py [--seeds 6] [--num_fewshot 3] [--repeats 2] [--actors 2]

Both sides are whole `lm-eval-faults sweep` commands run as subprocesses, interleaved (the order
alternates between repeats), with one torch thread per process or actor: the single process pays
interpreter start-up, imports, one model load and lm-eval's task indexing; the Ray side pays
starting a local Ray instance, the same start-up in every actor (in parallel), the baseline
alone (every other point's drift needs its samples), and stopping Ray. The bench watches each
run's `results.jsonl` grow, so besides the total it reports the time to the first record
(start-up + baseline) and the points phase after it, where the actors run side by side. The
grid is the embedded demo model on `faults_demo`, bit flips at 3 rates x 2 targets x `--seeds`
seeds plus the baseline; `--num_fewshot` sets the work per point. It also checks that both sides
wrote the same records, point for point, since a fast sweep that measured something else would
be worthless.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from lm_eval_faults.harness.package_data import demo_model_dir

P_GRID = "1e-4:1e-2"
TARGETS = "attention,mlp"
RUN_ONLY = ("elapsed_s", "retries")
"""Record fields that describe the run rather than the result."""
CLI = "import sys; from lm_eval_faults.cli import main; sys.exit(main())"


CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


@dataclass
class Run:
    """One command's wall time, the moments its records appeared (seconds from its start), and
    the CPU other users' processes took meanwhile (the machine is shared: a run with others busy
    cannot show what 2 cores give)."""

    total: float
    records: list[float] = field(default_factory=list)
    foreign_cpu: float = 0.0
    ray_start: float = 0.0
    """Seconds `ray.init` took, as the sweep reports it (0 in one process)."""

    @property
    def foreign_cores(self) -> float:
        return self.foreign_cpu / self.total

    @property
    def first(self) -> float:
        return self.records[0]

    @property
    def points_phase(self) -> float:
        return self.records[-1] - self.records[0]


def run_sweep_command(arguments: list[str], run_dir: Path, env: dict[str, str]) -> Run:
    """Run `lm-eval-faults sweep` to completion, noting when each record lands in results.jsonl."""
    results = run_dir / "results.jsonl"
    log = run_dir.with_suffix(".log")  # a file, not a pipe: lm-eval's progress bars would fill a pipe and stall the sweep
    with open(log, "wb") as stderr:
        started = time.perf_counter()
        command = [sys.executable, "-c", CLI, "sweep", *arguments, "--run_dir", str(run_dir)]
        process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=stderr, env=env)
        seen: list[float] = []
        foreign = ForeignLoad()
        while process.poll() is None:
            _note_records(results, seen, started)
            foreign.sample()
            time.sleep(0.25)
        total = time.perf_counter() - started
    if process.returncode:
        raise SystemExit(f"sweep failed ({process.returncode}), see {log}:\n{log.read_text()[-3000:]}")
    _note_records(results, seen, started)
    ray_start = re.search(r"started a local Ray instance in ([0-9.]+) s", log.read_text())
    return Run(total, seen, foreign.seconds, float(ray_start[1]) if ray_start else 0.0)


def _note_records(results: Path, seen: list[float], started: float) -> None:
    """Stamp each record that appeared since the last look with the time now."""
    if results.exists():
        lines = results.read_bytes().count(b"\n")
        now = time.perf_counter() - started
        seen.extend([now] * (lines - len(seen)))


class ForeignLoad:
    """CPU seconds used by processes outside this benchmark's process tree (Ray's daemons and
    actors descend from the sweep command, so they count as ours), summed between samples."""

    def __init__(self) -> None:
        self.last = cpu_by_process()
        self.seconds = 0.0

    def sample(self) -> None:
        now = cpu_by_process()
        ours = descendants(now, os.getpid())
        self.seconds += sum(cpu - self.last.get(pid, (0, 0.0))[1] for pid, (_, cpu) in now.items() if pid not in ours)
        self.last = now


def cpu_by_process() -> dict[int, tuple[int, float]]:
    """(parent pid, CPU seconds so far) of every process, from /proc."""
    table = {}
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            try:
                stat = Path(entry.path, "stat").read_text()
            except OSError:
                continue
            fields = stat[stat.rindex(")") + 2 :].split()  # after "pid (comm) ": state, ppid, ..., utime, stime
            table[int(entry.name)] = (int(fields[1]), (int(fields[11]) + int(fields[12])) / CLOCK_TICKS)
    return table


def descendants(table: dict[int, tuple[int, float]], root: int) -> set[int]:
    """`root` and every process below it."""
    children: dict[int, list[int]] = {}
    for pid, (parent, _) in table.items():
        children.setdefault(parent, []).append(pid)
    found, todo = {root}, [root]
    while todo:
        for child in children.get(todo.pop(), []):
            found.add(child)
            todo.append(child)
    return found


def load(run_dir: Path) -> dict[str, dict]:
    """Records by point id, without the fields that describe the run."""
    records = {}
    for line in (run_dir / "results.jsonl").read_text().splitlines():
        record = json.loads(line)
        records[record["point_id"]] = {key: value for key, value in record.items() if key not in RUN_ONLY}
    return records


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=6, help="seeds: 6 points each (3 rates x 2 targets), plus the baseline")
    parser.add_argument("--num_fewshot", type=int, default=3, help="few-shot examples per question: the work per point")
    parser.add_argument("--limit", default=None, help="questions of faults_demo per point (default: all 160)")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--actors", type=int, default=2)
    parser.add_argument("--workdir", type=Path, default=None, help="keep the run directories here (default: a temporary directory)")
    options = parser.parse_args()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    workdir = Path(tempfile.mkdtemp(prefix="bench_ray_", dir=options.workdir))
    common = ["--model_args", f"pretrained={demo_model_dir()}", "--tasks", "faults_demo", "--num_fewshot", str(options.num_fewshot)]
    common += ["--p", P_GRID, "--targets", TARGETS, "--seeds", str(options.seeds), "--device", "cpu", "--batch_size", "1"]
    common += ["--no_report", "--no_progress"] + (["--limit", options.limit] if options.limit else [])
    sides = {"one process": [], f"Ray, {options.actors} actors": ["--ray", "--ray_actors", str(options.actors)]}

    runs: dict[str, list[Run]] = {name: [] for name in sides}
    for repeat in range(options.repeats):
        order = list(sides) if repeat % 2 == 0 else list(reversed(sides))
        for name in order:
            run_dir = workdir / f"{len(runs[name])}_{name.split(',')[0].replace(' ', '_')}"
            run = run_sweep_command(common + sides[name], run_dir, env)
            runs[name].append(run)
            print(
                f"repeat {repeat}: {name:16s} total {run.total:6.1f} s, first record {run.first:5.1f} s, "
                f"points phase {run.points_phase:6.1f} s ({len(run.records)} records), other processes used {run.foreign_cores:.2f} cores",
                flush=True,
            )

    dirs = sorted(path for path in workdir.iterdir() if path.is_dir())
    reference = load(dirs[0])
    mismatched = [str(d.name) for d in dirs[1:] if load(d) != reference]
    single, ray = (runs[name] for name in sides)
    n = len(single[0].records)

    def median(values: list[float]) -> float:
        return statistics.median(values)

    rows = [
        ("total", median([r.total for r in single]), median([r.total for r in ray])),
        ("start-up + baseline (first record)", median([r.first for r in single]), median([r.first for r in ray])),
        ("of which starting Ray", 0.0, median([r.ray_start for r in ray])),
        (f"the other {n - 1} points", median([r.points_phase for r in single]), median([r.points_phase for r in ray])),
    ]
    print(
        f"\ndemo model, faults_demo {options.num_fewshot}-shot, limit {options.limit or 'all'}, {n} points, "
        f"1 torch thread per process/actor, {os.cpu_count()} CPUs, medians of {options.repeats}"
    )
    print(f"| | one process | Ray, {options.actors} actors | speed-up |\n|---|---|---|---|")
    for label, one, many in rows:
        print(f"| {label} | {one:.1f} s | {many:.1f} s | " + (f"{one / many:.2f}x |" if one else "|"))
    print(
        f"| other processes' CPU meanwhile | {median([r.foreign_cores for r in single]):.2f} cores | "
        f"{median([r.foreign_cores for r in ray]):.2f} cores | |"
    )
    print("same records, point for point, in every run" if not mismatched else f"MISMATCHED RUNS: {mismatched}")


if __name__ == "__main__":
    main()
