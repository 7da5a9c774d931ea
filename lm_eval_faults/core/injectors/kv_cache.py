"""Faults in the KV cache: the memory generation lives in, written once and read at every later step.

A transformers attention module hands each new key and value (after RoPE, as stored) to
`cache.update(keys, values, layer_idx, ...)`, whatever the cache class (DynamicCache, StaticCache,
sliding-window layers). This site wraps `update` on the cache instance it is handed (an instance
attribute, so the cache's class and `isinstance` are untouched) from a forward pre-hook on each
selected attention module, and faults the new entries before the cache stores them:

- `kv_fault=write`: each entry (one layer's keys or values at one position of one request) takes
  its faults once, as it is written; every later step reads the corrupted entry.
- `kv_fault=retention`: as write, and at every decoding step (every `update` of a layer) each bit
  of the entries the layer holds is also hit at rate p, in the cache's own tensors, so an entry
  that stays longer carries more faults.

An entry's faults are keyed by (layer's module and part, request key, position in the request),
from `Rows.requests` and `Rows.pads` (`faulty_hf` and `generate` declare them before every
forward): never by batch row, left padding, cache class or how a prompt was split into forwards,
so a request's faults do not depend on its batch. Outside them (plain `inject`), a row is keyed
by its index in the batch and a position by its cache index.

transformers' FP8 `QuantizedCache` appends each entry's E4M3 codes under a frozen per-tensor scale:
there the faults go into the stored codes, and the step reads them decoded (`_update_quantized`).
Caches that re-quantize their whole history (quanto, HQQ) are refused.

Under log-likelihood scoring a forward builds a fresh cache (or, with `use_cache=False`, none:
the pre-hook hands the attention a `ReadOnceCache` that stores nothing, so nothing changes but
the faults),
and the site is exactly faults on the keys and values that attention consumes in that forward.

Cost: per layer and part, one vectorised draw over the entries written (a COUNT uniform each; at
small p nothing else runs), plus one per row for retention. BENCHMARKS.md has it per decoding step.
"""

from __future__ import annotations

import functools
import inspect
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from lm_eval_faults.core.fault_map import FaultMap
from lm_eval_faults.core.faults.counts import count_by_site, expected_counts
from lm_eval_faults.core.faults.host import FaultBatch
from lm_eval_faults.core.random.streams import Purpose, StreamKind, entry_key_table, random_words, site_key, spec_key, to_uniform
from lm_eval_faults.core.report import ReportPart, SiteStats
from lm_eval_faults.core.sampling.host import Hits
from lm_eval_faults.core.sampling.planned import OutputSampler
from lm_eval_faults.core.sites.registry import Pausable, SiteKind, register_site
from lm_eval_faults.core.sites.rows import Rows
from lm_eval_faults.core.sites.targets import classify_modules, decoder_layers
from lm_eval_faults.core.spec import FaultSpec, FaultSpecError, layers_label
from lm_eval_faults.core.storage.layouts import FIELD_LAYOUTS, LAYOUTS, BitLayout, resolve_bits
from lm_eval_faults.core.storage.words import WordAccess

PARTS = ("keys", "values")
CACHE_ARGUMENTS = ("cache", "past_key_values", "past_key_value")
"""What attention modules call their cache argument (transformers 5 `cache`, earlier releases the others)."""


@dataclass
class EntryCounts:
    """One layer's part of the cache, over every cache it was written to.

    `written`: entries stored (one per real position and row); `corrupted`: entries holding at
    least one fault when last written or struck; `reads_corrupted`: reads of corrupted entries, one
    per entry present at each step (every query of a step reads every entry before it).
    """

    written: int = 0
    corrupted: int = 0
    reads_corrupted: int = 0


@dataclass
class _CacheState:
    """What one cache object holds of ours: the corrupted entries per (layer, part), by (row,
    cache index), and the current decoding step's screen per part."""

    corrupted: dict[tuple[int, str], set[tuple[int, int]]] = field(default_factory=dict)
    steps: dict[str, _Step] = field(default_factory=dict)


