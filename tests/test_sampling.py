"""Fault statistics match their definition: iid Bernoulli per bit (or element), exactly.

Statistical assertions use 5 standard deviations, so a correct sampler fails them with
probability below 1e-6 per check; the seeds are fixed, so the tests are deterministic anyway.
"""

import math
import subprocess
import sys

import numpy as np
import pytest
import torch
from lm_eval_faults.core.faults.host import draw_faults
from lm_eval_faults.core.random.streams import StreamKind, site_key, spec_key
from lm_eval_faults.core.sampling.host import (
    DENSE_ABOVE,
    SMALL_MEAN,
    _binomial_inverse_cdf,
    _extend_inverse_cdf,
    bernoulli_hits,
    distinct_uniform,
    element_rate,
    fault_counts,
    nonzero_masks,
)
from lm_eval_faults.core.spec import FaultSpec
from lm_eval_faults.core.storage.layouts import LAYOUTS, resolve_bits, to_unsigned


def stream(seed: int, name: str = "w", key: dict | None = None, index: int = 0) -> int:
    return site_key(spec_key(seed, key or {}), name, StreamKind.CALL, index, 0)


def keys_of(*keys: int) -> np.ndarray:
    return np.array(keys, dtype=np.uint64)


def bernoulli_positions(n: int, q: float, key: int) -> np.ndarray:
    """The hit positions of one site."""
    return bernoulli_hits(np.array([n]), q, keys_of(key)).position


def one_site(n: int, read, spec: FaultSpec, layout, bits, key: int):
    return draw_faults(np.array([n]), keys_of(key), lambda hits: read(hits.position), spec, layout, bits)


def within_5_sigma(observed: float, n: float, p: float) -> bool:
    return abs(observed - n * p) <= 5 * math.sqrt(n * p * (1 - p)) + 1e-9


@pytest.mark.parametrize("q", [1e-4, 3e-3, DENSE_ABOVE * 2, 0.5])
def test_positions_are_distinct_sorted_and_binomial(q):
    n, repeats = 200_000, 30
    counts = []
    for seed in range(repeats):
        positions = bernoulli_positions(n, q, stream(seed))
        assert np.all(np.diff(positions) > 0) and positions.min(initial=0) >= 0 and positions.max(initial=0) < n
        counts.append(len(positions))
    assert within_5_sigma(sum(counts), n * repeats, q)


