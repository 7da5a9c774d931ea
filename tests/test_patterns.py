"""Fault patterns (`pattern=`), FIT rates, and the codes that survive them: bit-interleaved SECDED
and chipkill RS(18,16), on crafted bursts and on drawn faults; the pattern analysis against
injected counts."""

from __future__ import annotations

import math
from itertools import combinations

import numpy as np
import pytest
import torch
from lm_eval_faults import inject
from lm_eval_faults.core.analysis.exact import analyze
from lm_eval_faults.core.faults.host import FaultBatch, draw_faults
from lm_eval_faults.core.patterns import parse_pattern
from lm_eval_faults.core.patterns.fit import BITS_PER_MBIT, fit_to_probability
from lm_eval_faults.core.protection import codewords, reed_solomon
from lm_eval_faults.core.protection.schemes import WeightProtection
from lm_eval_faults.core.random.streams import spec_key
from lm_eval_faults.core.sampling.host import Hits
from lm_eval_faults.core.sites.targets import ParamSite
from lm_eval_faults.core.spec import FaultSpec, FaultSpecError, to_spec
from lm_eval_faults.core.storage.layouts import layout_of
from lm_eval_faults.core.storage.words import WordAccess

from tiny import tiny_model

LAYOUT = layout_of(torch.float16)
ALL_BITS = tuple(range(16))


def _draw(spec: str, numels: list[int], key0: int = 7) -> FaultBatch:
    words = {s: np.arange(n, dtype=np.int64) * 0 + 0x3C00 for s, n in enumerate(numels)}  # 1.0 in float16

    def read(hits: Hits) -> np.ndarray:
        return np.concatenate([words[s][hits.position[w]] for s, w in hits.by_site()]) if len(hits) else np.empty(0, np.int64)

    keys = np.arange(key0, key0 + len(numels), dtype=np.uint64) * np.uint64(0x9E3779B97F4A7C15)
    return draw_faults(np.array(numels), keys, read, to_spec(spec), LAYOUT, ALL_BITS)


# -- the patterns' geometry -------------------------------------------------------------------------


@pytest.mark.parametrize("width", [2, 3, 4, 8])
def test_a_burst_hits_adjacent_bits_of_one_word(width):
    batch = _draw(f"p=1e-4,pattern=burst:{width}", [200_000])
    masks = batch.fault_bits
    assert len(masks) > 100
    windows = {((1 << width) - 1) << start for start in range(16 - width + 1)}
    single = np.isin(masks, list(windows))
    # Two bursts in one word (probability ~ 13 p per word) are the only other masks: unions of windows.
    assert single.mean() > 0.99
    assert all(any(m & w == w for w in windows) for m in masks[~single].tolist())
    # Events ~ Binomial(numel x starts, p): within 5 sigma of the mean.
    mean = 200_000 * (16 - width + 1) * 1e-4
    assert abs(len(masks) - mean) < 5 * math.sqrt(mean)


def test_multi_cell_upsets_hit_one_bit_in_k_neighbouring_words():
    batch = _draw("p=2e-5,pattern=mcu:4", [100_000])
    positions, masks = batch.hits.position, batch.fault_bits
    # Each event is a run of 4 consecutive words sharing a one-bit mask.
    runs = np.split(np.arange(len(positions)), np.flatnonzero((np.diff(positions) != 1) | (masks[1:] != masks[:-1])) + 1)
    lengths = [len(r) for r in runs]
    assert lengths.count(4) / len(lengths) > 0.95 and all(bin(m).count("1") == 1 for m in masks.tolist())


