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

A third side runs the machine's own ceiling: two independent sweeps of half the seeds each, side by
side, without Ray (each pays its own start-up and baseline). Per side it prints the cores its
processes used and which processes used them (actors, the driver, Ray's daemons).
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
from collections import Counter
from collections.abc import Callable
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
    first: float
    """When the run's first record appeared (every command's first, with several side by side)."""
    records: list[float] = field(default_factory=list)
    """When each record from `first` on appeared."""
    foreign_cpu: float = 0.0
    ray_start: float = 0.0
    """Seconds `ray.init` took, as the sweep reports it (0 in one process)."""
    cpu_by_name: dict[str, float] = field(default_factory=dict)
    """CPU seconds the run's own processes took, by process name."""

    @property
    def cores(self) -> float:
        """The run's own processes' CPU over its wall time: at most the CPUs it may use."""
        return sum(self.cpu_by_name.values()) / self.total

    @property
    def foreign_cores(self) -> float:
        return self.foreign_cpu / self.total

    @property
    def points_phase(self) -> float:
        return self.records[-1] - self.first


def run_sweep_commands(commands: list[tuple[list[str], Path]], env: dict[str, str]) -> Run:
    """Run `lm-eval-faults sweep` commands side by side to completion, noting when each record lands
    in each run's results.jsonl. The run's first record is the moment every command had written its
    own first (its baseline), and its records are all commands' together."""
    started = time.perf_counter()
    processes, seen, logs = [], [], []
    for arguments, run_dir in commands:
        log = run_dir.with_suffix(".log")  # a file, not a pipe: lm-eval's progress bars would fill a pipe and stall the sweep
        log.parent.mkdir(parents=True, exist_ok=True)
        command = [sys.executable, "-c", CLI, "sweep", *arguments, "--run_dir", str(run_dir)]
        with open(log, "wb") as stderr:
            processes.append(subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=stderr, env=env))
        seen.append([])
        logs.append(log)
    cpu = CpuUse()
    while any(process.poll() is None for process in processes):
        for (_, run_dir), times in zip(commands, seen, strict=True):
            _note_records(run_dir / "results.jsonl", times, started)
        cpu.sample()
        time.sleep(0.25)
    total = time.perf_counter() - started
    for process, log in zip(processes, logs, strict=True):
        if process.returncode:
            raise SystemExit(f"sweep failed ({process.returncode}), see {log}:\n{log.read_text()[-3000:]}")
    for (_, run_dir), times in zip(commands, seen, strict=True):
        _note_records(run_dir / "results.jsonl", times, started)
    first = max(times[0] for times in seen)
    records = sorted(time for times in seen for time in times if time >= first)
    ray_start = re.search(r"started a local Ray instance in ([0-9.]+) s", logs[0].read_text())
    return Run(total, first, records, cpu.foreign, float(ray_start[1]) if ray_start else 0.0, dict(cpu.ours))


def _note_records(results: Path, seen: list[float], started: float) -> None:
    """Stamp each record that appeared since the last look with the time now."""
    if results.exists():
        lines = results.read_bytes().count(b"\n")
        now = time.perf_counter() - started
        seen.extend([now] * (lines - len(seen)))


class CpuUse:
    """CPU seconds used between samples: by processes outside this benchmark's process tree (Ray's
    daemons and actors descend from the sweep command, so they count as ours), and by ours, per
    process name (so a run shows where its cores went: actors, driver, Ray's daemons)."""

    def __init__(self) -> None:
        self.last = cpu_by_process()
        self.foreign = 0.0
        self.ours: Counter[str] = Counter()

    def sample(self) -> None:
        now = cpu_by_process()
        ours = descendants(now, os.getpid())
        for pid, (_, cpu, name) in now.items():
            used = cpu - self.last.get(pid, (0, 0.0, name))[1]
            if pid in ours:
                self.ours[name] += used
            else:
                self.foreign += used
        self.last = now


def cpu_by_process() -> dict[int, tuple[int, float, str]]:
    """(parent pid, CPU seconds so far, name) of every process, from /proc."""
    table = {}
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            try:
                stat = Path(entry.path, "stat").read_text()
            except OSError:
                continue
            name = stat[stat.index("(") + 1 : stat.rindex(")")]
            fields = stat[stat.rindex(")") + 2 :].split()  # after "pid (comm) ": state, ppid, ..., utime, stime
            table[int(entry.name)] = (int(fields[1]), (int(fields[11]) + int(fields[12])) / CLOCK_TICKS, name)
    return table


