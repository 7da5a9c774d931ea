"""Batching never changes a request's faults, cached runs keep their report, a collapsed
model is counted as degenerate, and the request cache is keyed on the model too."""

from __future__ import annotations

import json
import math

import lm_eval
import pytest
import torch
from lm_eval_faults.harness.model import FaultyHFLM

from tiny import save_tiny_model

TASKS = ["tiny_colors", "tiny_colors_gen"]


def evaluate(model_args: str, task_manager, tasks: list[str] = TASKS, **kwargs) -> dict:
    return lm_eval.simple_evaluate(
        model="faulty_hf", model_args=model_args, tasks=tasks, device="cpu", task_manager=task_manager, log_samples=True, **kwargs
    )


def loglikelihoods(results: dict) -> list[float]:
    return [float(resp[0][0]) for sample in results["samples"]["tiny_colors"] for resp in sample["resps"]]


@pytest.mark.parametrize(
    "spec", ["p=2e-3,site=activations,target=mlp", "p=2e-3,site=activations,target=all,act_scope=all", "p=2e-3,site=kv_cache"]
)
def test_activation_faults_do_not_depend_on_batching(tiny_llama_dir, task_manager, spec):
    """Same spec and seed: the same faults per request at batch sizes 1, 7 and auto (whose probe
    forwards are neither faulted nor counted). Fault totals are compared on scoring requests:
    batched generation also runs rows that already stopped, whose extra steps' faults are counted
    but reach no answer; the generations themselves must match."""
    runs = {bs: evaluate(f"pretrained={tiny_llama_dir},{spec}", task_manager, ["tiny_colors"], batch_size=bs) for bs in (1, 7, "auto")}
    site = spec.rpartition("site=")[2].split(",")[0]
    totals = {bs: run["config"]["fault_injection"][site]["totals"] for bs, run in runs.items()}
    for field in ("elements", "hit_elements", "changed_elements", "flipped_bits", "expected_elements"):
        assert totals[1][field] == totals[7][field] == totals["auto"][field], field
    assert totals[1]["hit_elements"] > 0
    reference = loglikelihoods(runs[1])
    for bs in (7, "auto"):
        for a, b in zip(reference, loglikelihoods(runs[bs]), strict=False):
            assert (math.isnan(a) and math.isnan(b)) or math.isclose(a, b, rel_tol=1e-4, abs_tol=1e-4)
    generated = {bs: evaluate(f"pretrained={tiny_llama_dir},{spec}", task_manager, ["tiny_colors_gen"], batch_size=bs) for bs in (1, 3)}
    responses = {bs: [s["resps"] for s in run["samples"]["tiny_colors_gen"]] for bs, run in generated.items()}
    assert responses[1] == responses[3]


def test_cached_reruns_keep_their_request_counts(tiny_llama_dir, task_manager, tmp_path):
    args = f"pretrained={tiny_llama_dir},p=5e-2,seed=1"
    cache = str(tmp_path / "cache")
    first = evaluate(args, task_manager, use_cache=cache)["config"]["fault_injection"]
    again = evaluate(args, task_manager, use_cache=cache)["config"]["fault_injection"]
    assert first["requests"] == again["requests"] == {"tiny_colors": 16, "tiny_colors_gen": 4}
    for field in ("nonfinite_requests", "degenerate_requests"):
        assert first[field] == again[field], field
    assert sum(first["nonfinite_requests"].values()) > 0
    assert first["cached_requests"] == {"tiny_colors": 0, "tiny_colors_gen": 0}
    assert again["cached_requests"] == {"tiny_colors": 16, "tiny_colors_gen": 4}


def test_the_cache_never_serves_another_models_answers(tiny_llama_dir, task_manager, tmp_path):
    other = save_tiny_model(tmp_path / "other", dtype=torch.float32)
    torch.manual_seed(1)
    model = FaultyHFLM(pretrained=str(other), device="cpu").model
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(torch.randn_like(parameter))
    model.save_pretrained(other)
    cache = str(tmp_path / "cache")
    served = evaluate(f"pretrained={tiny_llama_dir},p=0", task_manager, use_cache=cache)
    second = evaluate(f"pretrained={other},p=0", task_manager, use_cache=cache)
    fresh = evaluate(f"pretrained={other},p=0", task_manager)
    assert loglikelihoods(second) == loglikelihoods(fresh) != loglikelihoods(served)
    assert second["config"]["fault_injection"]["cached_requests"]["tiny_colors"] == 0


def test_a_collapsed_model_is_counted_degenerate_not_chance(tiny_llama_dir, task_manager):
    """Zero the final norm's gain: logits are finite but all equal, every choice ties, and
    accuracy is the first choice's share. The report must say so."""
    with pytest.warns(UserWarning, match="NO FAULTS"):  # a spec that is active, yet lands nothing
        lm = FaultyHFLM(pretrained=str(tiny_llama_dir), device="cpu", p=1e-9, target="norm")
    with torch.no_grad():
        lm.model.model.norm.weight.zero_()
    results = lm_eval.simple_evaluate(model=lm, tasks=TASKS, task_manager=task_manager)
    report = results["config"]["fault_injection"]
    assert report["nonfinite_requests"]["tiny_colors"] == 0
    assert report["degenerate_requests"] == {"tiny_colors": 16, "tiny_colors_gen": 4}
    assert json.dumps(report)  # plain JSON
