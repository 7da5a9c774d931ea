"""The device path draws the numpy path's fault maps, bit for bit.

Everything here runs the torch implementation on CPU tensors and compares it with the numpy one:
that is how CI checks the algorithm a GPU runs without a GPU. The tests marked `cuda` compare
CPU and GPU maps where CUDA exists.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pytest
import torch
from lm_eval_faults import inject
from lm_eval_faults.core import FaultMap, Injection
from lm_eval_faults.core.faults import device as device_faults
from lm_eval_faults.core.faults import host as faults
from lm_eval_faults.core.injectors import weights
from lm_eval_faults.core.random import streams
from lm_eval_faults.core.random import torch_streams as ts
from lm_eval_faults.core.random.streams import Purpose, StreamKind, site_key, spec_key
from lm_eval_faults.core.sampling import device as device_sampling
from lm_eval_faults.core.sampling import host as sampling
from lm_eval_faults.core.spec import FaultSpec
from lm_eval_faults.core.storage.layouts import LAYOUTS, resolve_bits
from lm_eval_faults.core.storage.words import WordAccess

from tiny import tiny_model

CPU = torch.device("cpu")
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device: the CPU/GPU map comparison needs one")

EDGE_WORDS = [0, 1, 2, 3, (1 << 53) - 1, 1 << 53, (1 << 63) - 1, 1 << 63, (1 << 63) + 1, (1 << 64) - 2, (1 << 64) - 1]
TOP_INDEX = (1 << streams.PURPOSE_SHIFT) - 1
"""The last counter a purpose can reach."""


def words_with_edges(count: int, seed: int) -> np.ndarray:
    """Random 64-bit words (half of them with the top bit set) and the edge cases of unsigned arithmetic."""
    random = np.random.default_rng(seed).integers(0, 2**64, size=count, dtype=np.uint64, endpoint=False)
    return np.concatenate([np.array(EDGE_WORDS, dtype=np.uint64), random])


def as_words(tensor: torch.Tensor) -> np.ndarray:
    return ts.to_numpy(tensor)


def test_signed_is_the_int64_with_the_same_bits():
    for word in EDGE_WORDS:
        assert np.array([ts.signed(word)], dtype=np.int64).view(np.uint64)[0] == np.uint64(word)


def test_mix64_is_bit_identical():
    words = words_with_edges(10_000, seed=1)
    assert np.array_equal(as_words(ts.mix64(ts.to_device(words, CPU))), streams.mix64(words))


@pytest.mark.parametrize("purpose", list(Purpose))
def test_random_words_are_bit_identical_for_every_purpose(purpose):
    keys = words_with_edges(2_000, seed=int(purpose))  # includes keys with the high bit set, 0 and 2^64 - 1
    index = np.concatenate(
        [
            np.arange(1000, dtype=np.uint64),
            np.random.default_rng(7).integers(0, TOP_INDEX, size=len(keys) - 1000 - 3, dtype=np.uint64),
            np.array([TOP_INDEX - 1, TOP_INDEX, 1 << 55], dtype=np.uint64),  # the top of the counter space
        ]
    )
    expected = streams.random_words(keys, purpose, index)
    got = ts.random_words(ts.to_device(keys, CPU), purpose, ts.to_device(index, CPU))
    assert np.array_equal(as_words(got), expected)
    # One key for every draw, as a Python int (the dense draws), high bit set.
    key = (1 << 63) | 12345
    assert np.array_equal(
        as_words(ts.random_words(key, purpose, ts.to_device(index, CPU))), streams.random_words(np.uint64(key), purpose, index)
    )
    assert np.array_equal(ts.to_uniform(got).numpy(), streams.to_uniform(expected))


def test_row_keys_are_bit_identical():
    request_keys = words_with_edges(1000, seed=3)
    for key in ((1 << 64) - 1, 1 << 63, 0, 0x0123456789ABCDEF):
        assert np.array_equal(as_words(ts.row_keys(key, ts.to_device(request_keys, CPU))), streams.row_keys(key, request_keys))


def test_unsigned_order_and_remainder():
    a, b = words_with_edges(5000, seed=4), words_with_edges(5000, seed=5)
    assert np.array_equal(ts.unsigned_less(ts.to_device(a, CPU), ts.to_device(b, CPU)).numpy(), a < b)
    for bound in (0, 1, 1 << 63, (1 << 64) - 1, int(b[-1])):
        assert np.array_equal(ts.unsigned_less(ts.to_device(a, CPU), bound).numpy(), a < np.uint64(bound))
    for n in (1, 2, 3, 7, 1000, (1 << 40) - 1, 1 << 40, 987_654_321_987):
        got = ts.unsigned_remainder(ts.to_device(a, CPU), torch.full((len(a),), n, dtype=torch.int64))
        assert np.array_equal(got.numpy(), (a % np.uint64(n)).astype(np.int64))
        assert sampling.rejection_limit(np.array([n], dtype=np.uint64))[0] == np.uint64(2**64 - 1 - 2**64 % n)


def keys_for(count: int, seed: int = 0) -> np.ndarray:
    spec = spec_key(seed, {})
    return np.array([site_key(spec, f"site{i}", StreamKind.WEIGHTS) for i in range(count)], dtype=np.uint64)


def assert_same_hits(device_hits: device_sampling.DeviceHits, host: sampling.Hits) -> None:
    assert np.array_equal(np.repeat(device_hits.sites, device_hits.sizes), host.site)
    assert np.array_equal(device_hits.site.numpy(), host.site)
    assert np.array_equal(device_hits.position.numpy(), host.position)
    assert np.array_equal(device_hits.rank.numpy(), host.rank)


@pytest.mark.parametrize("q", [0.0, 1e-6, 1e-3, 0.04, sampling.DENSE_ABOVE * 1.01, 0.5, 1.0])
def test_positions_are_the_numpy_paths(q):
    numels = np.array([1_000_000, 0, 1, 17, 4096, 250_000, 3], dtype=np.int64)
    keys = keys_for(len(numels), seed=11)
    assert_same_hits(device_sampling.bernoulli_hits(numels, q, keys, CPU), sampling.bernoulli_hits(numels, q, keys))


def test_positions_where_collisions_are_common_and_prefixes_fall_short(monkeypatch):
    """4000 sites drawing every element of 3: many collide, and some need a second, longer prefix."""
    rounds = []
    first_distinct = device_sampling._first_distinct

    def counted(sites, *args):
        rounds.append(len(sites))
        return first_distinct(sites, *args)

    monkeypatch.setattr(device_sampling, "_first_distinct", counted)
    numels, counts = np.full(4000, 3), np.full(4000, 3)
    keys = keys_for(4000, seed=2)
    assert_same_hits(device_sampling.distinct_uniform(numels, counts, keys, CPU), sampling.distinct_uniform(numels, counts, keys))
    assert len(rounds) >= 2 and rounds[0] == 4000 > rounds[1]


def test_huge_tensors_are_refused_as_on_the_host():
    with pytest.raises(ValueError, match="2\\^40"):
        device_sampling.distinct_uniform(np.array([1 << 40]), np.array([1]), keys_for(1), CPU)


@pytest.mark.parametrize("p", [1e-6, 0.01, 0.3, 0.9])
@pytest.mark.parametrize("bits", [tuple(range(32)), tuple(range(16)), tuple(range(8)), (3,), (0, 1, 2, 9, 10, 30)])
def test_bit_masks_are_the_numpy_paths(p, bits):
    keys = keys_for(5000, seed=3)[np.arange(20_000) % 5000]
    rank = np.arange(20_000, dtype=np.int64) // 5000
    expected = sampling.nonzero_masks(p, bits, keys, rank)
    got = device_sampling.nonzero_masks(p, bits, ts.to_device(keys, CPU), torch.from_numpy(rank))
    assert np.array_equal(got.numpy(), expected)


def random_tensor(n: int, dtype: torch.dtype, generator: torch.Generator) -> torch.Tensor:
    if dtype.is_floating_point:
        return (torch.randn(n, generator=generator) * 3).to(dtype)
    return torch.randint(-128, 128, (n,), generator=generator, dtype=torch.int64).to(dtype)


FAULTS = [
    dict(p=1e-3),
    dict(p=0.05),  # dense for every dtype: element rate above DENSE_ABOVE
    dict(p=1e-3, bits="0-3+7"),
    dict(p=0.02, fault="stuck0"),
    dict(p=0.02, fault="stuck1"),
    dict(p01=0.02, p10=0.004),
    dict(p01=0.0, p10=0.5),
    dict(p=0.01, fault="value", value_range=(-3.0, 70_000.0)),
    dict(p=0.3, fault="value", value_range=(-1e-3, 1e-3)),
    dict(p=0.01, fault="zero"),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.int8])
@pytest.mark.parametrize("fields", FAULTS, ids=lambda fields: ",".join(f"{k}={v}" for k, v in fields.items()))
def test_fault_batches_are_the_numpy_paths(dtype, fields):
    spec = FaultSpec(**fields)
    layout = LAYOUTS[dtype]
    eligible = resolve_bits(layout, spec.bits) if spec.per_bit else layout.all_bits
    generator = torch.Generator().manual_seed(5)
    numels = np.array([5000, 0, 7, 30_000, 1, 100_000], dtype=np.int64)
    tensors = [random_tensor(int(n), dtype, generator) for n in numels]
    keys = keys_for(len(numels), seed=hash(tuple(fields.items())) % 1000)

    def read(hits: sampling.Hits) -> np.ndarray:
        old = np.empty(len(hits), dtype=np.int64)
        for site, where in hits.by_site():
            old[where] = WordAccess(tensors[site], layout).read(hits.position[where])
        return old

    expected = faults.draw_faults(numels, keys, read, spec, layout, eligible)
    clean = [tensor.clone() for tensor in tensors]
    drawn = device_faults.fault_tensors(numels, keys, tensors, spec, layout, eligible)
    assert len(expected) > 0
    for name in ("site", "position", "rank"):
        assert np.array_equal(getattr(drawn.batch.hits, name), getattr(expected.hits, name)), name
    for name in ("fault_bits", "old", "new"):
        assert np.array_equal(getattr(drawn.batch, name), getattr(expected, name)), name
    assert all(torch.equal(a.view(torch.uint8), b.view(torch.uint8)) for a, b in zip(tensors, clean, strict=True))  # nothing written yet
    drawn.write()
    for site, where in expected.hits.by_site():
        stored = WordAccess(tensors[site], layout).read(expected.hits.position[where])
        assert np.array_equal(stored, expected.new[where])


def test_value_faults_round_through_float32_as_the_host_path_does():
    """A float64 just above a float16 tie: rounded once it goes up, through float32 it ties to even."""
    ties = [1 + 2**-11 + 2**-40, 1 + 2**-8 + 2**-40, -(1 + 2**-11 + 2**-40), 65520.0, 70_000.0, 2.5, -0.5, 127.5, -128.6, 1e-8]
    values = np.concatenate([np.array(ties), np.random.default_rng(6).normal(scale=100.0, size=10_000)])
    for layout in LAYOUTS.values():
        expected = faults.uniform_words(values, layout)
        assert np.array_equal(device_faults.uniform_words(torch.from_numpy(values), layout).numpy(), expected), layout.name
    assert faults.uniform_words(np.array(ties[:1]), LAYOUTS[torch.float16])[0] == 0x3C00  # 1.0, not 1 + 2^-10


def test_groups_of_sites_merge_in_site_order():
    """Sites on different devices are drawn apart and merged: the merge restores the host path's order."""
    spec, layout = FaultSpec(p=2e-3), LAYOUTS[torch.float32]
    generator = torch.Generator().manual_seed(0)
    numels = np.array([3000, 5000, 10, 8000, 4000], dtype=np.int64)
    tensors = [random_tensor(int(n), torch.float32, generator) for n in numels]
    keys = keys_for(len(numels), seed=9)
    whole = device_faults.fault_tensors(numels, keys, tensors, spec, layout, layout.all_bits).batch
    parts = []
    for members in (np.array([1, 3]), np.array([0, 2, 4])):
        part = device_faults.fault_tensors(numels[members], keys[members], [tensors[i] for i in members], spec, layout, layout.all_bits)
        parts.append((members, part.batch))
    merged = device_faults._merge(parts)
    for name in ("site", "position", "rank"):
        assert np.array_equal(getattr(merged.hits, name), getattr(whole.hits, name))
    for name in ("fault_bits", "old", "new"):
        assert np.array_equal(getattr(merged, name), getattr(whole, name))


