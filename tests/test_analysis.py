"""`analyze` against brute force (every fault mask enumerated) and against real injections."""

from __future__ import annotations

import argparse
import itertools
import json
import math

import numpy as np
import pytest
import torch
from lm_eval_faults.cli.analyze import add_arguments, main
from lm_eval_faults.core.analysis.exact import RiskModel, analyze, bit_rates
from lm_eval_faults.core.injection import inject
from lm_eval_faults.core.sites.targets import select_params
from lm_eval_faults.core.spec import FaultSpec
from lm_eval_faults.core.storage.layouts import (
    from_unsigned,
    layout_of,
    resolve_bits,
    to_unsigned,
)

from tiny import save_tiny_model, tiny_model


def _words(values: list[float], dtype: torch.dtype) -> np.ndarray:
    layout = layout_of(dtype)
    return to_unsigned(torch.tensor(values, dtype=dtype).view(layout.int_view), layout).numpy()


def _classify(words: np.ndarray, dtype: torch.dtype, threshold: float) -> dict[str, np.ndarray]:
    values = from_unsigned(torch.from_numpy(words), layout_of(dtype)).view(dtype).to(torch.float64)
    finite = torch.isfinite(values)
    return {
        "nan": torch.isnan(values).numpy(),
        "inf": torch.isinf(values).numpy(),
        "huge": (finite & (values.abs() > threshold)).numpy(),
        "good": (finite & (values.abs() <= threshold)).numpy(),
    }


def _brute_force(
    words: np.ndarray, dtype: torch.dtype, eligible: tuple[int, ...], flip0: float, flip1: float, threshold: float
) -> dict[str, np.ndarray]:
    """Sum over every subset of eligible bits: P(that subset changes) x [outcome]."""
    totals = {name: np.zeros(len(words)) for name in ("nan", "inf", "huge")}
    good = _classify(words, dtype, threshold)["good"]
    for chosen in itertools.product((0, 1), repeat=len(eligible)):
        mask = sum(1 << bit for bit, on in zip(eligible, chosen, strict=True) if on)
        probability = np.ones(len(words))
        for bit, on in zip(eligible, chosen, strict=True):
            stored = words >> bit & 1
            change = np.where(stored == 1, flip1, flip0)
            probability *= change if on else 1.0 - change
        outcome = _classify(words ^ mask, dtype, threshold)
        for name in totals:
            totals[name] += probability * (outcome[name] & good)
    return totals


SAMPLE = [0.0, -0.0, 1.0, -1.0, 1.5, 1.9990234375, 0.75, -0.6, 0.02, -3e-3, 6.1e-5, 3.0, 2.5, 100.0, -1234.5, 3e4, 6e4]


@pytest.mark.parametrize(
    "dtype, bits, threshold",
    [
        (torch.float16, "exponent", None),
        (torch.float16, "exponent", 1.5),
        (torch.float16, "6-15", 2.5),
        (torch.float16, "0-3+10-14", 100.0),
        (torch.bfloat16, "4-13", 1.5),
        (torch.float32, "20-31", 2.5),
        (torch.float32, "0+23-30", None),
    ],
)
@pytest.mark.parametrize("flip0, flip1", [(0.1, 0.1), (0.3, 0.05), (0.0, 0.2), (0.25, 0.0)])
def test_word_risks_match_mask_enumeration(dtype, bits, threshold, flip0, flip1) -> None:
    layout = layout_of(dtype)
    risk = RiskModel.build(layout, resolve_bits(layout, bits), threshold)
    words = _words(SAMPLE, dtype)
    nan, inf, huge = risk.word_risks(words, flip0, flip1)
    expected = _brute_force(words, dtype, risk.eligible, flip0, flip1, risk.threshold)
    np.testing.assert_allclose(nan, expected["nan"], rtol=1e-12, atol=1e-15)
    np.testing.assert_allclose(inf, expected["inf"], rtol=1e-12, atol=1e-15)
    np.testing.assert_allclose(huge, expected["huge"], rtol=1e-12, atol=1e-15)