def descendants(table: dict[int, tuple[int, float, str]], root: int) -> set[int]:
    """`root` and every process below it."""
    children: dict[int, list[int]] = {}
    for pid, (parent, *_) in table.items():
        children.setdefault(parent, []).append(pid)
    found, todo = {root}, [root]
    while todo:
        for child in children.get(todo.pop(), []):
            found.add(child)
            todo.append(child)
    return found


def _top_processes(run: Run) -> str:
    """The run's busiest process names and their CPU seconds."""
    top = sorted(run.cpu_by_name.items(), key=lambda item: -item[1])[:4]
    return ", ".join(f"{name} {seconds:.0f} s" for name, seconds in top)


def load(run_dir: Path) -> dict[str, dict]:
    """Records by point id, without the fields that describe the run."""
    records = {}
    lines = [line for results in sorted(run_dir.rglob("results.jsonl")) for line in results.read_text().splitlines()]
    for line in lines:
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
    common += ["--p", P_GRID, "--targets", TARGETS, "--device", "cpu", "--batch_size", "1"]
    common += ["--no_report", "--no_progress"] + (["--limit", options.limit] if options.limit else [])
    # The third side is the machine's own ceiling: two independent sweeps of half the seeds each
    # (each with its own baseline), side by side, without Ray.
    every_seed = ["--seeds", str(options.seeds)]
    half = options.seeds // 2
    sides: dict[str, list[list[str]]] = {
        "one process": [every_seed],
        f"Ray, {options.actors} actors": [[*every_seed, "--ray", "--ray_actors", str(options.actors)]],
        "2 processes": [["--seeds", f"0-{half - 1}"], ["--seeds", f"{half}-{options.seeds - 1}"]],
    }

    runs: dict[str, list[Run]] = {name: [] for name in sides}
    for repeat in range(options.repeats):
        order = list(sides) if repeat % 2 == 0 else list(reversed(sides))
        for name in order:
            run_dir = workdir / f"{len(runs[name])}_{name.split(',')[0].replace(' ', '_')}"
            commands = [
                (common + arguments, run_dir / str(i) if len(sides[name]) > 1 else run_dir) for i, arguments in enumerate(sides[name])
            ]
            run = run_sweep_commands(commands, env)
            runs[name].append(run)
            print(
                f"repeat {repeat}: {name:16s} total {run.total:6.1f} s, first record {run.first:5.1f} s, "
                f"points phase {run.points_phase:6.1f} s ({len(run.records)} records), used {run.cores:.2f} cores "
                f"({_top_processes(run)}), other processes {run.foreign_cores:.2f} cores",
                flush=True,
            )

    dirs = sorted(path for path in workdir.iterdir() if path.is_dir())
    reference = load(dirs[0])
    mismatched = [str(d.name) for d in dirs[1:] if load(d) != reference]
    single, ray, pair = (runs[name] for name in sides)
    n = len(single[0].records)

    def median(values: list[float]) -> float:
        return statistics.median(values)

    def row(label: str, value: Callable[[Run], float]) -> tuple[str, float, float, float]:
        return label, median([value(r) for r in single]), median([value(r) for r in ray]), median([value(r) for r in pair])

    rows = [
        row("total", lambda r: r.total),
        row("start-up + baseline (first record)", lambda r: r.first),
        row("of which starting Ray", lambda r: r.ray_start),
        row(f"the other {n - 1} points", lambda r: r.points_phase),
    ]
    print(
        f"\ndemo model, faults_demo {options.num_fewshot}-shot, limit {options.limit or 'all'}, {n} points, "
        f"1 torch thread per process/actor, {os.cpu_count()} CPUs, medians of {options.repeats}"
    )
    print(f"| | one process | Ray, {options.actors} actors | speed-up | 2 processes, half the seeds each | speed-up |")
    print("|---|---|---|---|---|---|")
    for label, one, many, two in rows:
        ratios = (f"{one / many:.2f}x", f"{one / two:.2f}x") if one else ("", "")
        print(f"| {label} | {one:.1f} s | {many:.1f} s | {ratios[0]} | {two:.1f} s | {ratios[1]} |")
    cores, foreign = row("", lambda r: r.cores), row("", lambda r: r.foreign_cores)
    print(f"| cores used by the run | {cores[1]:.2f} | {cores[2]:.2f} | | {cores[3]:.2f} | |")
    print(f"| other processes' CPU meanwhile | {foreign[1]:.2f} cores | {foreign[2]:.2f} cores | | {foreign[3]:.2f} cores | |")
    print("same records, point for point, in every run" if not mismatched else f"MISMATCHED RUNS: {mismatched}")


if __name__ == "__main__":
    main()
