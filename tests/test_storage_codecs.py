"""The storages added after the first eight: FP8 with per-channel scales, NF4, GGUF Q4_K, and
torchao's quantized tensors faulted in their own fields. Each codec is checked against the
field's own library (torch's FP8 casts, torchao's NF4 rounding, gguf's Q4_K decoder), and
crafted single faults move exactly the weights the format says they move."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType, quants
from lm_eval_faults import inject
from lm_eval_faults.core.storage.codecs import codec, encoding_of
from lm_eval_faults.core.storage.k_quants import quantize_q4_k
from lm_eval_faults.core.storage.normal_float import NF4_VALUES, NormalFloat4
from lm_eval_faults.harness.model import FaultyHFLM

from tiny import tiny_model, tiny_tokenizer

WIDE = dict(hidden_size=64, intermediate_size=256)
"""Rows of 64 and 256: NF4's blocks of 64 and Q4_K's super-blocks of 256 divide them."""
DOWN = "model.layers.1.mlp.down_proj.weight"


def _torchao():
    return pytest.importorskip("torchao.quantization", reason="torchao is an optional reference here")


@pytest.mark.parametrize(("storage", "dtype"), [("fp8_e4m3", torch.float8_e4m3fn), ("fp8_e5m2", torch.float8_e5m2)])
def test_fp8_decodes_to_torchs_cast_of_each_row_scaled_to_the_formats_largest_value(storage, dtype):
    weight = torch.nn.Parameter(torch.randn(8, 64))
    encoding = encoding_of(weight, storage, 128, "w")
    largest = torch.finfo(dtype).max
    scale = weight.detach().abs().amax(dim=1, keepdim=True) / largest
    expected = (weight.detach() / scale).to(dtype).float() * scale
    with torch.no_grad():
        encoding.install()
        assert torch.equal(weight.detach(), expected)
        clean = weight.detach().clone()
        codes = encoding.fields["codes"].view(torch.int8)
        exponent_lsb = 3 if dtype == torch.float8_e4m3fn else 2
        row = encoding.fields["codes"][64:128].float().abs()
        j = 64 + int(((row > largest / 16) & (row < largest / 4)).nonzero()[0])  # a normal code far from overflow
        codes[j] ^= 1 << exponent_lsb  # its exponent moves by one: the weight doubles or halves
        encoding.refresh("codes", np.array([j]))
        moved = (weight - clean).flatten().nonzero().flatten().tolist()
        assert moved == [j] and float(weight.flatten()[j] / clean.flatten()[j]) in (2.0, 0.5)
        encoding.fields["scales"].view(torch.int32)[3] ^= 1 << 31  # a sign flip of row 3's scale
        encoding.refresh("scales", np.array([3]))
        assert torch.equal(weight[3], -clean[3]) and torch.equal(weight[[0, 2, 4, 5, 6, 7]], clean[[0, 2, 4, 5, 6, 7]])


def test_nf4_codes_and_packing_equal_torchaos_nf4tensor():
    ao = _torchao()
    weight = torch.randn(128, 512)  # 1024 blocks: torchao's second-level blocks of 256 divide them
    reference = ao.NF4Tensor.from_tensor(weight, 64, 256)
    assert torch.allclose(reference.nf4, torch.tensor(NF4_VALUES), rtol=0, atol=1e-4)  # bitsandbytes' table, to torchao's 4 decimals
    on_torchaos_table = NormalFloat4(tuple(reference.nf4.tolist()))
    fields = on_torchaos_table.encode(weight.reshape(-1, 64))
    assert torch.equal(fields["codes"].reshape(-1), reference.quantized_data)  # the same rounding and packing
    absmax = weight.reshape(-1, 64).abs().amax(dim=1, keepdim=True)
    assert torch.equal(fields["scales"], absmax)
    table = reference.nf4
    expected = (table[reference.quantized_data.long() >> 4], table[reference.quantized_data.long() & 0xF])
    decoded = on_torchaos_table.decode(fields).reshape(-1, 2)
    assert torch.equal(decoded[:, 0], (expected[0].reshape(-1, 32) * absmax).reshape(-1))
    assert torch.equal(decoded[:, 1], (expected[1].reshape(-1, 32) * absmax).reshape(-1))


def test_an_nf4_absmax_fault_scales_its_block_of_64_and_a_code_fault_one_weight():
    weight = torch.nn.Parameter(torch.randn(2, 128))
    encoding = encoding_of(weight, "nf4", 128, "w")
    with torch.no_grad():
        encoding.install()
        clean = weight.detach().clone()
        encoding.fields["scales"].view(torch.int32)[2] ^= 1 << 23  # exponent LSB: block 2 (weights 128..191) by 2x or 0.5x
        encoding.refresh("scales", np.array([2]))
        moved = set((weight - clean).flatten().nonzero().flatten().tolist())
        assert moved and moved <= set(range(128, 192))
        ratios = (weight.flatten()[128:192] / clean.flatten()[128:192])[clean.flatten()[128:192] != 0]
        assert set(ratios.tolist()) <= {2.0, 0.5}
        encoding.fields["scales"].view(torch.int32)[2] ^= 1 << 23
        encoding.refresh("scales", np.array([2]))
        encoding.fields["codes"][0] ^= 1 << 4  # the first code of the first byte is its high nibble
        encoding.refresh("codes", np.array([0]))
        assert (weight - clean).flatten().nonzero().flatten().tolist() == [0]


def test_q4_k_blocks_decode_through_ggufs_own_dequantizer_and_its_fields_are_the_layout():
    rows = np.random.default_rng(0).normal(0, 0.02, (16, 256)).astype(np.float32)
    raw = quantize_q4_k(rows)
    assert raw.shape == (16, quants.GGML_QUANT_SIZES[GGMLQuantizationType.Q4_K][1])
    reference = quants.dequantize(raw, GGMLQuantizationType.Q4_K)
    chosen = codec("q4_k")
    fields = chosen.encode(torch.from_numpy(rows))
    assert {name: tuple(words.shape) for name, words in fields.items()} == {
        "scales": (16, 1),
        "mins": (16, 1),
        "sub_scales": (16, 12),
        "codes": (16, 128),
    }
    assert np.array_equal(chosen.decode(fields).numpy(), reference)
    error = np.sqrt(((reference - rows) ** 2).mean() / (rows**2).mean())
    assert error < 0.1  # 4.5 bits per weight
    crafted = chosen.split(raw.copy())
    crafted["sub_scales"][0, 0] ^= 1  # sub-block 0's 6-bit scale: only weights 0..31 of block 0 move
    moved = np.flatnonzero(chosen.decode(crafted).numpy().reshape(-1) != reference.reshape(-1))
    assert len(moved) and set(moved.tolist()) <= set(range(32))


def test_int4_is_torchaos_asymmetric_affine_quantization_bit_for_bit():
    """GPTQ's layout through torchao's primitives: float16 scale, integer zero point, codes 0..15."""
    pytest.importorskip("torchao.quantization", reason="torchao is an optional reference here")
    from torchao.quantization.quant_primitives import MappingType, choose_qparams_affine, dequantize_affine, quantize_affine

    weight = torch.randn(256, 128) * 0.05
    weight[3], weight[4] = weight[3].abs(), -weight[4].abs()  # groups with no negative, no positive weight
    scale, zero = choose_qparams_affine(
        weight, MappingType.ASYMMETRIC, (1, 32), torch.uint8, 0, 15, scale_dtype=torch.float16, zero_point_dtype=torch.uint8
    )
    reference = quantize_affine(weight, (1, 32), scale, zero, torch.uint8, 0, 15)
    fields = codec("int4").encode(weight.reshape(-1, 32))
    codes = torch.stack([fields["codes"] & 0xF, fields["codes"] >> 4], dim=2).reshape(weight.shape)  # low nibble first
    assert torch.equal(fields["scales"].view(-1), scale.view(-1)) and torch.equal(fields["zeros"].view(-1), zero.view(-1))
    assert torch.equal(codes, reference)
    decoded = dequantize_affine(reference, (1, 32), scale, zero, torch.uint8, 0, 15, output_dtype=torch.float32)
    assert torch.equal(codec("int4").decode(fields).reshape(weight.shape), decoded)
    crafted = {name: words.clone() for name, words in fields.items()}
    crafted["zeros"][5, 0] ^= 1 << 3  # the zero's top bit: group 5 moves by 8 steps of its scale, as a whole
    moved = (codec("int4").decode(crafted) - codec("int4").decode(fields)).reshape(-1)
    assert set(moved.nonzero().flatten().tolist()) == set(range(160, 192))
    assert torch.allclose(moved[160:192].abs(), torch.full((32,), 8 * float(scale.view(-1)[5])))


@pytest.mark.parametrize("storage", ["fp8_e4m3", "nf4", "q4_k"])
def test_new_storages_fault_every_field_at_p_per_stored_bit_and_restore_exactly(storage):
    model = tiny_model(**WIDE)
    clean = {name: p.detach().clone() for name, p in model.named_parameters()}
    p = 2e-3
    with inject(model, p=p, storage=storage, target="mlp", modules="down_proj", seed=5) as faults:
        sites = faults.report.weights
        bits = sum(site.eligible_bits for site in sites)
        hit = sum(site.fault_bits for site in sites)
        assert abs(hit - p * bits) < 5 * math.sqrt(p * bits)
        assert {site.name.rpartition(".")[2] for site in sites} == set(codec(storage).field_layouts)
        assert not torch.equal(model.get_parameter(DOWN), clean[DOWN])
    assert all(torch.equal(p_, clean[name]) for name, p_ in model.named_parameters())


@pytest.mark.parametrize("config", ["Int8WeightOnlyConfig", "IntxWeightOnlyConfig"])
def test_a_torchao_weight_is_faulted_in_its_qdata_scale_and_zero_point_and_restored(config):
    """Int8Tensor (int8, a scale per row) and IntxUnpackedToInt8Tensor (int4 values in int8
    words, a scale and zero point per group of 32); Int4Tensor's kernels need CUDA (mslk)."""
    ao = _torchao()
    model = tiny_model()
    options = {"weight_dtype": torch.int4, "granularity": ao.PerGroup(32)} if config == "IntxWeightOnlyConfig" else {}
    ao.quantize_(model, getattr(ao, config)(**options))
    weight = model.get_parameter(DOWN)
    stored = {name: getattr(weight, name).clone() for name in ("qdata", "scale", "zero_point")}
    tokens = torch.randint(0, 100, (2, 8))
    with torch.no_grad():
        clean = model(tokens).logits
        with inject(model, p=1e-2, target="mlp", seed=1) as faults:
            names = {site.name for site in faults.report.weights}
            assert {f"{DOWN}.codes", f"{DOWN}.scales", f"{DOWN}.zeros"} <= names  # qdata, scale, zero_point
            hit = {site.name.rpartition(".")[2]: site.changed_elements for site in faults.report.weights if site.name.startswith(DOWN)}
            assert hit["codes"] == int((weight.qdata != stored["qdata"]).sum()) > 0
            assert not torch.equal(model(tokens).logits, clean)
        assert all(torch.equal(getattr(weight, name), value) for name, value in stored.items())
        assert torch.equal(model(tokens).logits, clean)