def test_int8_huge_matches_mask_enumeration() -> None:
    layout = layout_of(torch.int8)
    risk = RiskModel.build(layout, tuple(range(8)))
    words = to_unsigned(torch.arange(-128, 128, dtype=torch.int8), layout).numpy()
    nan, inf, huge = risk.word_risks(words, 0.1, 0.2)
    expected = _brute_force(words, torch.int8, risk.eligible, 0.1, 0.2, 63.5)
    assert not nan.any() and not inf.any()
    np.testing.assert_allclose(huge, expected["huge"], rtol=1e-12, atol=1e-15)


def test_one_flip_from_one_to_two_is_nonfinite_and_below_one_never_is() -> None:
    """The study's premise, checked: only |x| in [1, 2) is one (top exponent) flip from Inf/NaN."""
    layout = layout_of(torch.float32)
    top = layout.exponent[-1]
    one_to_two = _words([1.0, 1.25, 1.5, -1.75, 1.9999999], torch.float32)
    flipped = from_unsigned(torch.from_numpy(one_to_two ^ (1 << top)), layout).view(torch.float32)
    assert torch.isinf(flipped[0]) and torch.isnan(flipped[1:]).all()
    risk = RiskModel.build(layout, (top,))
    nan, inf, _ = risk.word_risks(one_to_two, 1.0, 1.0)
    np.testing.assert_array_equal(nan + inf, 1.0)

    below_one = _words([*np.geomspace(1e-30, 0.9999999, 200).tolist(), 0.5, 0.75, -0.99], torch.float32)
    for bit in range(layout.width):
        single = from_unsigned(torch.from_numpy(below_one ^ (1 << bit)), layout).view(torch.float32)
        assert torch.isfinite(single).all(), f"bit {bit}"
    # Top exponent bit of a value in [0.5, 1): times 2^128, above max/2 (huge, not Inf).
    half_to_one = _words([0.5, 0.75, -0.99], torch.float32)
    scaled = from_unsigned(torch.from_numpy(half_to_one ^ (1 << top)), layout).view(torch.float32).double()
    np.testing.assert_allclose(scaled.numpy(), np.array([0.5, 0.75, -0.99], dtype=np.float32).astype(np.float64) * 2.0**128)
    assert (scaled.abs() > torch.finfo(torch.float32).max / 2).all()
    # Under iid flips, non-finite needs two flips (O(p^2)) below 1 but one (O(p)) in [1, 2).
    everywhere = RiskModel.build(layout, tuple(range(32)))
    p = 1e-6
    nan, inf, huge = everywhere.word_risks(below_one, p, p)
    assert (nan + inf).max() < 10 * p**2
    assert huge[-3:].min() > 0.9 * p
    nan, inf, _ = everywhere.word_risks(one_to_two, p, p)
    np.testing.assert_allclose(nan + inf, p * (1 - p) ** 7, rtol=1e-12)  # top bit flips, 7 others hold


def test_float16_top_exponent_flip_scales_by_two_to_the_sixteen() -> None:
    layout = layout_of(torch.float16)
    words = _words([0.5, 0.25, -0.0078125], torch.float16)
    flipped = from_unsigned(torch.from_numpy(words ^ (1 << layout.exponent[-1])), layout).view(torch.float16)
    np.testing.assert_array_equal(flipped.double().numpy(), np.array([0.5, 0.25, -0.0078125]) * 2.0**16)


# -- against real injections ----------------------------------------------------------------


def _observe(model: torch.nn.Module, spec: FaultSpec, threshold: float) -> dict[str, float]:
    """Counts from one real injection: changed elements, flipped bits, NaN/Inf/huge created."""
    sites = select_params(model, spec)
    before = [site.param.detach().clone() for site in sites]
    with inject(model, spec) as faults:
        totals = faults.report.totals("weights")
        counts = {
            "hit": totals["hit_elements"],
            "elements": totals["changed_elements"],
            "bits": totals["flipped_bits"],
            "nan": 0,
            "inf": 0,
            "huge": 0,
        }
        for site, old in zip(sites, before, strict=True):
            new = site.param.detach().double()
            was_good = torch.isfinite(old.double()) & (old.double().abs() <= threshold)
            counts["nan"] += int((was_good & torch.isnan(new)).sum())
            counts["inf"] += int((was_good & torch.isinf(new)).sum())
            counts["huge"] += int((was_good & torch.isfinite(new) & (new.abs() > threshold)).sum())
    return counts


