"""The clean baseline's samples, and each faulty point's drift from them as a record's `"drift"` entry.

Why: a sweep measures every faulty point against the clean model's per-sample outputs, which
are kept (stripped to what `sample_drift.compare_samples` reads) from the baseline point; the run
directory stores them (`run_dir.RunDir.save_baseline`) so a resumed sweep need not re-run it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from lm_eval_faults.study.sample_drift import TaskDrift, compare_samples

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


TEXTS_KEPT = 20
"""Generative samples whose texts a record keeps (the first by document), for the sweep's
side-by-side page (`sweep_pages`): enough to read, few enough to keep results.jsonl small."""


def point_drift(clean: CleanSamples, results: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Aggregate drift of every task the point and the baseline both sampled (no per-sample lists,
    but for generative tasks the texts of the first `TEXTS_KEPT` documents)."""
    types = {**output_types(results), **clean.output_types}
    drift = {}
    for task, samples in (results.get("samples") or {}).items():
        if task in clean.samples:
            compared = compare_samples(clean.samples[task], samples, types.get(task), task=task)
            drift[task] = drift_summary(compared)
            texts = sorted((s for s in compared.samples if s.clean_text is not None), key=lambda s: (str(s.doc_id), s.index))
            if texts:
                drift[task]["texts"] = [
                    {"doc_id": s.doc_id, "prompt": s.prompt, "clean": s.clean_text, "faulted": s.faulty_text} for s in texts[:TEXTS_KEPT]
                ]
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