def test_a_row_hits_every_word_of_an_aligned_span_and_stops_at_the_tensor_end():
    batch = _draw("p=0.5,pattern=row:64", [1000])  # 32 float16 words per row; the last row holds 8
    rows = np.unique(batch.hits.position // 32)
    assert len(rows) > 5
    for row in rows.tolist():
        expected = np.arange(row * 32, min(row * 32 + 32, 1000))
        assert np.array_equal(batch.hits.position[batch.hits.position // 32 == row], expected)
    assert (batch.fault_bits == 0xFFFF).all() and (batch.new == batch.old ^ 0xFFFF).all()


def test_a_column_hits_one_bit_on_a_strided_line_of_a_tile():
    batch = _draw("p=1e-4,pattern=column:16:8", [16 * 8 * 50])
    for mask in np.unique(batch.fault_bits).tolist():
        positions = batch.hits.position[batch.fault_bits == mask]
        tiles = positions // 128
        for tile in np.unique(tiles).tolist():
            within = positions[tiles == tile] % 128
            assert len(np.unique(within % 16)) == len(within) // 8 and len(within) % 8 == 0


def test_clusters_stick_cells_at_their_own_values():
    batch = _draw("pattern=clustered:3,p_sa0=1e-4,p_sa1=2e-4", [200_000])
    stuck1 = (batch.new & ~batch.old) != 0
    stuck0 = (batch.old & ~batch.new) != 0
    assert stuck1.any() and stuck0.any()
    assert ((batch.new & batch.fault_bits) | (batch.old & ~batch.fault_bits) == batch.new).all()  # only hit bits move


def test_draws_are_a_function_of_the_site_key_alone():
    alone = _draw("p=1e-3,pattern=burst:3", [5000])
    together = _draw("p=1e-3,pattern=burst:3", [5000, 7000, 300])
    first = together.hits.site == 0
    assert np.array_equal(alone.hits.position, together.hits.position[first])
    assert np.array_equal(alone.fault_bits, together.fault_bits[first])


def test_iid_specs_and_their_dicts_are_unchanged_by_patterns():
    spec = FaultSpec(p=1e-5)
    assert FaultSpec(p=1e-5, pattern="iid") == spec
    assert not {"pattern", "p_sa0", "p_sa1", "fit", "hours", "interleave"} & set(spec.to_dict())
    assert "pattern" not in spec.sampling_key()
    assert FaultSpec(p=1e-5, ecc="secded").to_dict() == FaultSpec(p=1e-5, ecc="secded", interleave=1).to_dict()


@pytest.mark.parametrize(
    "args, message",
    [
        ({"pattern": "bursts:2"}, "choose iid, burst:K"),
        ({"pattern": "burst:0"}, "K must be at least 1"),
        ({"pattern": "burst:x"}, "whole numbers"),
        ({"p_sa0": 1e-3}, "pattern=clustered:C"),
        ({"pattern": "clustered:2", "p": 1e-3}, "p_sa0= and p_sa1="),
        ({"pattern": "burst:2", "fault": "zero", "p": 1e-3}, "use row, mcu or column"),
        ({"pattern": "burst:2", "p01": 1e-3}, "p01/p10 are independent"),
        ({"fit": 100}, "add hours="),
        ({"fit": 100, "hours": 10, "p": 1e-3}, "leave p"),
        ({"fit": -1, "hours": 10}, "FIT per Mbit"),
        ({"interleave": 4}, "add ecc=secded"),
        ({"interleave": 0, "ecc": "secded"}, "depth from 1"),
        ({"ecc": "chipkill", "interleave": 2}, "add ecc=secded"),
    ],
)
def test_bad_pattern_keys_fail_in_one_line(args, message):
    with pytest.raises(FaultSpecError, match=message):
        FaultSpec(**args)


def test_rows_need_whole_words():
    with pytest.raises(ValueError, match="whole 32-bit words"):
        parse_pattern("row:2").slots(np.array([10]), 32, tuple(range(32)))


# -- FIT --------------------------------------------------------------------------------------------


def test_fit_and_hours_give_the_probability_of_an_event_per_slot():
    spec = FaultSpec(fit=5000, hours=8760)
    rate = 5000 * 8760 / (1e9 * BITS_PER_MBIT)
    assert spec.p == pytest.approx(-math.expm1(-rate), rel=1e-12)
    row = FaultSpec(fit=5000, hours=8760, pattern="row:1024")
    assert row.p == pytest.approx(-math.expm1(-rate * 8192), rel=1e-12)  # a row slot stands for its 8192 bits
    data = spec.to_dict()
    assert data["fit"] == 5000 and data["hours"] == 8760 and data["p"] == spec.p
    assert "fit=5000 FIT/Mbit over 8760 h" in spec.describe()
    assert fit_to_probability(0, 10) == 0.0


# -- codes on crafted bursts -------------------------------------------------------------------------


def _burst_patterns(code: codewords.WordCode, width: int, units: int = 2) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Every burst of `width` stream bits at every offset in `units` units: per burst, the data
    error bytes of each codeword it touches (burst index, codeword, bytes)."""
    layout = code.layout
    rows, words, bits = [], [], []
    for offset in range(units * layout.unit_bits - width + 1):
        codeword, within = layout.locate(np.arange(offset, offset + width))
        rows.append(np.full(width, offset))
        words.append(codeword)
        bits.append(within)
    row, word, bit = (np.concatenate(part) for part in (rows, words, bits))
    ids, inverse = np.unique(row * 1_000_000 + word, return_inverse=True)
    errors = np.zeros((len(ids), layout.data_bits), dtype=np.uint8)
    errors[inverse, bit] = 1
    return ids // 1_000_000, np.packbits(errors, axis=1, bitorder="little").astype(np.int64), np.bincount(inverse)


@pytest.mark.parametrize("depth", [1, 2, 4, 8, 16])
def test_interleaved_secded_corrects_every_burst_up_to_its_depth_and_detects_up_to_twice_it(depth):
    code = codewords.word_code("secded", depth)
    for width in range(1, 2 * depth + 1):
        _, errors, bits_per_codeword = _burst_patterns(code, width)
        residual, detected, _ = code.decode(errors, np.zeros((len(errors), 1), dtype=np.int64))
        assert bits_per_codeword.max() <= -(-width // depth)
        if width <= depth:
            assert not detected.any() and not residual.any(), (depth, width)  # one error per codeword: corrected
        else:
            doubles = bits_per_codeword == 2
            assert detected[doubles].all(), (depth, width)  # two per codeword: always detected


def test_chipkill_corrects_any_error_within_one_byte_and_never_misses_two():
    code = codewords.word_code("chipkill", 1)
    for width in range(1, 17):
        _, errors, _ = _burst_patterns(code, width)
        residual, detected, _ = code.decode(errors, np.zeros((len(errors), 2), dtype=np.int64))
        symbols = (errors != 0).sum(axis=1)
        assert not detected[symbols == 1].any() and not residual[symbols == 1].any(), width
        # Distance 3: two wrong bytes never pass unseen (detected, or miscorrected into a third).
        two = symbols == 2
        assert (detected[two] | residual[two].any(axis=1)).all() and not (~detected[two] & (residual[two] != 0).sum(1) == 2).any()
    # Every non-zero value of every one of the 18 symbols (check symbols too) is corrected.
    for symbol in range(reed_solomon.SYMBOLS):
        pattern = np.zeros((255, reed_solomon.SYMBOLS), dtype=np.int64)
        pattern[:, symbol] = np.arange(1, 256)
        residual, detected, acted = reed_solomon.decode(pattern[:, :16], pattern[:, 16:])
        assert not detected.any() and acted.all() and not residual.any()


def test_chipkill_miscorrects_some_double_byte_errors_and_the_count_says_so():
    pairs = list(combinations(range(16), 2))
    data = np.zeros((len(pairs) * 5, 16), dtype=np.int64)
    for i, (a, b) in enumerate(pairs * 5):
        data[i, a], data[i, b] = 1 + i % 255, 1 + (7 * i) % 255
    residual, detected, acted = reed_solomon.decode(data, np.zeros((len(data), 2), dtype=np.int64))
    assert not (~detected & ~acted & residual.any(axis=1)).any()  # nothing undetected
    assert (acted & ~detected).any() and detected.any()


def test_the_rs_encoder_makes_every_codeword_syndrome_free():
    data = np.random.default_rng(0).integers(0, 256, (500, 16))
    s0, s1 = reed_solomon.syndromes(np.concatenate([data, reed_solomon.encode(data)], axis=1))
    assert not s0.any() and not s1.any()


# -- codes on drawn faults, through the protection stage -----------------------------------------------


def _site(model: torch.nn.Module, name: str) -> ParamSite:
    param = dict(model.named_parameters())[name]
    return ParamSite((name,), param, "mlp", 0, layout_of(param.dtype))


def _protect(spec: FaultSpec, site: ParamSite, batch: FaultBatch):
    protection = WeightProtection(spec, spec_key(spec.seed, spec.sampling_key()))
    return protection.apply(batch, [site], site.layout, lambda _: WordAccess(site.param, site.layout))


def _batch(site: ParamSite, positions: list[int], masks: list[int]) -> FaultBatch:
    access = WordAccess(site.param, site.layout)
    position = np.array(positions, dtype=np.int64)
    old = access.read(position)
    mask = np.array(masks, dtype=np.int64)
    return FaultBatch(Hits(np.zeros(len(position), dtype=np.int64), position, np.arange(len(position))), mask, old, old ^ mask)


def test_the_codeword_simulation_at_depth_one_is_plain_secded():
    model = tiny_model("llama").to(torch.float16)
    site = _site(model, "model.layers.0.mlp.down_proj.weight")
    rng = np.random.default_rng(3)
    positions = np.sort(rng.choice(site.param.numel(), 400, replace=False)).tolist()
    masks = [int(m) for m in rng.integers(1, 1 << 16, 400)]
    batch = _batch(site, positions, masks)
    for policy in ("zero", "keep"):
        spec = FaultSpec(p=1e-3, ecc="secded", ecc_policy=policy)
        plain = _protect(spec, site, batch)
        protection = WeightProtection(spec, spec_key(spec.seed, spec.sampling_key()))
        counts = {name: np.zeros(1, dtype=np.int64) for name in plain.counts}
        elements = protection._codewords(
            batch.hits.site,
            batch.hits.position,
            batch.old,
            batch.new,
            [site],
            site.layout,
            lambda _: WordAccess(site.param, site.layout),
            counts,
        )
        changed = elements[2] != elements[3]
        assert np.array_equal(elements[1][changed], plain.batch.hits.position) and np.array_equal(elements[3][changed], plain.batch.new)
        assert {k: int(v[0]) for k, v in counts.items()} == {k: int(v[0]) for k, v in plain.counts.items()}


@pytest.mark.parametrize(
    "ecc_name, interleave, width, corrected", [("secded", 8, 8, True), ("secded", 4, 8, False), ("chipkill", 1, 8, None)]
)
def test_drawn_bursts_meet_each_code_where_its_guarantee_says(ecc_name, interleave, width, corrected):
    model = tiny_model("llama").to(torch.float16)
    site = _site(model, "model.layers.0.mlp.down_proj.weight")
    # p only draws the check bytes' faults here: at 1e-9 none land, so the crafted bursts are all there is.
    spec = FaultSpec(p=1e-9, pattern=f"burst:{width}", ecc=ecc_name, interleave=interleave, ecc_policy="keep")
    positions = list(range(3, site.param.numel(), 97))  # one burst every 97 words: never two per unit
    masks = [(1 << width) - 1 << (i % (17 - width)) for i in range(len(positions))]
    protected = _protect(spec, site, _batch(site, positions, masks))
    counts = {k: int(v[0]) for k, v in protected.counts.items()}
    assert counts["check_bit_faults"] == 0
    changed = len(protected.batch)
    if corrected:  # 8 bits over 8 codewords: one error each, all corrected, nothing read wrong
        assert counts["detected"] == counts["undetected"] == counts["miscorrected"] == 0
        assert counts["corrected"] == 8 * len(positions) and changed == 0
    elif corrected is False:  # 8 bits over 4 codewords: two errors each, every one detected
        assert counts["detected"] == 4 * len(positions) and counts["corrected"] == counts["undetected"] == 0
    else:  # chipkill: a burst inside one byte is corrected; one across two bytes is detected or miscorrected
        in_one_byte = sum(1 for m in masks if m & 0xFF == m or m & 0xFF00 == m)
        assert counts["corrected"] == in_one_byte and counts["undetected"] == 0
        assert counts["detected"] + counts["miscorrected"] == len(positions) - in_one_byte


def test_interleaving_costs_what_secded_costs_and_chipkill_its_bytes():
    model = tiny_model("llama").to(torch.float16)
    with inject(model, "p=1e-4,ecc=secded,interleave=8") as injection:
        secded = injection.report.totals("weights")
    with inject(model, "p=1e-4,ecc=chipkill") as injection:
        chipkill = injection.report.totals("weights")
    assert secded["protection_bits"] / secded["stored_bits"] == pytest.approx(0.125, abs=1e-3)
    assert chipkill["protection_bits"] / chipkill["stored_bits"] == pytest.approx(0.125, abs=1e-3)


def test_a_pattern_injects_restores_and_counts_with_every_code():
    model = tiny_model("llama").to(torch.bfloat16)
    clean = {name: p.detach().clone() for name, p in model.named_parameters()}
    for scheme in (
        "",
        ",ecc=secded",
        ",ecc=secded,interleave=8",
        ",ecc=chipkill",
        ",ecc=parity",
        ",clamp=weights",
        ",protect_bits=exponent_msb",
    ):
        for pattern in ("burst:4", "row:64", "mcu:2", "column:8:8"):
            with inject(model, f"p=1e-3,pattern={pattern}{scheme}") as injection:
                totals = injection.report.totals("weights")
                assert totals["hit_elements"] > 0
            assert all(torch.equal(p, clean[n]) for n, p in model.named_parameters())


# -- the analysis follows the patterns -------------------------------------------------------------------


@pytest.mark.parametrize(
    "spec",
    [
        "p=1e-3,pattern=burst:2,fault=stuck1",
        "p=1e-3,pattern=mcu:3,fault=stuck1",
        "p=3e-3,pattern=row:16,fault=stuck1",
        "pattern=clustered:2,p_sa0=1e-3,p_sa1=3e-3",
    ],
)
def test_the_pattern_analysis_matches_injected_counts(spec):
    model = tiny_model("llama").to(torch.float16)
    expected = analyze(model, spec).total()
    changed, nonfinite = [], []
    for seed in range(24):
        with inject(model, f"{spec},seed={seed}") as injection:
            totals = injection.report.totals("weights")
            changed.append(totals["changed_elements"])
            nonfinite.append(totals["nonfinite_created"])
    for measured, mean in ((changed, expected.changed_elements), (nonfinite, expected.nan + expected.inf)):
        error = np.std(measured) / math.sqrt(len(measured)) + 1e-9
        assert abs(np.mean(measured) - mean) < 5 * error + 0.02 * mean, (spec, np.mean(measured), mean)


def test_the_analysis_says_what_it_leaves_out():
    model = tiny_model("llama").to(torch.float16)
    burst = analyze(model, "p=1e-4,pattern=burst:4")
    assert burst.remainder > 0 and any("remainder" in note for note in burst.to_dict()["notes"])
    row = analyze(model, "p=1e-4,pattern=row:64")
    assert math.isnan(row.total().p_any_nonfinite) and "not given" in row.format_table()


def test_element_faults_follow_whole_word_patterns():
    batch = _draw("p=0.02,pattern=row:32,fault=zero", [1600])  # 16 float16 words per row
    assert len(batch) and len(batch) % 16 == 0
    assert np.array_equal(np.unique(batch.hits.position // 16, return_counts=True)[1], np.full(len(batch) // 16, 16))
    assert not batch.new.any()


# -- FIT as a sweep axis ------------------------------------------------------------------------------


def test_a_sweep_takes_fit_rates_as_its_axis():
    from lm_eval_faults.study.grid import SweepConfig, SweepConfigError, plan_points

    config = SweepConfig(model_args="", tasks="faults_demo", p="", fit="1e3:1e5", fault_args="hours=8760,pattern=burst:2")
    points = plan_points(config, 2)
    assert [point.point_id.split("|")[4] for point in points[1:]] == ["fit=1000.0", "fit=10000.0", "fit=100000.0"]
    assert points[1].spec.p == pytest.approx(fit_to_probability(1000, 8760)) and points[1].labels()["p"] == points[1].spec.p
    assert points[0].spec.fit is None and not points[0].spec.active  # the clean baseline
    assert "fit" not in SweepConfig(model_args="", tasks="faults_demo", p="1e-5").to_dict()  # old run directories resume
    for bad, message in ((dict(p="1e-3", fit="1e3"), "not both"), (dict(p="", fit="1e3"), "hours=H"), (dict(p="", fit="0"), "numbers > 0")):
        with pytest.raises(SweepConfigError, match=message):
            SweepConfig(model_args="", tasks="faults_demo", **bad)


@pytest.mark.parametrize("ecc_name, interleave", [("secded", 4), ("chipkill", 1)])
def test_decoding_a_chunk_of_units_at_a_time_changes_nothing(monkeypatch, ecc_name, interleave):
    """Units are decoded CHUNK_CODEWORDS at a time to bound memory; any chunk size gives the same reads."""
    model = tiny_model("llama").to(torch.float16)
    site = _site(model, "model.layers.0.mlp.down_proj.weight")
    rng = np.random.default_rng(5)
    positions = np.sort(rng.choice(site.param.numel(), 600, replace=False)).tolist()
    batch = _batch(site, positions, [int(m) for m in rng.integers(1, 1 << 16, 600)])
    spec = FaultSpec(p=1e-2, ecc=ecc_name, interleave=interleave)
    whole = _protect(spec, site, batch)
    monkeypatch.setattr(codewords, "CHUNK_CODEWORDS", 4)
    chunked = _protect(spec, site, batch)
    assert np.array_equal(whole.batch.hits.position, chunked.batch.hits.position) and np.array_equal(whole.batch.new, chunked.batch.new)
    assert {k: v.tolist() for k, v in whole.counts.items()} == {k: v.tolist() for k, v in chunked.counts.items()}


@pytest.mark.parametrize(
    "spec",
    [
        "p=1e-4,pattern=burst:2,site=activations",
        "p=1e-2,pattern=row:64,site=activations,fault=zero",
        "p=1e-3,pattern=mcu:2,site=kv_cache",
        "p=1e-4,pattern=burst:3,storage=int8",
        "p=1e-4,pattern=column:8:8,storage=q4_1,ecc=secded,ecc_policy=keep",
    ],
)
def test_patterns_compose_with_every_site_and_storage(spec):
    model = tiny_model("llama")
    ids = torch.arange(1, 17).reshape(2, 8)
    with torch.no_grad():
        clean = model(ids).logits
        with inject(model, spec) as injection:
            faulty = model(ids, use_cache="kv_cache" in spec).logits
            part = next((site for site in ("activations", "kv_cache") if f"site={site}" in spec), "weights")
            totals = injection.report.totals(part)
        after = model(ids).logits
    assert totals["hit_elements"] > 0 and not torch.equal(clean, faulty)
    assert torch.equal(clean, after)  # restored


def test_a_row_that_holds_no_whole_word_fails_before_the_model_loads(tmp_path):
    from lm_eval_faults.harness.preflight import check_bits

    with pytest.raises(FaultSpecError, match=r"pattern='row:2' is invalid: row:2 does not hold whole 32-bit words.*runs in float32"):
        check_bits(FaultSpec(p=1e-3, pattern="row:2"), layout_of(torch.float32), "the model runs in float32")
    check_bits(FaultSpec(p=1e-3, pattern="row:2"), layout_of(torch.float16), "the model runs in float16")
