"""faults_facts: deterministic data, and a real pretrained model that knows it and loses it under faults."""

from __future__ import annotations

import lm_eval
import pytest
from lm_eval_faults import FaultSpec
from lm_eval_faults.harness.model import FaultyHFLM
from lm_eval_faults.tasks.faults_facts import facts_data


def test_docs_are_deterministic_with_the_true_capital_at_the_gold_index():
    docs = facts_data.test_docs()
    assert docs == facts_data.test_docs() and len(docs) == len(facts_data.CAPITALS) == 40
    for doc in docs:
        assert len(set(doc["choices"])) == 4 and doc["choices"][doc["answer"]] == facts_data.CAPITALS[doc["country"]]
    positions = [doc["answer"] for doc in docs]
    assert all(positions.count(i) >= 4 for i in range(4))


@pytest.mark.slow
def test_real_model_knows_the_facts_and_loses_them_under_bit_flips(smollm_dir):
    lm = FaultyHFLM(pretrained=str(smollm_dir), gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf", dtype="float32", device="cpu", batch_size=32)

    def accuracy() -> float:
        results = lm_eval.simple_evaluate(model=lm, tasks=["faults_facts"])
        return results["results"]["faults_facts"]["acc,none"]

    assert accuracy() >= 0.9

    lm.set_faults(FaultSpec(p=1e-4, target="attention", seed=0))
    assert lm.report.totals()["flipped_bits"] > 50_000
    assert accuracy() <= 0.5
    lm.set_faults(FaultSpec(p=0))
    assert accuracy() >= 0.9


@pytest.mark.slow
def test_the_generative_variant_is_answered_by_the_real_model_and_lost_to_kv_cache_faults(smollm_dir):
    lm = FaultyHFLM(pretrained=str(smollm_dir), gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf", dtype="float32", device="cpu", batch_size=40)

    def exact_match() -> float:
        results = lm_eval.simple_evaluate(model=lm, tasks=["faults_facts_gen"], limit=12)
        return results["results"]["faults_facts_gen"]["exact_match,none"]

    assert exact_match() >= 0.75
    lm.set_faults(FaultSpec(p=1e-3, site="kv_cache", seed=0))
    assert exact_match() <= 0.25
    assert lm.report.totals("kv_cache")["hit_elements"] > 1000
