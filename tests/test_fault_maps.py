"""Fault maps saved and replayed exactly, refused when foreign, and bisected to culprits."""

from __future__ import annotations

import json
import math

import lm_eval
import numpy as np
import pytest
import torch
from lm_eval_faults import inject
from lm_eval_faults.core import FaultMap, FaultMapError, Injection
from lm_eval_faults.core.fault_map import ParamInfo
from lm_eval_faults.study.bisect import bisect, minimal_failing_subset

from tiny import tiny_model


def words(model: torch.nn.Module) -> dict[str, bytes]:
    return {name: t.detach().clone().view(-1).view(torch.uint8).numpy().tobytes() for name, t in model.state_dict().items()}


def test_save_load_replay_is_bit_identical_with_tied_weights(tmp_path):
    model = tiny_model("gpt2")  # embedding and LM head are one tensor
    clean = words(model)
    path = tmp_path / "map.npz"
    with inject(model, f"p=1e-3,seed=3,save_map={path}") as faults:
        faulted = words(model)
        in_memory = faults.fault_map()
    assert words(model) == clean
    saved = FaultMap.load(path)
    assert len(saved) == len(in_memory) == faults.report.totals()["changed_elements"] > 100
    assert "transformer.wte.weight" in {info.name for info in saved.params}
    with np.load(path, allow_pickle=False) as raw:  # readable with numpy alone
        assert set(raw.files) == {"param", "index", "old", "new", "meta"}
        assert (raw["old"] ^ raw["new"]).all()
    with inject(model, f"replay={path}") as replayed:
        assert words(model) == faulted
        assert replayed.report.totals()["changed_elements"] == len(saved)
        assert replayed.report.totals()["flipped_bits"] == faults.report.totals()["flipped_bits"]
    assert words(model) == clean
    row = saved.rows()[0]
    assert row["bits"] == [b for b in range(32) if (row["old"] ^ row["new"]) >> b & 1]


def test_subsets_replay_only_their_faults():
    model = tiny_model()
    clean = words(model)
    with inject(model, "p=1e-3,seed=1") as faults:
        full = faults.fault_map()
    half = full.subset(np.arange(0, len(full), 2))
    with Injection.replay(model, half) as replayed:
        assert replayed.report.totals()["changed_elements"] == len(half)
        state = model.state_dict()
        for info_number, info in enumerate(half.params):
            tensor = state[info.name].view(-1).view(torch.int32).numpy().astype(np.int64) & 0xFFFFFFFF
            rows = half.param == info_number
            assert (tensor[half.index[rows]] == half.new[rows]).all()
    assert words(model) == clean


def test_a_tampered_foreign_or_stale_map_is_refused_and_changes_nothing(tmp_path):
    model = tiny_model()
    with inject(model, "p=1e-3,seed=2") as faults:
        fault_map = faults.fault_map()
    clean = words(model)
    tampered = FaultMap(fault_map.params, fault_map.param, fault_map.index, fault_map.old ^ 1, fault_map.new)
    with pytest.raises(FaultMapError, match="does not match this model"):
        Injection.replay(model, tampered)
    assert words(model) == clean
    with pytest.raises(FaultMapError, match="is not a parameter of this model"):
        Injection.replay(tiny_model("gpt2"), fault_map)
    with pytest.raises(FaultMapError, match=r"float32 x .* this model has float16"):
        Injection.replay(tiny_model(dtype=torch.float16), fault_map)
    with inject(model, "p=1e-3,seed=2"), pytest.raises(FaultMapError, match="does not match"):
        Injection.replay(model, fault_map)  # already faulted: the old words are not there
    (tmp_path / "junk.npz").write_bytes(b"not a map")
    with pytest.raises(FaultMapError, match="is not a fault map"):
        FaultMap.load(tmp_path / "junk.npz")


def test_replayed_map_gives_identical_lm_eval_results(tiny_llama_dir, task_manager, tmp_path):
    path = tmp_path / "map.npz"
    args = f"pretrained={tiny_llama_dir},device=cpu"
    kwargs = dict(tasks=["tiny_colors"], task_manager=task_manager, log_samples=True)
    drawn = lm_eval.simple_evaluate(model="faulty_hf", model_args=f"{args},p=2e-2,seed=5,save_map={path}", **kwargs)
    replayed = lm_eval.simple_evaluate(model="faulty_hf", model_args=f"{args},replay={path}", **kwargs)
    responses = [json.dumps([s["resps"] for s in run["samples"]["tiny_colors"]]) for run in (drawn, replayed)]  # NaN == NaN here
    assert responses[0] == responses[1]
    report = replayed["config"]["fault_injection"]
    assert report["spec"]["replay"] == str(path)
    assert report["weights"]["totals"]["changed_elements"] == drawn["config"]["fault_injection"]["weights"]["totals"]["changed_elements"]


def test_ddmin_finds_planted_culprits_within_the_budget():
    calls = []
    planted = {17, 403, 811}

    def fails(indices: np.ndarray) -> bool:
        calls.append(len(indices))
        return bool(planted & set(indices.tolist()))

    found = minimal_failing_subset(np.arange(1000), fails)
    assert len(found) == 1 and int(found[0]) in planted
    assert len(calls) <= 2 * math.ceil(math.log2(1000)) + 2


def test_bisect_finds_every_planted_culprit_on_a_model():
    """Two huge weights among 200 harmless mantissa flips: bisection blames exactly the two,
    replaying them alone does the damage, replaying the rest does not."""
    model = tiny_model()
    weight = model.model.layers[1].mlp.down_proj.weight
    numel = weight.numel()
    layout_words = weight.detach().view(-1).view(torch.int32).numpy().astype(np.int64) & 0xFFFFFFFF
    rng = np.random.default_rng(0)
    index = rng.choice(numel, 202, replace=False)
    old = layout_words[index]
    new = old ^ 1  # lowest mantissa bit: harmless
    culprits = [50, 150]
    new[culprits] = old[culprits] ^ (1 << 30)  # top exponent bit of a small weight: x 2^128
    fault_map = FaultMap(
        (ParamInfo("model.layers.1.mlp.down_proj.weight", "float32", numel),), np.zeros(202, dtype=np.int64), index, old, new
    )
    ids = torch.tensor([[1, 5, 9, 13]])

    def score(subset: FaultMap | None) -> float:
        """1 while every residual-stream value stays small, 0 once one explodes (a huge weight)."""
        with Injection.replay(model, subset) if subset is not None else torch.no_grad(), torch.no_grad():
            hidden = model(ids, output_hidden_states=True).hidden_states[:-1]  # before the final norm
        return float(all(torch.isfinite(h).all() and h.abs().max() < 1e6 for h in hidden))

    outcome = bisect(fault_map, score, 0.5, {"model.layers.1.mlp.down_proj.weight": ("mlp", 1)})
    assert outcome.indices == culprits
    assert outcome.culprits_score == 0.0 and outcome.rest_score == 1.0
    assert all(c.bits == [30] and c.component == "mlp" and abs(c.new_value) > 1e30 for c in outcome.culprits)
    assert outcome.evaluations <= 2 * (2 * math.ceil(math.log2(202)) + 4)
    assert "2 culprit(s) among 202 faults" in outcome.format_table()
    assert outcome.fault_bits[0] == 200 and outcome.fault_bits[30] == 2 and sum(outcome.fault_bits) == 202