def test_a_torchao_int8_weight_takes_the_same_code_faults_as_simulated_int8():
    """Both store one int8 code per weight, row-major, with a scale per row: the same seed flips
    the same bits of the same codes, and each moved weight moves by its code's change times its
    own row's scale (torchao's float32 scale, the simulated format's float16 one)."""
    ao = _torchao()
    quantized, simulated = tiny_model(), tiny_model()
    ao.quantize_(quantized, ao.Int8WeightOnlyConfig())
    weight = quantized.get_parameter(DOWN)
    clean_codes, clean_scale, clean_zero = weight.qdata.clone(), weight.scale.clone(), weight.zero_point.clone()
    clean_weight = weight.dequantize()
    encoding = encoding_of(simulated.get_parameter(DOWN), "int8", 128, DOWN)
    spec = dict(p=2e-3, target="mlp", modules="down_proj", seed=3)
    with inject(quantized, **spec):
        torchao_flips = (weight.qdata.view(torch.uint8) ^ clean_codes.view(torch.uint8)).clone()
        rows = ((weight.scale == clean_scale) & (weight.zero_point == clean_zero)).view(-1)  # rows whose scale and zero point no fault hit
        moved = (weight.dequantize() - clean_weight)[rows]
        delta = ((weight.qdata.float() - clean_codes.float()) * clean_scale.float().view(-1, 1))[rows]
    simulated_codes = encoding.fields["codes"].clone()
    with inject(simulated, storage="int8", fields="codes", **spec):
        simulated_flips = (encoding.fields["codes"].view(torch.uint8) ^ simulated_codes.view(torch.uint8)).view(torch.uint8)
        assert torch.equal(torchao_flips.view(-1), simulated_flips.view(-1).clone())
    assert int(torchao_flips.count_nonzero()) > 10 and int(rows.sum()) > 0 and bool(moved.any())
    assert torch.allclose(moved, delta, rtol=1e-5, atol=1e-7)  # q's - qs against (q' - q)s: float32 rounding apart