CASES = [
    (torch.float32, "p=0.01", None),
    (torch.float16, "p=0.01", None),
    (torch.bfloat16, "p=0.003", 1.5),
    (torch.float32, "p=0.02,fault=stuck1,bits=exponent", None),
    (torch.float16, "p=0.03,fault=stuck0", None),
    (torch.float32, "p01=0.02,p10=0.004,bits=sign+exponent", 1.0),
    (torch.float16, "p=0.01,fault=value,value_range=-1:4", 3.0),
    (torch.float32, "p=0.02,fault=zero,target=attention+norm", None),
]


@pytest.mark.parametrize("dtype, args, threshold", CASES)
def test_expectations_match_repeated_injections(dtype, args, threshold) -> None:
    """Sums over 24 seeds agree with 24 x the analytic expectation within 5 sigma.

    Every count is a sum of independent Bernoulli variables (per element, or per bit), so its
    variance is at most its mean; except flipped bits under element faults (zero, value), where
    an element's bits change together: a sum of b_i * Bernoulli with b_i <= width, so its
    variance is at most width * mean.
    """
    model = tiny_model("llama", dtype)
    runs = 24
    base = dict(part.split("=") for part in args.split(","))
    analysis = analyze(model, FaultSpec(**base), threshold=threshold).total()
    used_threshold = threshold if threshold is not None else torch.finfo(dtype).max / 2
    observed = {"hit": 0.0, "elements": 0.0, "bits": 0.0, "nan": 0.0, "inf": 0.0, "huge": 0.0}
    for seed in range(runs):
        for name, value in _observe(model, FaultSpec(**base, seed=seed), used_threshold).items():
            observed[name] += value
    expected = {
        "hit": analysis.hit_elements,
        "elements": analysis.changed_elements,
        "bits": analysis.flipped_bits,
        "nan": analysis.nan,
        "inf": analysis.inf,
        "huge": analysis.huge,
    }
    for name, mean in expected.items():
        if mean is None:
            continue
        total = runs * mean
        clumped = name == "bits" and base.get("fault") in ("zero", "value")
        variance = total * (torch.finfo(dtype).bits if clumped else 1)
        assert abs(observed[name] - total) <= 5 * math.sqrt(variance) + 1e-9, (name, observed[name], total)


def test_probability_of_at_least_one_combines_sites_exactly() -> None:
    model = tiny_model("llama", torch.float32)
    analysis = analyze(model, "p=1e-4")
    total = analysis.total()
    per_site = 1 - np.prod([1 - site.expectation.p_any_nonfinite for site in analysis.sites])
    assert math.isclose(total.p_any_nonfinite, per_site, rel_tol=1e-9)
    # 1 - prod(1 - p_i) lies between 1 - exp(-sum p_i) and sum p_i.
    assert 1 - math.exp(-(total.nan + total.inf)) <= total.p_any_nonfinite <= total.nan + total.inf


def test_symmetric_bitflip_counts_follow_the_closed_forms() -> None:
    model = tiny_model("gpt2", torch.float16)
    spec = FaultSpec(p=1e-3, bits="exponent", target="attention")
    total = analyze(model, spec).total()
    numel = sum(site.param.numel() for site in select_params(model, spec))
    assert total.eligible_bits == numel * 5
    assert math.isclose(total.changed_elements, numel * (1 - (1 - 1e-3) ** 5), rel_tol=1e-9)
    assert math.isclose(total.flipped_bits, numel * 5 * 1e-3, rel_tol=1e-9)
    assert bit_rates(FaultSpec(p=0.1, fault="stuck0")) == (0.0, 0.1)


