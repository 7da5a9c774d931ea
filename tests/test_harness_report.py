"""Reports, figures and tables say what is on the model and can't mislead."""

from __future__ import annotations

import lm_eval
import pytest
from lm_eval_faults.core import Injection, inject
from lm_eval_faults.harness.model import FaultyHFLM


@pytest.fixture(scope="module")
def lm(tiny_llama_dir):
    model = FaultyHFLM(pretrained=str(tiny_llama_dir), device="cpu")
    model.print_report = False
    return model


def _evaluate(lm, task_manager):
    return lm_eval.simple_evaluate(model=lm, tasks=["tiny_colors"], task_manager=task_manager)["config"]["fault_injection"]


def test_faults_replayed_from_outside_are_reported_and_counts_are_per_evaluation(lm, task_manager):
    clean = _evaluate(lm, task_manager)
    with inject(lm.model, "p=2e-2,seed=5") as faults:
        fault_map = faults.fault_map()
    with Injection.replay(lm.model, fault_map) as replayed:
        report = _evaluate(lm, task_manager)
        assert report["spec"]["description"] == replayed.report.spec["description"]
        assert report["weights"]["totals"]["changed_elements"] == faults.report.totals()["changed_elements"] > 0
    again = _evaluate(lm, task_manager)
    assert report["requests"] == again["requests"] == clean["requests"]  # one evaluation's requests, not a running sum
    assert again["weights"]["totals"]["changed_elements"] == 0  # the replay is gone: the report says so


def test_two_stacked_injections_are_both_reported(lm, task_manager):
    with inject(lm.model, "p=1e-2,seed=1") as first, inject(lm.model, "p=1e-2,seed=2") as second:
        report = _evaluate(lm, task_manager)
    assert [spec["seed"] for spec in report["spec"]["stack"]] == [1, 2]
    expected = first.report.totals()["hit_elements"] + second.report.totals()["hit_elements"]
    assert report["weights"]["totals"]["hit_elements"] == expected
