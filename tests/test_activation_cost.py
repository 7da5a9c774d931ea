"""Activation faults drawn ahead for a whole forward pass are exactly the faults each hook drew on
its own before, and planning them keeps memory flat and costs O(1) passes per forward.

The digests below were computed with the implementation that preceded planning (commit 80d79fd's
`activations.py`: every hook drew its own faults through `faults.draw_faults`), on modules whose
outputs are copies of fixed ramps, so a digest depends on the faults drawn and nothing else (no
matrix product whose rounding could vary between machines). The faults of every (seed, module,
call, request row) must stay exactly those.
"""

from __future__ import annotations

import gc
import hashlib
import json
import math
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
import torch
from lm_eval_faults import inject
from lm_eval_faults.core.faults.device import DEVICE_PATH_ENV
from lm_eval_faults.core.injectors.activations import Rows
from lm_eval_faults.core.random.streams import request_key
from lm_eval_faults.core.report import FAULT_COUNT_FIELDS
from lm_eval_faults.core.sampling import host as sampling
from lm_eval_faults.core.sampling import planned as output_draws
from torch import nn

from golden import first_moved
from tiny import tiny_model

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device: the CPU/GPU comparison needs one")


class Ramp(nn.Module):
    """Outputs a fixed ramp shaped like the input's batch and length: a fresh tensor every call."""

    def __init__(self, inner: int, dtype: torch.dtype, shared: bool = False) -> None:
        super().__init__()
        self.shared = shared  # batch dimension 1, broadcast over the rows (like a rotary table)
        values = (torch.arange(8 * 16 * inner) % 997 - 498).to(torch.float32) / 37.0
        self.register_buffer("table", values.reshape(8, 16, inner).to(dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.table[: 1 if self.shared else x.shape[0], : x.shape[1]].clone()


class Pair(nn.Module):
    """A tuple of two tensors (streams t=0 and t=1) around a non-tensor."""

    def __init__(self, dtype: torch.dtype) -> None:
        super().__init__()
        self.left, self.right = Ramp(5, dtype), Ramp(3, dtype)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, None, torch.Tensor]:
        return self.left(x), None, self.right(x)


class Strided(nn.Module):
    """A non-contiguous view (the hook must copy it before writing)."""

    def __init__(self, dtype: torch.dtype) -> None:
        super().__init__()
        self.ramp = Ramp(7, dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.ramp(x).transpose(1, 2).contiguous().transpose(1, 2)


class Whole(nn.Module):
    """An output that is not batch-first (one site per call even when rows are declared)."""

    def __init__(self, dtype: torch.dtype) -> None:
        super().__init__()
        self.ramp = Ramp(3, dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.ramp(x).flatten()


class Block(nn.Module):
    def __init__(self, dtype: torch.dtype) -> None:
        super().__init__()
        self.ramp = Ramp(24, dtype)
        self.wide = Ramp(512, dtype)  # enough hits per call for the vectorised write
        self.table = Ramp(6, dtype, shared=True)
        self.pair = Pair(dtype)
        self.alias = nn.Identity()
        self.strided = Strided(dtype)
        self.whole = Whole(dtype)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        left, _, right = self.pair(x)
        return {
            "ramp": self.ramp(x),
            "again": self.ramp(x),  # a second call in the same forward: call number 1
            "wide": self.wide(x),
            "table": self.table(x),
            "left": left,
            "right": right,
            "alias": self.alias(x),
            "strided": self.strided(x),
            "whole": self.whole(x),
        }


class Stack(nn.Module):
    def __init__(self, dtype: torch.dtype) -> None:
        super().__init__()
        self.layers = nn.ModuleList([Block(dtype), Block(dtype)])

    def forward(self, x: torch.Tensor) -> tuple[dict[str, torch.Tensor], ...]:
        return tuple(layer(x) for layer in self.layers)


SCENARIOS = {
    "call-leaf-fp32": (dict(p=5e-4), "call", torch.float32),
    "rows-leaf-fp32": (dict(p=5e-4), "rows", torch.float32),
    "rows-all-fp32": (dict(p=3e-4, act_scope="all", seed=2), "rows", torch.float32),
    "rows-all-bf16": (dict(p=5e-4, act_scope="all"), "rows", torch.bfloat16),
    "rows-all-fp16": (dict(p=1e-3, act_scope="all", seed=3), "rows", torch.float16),
    "call-exponent-bf16": (dict(p=2e-3, bits="exponent"), "call", torch.bfloat16),
    "call-all-stuck1-fp16": (dict(p=3e-3, fault="stuck1", bits="exponent", act_scope="all"), "call", torch.float16),
    "rows-stuck0-fp32": (dict(p=5e-4, fault="stuck0", seed=5), "rows", torch.float32),
    "rows-value-fp32": (dict(p=1e-3, fault="value"), "rows", torch.float32),
    "call-zero-bf16": (dict(p=1e-3, fault="zero"), "call", torch.bfloat16),
    "rows-asymmetric-fp32": (dict(p01=3e-3, p10=1e-3), "rows", torch.float32),
    "rows-dense-fp32": (dict(p=1e-2), "rows", torch.float32),
}
"""Symmetric and stuck-at bit faults up to an element rate of 5% are planned (all but the last four)."""

BATCHES = [(3, 10, (0, 1, 0), (10, 9, 8)), (3, 10, (0, 0, 0), (10, 10, 7)), (2, 7, (1, 0), (7, 6)), (3, 10, (2, 0, 1), (9, 10, 10))]
"""Per forward: rows, length, each row's first and last real position (the rest is padding)."""


STATS_FIELDS = ("dtype", "calls", "elements", "eligible_bits", "expected_elements", "expected_bits", *FAULT_COUNT_FIELDS, "bit_histogram")


def run_scenario(name: str, device: str = "cpu") -> str:
    """Four forwards of `Stack` under one injection; a digest of every output and of the report.
    When it differs from its golden value, the first site whose faults moved is named."""
    digest, sites = scenario_digests(name, device)
    moved = first_moved(sites, GOLDEN_SITES[name])
    assert moved is None, f"{name}: the faults of {moved} moved"
    return digest


def scenario_digests(name: str, device: str = "cpu") -> tuple[str, dict[str, str]]:
    """The scenario's digest, and one per site (module): its outputs over the forwards and its counts."""
    fields, mode, dtype = SCENARIOS[name]
    model = Stack(dtype).to(device)
    digest = hashlib.sha256()
    per_output: dict[str, hashlib._Hash] = {}
    with torch.no_grad(), inject(model, site="activations", **fields) as faults:
        for rows, length, starts, ends in BATCHES:
            x = (torch.arange(rows * length * 4, dtype=torch.float32).reshape(rows, length, 4) / 8.0).to(device, dtype)
            if mode == "rows":
                keys = np.array([request_key([r, length, *starts]) for r in range(rows)], dtype=np.uint64)
                faults.next_forward(Rows(keys, np.array(starts, dtype=np.int64), np.array(ends, dtype=np.int64), length))
            for layer, outputs in enumerate(model(x)):
                for key in sorted(outputs):
                    data = outputs[key].contiguous().view(-1).view(torch.uint8).cpu().numpy().tobytes()
                    digest.update(data)
                    per_output.setdefault(f"layers.{layer}:{key}", hashlib.sha256()).update(data)
            faults.next_forward(None)
        faults.report.settle()  # counts summed on the device (device path) join the report
        sites = {name: {field: getattr(stats, field) for field in STATS_FIELDS} for name, stats in faults.report.activations.items()}
    digest.update(json.dumps(sites, sort_keys=True).encode())
    assert sum(site["hit_elements"] for site in sites.values()) > 0
    site_digests = {key: value.hexdigest()[:12] for key, value in per_output.items()}
    site_digests.update(
        {name: hashlib.sha256(json.dumps(stats, sort_keys=True).encode()).hexdigest()[:12] for name, stats in sites.items()}
    )
    return digest.hexdigest()[:24], site_digests


GOLDEN_SITES = json.loads((Path(__file__).parent / "golden" / "activation_sites.json").read_text())
"""Per scenario, per site: the digests `scenario_digests` gives (made once from the code the
scenario digests below were made with; a change in either changes the other)."""


GOLDEN = {
    "call-leaf-fp32": "464ca10def30e5ef980e33ec",
    "rows-leaf-fp32": "a2820dbafd5cafa99ce486b2",
    "rows-all-fp32": "2ace8dc3fd4cf2e76fa3e48c",
    "rows-all-bf16": "367f36d27406af25446a2b8a",
    "rows-all-fp16": "2a65386323ce31d8c378bf68",
    "call-exponent-bf16": "8f8a68563bf7366b7da47ea2",
    "call-all-stuck1-fp16": "9f13b3c73eaa09a3b8b979ee",
    "rows-stuck0-fp32": "8893af8fceb5f552fd317d89",
    "rows-value-fp32": "d1b957c5414bfce3f631ce61",
    "call-zero-bf16": "149373bb1a9031caff102735",
    "rows-asymmetric-fp32": "f0e111e577c87838674d05b7",
    "rows-dense-fp32": "d224fef47f0262588bc58a20",
}


@pytest.mark.parametrize("name", list(SCENARIOS))
def test_activation_faults_are_the_faults_each_hook_drew_on_its_own(name):
    assert run_scenario(name) == GOLDEN[name]


@pytest.mark.parametrize("name", list(SCENARIOS))
def test_the_device_write_path_gives_the_same_faults_and_counts(name, monkeypatch):
    """Planned faults written and counted by torch ops (as on a GPU, here on the CPU): same digest."""
    monkeypatch.setenv(DEVICE_PATH_ENV, "always")
    assert run_scenario(name) == GOLDEN[name]


@cuda
@pytest.mark.parametrize("name", list(SCENARIOS))
def test_activation_faults_on_cuda_are_the_cpus(name):
    assert run_scenario(name, "cuda") == GOLDEN[name]


def test_device_counts_wait_on_the_device_until_the_report_is_read(monkeypatch):
    """On the device path no count is read back per forward: they are summed where the output
    lives, and one read (any report summary) brings them in, the same as the host path's."""

    def totals(path: str) -> tuple[dict[str, float], list[bool]]:
        monkeypatch.setenv(DEVICE_PATH_ENV, path)
        model = Stack(torch.float32)
        x = torch.arange(3 * 10 * 4, dtype=torch.float32).reshape(3, 10, 4) / 8.0
        with torch.no_grad(), inject(model, p=5e-3, bits="exponent", site="activations") as faults:
            for _ in range(3):
                model(x)
            held = [hook.device_counts is not None for hook in faults.injectors["activations"]._hooks]
            result = faults.report.totals("activations")
            assert all(hook.device_counts is None for hook in faults.injectors["activations"]._hooks)
        return result, held

    on_device, held = totals("always")
    on_host, held_on_host = totals("never")
    assert any(held) and not any(held_on_host)
    assert on_device == on_host and on_host["nonfinite_created"] > 0


def test_count_tables_give_the_samplers_counts():
    """Counts from the tables a plan keeps are `sampling.fault_counts`' counts, site by site (tables
    fresh and reused), except sites flagged to be drawn with their own output (none here)."""
    rng = np.random.default_rng(0)
    sizes = np.array([1, 3, 64, 576, 1536, 6144, 18432, 49152, 196608, 1572864, 6291456])
    for _ in range(150):
        q = float(10 ** rng.uniform(-8, np.log10(0.05)))
        numels = (rng.choice(sizes, rng.integers(1, 40)) * rng.integers(1, 30, 1)).astype(np.int64)
        keys = rng.integers(0, 2**64 - 1, len(numels), dtype=np.uint64)
        tables = output_draws.CountTables(q)
        for _ in range(2):
            counts, alone = tables.counts(numels, keys)
            assert not len(alone) and np.array_equal(counts, sampling.fault_counts(numels, q, keys))


@pytest.mark.parametrize(("n", "q"), [(3, 0.05), (700, 1e-3), (49152, 3e-4), (20_000, 5e-3)])
def test_a_count_tables_cdf_is_the_samplers_and_its_end_is_flagged(n, q):
    """Up to its last entry a table finds the count `sampling._binomial_inverse_cdf` finds for a
    site alone; a uniform beyond it is flagged (there the sampler extends the widest site's table)."""
    tables = output_draws.CountTables(q)
    _, cdf, small = tables._table(n)
    assert small
    u = np.concatenate([np.linspace(0.0, 1.0, 2001)[:-1], [1 - 2**-53, float(cdf[-1]), float(np.nextafter(cdf[-1], 0))]])
    p_zero = np.exp(np.full(len(u), n) * math.log1p(-q))
    some = u >= p_zero
    expected = sampling._binomial_inverse_cdf(np.full(some.sum(), n), q, u[some], p_zero[some])
    found = np.searchsorted(cdf, u[some], side="right")
    inside = found < len(cdf)
    assert np.array_equal(np.minimum(found[inside], n), expected[inside])
    assert (expected[~inside] >= min(n, len(cdf) - 1)).all()


@pytest.mark.parametrize("mode", ["call", "rows"])
def test_after_the_first_forward_every_bit_fault_is_planned(mode, monkeypatch):
    """From the second forward on, no hook draws its own faults: the plan covered every call."""
    model = tiny_model("llama")
    tokens = torch.randint(0, 100, (3, 9), generator=torch.Generator().manual_seed(0))
    keys = np.array([request_key(row) for row in tokens.tolist()], dtype=np.uint64)
    rows = Rows(keys, np.zeros(3, dtype=np.int64), np.full(3, 9, dtype=np.int64), 9)
    with torch.no_grad(), inject(model, p=1e-3, site="activations", act_scope="all") as faults:

        def forward() -> None:
            if mode == "rows":
                faults.next_forward(rows)
            model(tokens)
            faults.next_forward(None)

        forward()

        def own_draw(*args, **kwargs):
            raise AssertionError("a hook drew its own faults after the first forward")

        monkeypatch.setattr(output_draws.OutputSampler, "draw", own_draw)
        plans_before = faults.injectors["activations"].plan_number
        for _ in range(5):
            forward()
        assert faults.injectors["activations"].plan_number - plans_before == 5  # one planning pass per forward
        assert faults.report.totals("activations")["hit_elements"] > 0


def test_a_module_called_in_a_loop_is_planned_every_half_round_not_every_call():
    """Planning covers every output; a lone module called over and over must not replan at each call."""
    model = tiny_model("llama")
    tokens = torch.randint(0, 100, (1, 6), generator=torch.Generator().manual_seed(0))
    with torch.no_grad(), inject(model, p=1e-4, site="activations") as faults:
        model(tokens)
        model(tokens)
        hooks = len(faults.injectors["activations"]._hooks)
        before = faults.injectors["activations"].plan_number
        norm = model.model.norm
        hidden = torch.randn(1, 6, 32)
        for _ in range(4 * hooks):
            norm(hidden)
        assert faults.injectors["activations"].plan_number - before <= 9


def ours(snapshot: tracemalloc.Snapshot) -> int:
    """Bytes still held that this package's code allocated (transformers' own allocations drift a little)."""
    return sum(stat.size for stat in snapshot.filter_traces([tracemalloc.Filter(True, "*/lm_eval_faults/*")]).statistics("filename"))


def test_memory_stays_flat_over_many_planned_calls():
    """The plan is replaced at every forward and the caches are bounded: nothing grows with calls."""
    model = tiny_model("llama")
    tokens = torch.randint(0, 100, (2, 8), generator=torch.Generator().manual_seed(0))
    keys = np.array([request_key(row) for row in tokens.tolist()], dtype=np.uint64)
    rows = Rows(keys, np.zeros(2, dtype=np.int64), np.array([8, 5], dtype=np.int64), 8)
    with torch.no_grad(), inject(model, p=1e-3, site="activations", act_scope="all") as faults:

        def forwards(n: int) -> None:
            for _ in range(n):
                faults.next_forward(rows)
                model(tokens)
                faults.next_forward(None)

        forwards(10)
        # Counters past Python's small-int cache, so that one reaching 257 does not read as a leak.
        for stats in faults.report.activations.values():
            for field in ("calls", "elements", "eligible_bits", *FAULT_COUNT_FIELDS):
                setattr(stats, field, getattr(stats, field) + 10**6)
            stats.bit_histogram = [count + 10**6 for count in stats.bit_histogram or [0] * 32]
        calls = sum(site.calls for site in faults.report.activations.values())
        tracemalloc.start()
        try:
            forwards(5)
            gc.collect()
            objects, traced = len(gc.get_objects()), ours(tracemalloc.take_snapshot())
            forwards(180)
            gc.collect()
            grown_objects, grown_bytes = len(gc.get_objects()) - objects, ours(tracemalloc.take_snapshot()) - traced
        finally:
            tracemalloc.stop()
        calls = sum(site.calls for site in faults.report.activations.values()) - calls
    assert calls > 10_000 and traced > 0  # the plan in force was allocated by this package: the filter sees it
    assert grown_objects < 50, f"{grown_objects} objects more after 180 forwards"
    assert grown_bytes < 4096, f"this package holds {grown_bytes} bytes more after 180 forwards"