def test_faulty_hf_faults_a_torchao_model_it_is_given():
    ao = _torchao()
    model = tiny_model()
    ao.quantize_(model, ao.Int8WeightOnlyConfig())
    stored = {name: getattr(model.get_parameter(DOWN), name).clone() for name in ("qdata", "scale", "zero_point")}
    lm = FaultyHFLM(pretrained=model, tokenizer=tiny_tokenizer(), p=1e-2, target="mlp", device="cpu")
    rows = lm.report.to_dict()["weights"]
    assert {site.name.rpartition(".")[2] for site in lm.report.weights} == {"codes", "scales", "zeros"}
    assert rows and lm.report.totals()["changed_elements"] > 0
    lm.set_faults(lm.spec.__class__(p=0))
    assert all(torch.equal(getattr(model.get_parameter(DOWN), name), value) for name, value in stored.items())


def test_a_torchao_int8_code_fault_moves_its_weight_by_two_to_the_k_scales():
    ao = _torchao()
    layer = torch.nn.Sequential(torch.nn.Linear(64, 8))
    ao.quantize_(layer, ao.Int8WeightOnlyConfig())
    weight = layer[0].weight
    before = weight.dequantize()
    with torch.no_grad():
        code = int(weight.qdata.view(-1)[70])
        weight.qdata.view(-1)[70] ^= 1 << 5  # what a fault in this field writes, in place
    moved = (weight.dequantize() - before).view(-1)
    assert moved.nonzero().flatten().tolist() == [70]
    step = 2**5 * float(weight.scale.view(-1)[1])
    assert math.isclose(abs(float(moved[70])), step, rel_tol=1e-6) and (int(weight.qdata.view(-1)[70]) > code) == (float(moved[70]) > 0)