def test_record_table_json_and_cli(tmp_path, capsys) -> None:
    model = tiny_model("llama", torch.float32)
    assert analyze(model, "p=1e-3,target=mlp").total().changed_elements > 0
    analysis = analyze(model, "p=1e-3,target=mlp+norm")
    json.dumps(analysis.to_dict())
    table = analysis.format_table()
    assert "mlp" in table and "norm" in table and "total" in table
    assert analyze(model, "p=0.1,fault=value").total().flipped_bits is None

    directory = save_tiny_model(tmp_path / "tiny")
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    out = tmp_path / "analysis.json"
    args = parser.parse_args([str(directory), "--model_args", "dtype=float16,p=1e-4,target=attention", "--json", str(out)])
    assert main(args) == 0
    assert "attention" in capsys.readouterr().out
    saved = json.loads(out.read_text())
    assert saved["thresholds"] == {"float16": 65504 / 2}
    assert saved["total"]["elements"] == sum(s["elements"] for s in saved["sites"])


# -- the one-pass word statistics ------------------------------------------------------------


def _special_words(dtype: torch.dtype, count: int, seed: int = 0) -> torch.Tensor:
    """Weights-like values mixed with every kind of word the pass must sort: zeros of both signs,
    subnormals, NaN, +-Inf, values above and below the thresholds, and raw random bit patterns."""
    generator = torch.Generator().manual_seed(seed)
    layout = layout_of(dtype)
    if not layout.is_float:
        return torch.randint(-128, 128, (count,), generator=generator).to(dtype)
    values = torch.randn(count, generator=generator) * 0.05
    values[::7] *= 3e4
    values[::11] = torch.tensor([0.0, -0.0, float("nan"), float("inf"), -float("inf"), 1e-40, 1.5, -2.5, 99.99, 1024.0, 6e4])[
        torch.arange(len(values[::11])) % 11
    ]
    words = to_unsigned(values.to(dtype).view(layout.int_view), layout)
    raw = torch.randint(0, 1 << layout.width, (count // 5,), generator=generator)
    words[: len(raw)] = raw
    return from_unsigned(words, layout)


def _direct_stats(words: torch.Tensor, risk: RiskModel) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
    """Word by word, no histogram: (key values, key counts, eligible popcount, non-zero words)."""
    unsigned = to_unsigned(words, risk.layout).numpy()
    keys, good = risk.keys(unsigned)
    key_values, key_counts = np.unique(keys[good], return_counts=True)
    ones = np.bitwise_count(unsigned & sum(1 << b for b in risk.eligible))
    return key_values, key_counts, np.bincount(ones, minlength=len(risk.eligible) + 1), int((unsigned != 0).sum())


@pytest.mark.parametrize(
    "dtype, bits, threshold",
    [
        (torch.float32, "all", None),
        (torch.float32, "all", math.nextafter(1024.0, 0.0)),  # limit mantissa all ones: no leading bits
        (torch.float32, "all", math.nextafter(100.0, 0.0)),  # 4 leading mantissa bits decide
        (torch.float32, "exponent", None),  # every mantissa bit ineligible: only "mantissa != 0" matters
        (torch.float32, "0-15+23-30", None),  # mantissa ones both eligible and not
        (torch.float32, "3-9+20-31", math.nextafter(100.0, 0.0)),  # ineligible leading bits
        (torch.float32, "all", 1000.0),  # limit mantissa ends in 17 zeros: exceeds iff a low bit ends up one
        (torch.float32, "0-15+23-30", 1024.0),  # limit mantissa all zeros
        (torch.float32, "0-1+19-30", 1000.0),  # ineligible bits both in the leading bits and below
        (torch.float32, "all", 1e4),  # limit mantissa ends in 14 zeros: distinct words
        (torch.float16, "all", None),
        (torch.bfloat16, "0-3+10-14", 1.5),
        (torch.int8, "all", 10.0),
    ],
)
@pytest.mark.parametrize("workers, size", [(1, 600_000), (3, 600_000), (2, 3_000)])
def test_word_stats_equal_a_word_by_word_count(monkeypatch, dtype, bits, threshold, workers, size) -> None:
    """The pass (whichever path: counted, reduced or distinct words; a histogram filled step by step
    on one thread or several, or a small tensor's keys sorted) loses nothing: its statistics equal
    those computed from every word on its own."""
    from lm_eval_faults.core.analysis import word_stats as analysis

    monkeypatch.setattr(analysis.torch, "get_num_threads", lambda: workers)
    monkeypatch.setattr(analysis, "SORT_CHUNK", 100_003)
    layout = layout_of(dtype)
    risk = RiskModel.build(layout, resolve_bits(layout, bits), threshold)
    words = _special_words(dtype, size)  # 600,000: several pass steps (and sorts) whatever the path
    stats = analysis.word_stats(words, risk)
    key_values, key_counts, eligible_popcount, nonzero = _direct_stats(words, risk)
    np.testing.assert_array_equal(stats.key_values, key_values)
    np.testing.assert_array_equal(stats.key_counts, key_counts)
    np.testing.assert_array_equal(stats.eligible_popcount, eligible_popcount)
    assert stats.nonzero == nonzero and stats.numel == len(words)
    assert stats.eligible_ones == int(np.arange(len(eligible_popcount)) @ eligible_popcount)
    if layout.width == 32 and risk.lead_low >= analysis.MIN_LEAD_LOW:
        # The reduced path ran: some representatives are stand-ins, not stored words.
        values, counts = analysis.word_histogram(words, risk)
        stored = np.sort(to_unsigned(words, layout).numpy())
        found = stored[np.searchsorted(stored, values).clip(max=len(stored) - 1)] == values
        assert counts.sum() == len(words) and not found.all()


@pytest.mark.parametrize("bits, threshold", [("0+19-29", 1000.0), ("20-30", 1024.0), ("5+19-30", math.nextafter(100.0, 0.0))])
def test_float32_low_runs_match_mask_enumeration(bits, threshold) -> None:
    """Thresholds whose limit's mantissa ends in a run of zeros (1000, 1024) or ones (just below
    100): words at and around the limit, where the bits below the leading ones decide."""
    layout = layout_of(torch.float32)
    risk = RiskModel.build(layout, resolve_bits(layout, bits), threshold)
    near = [1000.0, 1000.0001, 999.9999, -1000.0, 1024.0, 1023.9999, 1536.5, 999.0, 600.0, 99.99999, 100.0, 96.0, 0.3]
    words = _words(near, torch.float32)
    for flip0, flip1 in [(0.3, 0.05), (0.0, 0.2)]:
        nan, inf, huge = risk.word_risks(words, flip0, flip1)
        expected = _brute_force(words, torch.float32, risk.eligible, flip0, flip1, risk.threshold)
        np.testing.assert_allclose(huge, expected["huge"], rtol=1e-12, atol=1e-15)
        np.testing.assert_allclose(nan + inf, expected["nan"] + expected["inf"], rtol=1e-12, atol=1e-15)


def test_usual_float32_thresholds_take_the_reduced_pass() -> None:
    """The bits that decide "above the threshold" start at bit 16 or higher for the default and for
    round thresholds (their limit's mantissa ends in a long run of ones or zeros), so the pass can
    reduce float32 words; a limit such as 1e4's (mantissa 0x1C4000) needs distinct words."""
    from lm_eval_faults.core.analysis.word_stats import MIN_LEAD_LOW

    layout = layout_of(torch.float32)
    expected = {None: 23, math.nextafter(1024.0, 0.0): 23, 1024.0: 23, 1000.0: 17, 100.0: 19, math.nextafter(100.0, 0.0): 19, 1e4: 14}
    for threshold, lead_low in expected.items():
        assert RiskModel.build(layout, layout.all_bits, threshold).lead_low == lead_low, threshold
    assert min(expected.values()) < MIN_LEAD_LOW <= sorted(expected.values())[1]


def test_rates_as_parameters_give_the_spec_expectation() -> None:
    """`expect_bit_changes` takes the per-bit rates directly (what a protection scheme would leave
    uncorrected) and agrees with `expect` for the spec with those rates."""
    from lm_eval_faults.core.analysis.exact import expect, expect_bit_changes, site_risk, word_stats

    model = tiny_model("llama", torch.float16)
    spec = FaultSpec(p01=1e-3, p10=4e-4, bits="sign+exponent")
    for site in select_params(model, spec):
        risk, words = site_risk(site, spec, None)
        stats = word_stats(words, risk)
        assert expect_bit_changes(stats, risk, 1e-3, 4e-4) == expect(stats, risk, spec)