@dataclass(frozen=True)
class KVLayer:
    """One attention module that writes one layer of the cache."""

    name: str
    module: torch.nn.Module
    layer: int
    cache_argument: str
    component: str = "kv_cache"
    """What protection schemes see (`protect=attention` backs up weights, not the cache's entries)."""


class KVCacheInjector(Pausable):
    """Faults the entries a model writes to its KV cache (the `kv_cache` site's `Injector`)."""

    def __init__(self, spec: FaultSpec, layers: list[KVLayer]) -> None:
        self.spec = spec
        self.layers = {layer.layer: layer for layer in layers}
        self.parts = PARTS if spec.kv_part == "both" else (spec.kv_part,)
        self.stats: dict[str, SiteStats] = {}
        self.entries: dict[str, EntryCounts] = {}
        self.rows: Rows | None = None
        self.log: list[tuple[int, int, str, int, int, int]] | None = None
        """When a list: every fault written, as (request key, layer, part, position, element, bit
        mask), for tests and for `generate`'s page; None (the default) keeps nothing."""
        self._spec_key = spec_key(spec.seed, spec.sampling_key())
        self._stream_keys: dict[tuple[int, str, StreamKind], int] = {}
        """Per (layer, part, stream kind), its site key: hashed once per injection."""
        self._samplers: dict[torch.dtype, OutputSampler] = {}
        self._eligible_bits: dict[str, tuple[int, ...]] = {}
        self._handles: list[Any] = []
        self._wrapped: weakref.WeakKeyDictionary[Any, Any] = weakref.WeakKeyDictionary()
        self._states: weakref.WeakKeyDictionary[Any, _CacheState] = weakref.WeakKeyDictionary()

    @classmethod
    def build(cls, model: torch.nn.Module, spec: FaultSpec, replaying: bool) -> KVCacheInjector:
        return cls(spec, select_kv_layers(model, spec))

    @property
    def selected(self) -> list[KVLayer]:
        return list(self.layers.values())

    def part(self) -> ReportPart:
        return ReportPart(self.stats, per_call=True, entries=self.entry_summary)

    def entry_summary(self) -> dict[str, dict[str, int]]:
        """Per layer and part (`model.layers.3.self_attn.keys`), its `EntryCounts`."""
        return {name: vars(counts).copy() for name, counts in self.entries.items()}

    def attach(self, fault_map: FaultMap | None = None, progress: bool = False) -> None:
        if self._handles:
            return
        for layer in self.layers.values():
            for part in self.parts:
                name = f"{layer.name}.{part}"
                self.stats.setdefault(name, SiteStats(name, f"kv_{part}", layer.layer, "", 0, 0, 0.0, 0.0))
                self.entries.setdefault(name, EntryCounts())
        try:
            for layer in self.layers.values():
                hook = functools.partial(self._before_attention, layer)
                self._handles.append(layer.module.register_forward_pre_hook(hook, with_kwargs=True))
        except BaseException:
            self.restore()
            raise

    def restore(self) -> None:
        """Remove the hooks and unwrap every cache still alive: later writes are clean (the entries
        already corrupted stay so in a cache that outlives the injection, as memory would)."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        for cache, previous in list(self._wrapped.items()):
            if previous is None:
                cache.__dict__.pop("update", None)
            else:
                cache.update = previous
        self._wrapped.clear()

    def next_forward(self, rows: Rows | None) -> None:
        self.rows = rows

    # -- the hooks -------------------------------------------------------------------------

    def _before_attention(self, layer: KVLayer, module: torch.nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
        """Wrap the cache this attention call writes to; hand it a throwaway cache if it has none."""
        cache = next((kwargs[name] for name in CACHE_ARGUMENTS if kwargs.get(name) is not None), None)
        if cache is None:
            cache = ReadOnceCache()
            self._wrap(cache)
            return args, {**kwargs, layer.cache_argument: cache}
        self._wrap(cache)
        return None

    def _wrap(self, cache: Any) -> None:
        if cache in self._wrapped:
            return
        previous = cache.__dict__.get("update")
        original = cache.update
        self._wrapped[cache] = previous
        self._states[cache] = _CacheState()
        cache.update = functools.partial(self._update, weakref.ref(cache), original)

    def _update(
        self,
        cache_ref: Callable[[], Any],
        original: Callable[..., Any],
        keys: torch.Tensor,
        values: torch.Tensor,
        layer_idx: int,
        *args: Any,
        **kwargs: Any,
    ) -> Any:
        cache = cache_ref()
        if self.paused or cache is None or layer_idx not in self.layers:
            return original(keys, values, layer_idx, *args, **kwargs)
        layer = self.layers[layer_idx]
        stored = cache.layers[layer_idx] if layer_idx < len(getattr(cache, "layers", ())) else None
        offset = int(stored.get_seq_length()) if stored is not None and getattr(stored, "is_initialized", False) else 0
        state = self._states[cache]
        if stored is not None and hasattr(stored, "_quantized_keys"):
            return self._update_quantized(cache, layer, stored, offset, state, original, keys, values, layer_idx, *args, **kwargs)
        new = {"keys": keys, "values": values}
        for part in self.parts:
            step = self._step(state, part, offset, new[part])
            if self.spec.kv_fault == "retention" and offset:
                self._retain(cache, layer, part, step, state)
            new[part] = self._write(layer, part, new[part], step, state)
        result = original(new["keys"], new["values"], layer_idx, *args, **kwargs)
        self._count_reads(layer, state)
        return result

    def _update_quantized(
        self,
        cache: Any,
        layer: KVLayer,
        stored: Any,
        offset: int,
        state: _CacheState,
        original: Callable[..., Any],
        keys: torch.Tensor,
        values: torch.Tensor,
        *args: Any,
        **kwargs: Any,
    ) -> Any:
        """A quantized cache layer: the faults go into its stored codes. The FP8 layer appends each
        entry's E4M3 codes (under a per-tensor scale frozen at the first write), so an entry is
        faulted in its codes once they are stored, and what this step returns is decoded again from
        the faulted codes; the prefill step returns its keys and values unquantized, as transformers
        does. (Layers that re-quantize their whole history, quanto's and HQQ's, are refused.)"""
        if getattr(stored, "fp8_dtype", None) is None:
            raise NotImplementedError(
                f"site=kv_cache: a {type(stored).__name__} re-quantizes its whole history at every flush (optimum-quanto or HQQ), "
                "which this site does not simulate; use QuantizedCache(backend='fp8'), a DynamicCache or a StaticCache"
            )
        if self.spec.kv_fault == "retention" and offset:
            for part in self.parts:
                held = _held(stored, part)
                incoming = torch.empty((*held.shape[:2], keys.shape[-2], held.shape[-1]), dtype=held.dtype, device="meta")
                self._retain(cache, layer, part, self._step(state, part, offset, incoming), state)
        first = not getattr(stored, "is_initialized", False)
        result = list(original(keys, values, *args, **kwargs))
        for index, part in enumerate(PARTS):
            if part not in self.parts:
                continue
            codes = _held(stored, part)
            if not codes.is_contiguous():  # the prefill's codes keep the strides of a transposed projection
                codes = codes.contiguous()
                setattr(stored, f"_quantized_{part}", (codes, getattr(stored, f"_quantized_{part}")[1]))
            new = codes[:, :, offset : offset + keys.shape[-2]]
            hit = self._write(layer, part, new, self._step(state, part, offset, new), state, codes) is not new
            if hit and not first:
                quantized = stored._quantized_keys if part == "keys" else stored._quantized_values
                result[index] = stored._dequantize(quantized)
        self._count_reads(layer, state)
        return tuple(result)

    def _count_reads(self, layer: KVLayer, state: _CacheState) -> None:
        for part in self.parts:
            self.entries[f"{layer.name}.{part}"].reads_corrupted += len(state.corrupted.get((layer.layer, part), ()))

    # -- drawing and writing -----------------------------------------------------------------

    def _step(self, state: _CacheState, part: str, offset: int, tensor: torch.Tensor) -> _Step:
        """This decoding step's screen for one part, made at its first layer for every selected
        layer (they all write entries of the same shape at the same offset) and reused by the rest."""
        batch, heads, length, width = tensor.shape
        signature = (id(self.rows), offset, batch, heads, length, width, tensor.dtype)
        step = state.steps.get(part)
        if step is None or step.signature != signature:
            step = state.steps[part] = _Step(self, part, signature, _EntryRows.of(self.rows, batch, length), offset, tensor)
        return step

    def _write(
        self, layer: KVLayer, part: str, tensor: torch.Tensor, step: _Step, state: _CacheState, stored: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Fault the new entries of one part (one site per row and position): in a copy of `tensor`
        before the cache stores it (returned), or, with `stored`, in the stored tensor itself, where
        `tensor` is the view of the new entries (then `tensor` is returned if nothing was hit)."""
        name = f"{layer.name}.{part}"
        self.entries[name].written += len(step.row)
        self._add_elements(name, step.layout, step.write_elements, step.write_expected)
        sites = step.write_hits.get(layer.layer)
        if sites is None:
            return tensor
        _, heads, length, width = tensor.shape
        capacity, base = (length, 0) if stored is None else (stored.shape[-2], step.offset)
        row, column = step.row[sites], step.column[sites]
        target: list[torch.Tensor] = []

        def flat_of(hits: Hits) -> np.ndarray:
            head, element = np.divmod(hits.position, width)
            return ((row[hits.site] * heads + head) * capacity + base + column[hits.site]) * width + element

        def read_words(hits: Hits) -> np.ndarray:
            target.append(tensor.detach().clone(memory_format=torch.contiguous_format) if stored is None else stored)
            return WordAccess(target[0], step.layout).read(flat_of(hits))

        numels = np.full(len(sites), heads * width, dtype=np.int64)
        faults = step.sampler.draw(
            numels, step.write_keys[step.layer_row[layer.layer]][sites], step.sampler.zero_probability(numels), read_words
        )
        if not len(faults):
            return tensor
        self._apply(name, target[0], step.layout, flat_of(faults.hits), faults)
        corrupted = state.corrupted.setdefault((layer.layer, part), set())
        self._mark(name, corrupted, row[faults.hits.site], step.offset + column[faults.hits.site])
        positions = step.positions[sites][faults.hits.site]
        self._log(layer, part, step.rows.requests[row[faults.hits.site]], positions, faults.hits.position, faults)
        return target[0]

    def _retain(self, cache: Any, layer: KVLayer, part: str, step: _Step, state: _CacheState) -> None:
        """Count one decoding step's retention on a layer's entries; at the step's first layer, draw
        and write it for every selected layer at once (`_retain_all`): each layer's entries are then
        struck before its attention reads them, in one vectorised draw instead of one per layer."""
        self._add_elements(f"{layer.name}.{part}", step.layout, step.retain_elements, step.retain_expected)
        if not step.retained:
            step.retained = True
            self._retain_all(cache, part, step, state)

    def _retain_all(self, cache: Any, part: str, step: _Step, state: _CacheState) -> None:
        """The step's retention faults on every selected layer's held entries: one site per (layer,
        row) the screen kept, over the row's real entries [pad, offset) in position-major order,
        keyed by the position being decoded."""
        screened = [(layer, rows) for layer, rows in step.retain_hits.items() if len(rows)]
        if not screened:
            return
        held = {layer: _held(cache.layers[layer], part) for layer, _ in screened}
        site_layer = np.concatenate([np.full(len(rows), layer, dtype=np.int64) for layer, rows in screened])
        site_row = np.concatenate([rows for _, rows in screened])
        keys = np.concatenate([step.retain_keys[step.layer_row[layer]][rows] for layer, rows in screened])
        numels = step.retain_numels[site_row]
        pads = step.rows.pads

        def flat_of(hits: Hits, tensor: torch.Tensor) -> np.ndarray:
            _, heads, capacity, width = tensor.shape
            position, rest = np.divmod(hits.position, heads * width)
            head, element = np.divmod(rest, width)
            row = site_row[hits.site]
            return ((row * heads + head) * capacity + pads[row] + position) * width + element

        def read_words(hits: Hits) -> np.ndarray:
            old = np.empty(len(hits), dtype=np.int64)
            for layer, tensor in held.items():
                mine = site_layer[hits.site] == layer
                if mine.any():
                    old[mine] = WordAccess(tensor, step.layout).read(flat_of(hits.select(mine), tensor))
            return old

        faults = step.sampler.draw(numels, keys, step.sampler.zero_probability(numels), read_words)
        if not len(faults):
            return
        changed = faults.old != faults.new
        hit_layer = site_layer[faults.hits.site]
        for layer, tensor in held.items():
            mine = hit_layer == layer
            if not mine.any():
                continue
            hits = faults.hits.select(mine)
            written = changed[mine]
            WordAccess(tensor, step.layout).write(flat_of(hits, tensor)[written], faults.new[mine][written])
            kv_layer = self.layers[layer]
            position, element = np.divmod(hits.position, tensor.shape[1] * tensor.shape[3])
            row = site_row[hits.site]
            self._mark(f"{kv_layer.name}.{part}", state.corrupted.setdefault((layer, part), set()), row, pads[row] + position)
            ours = FaultBatch(hits, faults.fault_bits[mine], faults.old[mine], faults.new[mine])
            self._log(kv_layer, part, step.rows.requests[row], position, element, ours)
        sites = [self.stats[f"{self.layers[layer].name}.{part}"] for layer in site_layer.tolist()]
        count_by_site(faults, len(sites), step.layout).add_to(sites)  # one pass for every layer's counts

    def _apply(self, name: str, target: torch.Tensor, layout: BitLayout, flat: np.ndarray, faults: FaultBatch) -> None:
        changed = faults.old != faults.new
        WordAccess(target, layout).write(flat[changed], faults.new[changed])
        sites = int(faults.hits.site.max()) + 1
        count_by_site(faults, sites, layout).add_to([self.stats[name]] * sites)

    def _mark(self, name: str, corrupted: set[tuple[int, int]], rows: np.ndarray, indices: np.ndarray) -> None:
        before = len(corrupted)
        corrupted.update(zip(rows.tolist(), indices.tolist(), strict=True))
        self.entries[name].corrupted += len(corrupted) - before

    def _log(
        self, layer: KVLayer, part: str, requests: np.ndarray, positions: np.ndarray, elements: np.ndarray, faults: FaultBatch
    ) -> None:
        """Record faults in `log` (when kept): `elements` index (head, dim) within their entry."""
        if self.log is None:
            return
        for request, position, element, mask in zip(
            requests.tolist(), positions.tolist(), elements.tolist(), faults.fault_bits.tolist(), strict=True
        ):
            self.log.append((request, layer.layer, part, position, element, mask))

    def _add_elements(self, name: str, layout: BitLayout, elements: int, expected: tuple[float, float, int]) -> None:
        """Count one write or retention step of a layer's part: `expected` is (elements, bits,
        eligible bits) from `expected`, computed once per step for every layer."""
        stats = self.stats[name]
        stats.dtype = layout.name
        stats.calls += 1
        stats.elements += elements
        stats.eligible_bits += expected[2]
        stats.expected_elements += expected[0]
        stats.expected_bits += expected[1]

    def expected(self, layout: BitLayout, elements: int) -> tuple[float, float, int]:
        """(expected faulty elements, expected fault bits, eligible bits) of `elements` words."""
        eligible = self._eligible(layout)
        return (*expected_counts(self.spec, elements, eligible, layout.width), elements * len(eligible))

    def layout(self, tensor: torch.Tensor, name: str) -> BitLayout:
        layout = LAYOUTS.get(tensor.dtype) or next((lay for lay in FIELD_LAYOUTS.values() if lay.dtype == tensor.dtype), None)
        if layout is None or not layout.is_float:
            supported = ", ".join(lay.name for lay in LAYOUTS.values() if lay.is_float)
            raise TypeError(f"{name} stores {tensor.dtype} entries, which cannot be faulted; supported: {supported}")
        return layout

    def _eligible(self, layout: BitLayout) -> tuple[int, ...]:
        eligible = self._eligible_bits.get(layout.name)
        if eligible is None:
            try:
                eligible = resolve_bits(layout, self.spec.bits) if self.spec.per_bit else layout.all_bits
            except ValueError as error:  # the cache's dtype is known only once it stores (an FP8 cache: 8-bit codes)
                reason = str(error).removeprefix(f"bits={self.spec.bits!r}").lstrip(": ")
                raise FaultSpecError(
                    f"model_args bits={self.spec.bits!r} is invalid: {reason} (the KV cache stores {layout.name})"
                ) from None
            self._eligible_bits[layout.name] = eligible
        return eligible

    def sampler(self, layout: BitLayout) -> OutputSampler:
        sampler = self._samplers.get(layout.dtype)
        if sampler is None:
            sampler = self._samplers[layout.dtype] = OutputSampler(self.spec, layout, self._eligible(layout))
        return sampler

    def stream_key(self, layer: KVLayer, part: str, kind: StreamKind) -> int:
        key = self._stream_keys.get((layer.layer, part, kind))
        if key is None:
            key = self._stream_keys[layer.layer, part, kind] = site_key(self._spec_key, f"{layer.name}.{part}", kind)
        return key