def test_the_report_has_a_row_per_stored_field_that_adds_up_to_its_components():
    model = tiny_model()
    with inject(model, p=3e-3, storage="q4_1", target="mlp", seed=2) as faults:
        (row,) = faults.report.to_dict()["weights"]["storage"].values()
        sites = faults.report.weights
        fields = row["fields"]
        assert set(fields) == {"scales", "mins", "codes"}
        assert sum(f["eligible_bits"] for f in fields.values()) == row["stored_bits"] == sum(s.eligible_bits for s in sites)
        assert sum(f["bits_hit"] for f in fields.values()) == sum(s.fault_bits for s in sites)
        assert row["faults_per_weight"] == sum(s.fault_bits for s in sites) / row["weights"]
        assert fields["codes"]["weights_affected"] <= fields["codes"]["words_changed"] * 2  # a byte holds two codes
        assert fields["scales"]["weights_affected"] <= fields["scales"]["words_changed"] * 32  # a scale, its block
        assert (
            max(f["weights_affected"] for f in fields.values())
            <= row["weights_affected"]
            <= sum(f["weights_affected"] for f in fields.values())
        )
        assert "field scales" in faults.report.format_table()


def test_a_scale_turned_inf_is_counted_as_its_blocks_weights_made_non_finite():
    weight = torch.nn.Parameter(torch.randn(2, 64))
    encoding = encoding_of(weight, "q4_1", 128, "w")
    with torch.no_grad():
        encoding.install()
        encoding.fields["scales"].view(torch.int16)[1] = 0x7C00  # +Inf: block 1's weights are Inf, or NaN where the code is 0
        encoding.refresh("scales", np.array([1]))
    largest, created = encoding.damage("scales")
    assert created == 32 == int((~weight.detach().isfinite()).sum()) and largest == math.inf
    assert encoding.damage("codes") == (0.0, 0)


@pytest.mark.parametrize("storage", ["int8", "nf4", "fp8_e4m3"])
def test_tied_weights_are_one_stored_form_faulted_once(storage):
    model = tiny_model(tie_word_embeddings=True, hidden_size=64)
    assert model.get_parameter("lm_head.weight") is model.get_parameter("model.embed_tokens.weight")
    with inject(model, p=1e-3, storage=storage, target="embedding+lm_head", seed=1) as faults:
        sites = faults.report.weights
        assert all(site.name.startswith("model.embed_tokens.weight.") for site in sites)
        assert all(site.shared_with == [f"lm_head.weight.{site.name.rpartition('.')[2]}"] for site in sites)
        (row,) = faults.report.to_dict()["weights"]["storage"].values()
        assert row["weights"] == model.get_parameter("lm_head.weight").numel()  # counted once


def test_fp8_e4m3_counts_as_non_finite_only_its_nan_words():
    """E4M3 has no Inf and one NaN per sign (S.1111.111): 0x78..0x7E are 256..448, finite. The
    report's non-finite count is the number of weights the faults made NaN, read off the model."""
    from lm_eval_faults.core.faults.counts import becomes_nonfinite
    from lm_eval_faults.core.storage.layouts import FIELD_LAYOUTS

    layout = FIELD_LAYOUTS["float8_e4m3fn"]
    words = np.arange(256, dtype=np.int64)
    made = becomes_nonfinite(np.zeros(256, dtype=np.int64), words, layout)
    reference = torch.from_numpy(words.astype(np.uint8)).view(torch.float8_e4m3fn).float().isnan().numpy()
    assert np.array_equal(made, reference) and made.sum() == 2
    model = tiny_model(**WIDE)
    with inject(model, p=2e-2, storage="fp8_e4m3", target="mlp", fields="codes", seed=3) as faults:
        words = faults.report.totals()["nonfinite_created"]  # codes turned NaN, one weight each
        (row,) = faults.report.to_dict()["weights"]["storage"].values()
        actual = sum(int((~p.isfinite()).sum()) for name, p in model.named_parameters() if ".mlp." in name)
        assert words == row["nonfinite_created"] == actual > 0
