"""Simulated storage (`storage=`): weights encoded into a format's stored fields, faulted there,
decoded into what the model computes with; every format against its reference codec."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType, quants
from lm_eval_faults import inject
from lm_eval_faults.core.spec import FaultSpec, FaultSpecError
from lm_eval_faults.core.storage.codecs import StorageError, codec_names, encoding_of

from tiny import tiny_model

STORAGES = ("float16", "bfloat16", "int8", "int4", "q8_0", "q4_0", "q4_1", "mxfp4")
GGUF_TYPES = {
    "q8_0": GGMLQuantizationType.Q8_0,
    "q4_0": GGMLQuantizationType.Q4_0,
    "q4_1": GGMLQuantizationType.Q4_1,
    "mxfp4": GGMLQuantizationType.MXFP4,
}
MLP = "model.layers.1.mlp.down_proj.weight"


def _groups(storage: str) -> dict[str, int]:
    """Groups of 16 for int4 (the tiny model's rows are 32 wide); the other storages' blocks are fixed."""
    return {"group_size": 16} if storage == "int4" else {}


def _weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in model.named_parameters()}


def _reference(storage: str, weight: torch.Tensor, group_size: int) -> torch.Tensor:
    """Each format decoded by an independent reference: gguf's own codecs, or the formula."""
    w = weight.detach().float()
    if storage in GGUF_TYPES:
        return torch.from_numpy(quants.dequantize(quants.quantize(w.numpy(), GGUF_TYPES[storage]), GGUF_TYPES[storage]))
    if storage in ("float16", "bfloat16"):
        return w.to(getattr(torch, storage)).float()
    rows = w.numpy().reshape(-1, w.shape[-1] if storage == "int8" else group_size).astype(np.float64)
    if storage == "int8":
        scale = (np.abs(rows).max(axis=1, keepdims=True) / 127).astype(np.float16).astype(np.float64)
        return torch.from_numpy((np.clip(np.round(rows / scale), -127, 127) * scale).reshape(w.shape)).float()
    rows32 = rows.astype(np.float32)  # GPTQ's asymmetric int4: a range widened to hold 0, an integer zero
    low, high = np.minimum(rows32.min(axis=1, keepdims=True), 0), np.maximum(rows32.max(axis=1, keepdims=True), 0)
    step = (high - low) / np.float32(15)
    scale = step.astype(np.float16)
    zero = np.clip(-np.round(low / step), 0, 15)
    codes = np.clip(np.round(rows32 * (np.float16(1) / scale).astype(np.float32)) + zero, 0, 15)
    return torch.from_numpy(((codes - zero) * scale.astype(np.float32)).reshape(w.shape).astype(np.float32))


def test_every_storage_is_registered():
    assert set(STORAGES) <= set(codec_names())


@pytest.mark.parametrize("storage", STORAGES)
def test_at_p0_the_model_computes_with_the_formats_own_decoding_and_restores_to_float(storage):
    model = tiny_model()
    clean = _weights(model)
    with inject(model, p=0, storage=storage, **_groups(storage), target="mlp"):
        decoded = model.get_parameter(MLP).detach().clone()
        untouched = model.get_parameter("model.layers.1.self_attn.q_proj.weight")
        assert torch.equal(untouched, clean["model.layers.1.self_attn.q_proj.weight"])  # outside the target
    assert torch.allclose(decoded, _reference(storage, clean[MLP], 16), rtol=0, atol=1e-6)
    assert not torch.equal(decoded, clean[MLP]) or storage == "float16"
    assert all(torch.equal(p, clean[name]) for name, p in model.named_parameters())


@pytest.mark.parametrize("storage", STORAGES)
def test_faults_land_in_stored_fields_at_p_per_stored_bit_and_restore_exactly(storage):
    model = tiny_model()
    clean = _weights(model)
    p = 2e-3
    with inject(model, p=p, storage=storage, **_groups(storage), target="mlp", seed=4) as faults:
        sites = faults.report.weights
        fields = {site.name.rpartition(".")[2] for site in sites}
        assert all(site.name.startswith("model.layers.") and site.name.rsplit(".", 1)[0].endswith(".weight") for site in sites)
        bits = sum(site.eligible_bits for site in sites)
        faulted = sum(site.fault_bits for site in sites)
        assert abs(faulted - p * bits) < 5 * math.sqrt(p * bits), (faulted, p * bits)  # within 5 sigma
        assert sum(site.changed_elements for site in sites) > 0
        assert not all(torch.equal(p_, clean[name]) for name, p_ in model.named_parameters())
    assert fields == {"values"} if storage in ("float16", "bfloat16") else len(fields) >= 2
    assert all(torch.equal(p_, clean[name]) for name, p_ in model.named_parameters())
    with inject(model, p=0, storage=storage, **_groups(storage), target="mlp"):  # the cached encoding is clean again
        assert torch.allclose(model.get_parameter(MLP), _reference(storage, clean[MLP], 16), rtol=0, atol=1e-6)


def test_an_int8_code_bit_moves_one_weight_by_two_to_the_k_scales_and_a_scale_bit_its_whole_row():
    weight = torch.nn.Parameter(torch.randn(4, 64))
    encoding = encoding_of(weight, "int8", 128, "w")
    with torch.no_grad():
        encoding.install()
        clean = weight.detach().clone()
        scale = float(encoding.fields["scales"][2])
        codes = encoding.fields["codes"]
        j, k = 2 * 64 + 5, 3
        codes[j] = codes[j] ^ (1 << k)
        encoding.refresh("codes", np.array([j]))
        moved = (weight - clean).flatten().nonzero().flatten().tolist()
        assert moved == [j] and abs(abs(float((weight - clean).flatten()[j])) - 2**k * scale) < 1e-6
        codes[j] = codes[j] ^ (1 << k)
        encoding.refresh("codes", np.array([j]))
        assert torch.equal(weight, clean)
        scales = encoding.fields["scales"]
        scales.view(torch.int16)[1] ^= 1 << 10  # the lowest exponent bit: the scale doubles or halves
        encoding.refresh("scales", np.array([1]))
        ratio = weight[1] / clean[1]
        assert set(torch.round(ratio[clean[1] != 0] * 1000).tolist()) <= {2000.0, 500.0}
        assert torch.equal(weight[[0, 2, 3]], clean[[0, 2, 3]])


def test_a_q4_1_scale_fault_moves_exactly_its_block_of_32():
    weight = torch.nn.Parameter(torch.randn(2, 64))
    encoding = encoding_of(weight, "q4_1", 128, "w")
    with torch.no_grad():
        encoding.install()
        clean = weight.detach().clone()
        encoding.fields["scales"].view(torch.int16)[3] ^= 1 << 14  # block 3: weights 96..127 of the flat view
        encoding.refresh("scales", np.array([3]))
        moved = set((weight - clean).flatten().nonzero().flatten().tolist())
        assert moved and moved <= set(range(96, 128))


def test_bits_select_positions_within_a_fields_layout():
    model = tiny_model()
    with inject(model, p=5e-3, storage="int4", group_size=16, target="mlp", fields="codes", bits="3+7", seed=2) as faults:
        codes = [site for site in faults.report.weights if site.name.endswith(".codes")]
        histogram = np.sum([site.bit_histogram for site in codes], axis=0)
        assert histogram.sum() > 0 and set(np.flatnonzero(histogram)) <= {3, 7}  # the top bit of each 4-bit code


@pytest.mark.parametrize(
    "fields, message",
    [
        (dict(storage="int3"), r"storage='int3' is invalid: choose none, file \(a GGUF file's own blocks\) or one of .*int4"),
        (dict(storage="int4", group_size=3), r"group_size=3 is invalid"),
        (dict(storage="int4", site="activations"), r"storage='int4' is invalid: storage encodes stored weights"),
        (dict(storage="q4_0", group_size=64), r"group_size=64 is invalid: sets the groups of storage=int4 only"),
        (dict(group_size=64), r"group_size=64 is invalid: sets the groups of storage=int4 only"),
        (dict(storage="q4_0", ecc="parity"), r"ecc='parity' is invalid: with storage=, a detected word would be zeroed"),
        (
            dict(storage="mxfp4", bits="sign"),
            r"bits='sign' is invalid: does not exist in e8m0; valid names: all, exponent.* \(field 'exponents'",
        ),
        (
            dict(storage="int4", bits="3+7"),
            r"bits='3\+7' is invalid: position range '7' is outside 0-3 for uint4 \(field 'zeros' of storage=int4",
        ),
        (dict(storage="q4_1", protect_bits="exponent_msb"), r"protect_bits='exponent_msb' is invalid: does not exist in int4x2"),
    ],
)
def test_bad_storage_keys_fail_in_one_line_naming_the_key(fields, message):
    with pytest.raises(FaultSpecError, match=message):
        FaultSpec(p=1e-3, **fields)
    with pytest.raises(FaultSpecError, match=message):  # the Python API refuses it the same way, before anything is written
        inject(tiny_model(), p=1e-3, **fields)


def test_a_weight_the_blocks_do_not_divide_is_refused_by_name_before_anything_changes():
    model = tiny_model()
    clean = _weights(model)
    with pytest.raises(StorageError, match=r"storage=int4: model\.layers\.0\.mlp\.gate_proj\.weight has last dimension 32"):
        inject(model, p=1e-3, storage="int4", target="mlp")  # group_size 128 > a 32-wide row
    assert all(torch.equal(p, clean[name]) for name, p in model.named_parameters())


def test_the_float_spec_keeps_its_fingerprint():
    assert "storage" not in FaultSpec(p=1e-3).to_dict()
    assert FaultSpec(p=1e-3, storage="q4_1").fingerprint() != FaultSpec(p=1e-3).fingerprint()


@pytest.mark.parametrize(
    "model_args, message",
    [
        (dict(storage="int4", p=1e-3), r"storage=int4 is invalid for this model: its blocks of 128 weights do not divide hidden_size=64"),
        (
            dict(storage="q4_1", p=1e-3, bits="exponent"),
            r"bits='exponent' is invalid: does not exist in int4x2.*field 'codes' of storage=q4_1",
        ),
    ],
)
def test_faulty_hf_refuses_a_storage_the_config_rules_out_before_loading(model_args, message, monkeypatch):
    from lm_eval_faults.harness import model as harness_model

    def no_load(*args, **kwargs):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(harness_model.HFLM, "__init__", no_load)
    with pytest.raises(FaultSpecError, match=message):
        harness_model.FaultyHFLM(**model_args, device="cpu")


def test_faulty_hf_evaluates_the_stored_form():
    """The demo model stored as q4_1 runs through lm-eval's loglikelihood; its fields are reported."""
    from lm_eval.api.instance import Instance
    from lm_eval_faults.harness.model import FaultyHFLM

    lm = FaultyHFLM(storage="q4_1", p=1e-3, seed=1, device="cpu", batch_size=4)
    requests = [Instance("loglikelihood", {}, ("The sky is", " blue"), 0), Instance("loglikelihood", {}, ("Snow is", " white"), 0)]
    results = lm.loglikelihood(requests)
    assert len(results) == 2 and all(math.isfinite(score) for score, _ in results)
    fields = {site.name.rpartition(".")[2] for site in lm.report.weights}
    assert fields == {"scales", "mins", "codes"} and "stored as q4_1" in lm.report.spec["description"]


@pytest.mark.parametrize("storage", ["int8", "q4_1", "mxfp4"])
def test_the_report_counts_the_weights_faults_changed_and_the_clean_quantization_error(storage):
    model = tiny_model()
    clean = _weights(model)
    with inject(model, p=0, storage=storage, target="mlp"):
        decoded = {name: p.detach().clone() for name, p in model.named_parameters() if ".mlp." in name}
    with inject(model, p=3e-3, storage=storage, target="mlp", seed=6) as faults:
        (row,) = faults.report.to_dict()["weights"]["storage"].values()
        changed = sum(
            int(((model.get_parameter(name) != value) & ~(model.get_parameter(name).isnan() & value.isnan())).sum())
            for name, value in decoded.items()
        )
        assert row["weights_affected"] == changed > 0
        words_changed = sum(site.changed_elements for site in faults.report.weights)
        assert changed >= words_changed if storage != "int8" else changed > 0  # a scale word changes its whole block
        error = sum(float(((decoded[name].double() - clean[name].double()) ** 2).sum()) for name in decoded)
        norm = sum(float((clean[name].double() ** 2).sum()) for name in decoded)
        assert row["clean_relative_rms"] == pytest.approx((error / norm) ** 0.5, rel=1e-9)
        assert row["bits_per_weight"] == pytest.approx(row["stored_bits"] / row["weights"])
        assert f"stored as {storage} (mlp)" in faults.report.format_table()


def test_fields_choose_where_faults_land_and_protect_fields_backs_one_up_at_its_cost():
    model = tiny_model()
    with inject(model, p=3e-3, storage="q4_1", target="mlp", fields="scales", seed=1) as faults:
        assert {site.name.rpartition(".")[2] for site in faults.report.weights} == {"scales"}
    with inject(model, p=3e-3, storage="q4_1", target="mlp", protect_fields="scales+mins", seed=1) as faults:
        report = faults.report.to_dict()
        protected = [site for site in faults.report.weights if site.name.endswith((".scales", ".mins"))]
        assert sum(site.changed_elements for site in protected) == 0 and sum(site.masked_bits for site in protected) > 0
        assert report["protection"]["overhead"] == pytest.approx(32 / 160)  # a block's scale and min of its 160 stored bits
        (row,) = report["weights"]["storage"].values()
        codes = sum(site.changed_elements for site in faults.report.weights if site.name.endswith(".codes"))
        assert 0 < row["weights_affected"] <= 2 * codes  # a packed byte holds two weights' codes


@pytest.mark.parametrize(
    "fields, message",
    [
        (dict(storage="q4_1", fields="exponents"), r"fields='exponents' is invalid: storage=q4_1 stores the fields scales, mins, codes"),
        (dict(protect_fields="scales"), r"protect_fields='scales' is invalid: names fields of a simulated storage"),
    ],
)
def test_unknown_fields_are_refused_naming_the_storages_fields(fields, message):
    with pytest.raises(FaultSpecError, match=message):
        FaultSpec(p=1e-3, **fields)


@pytest.mark.slow
def test_a_sweep_of_one_storage_has_that_storage_at_p0_as_its_baseline(tmp_path):
    from lm_eval_faults.study.grid import SweepConfig
    from lm_eval_faults.study.records import load_records
    from lm_eval_faults.study.runner import run_sweep

    config = SweepConfig(model_args="", tasks="faults_demo", p="1e-3", fault_args="storage=q4_1", limit=8)
    run_sweep(tmp_path, config, report=False, progress=False)
    baseline, point = load_records(tmp_path / "results.jsonl")
    assert baseline["baseline"] and all(row["weights_affected"] == 0 for row in baseline["storage"].values())
    rows = point["storage"].values()
    assert sum(row["stored_bits"] for row in rows) / sum(row["weights"] for row in rows) == pytest.approx(5.0)
    assert sum(row["weights_affected"] for row in rows) > 0
    from lm_eval_faults.study.sweep_report import build_report

    assert "**Stored as q4_1** (5.00 stored bits per weight)" in build_report(tmp_path).read_text()


@pytest.mark.parametrize("storage", ["q4_1", "int8", "nf4"])
def test_a_storage_map_names_weight_field_and_word_and_replays_to_the_same_weights(tmp_path, storage):
    from lm_eval_faults.core.fault_map import FaultMap

    path = tmp_path / "m.npz"
    model = tiny_model()
    clean = _weights(model)
    with inject(model, p=3e-3, storage=storage, target="mlp", modules="down_proj", save_map=str(path), seed=2) as faults:
        faulted = _weights(model)
        fields = faults.report.to_dict()["weights"]["storage"]
    saved = FaultMap.load(path)
    assert all(info.name.rpartition(".")[2] in ("scales", "mins", "codes") for info in saved.params)
    assert all(info.name.rpartition(".")[0].endswith("down_proj.weight") for info in saved.params)
    with inject(model, replay=str(path)) as replayed:  # the map's spec says the storage: no storage= needed
        assert all(torch.equal(p_, faulted[name]) or (p_.isnan() == faulted[name].isnan()).all() for name, p_ in model.named_parameters())
        assert replayed.report.to_dict()["weights"]["storage"].keys() == fields.keys()
        assert sum(s.changed_elements for s in replayed.report.weights) == len(saved)
    assert all(torch.equal(p_, clean[name]) for name, p_ in model.named_parameters())
    with pytest.raises(FaultSpecError, match=r"replay=.* is invalid: a map replays in the storage it was saved in"):
        FaultSpec(replay=str(path), storage=storage)


def test_bisection_of_a_storage_map_names_the_culprits_fields():
    from lm_eval_faults.core.injection import Injection
    from lm_eval_faults.core.sites.targets import all_param_sites
    from lm_eval_faults.study.bisect import bisect

    model = tiny_model()
    with inject(model, p=0, storage="q4_1", target="mlp", modules="down_proj"):
        decoded = model.get_parameter(MLP).detach().clone()
    with inject(model, p=2e-3, storage="q4_1", target="mlp", modules="down_proj", seed=3) as faults:
        fault_map = faults.fault_map()

    def score(subset):  # 1 for the clean stored form, falling with the largest weight change
        injection = (
            inject(model, p=0, storage="q4_1", target="mlp", modules="down_proj") if subset is None else Injection.replay(model, subset)
        )
        with injection:
            change = float((model.get_parameter(MLP).detach() - decoded).abs().nan_to_num(1e9).max())
        return 1 / (1 + change)

    sites = {name: (site.component, site.layer) for site in all_param_sites(model) for name in site.names}
    outcome = bisect(fault_map, score, score(fault_map) + 0.01, sites)  # damage: as bad as the whole map, nearly
    assert outcome.culprits and outcome.clean_score == 1.0
    assert all(
        c.param.rpartition(".")[2] in ("scales", "mins", "codes") and c.component == "mlp" and c.layer == 1 for c in outcome.culprits
    )
    fields = np.array([info.name.rpartition(".")[2] for info in fault_map.params])[fault_map.param]
    assert outcome.faults_by_field == {name: int((fields == name).sum()) for name in ("codes", "mins", "scales")}
    assert sum(outcome.culprits_by_field.values()) == len(outcome.culprits) and set(outcome.culprits_by_field) == set(
        outcome.faults_by_field
    )
    assert "culprits by stored field: codes" in outcome.format_table()


@pytest.mark.parametrize("storage", codec_names())
def test_every_storage_composes_with_layers_bits_ecc_and_maps(storage, tmp_path):
    """One weight of one layer, chosen by target, layers and modules; bits= inside each field's
    own words; SECDED over each field's packed 64-bit words; a saved map replayed exactly."""
    model = tiny_model(hidden_size=64, intermediate_size=256)  # down_proj rows of 256: Q4_K's super-blocks fit
    clean = _weights(model)
    where = dict(storage=storage, target="mlp", layers="1", modules="down_proj", **_groups(storage))
    path = tmp_path / "m.npz"
    with inject(model, p=2e-2, bits="0", seed=1, save_map=str(path), **where) as faults:
        sites = faults.report.weights
        assert {site.name.rpartition(".")[0] for site in sites} == {MLP}
        assert sum(site.bit_histogram[0] for site in sites) > 0
        assert all(sum(site.bit_histogram[1:]) == 0 for site in sites)  # bit 0 of every field's words, and no other
        faulted = _weights(model)
        assert all(torch.equal(value, clean[name]) for name, value in faulted.items() if name != MLP)
        assert not torch.equal(faulted[MLP], clean[MLP])
    with inject(model, replay=str(path)):
        assert torch.equal(model.get_parameter(MLP).nan_to_num(), faulted[MLP].nan_to_num())
    with inject(model, p=1e-3, ecc="secded", ecc_policy="keep", seed=2, **where) as faults:
        counts = faults.report.totals()
        assert counts["corrected"] > 0 and counts["corrected"] >= counts["changed_elements"]  # single errors per word are undone
    assert all(torch.equal(value, clean[name]) for name, value in model.named_parameters())