class _Step:
    """One decoding step of one part, for every selected layer at once: which entry sites (writes)
    and row sites (retention) have any fault, from one vectorised COUNT screen, so the layers
    without one return at a dictionary lookup (at small p, nearly all of them).

    A site's faults never depend on the sites screened with it: its count comes from its own
    COUNT uniform, and the layers with a fault draw only their screened sites, as
    `OutputSampler.draw` would have drawn them among all.
    """

    def __init__(self, injector: KVCacheInjector, part: str, signature: tuple, rows: _EntryRows, offset: int, tensor: torch.Tensor) -> None:
        self.signature = signature
        self.rows = rows
        self.offset = offset
        self.retained = False
        """Whether this step's retention faults were drawn (at its first layer, for all of them)."""
        _, heads, length, width = tensor.shape
        layers = list(injector.layers.values())
        self.layout = injector.layout(tensor, f"{layers[0].name}.{part}")
        self.sampler = injector.sampler(self.layout)
        per_entry = heads * width
        self.row, self.column = rows.real_entries(length)
        self.positions = offset + self.column - rows.pads[self.row]
        self.write_elements = len(self.row) * per_entry
        self.write_expected = injector.expected(self.layout, self.write_elements)
        write_numels = np.full(len(self.row), per_entry, dtype=np.int64)
        self.layer_row = {layer.layer: index for index, layer in enumerate(layers)}
        write_streams = np.array([injector.stream_key(layer, part, StreamKind.KV_WRITE) for layer in layers], dtype=np.uint64)
        self.write_keys = entry_key_table(write_streams, rows.requests[self.row], self.positions)
        self.write_hits = self._screen(write_numels, self.write_keys)
        held = np.maximum(offset - rows.pads, 0)
        self.retain_numels = held * per_entry
        self.retain_elements = int(self.retain_numels.sum())
        self.retain_expected = injector.expected(self.layout, self.retain_elements)
        self.retain_keys = np.empty((len(layers), 0), dtype=np.uint64)
        self.retain_hits: dict[int, np.ndarray] = {}
        if injector.spec.kv_fault == "retention" and offset:
            retain_streams = np.array([injector.stream_key(layer, part, StreamKind.KV_RETAIN) for layer in layers], dtype=np.uint64)
            self.retain_keys = entry_key_table(retain_streams, rows.requests, held)
            self.retain_hits = self._screen(self.retain_numels, self.retain_keys)

    def _screen(self, numels: np.ndarray, keys: np.ndarray) -> dict[int, np.ndarray]:
        """Per layer, the sites that may hold a fault (all of them where the sampler cannot screen);
        `keys` has a row per layer (`layer_row`)."""
        if not len(numels) or not self.sampler.q:
            return {}
        layers = list(self.layer_row)
        if not self.sampler.screens:
            return {layer: np.flatnonzero(numels) for layer in layers}
        faulty = to_uniform(random_words(keys.ravel(), Purpose.COUNT, 0)).reshape(keys.shape) >= self.sampler.zero_probability(numels)
        return {layers[i]: np.flatnonzero(faulty[i]) for i in np.flatnonzero(faulty.any(axis=1)).tolist()}


