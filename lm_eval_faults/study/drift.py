"""Drift of a faulted lm-eval run against the clean one, from their two output directories (`--log_samples`).

Why: any two lm-eval runs can be compared, not only a sweep's points: each task's newest
`samples_<task>_<date_id>.jsonl` in both directories is matched and handed, filter by filter, to
`sample_drift.compare_samples`; `drift_table` prints the result.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lm_eval_faults.study.sample_drift import TaskDrift, compare_samples

SAMPLES_RE = re.compile(r"^samples_(?P<task>.+)_(?P<stamp>[^_]+)\.jsonl$")
"""lm-eval's `samples_<task>_<date_id>.jsonl`; the date_id (`2026-01-31T12-00-00.123456`) has no underscore."""


@dataclass
class DriftReport:
    """The drift of every task present in both runs, and what could not be matched."""

    clean_dir: str
    faulty_dir: str
    tasks: list[TaskDrift] = field(default_factory=list)
    only_clean_tasks: list[str] = field(default_factory=list)
    only_faulty_tasks: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def to_dict(self, samples: bool = True) -> dict[str, Any]:
        """The report as JSON-ready values; `samples=False` keeps only the aggregates."""
        return {
            "clean_dir": self.clean_dir,
            "faulty_dir": self.faulty_dir,
            "tasks": [task.to_dict(samples) for task in self.tasks],
            "only_clean_tasks": list(self.only_clean_tasks),
            "only_faulty_tasks": list(self.only_faulty_tasks),
            "notes": list(self.notes),
        }


@dataclass(frozen=True)
class RunFiles:
    """One lm-eval output directory: the newest samples file of each task and the notes on the choice."""

    samples: dict[str, Path]
    notes: list[str]


def find_sample_files(directory: str | Path) -> RunFiles:
    """`samples_<task>_<date_id>.jsonl` anywhere under `directory` (lm-eval adds a model-named level);
    the newest date_id per task, chosen by name as lm-eval itself does, not by file time."""
    root = Path(directory)
    if not root.is_dir():
        raise FileNotFoundError(f"{root} is not a directory")
    found: dict[str, list[tuple[str, Path]]] = {}
    for path in sorted(root.rglob("samples_*.jsonl")):
        match = SAMPLES_RE.match(path.name)
        if match:
            found.setdefault(match["task"], []).append((match["stamp"], path))
    if not found:
        raise FileNotFoundError(f"no samples_<task>_<timestamp>.jsonl under {root}: was lm-eval run with --output_path and --log_samples?")
    chosen = {task: max(files)[1] for task, files in found.items()}
    notes = [
        f"{task}: {len(files)} sample files under {root}, using the newest, {chosen[task].relative_to(root)}"
        for task, files in sorted(found.items())
        if len(files) > 1
    ]
    return RunFiles(samples=chosen, notes=notes)


def read_samples(path: Path) -> list[dict[str, Any]]:
    """The samples of one JSONL file (Python's json reads lm-eval's NaN and -Infinity)."""
    samples = []
    with path.open(encoding="utf-8") as handle:
        for number, line in enumerate(handle, 1):
            if line.strip():
                try:
                    samples.append(json.loads(line))
                except json.JSONDecodeError as error:
                    raise ValueError(f"{path}:{number}: not JSON ({error.msg})") from None
    return samples


def read_results(samples_path: Path) -> dict[str, Any]:
    """The results JSON written with a samples file: the sibling `*_<same date_id>.json`; {} if none."""
    match = SAMPLES_RE.match(samples_path.name)
    stamp = match["stamp"] if match else ""
    for path in sorted(samples_path.parent.glob(f"*_{stamp}.json"), key=lambda p: not p.name.startswith("results_")):
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError):
            continue
        if isinstance(data, dict) and "results" in data:
            return data
    return {}


def _output_type(task: str, results: Mapping[str, Any]) -> str | None:
    """The task's output_type from the results JSON's configs."""
    config = (results.get("configs") or {}).get(task) or {}
    value = config.get("output_type")
    return value if isinstance(value, str) else None


def _fault_counts(task: str, results: Mapping[str, Any]) -> tuple[int | None, int | None, int | None]:
    """(requests, degenerate, non-finite) of `task` in a faulty_hf run's results; None where absent."""
    injection = (results.get("config") or {}).get("fault_injection") or {}

    def count(key: str) -> int | None:
        value = (injection.get(key) or {}).get(task)
        return int(value) if isinstance(value, (int, float)) else None

    return count("requests"), count("degenerate_requests"), count("nonfinite_requests")


def _by_filter(samples: list[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    """Samples per lm-eval filter: a task with several filters writes one line per document and filter."""
    groups: dict[str, list[dict[str, Any]]] = {}
    for sample in samples:
        groups.setdefault(str(sample.get("filter", "none")), []).append(sample)
    return groups


def _task_drifts(task: str, clean_path: Path, faulty_path: Path) -> list[TaskDrift]:
    """One TaskDrift per filter of `task`."""
    clean_results, faulty_results = read_results(clean_path), read_results(faulty_path)
    output_type = _output_type(task, faulty_results) or _output_type(task, clean_results)
    clean, faulty = _by_filter(read_samples(clean_path)), _by_filter(read_samples(faulty_path))
    drifts = []
    for name in sorted(set(clean) | set(faulty)):
        drift_ = compare_samples(clean.get(name, []), faulty.get(name, []), output_type, task=task)
        drift_.filter = name
        if output_type is None:
            drift_.notes.append(f"no output_type in a results JSON: inferred {drift_.output_type} from the samples")
        drift_.requests, drift_.degenerate_requests, drift_.nonfinite_requests = _fault_counts(task, faulty_results)
        drifts.append(drift_)
    return drifts


def drift(clean_dir: str | Path, faulty_dir: str | Path) -> DriftReport:
    """Per-sample drift of every task found in both lm-eval output directories (`--log_samples`)."""
    clean_files, faulty_files = find_sample_files(clean_dir), find_sample_files(faulty_dir)
    common = sorted(set(clean_files.samples) & set(faulty_files.samples))
    if not common:
        raise ValueError(f"no task in common: clean has {sorted(clean_files.samples)}, faulted has {sorted(faulty_files.samples)}")
    report = DriftReport(
        clean_dir=str(clean_dir),
        faulty_dir=str(faulty_dir),
        only_clean_tasks=sorted(set(clean_files.samples) - set(common)),
        only_faulty_tasks=sorted(set(faulty_files.samples) - set(common)),
        notes=clean_files.notes + faulty_files.notes,
    )
    for task in common:
        report.tasks.extend(_task_drifts(task, clean_files.samples[task], faulty_files.samples[task]))
    return report