def test_positions_are_uniform_over_the_tensor():
    n, bins = 1_000_000, 10
    positions = np.concatenate([bernoulli_positions(n, 1e-3, stream(s)) for s in range(20)])
    histogram = np.bincount(positions * bins // n, minlength=bins)
    for count in histogram:
        assert within_5_sigma(count, len(positions), 1 / bins)


def test_distinct_uniform_even_when_collisions_are_common():
    subset = distinct_uniform(np.array([50]), np.array([45]), keys_of(stream(1))).position
    assert len(set(subset.tolist())) == 45 and subset.max() < 50
    # Every element of a small population is equally likely to be chosen, also when thousands of
    # sites are drawn in one batch (most of them collide and take the one-by-one path).
    sites = 4000
    drawn = distinct_uniform(np.full(sites, 10), np.full(sites, 3), keys_of(*(stream(7, index=i) for i in range(sites))))
    assert np.array_equal(np.bincount(drawn.site), np.full(sites, 3))
    pairs = drawn.site * 10 + drawn.position
    assert len(np.unique(pairs)) == len(pairs)
    for count in np.bincount(drawn.position, minlength=10):
        assert within_5_sigma(count, sites, 0.3)


def test_a_site_draws_the_same_faults_alone_or_among_others():
    """Each site's draws come from its own stream: batching sites together changes nothing."""
    numels = np.array([10**6, 37, 5 * 10**5, 10**7])
    keys = keys_of(*(stream(3, f"w{i}") for i in range(4)))
    for q in (3e-5, 0.02, 0.2):
        together = bernoulli_hits(numels, q, keys)
        for site in range(4):
            alone = bernoulli_hits(numels[site : site + 1], q, keys[site : site + 1])
            assert np.array_equal(together.position[together.site == site], alone.position)
        masks = nonzero_masks(1e-3, tuple(range(32)), keys[together.site], together.rank)
        alone = nonzero_masks(1e-3, tuple(range(32)), keys[together.site[-5:]], together.rank[-5:])
        assert np.array_equal(masks[-5:], alone)


@pytest.mark.parametrize("p, bits", [(1e-3, tuple(range(32))), (0.1, tuple(range(16))), (0.3, (0, 5, 9, 30)), (1e-2, tuple(range(23, 31)))])
def test_every_eligible_bit_is_hit_with_probability_p(p, bits):
    """Element rate x conditional mask = iid Bernoulli(p) per bit, checked per bit position."""
    n = 400_000
    site = stream(0, "bits", {"p": p})
    hits = bernoulli_hits(np.array([n]), element_rate(p, len(bits)), keys_of(site))
    masks = nonzero_masks(p, bits, keys_of(site)[hits.site], hits.rank)
    assert np.all(masks != 0)
    for bit in range(32):
        hits = np.count_nonzero(masks >> bit & 1)
        if bit in bits:
            assert within_5_sigma(hits, n, p), (bit, hits, n * p)
        else:
            assert hits == 0
    # Bits are independent: elements with two or more faulty bits occur at the binomial rate.
    multi = np.count_nonzero([bin(m).count("1") >= 2 for m in masks])
    b = len(bits)
    p_multi = 1 - (1 - p) ** b - b * p * (1 - p) ** (b - 1)
    assert within_5_sigma(multi, n, p_multi)


def test_element_faults_count_and_values():
    layout = LAYOUTS[torch.float32]
    spec = FaultSpec(p=0.01, fault="value", value_range="-2:3")
    n = 300_000
    batch = one_site(n, lambda pos: np.zeros(len(pos), dtype=np.int64), spec, layout, tuple(range(32)), stream(3))
    assert within_5_sigma(len(batch), n, 0.01)
    values = torch.from_numpy(batch.new).to(torch.int32).view(torch.float32).numpy()
    assert values.min() >= -2 and values.max() <= 3
    # Uniform on (-2, 3): each unit interval holds a fifth of the draws.
    for low in range(-2, 3):
        assert within_5_sigma(np.count_nonzero((values >= low) & (values < low + 1)), len(values), 0.2)


def test_asymmetric_flips_follow_p01_and_p10_separately():
    layout = LAYOUTS[torch.int8]
    n = 200_000
    words = np.full(n, 0b00001111, dtype=np.int64)  # four zero bits, four one bits
    spec = FaultSpec(p01=0.02, p10=0.005)
    batch = one_site(n, lambda pos: words[pos], spec, layout, tuple(range(8)), stream(5))
    up = int(np.bitwise_count(~batch.old & batch.new & 0xFF).sum())
    down = int(np.bitwise_count(batch.old & ~batch.new & 0xFF).sum())
    assert within_5_sigma(up, 4 * n, 0.02) and within_5_sigma(down, 4 * n, 0.005)


def test_stuck_at_only_changes_bits_that_differ():
    layout = LAYOUTS[torch.float16]
    words = to_unsigned(torch.tensor([1.0, -2.5, 0.0, 65504.0], dtype=torch.float16).view(torch.int16), layout).numpy()
    for fault, check in (("stuck0", lambda o, n: (n & ~o) == 0), ("stuck1", lambda o, n: (o & ~n) == 0)):
        batch = one_site(4, lambda pos: words[pos], FaultSpec(p=0.5, fault=fault), layout, tuple(range(16)), stream(1))
        assert np.all(check(batch.old, batch.new))
        assert np.all((batch.old ^ batch.new) & ~batch.fault_bits == 0)


def test_bit_fields_select_the_right_positions():
    fp32, bf16, fp16 = LAYOUTS[torch.float32], LAYOUTS[torch.bfloat16], LAYOUTS[torch.float16]
    assert resolve_bits(fp32, "sign") == (31,) and resolve_bits(fp32, "exponent") == tuple(range(23, 31))
    assert resolve_bits(bf16, "exponent") == tuple(range(7, 15)) and resolve_bits(fp16, "mantissa") == tuple(range(10))
    assert resolve_bits(fp16, "0-2+15") == (0, 1, 2, 15)
    with pytest.raises(ValueError, match="outside 0-15"):
        resolve_bits(fp16, "16")
    with pytest.raises(ValueError, match="valid names: all, sign"):
        resolve_bits(LAYOUTS[torch.int8], "exponent")


def test_a_flip_of_the_top_exponent_bit_of_a_value_in_1_2_gives_inf_or_nan():
    value = torch.tensor([1.5], dtype=torch.float32)
    flipped = (value.view(torch.int32) ^ (1 << 30)).view(torch.float32)
    assert not torch.isfinite(flipped).any()
    small = torch.tensor([0.75], dtype=torch.float32)
    huge = (small.view(torch.int32) ^ (1 << 30)).view(torch.float32)
    assert torch.isfinite(huge).all() and huge.item() == 0.75 * 2.0**128


@pytest.mark.slow
def test_map_is_a_pure_function_of_seed_name_and_spec_across_processes():
    code = (
        "import numpy as np; from lm_eval_faults.core.sampling.host import *; from lm_eval_faults.core.random.streams import *;"
        "key = site_key(spec_key(4, {'p': 1e-3}), 'model.layers.0.mlp.up_proj.weight', StreamKind.CALL, 0, 0);"
        "print(bernoulli_hits(np.array([10**7]), 1e-4, np.array([key], dtype=np.uint64)).position.sum())"
    )
    other = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    here = bernoulli_positions(10**7, 1e-4, stream(4, "model.layers.0.mlp.up_proj.weight", {"p": 1e-3})).sum()
    assert int(other) == int(here)
    different_name = bernoulli_positions(10**7, 1e-4, stream(4, "model.layers.1.mlp.up_proj.weight", {"p": 1e-3})).sum()
    assert different_name != here


@pytest.mark.parametrize("n, q", [(10**9, 1e-9), (10**6, 2e-5), (500, 0.01), (40, 0.3), (10**6, 3e-4)])
def test_counts_are_binomial(n, q):
    """Site counts (inverse CDF when few faults are expected, numpy's sampler above SMALL_MEAN)
    have the binomial's mean and P(0), over 20000 sites drawn in one batch."""
    sites = 20000
    draws = fault_counts(np.full(sites, n), q, keys_of(*(stream(11, f"s{i}") for i in range(sites))))
    mean, var = n * q, n * q * (1 - q)
    assert abs(draws.mean() - mean) <= 5 * math.sqrt(var / sites) + 1e-3
    assert abs(np.mean(draws == 0) - (1 - q) ** n) <= 5 * math.sqrt(0.25 / sites)
    assert (n * q > SMALL_MEAN) == (n == 10**6 and q == 3e-4)


def test_inverse_cdf_matches_the_scalar_recurrence_far_into_the_tail():
    n, q = np.array([1000, 30000, 7]), 3e-3  # means 3, 90 and 0.02: all within SMALL_MEAN
    p_zero = np.exp(n * math.log1p(-q))
    for u in (0.0, 0.3, 0.999, 1 - 1e-15, float(np.nextafter(1.0, 0.0))):  # the last one runs past the table
        got = _binomial_inverse_cdf(n, q, np.full(3, u), p_zero)
        want = [_extend_inverse_cdf(int(m), q, u, 0, float(p0), float(p0)) for m, p0 in zip(n, p_zero, strict=True)]
        assert got.tolist() == want