def _held(stored: Any, part: str) -> torch.Tensor:
    """The tensor a cache layer holds one part's entries in, at their cache indices: its keys or
    values, or an FP8 layer's codes. Layers that keep a window (sliding) or a re-quantized history
    hold no entry at a fixed index, and retention is refused for them."""
    quantized = getattr(stored, f"_quantized_{part}", None)
    tensor = quantized[0] if isinstance(quantized, tuple) else getattr(stored, part, None)
    if not isinstance(tensor, torch.Tensor) or getattr(stored, "is_sliding", False):
        raise NotImplementedError(
            f"kv_fault=retention needs a cache layer that keeps every entry at its cache index; a {type(stored).__name__} "
            "does not; use kv_fault=write"
        )
    return tensor


class ReadOnceCache:
    """The cache handed to attention run without one (`use_cache=False`): it stores nothing and
    returns each layer's keys and values as given, so the site faults what attention consumes."""

    def __init__(self) -> None:
        self.layers: list[Any] = []

    def update(
        self, keys: torch.Tensor, values: torch.Tensor, layer_idx: int, *args: Any, **kwargs: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        return keys, values

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return 0


@dataclass(frozen=True)
class _EntryRows:
    """The rows of one cache write: each row's request key, left padding, and real input columns."""

    requests: np.ndarray
    pads: np.ndarray
    starts: np.ndarray
    ends: np.ndarray

    @classmethod
    def of(cls, rows: Rows | None, batch: int, length: int) -> _EntryRows:
        """From the declared rows, if they describe this write; else keyed by batch row and cache index."""
        if rows is not None and len(rows) == batch and rows.length == length:
            requests = rows.keys if rows.requests is None else rows.requests
            pads = np.zeros(batch, dtype=np.int64) if rows.pads is None else rows.pads
            return cls(np.asarray(requests, dtype=np.uint64), np.asarray(pads, dtype=np.int64), rows.starts, rows.ends)
        zeros = np.zeros(batch, dtype=np.int64)
        return cls(np.arange(batch, dtype=np.uint64), zeros, zeros, np.full(batch, length, dtype=np.int64))

    def real_entries(self, length: int) -> tuple[np.ndarray, np.ndarray]:
        """(row, input column) of every real (not padding) entry of a write of `length` positions."""
        counts = np.clip(self.ends, 0, length) - np.clip(self.starts, 0, length)
        row = np.repeat(np.arange(len(counts), dtype=np.int64), counts)
        first = np.concatenate([[0], np.cumsum(counts)[:-1]])
        column = np.arange(int(counts.sum()), dtype=np.int64) - np.repeat(first, counts) + np.repeat(self.starts, counts)
        return row, column


def select_kv_layers(model: torch.nn.Module, spec: FaultSpec) -> list[KVLayer]:
    """The attention modules that write the cache layers `kv_layers=` selects (all by default)."""
    found: dict[int, KVLayer] = {}
    for site in classify_modules(model).values():
        index = getattr(site.module, "layer_idx", None)
        if isinstance(index, int) and "attention" in type(site.module).__name__.lower() and index not in found:
            found[index] = KVLayer(site.name, site.module, index, _cache_argument(site.module))
    if not found:
        stack = decoder_layers(model)
        raise FaultSpecError(
            f"model_args site={spec.site!r} is invalid: this model ({type(model).__name__}, "
            f"{len(stack[1]) if stack else 0} decoder layers) has no attention module with a layer_idx, "
            "which is how transformers' attention addresses its KV cache"
        )
    if spec.kv_layers is None:
        return [found[index] for index in sorted(found)]
    missing = sorted(set(spec.kv_layers) - set(found))
    if missing:
        raise FaultSpecError(
            f"model_args kv_layers={layers_label(spec.kv_layers)!r} is invalid: layers {layers_label(missing)} are not in this "
            f"model; its cache layers are {layers_label(found)}"
        )
    return [found[index] for index in spec.kv_layers]


def _cache_argument(module: torch.nn.Module) -> str:
    parameters = inspect.signature(module.forward).parameters
    return next((name for name in CACHE_ARGUMENTS if name in parameters), CACHE_ARGUMENTS[0])


register_site(SiteKind("kv_cache", KVCacheInjector.build, per_call=True))