@dataclass
class Injected:
    """One injection as the tests compare it: the handle, its undo log, map and faulted weights."""

    handle: Injection
    undo: list[tuple[int, np.ndarray, np.ndarray, np.ndarray]]
    fault_map: FaultMap
    weights: dict[str, torch.Tensor]
    device_batches: int


def injected(model: torch.nn.Module, monkeypatch: pytest.MonkeyPatch, mode: str, **fields) -> Injected:
    """Inject with the path `mode` picks, counting the batches that took the device path."""
    monkeypatch.setenv(device_faults.DEVICE_PATH_ENV, mode)
    calls = []

    def counted(*args):
        calls.append(1)
        return device_faults.fault_tensors(*args)

    monkeypatch.setattr(weights, "fault_tensors", counted)
    handle = inject(model, **fields)
    undo = [(e.site, e.positions, e.original, e.new) for e in handle.injectors["weights"]._undo]
    faulted = {name: tensor.detach().cpu().clone() for name, tensor in bits_of(model.state_dict()).items()}
    return Injected(handle, undo, handle.fault_map(), faulted, len(calls))


def bits_of(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {name: tensor.view(torch.uint8) for name, tensor in state.items()}


def assert_same_injection(ours: Injected, theirs: Injected) -> None:
    assert ours.handle.report.weights == theirs.handle.report.weights
    assert len(ours.undo) == len(theirs.undo)
    for a, b in zip(ours.undo, theirs.undo, strict=True):
        assert a[0] == b[0] and all(np.array_equal(x, y) for x, y in zip(a[1:], b[1:], strict=True))
    assert ours.fault_map.params == theirs.fault_map.params
    for name in ("param", "index", "old", "new"):
        assert np.array_equal(getattr(ours.fault_map, name), getattr(theirs.fault_map, name))
    assert all(torch.equal(tensor, theirs.weights[name]) for name, tensor in ours.weights.items())


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize(
    "fields",
    [dict(p=1e-3), dict(p=0.02), dict(p01=0.01, p10=1e-3, target="mlp"), dict(p=1e-2, fault="value", target="attention")],
    ids=lambda fields: ",".join(f"{k}={v}" for k, v in fields.items()),
)
def test_injector_takes_the_device_path_with_the_same_log_report_and_map(dtype, fields, monkeypatch):
    model = tiny_model(dtype=dtype)
    clean = bits_of(model.state_dict())
    clean = {name: tensor.clone() for name, tensor in clean.items()}
    host = injected(model, monkeypatch, "never", **fields)
    host.handle.restore()
    device = injected(model, monkeypatch, "always", **fields)
    assert host.device_batches == 0 and device.device_batches > 0
    assert host.handle.report.totals()["changed_elements"] > 0
    assert_same_injection(device, host)
    device.handle.restore()
    assert all(torch.equal(t, clean[n]) for n, t in bits_of(model.state_dict()).items())


def test_offloaded_weights_are_refused_as_on_the_host_path():
    layout, spec = LAYOUTS[torch.float16], FaultSpec(p=0.01)
    meta = torch.empty(1000, dtype=torch.float16, device="meta")
    with pytest.raises(ValueError, match="meta device"):
        device_faults.fault_tensors(np.array([1000]), keys_for(1), [meta], spec, layout, layout.all_bits)
    with pytest.raises(ValueError, match="meta device"):
        faults.draw_faults(
            np.array([1000]), keys_for(1), lambda hits: WordAccess(meta, layout).read(hits.position), spec, layout, layout.all_bits
        )


def test_the_path_is_chosen_by_the_environment(monkeypatch):
    cpu_tensor = torch.zeros(3)
    monkeypatch.delenv(device_faults.DEVICE_PATH_ENV, raising=False)
    assert not device_faults.device_path_wanted([cpu_tensor])  # auto: CPU tensors take the host path
    for mode, wanted in (("auto", False), ("always", True), ("never", False), (" Always ", True)):
        monkeypatch.setenv(device_faults.DEVICE_PATH_ENV, mode)
        assert device_faults.device_path_wanted([cpu_tensor]) is wanted
    monkeypatch.setenv(device_faults.DEVICE_PATH_ENV, "gpu")
    with pytest.raises(ValueError, match="LM_EVAL_FAULTS_DEVICE_PATH='gpu'"):
        device_faults.device_path_wanted([cpu_tensor])


@cuda
def test_streams_on_cuda_are_the_cpus():
    keys, index = words_with_edges(100_000, seed=8), np.arange(100_011, dtype=np.uint64) * np.uint64(977)
    for purpose in Purpose:
        on_cpu = ts.random_words(ts.to_device(keys, CPU), purpose, ts.to_device(index, CPU))
        on_gpu = ts.random_words(ts.to_device(keys, "cuda"), purpose, ts.to_device(index, "cuda"))
        assert np.array_equal(as_words(on_gpu), as_words(on_cpu))
        assert torch.equal(ts.to_uniform(on_gpu).cpu(), ts.to_uniform(on_cpu))


@cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.int8])
@pytest.mark.parametrize("fields", FAULTS, ids=lambda fields: ",".join(f"{k}={v}" for k, v in fields.items()))
def test_fault_batches_on_cuda_are_the_cpus(dtype, fields):
    spec = FaultSpec(**fields)
    layout = LAYOUTS[dtype]
    eligible = resolve_bits(layout, spec.bits) if spec.per_bit else layout.all_bits
    generator = torch.Generator().manual_seed(5)
    numels = np.array([5000, 0, 7, 30_000, 1, 100_000], dtype=np.int64)
    on_cpu = [random_tensor(int(n), dtype, generator) for n in numels]
    on_gpu = [tensor.cuda() for tensor in on_cpu]
    keys = keys_for(len(numels), seed=4)
    cpu_faults = device_faults.fault_tensors(numels, keys, on_cpu, spec, layout, eligible)
    gpu_faults = device_faults.fault_tensors(numels, keys, on_gpu, spec, layout, eligible)
    for name in ("site", "position", "rank"):
        assert np.array_equal(getattr(gpu_faults.batch.hits, name), getattr(cpu_faults.batch.hits, name)), name
    for name in ("fault_bits", "old", "new"):
        assert np.array_equal(getattr(gpu_faults.batch, name), getattr(cpu_faults.batch, name)), name
    cpu_faults.write()
    gpu_faults.write()
    assert all(torch.equal(g.cpu().view(torch.uint8), c.view(torch.uint8)) for g, c in zip(on_gpu, on_cpu, strict=True))


@cuda
@pytest.mark.parametrize("fields", [dict(p=1e-3), dict(p=0.02), dict(p01=0.01, p10=1e-3), dict(p=1e-2, fault="value")])
def test_a_model_on_cuda_gets_the_cpu_map_from_the_device_path(fields, monkeypatch):
    on_cpu, on_gpu = tiny_model(dtype=torch.float16), tiny_model(dtype=torch.float16).cuda()
    clean = {name: tensor.clone() for name, tensor in bits_of(on_cpu.state_dict()).items()}
    host = injected(on_cpu, monkeypatch, "never", **fields)
    device = injected(on_gpu, monkeypatch, "auto", **fields)
    assert host.device_batches == 0 and device.device_batches > 0  # auto: a model on the GPU takes the device path
    assert_same_injection(device, host)
    device.handle.restore()
    assert all(torch.equal(t.cpu(), clean[n]) for n, t in bits_of(on_gpu.state_dict()).items())
