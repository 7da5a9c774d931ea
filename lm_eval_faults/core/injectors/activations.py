"""Transient faults on module outputs: fresh faults at every forward call, nothing retained.

One forward hook per targeted module corrupts the floating-point tensors in its output (a
tensor, a tuple or list of them, or a ModelOutput / dict), in loglikelihood scoring and in
generation with a KV cache alike. The hooks keep counters, stream keys and the last size of each
output; the only arrays kept are the faults planned for the next call of each output, replaced
at every round, so memory stays flat however many calls are made (the RRAM study's tool leaked).

Cost: the bit faults of every output of a forward pass are drawn in one vectorised pass at its
first hook call (`output_draws.PlannedFaults`: a hook's faults depend on its key and size, both
known in advance), so a hook only takes its hits, flips those words and counts
(`output_writes`). An output whose call or size was not foreseen (the first pass; under plain
`inject`, the first generation step after the prompt) draws its own; the faults are the same
either way (`tests/test_activation_cost.py`). BENCHMARKS.md has the cost per hook call.

On a GPU, planned faults are written on the device and the counts that depend on the values
(non-finite values created; for stuck-at faults also what changed) are summed there, one small
vector per module, and read in one transfer when the report is read (`settle`), not per forward.
Faults that must read the values to be drawn (value faults, asymmetric flips) and unforeseen
outputs still read their hit words to the host.

Which stream a tensor draws from (see `streams.py`):

- After `next_forward(rows)` (what `faulty_hf` does before every lm-eval forward), each row of a
  batch-first tensor is its own site, keyed by the row's request key, the module's call number
  within the forward and the tensor's index in the output; only the row's real positions (not
  padding) are eligible. A request's faults therefore do not depend on how requests were batched
  or padded. A tensor with batch dimension 1 broadcast over the rows (rotary tables) is expanded
  first, so each row gets its own faults.
- Outside (plain `inject` on a model), tensor t of call c of a module draws from stream (c, t).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterator, Mapping, MutableMapping
from dataclasses import dataclass
from typing import Any, NamedTuple, cast

import numpy as np
import torch

from lm_eval_faults.core.fault_map import FaultMap
from lm_eval_faults.core.faults.counts import expected_counts
from lm_eval_faults.core.faults.device import device_path_mode
from lm_eval_faults.core.injectors.activation_writes import add, flip, on_device, writable, write_and_count, write_on_device
from lm_eval_faults.core.protection.schemes import backed_up
from lm_eval_faults.core.random.streams import StreamKind, mix64, site_key, spec_key
from lm_eval_faults.core.report import ReportPart, SiteStats
from lm_eval_faults.core.sampling.host import POSITION_BITS, Hits
from lm_eval_faults.core.sampling.planned import OutputSampler, PlannedFaults
from lm_eval_faults.core.sites.hooks import ForwardHooks
from lm_eval_faults.core.sites.registry import Pausable, SiteKind, register_site
from lm_eval_faults.core.sites.rows import Rows
from lm_eval_faults.core.sites.targets import ModuleSite, select_modules
from lm_eval_faults.core.spec import FaultSpec
from lm_eval_faults.core.storage.layouts import LAYOUTS, BitLayout, resolve_bits
from lm_eval_faults.core.storage.words import WordAccess

ShapeKey = tuple[torch.dtype, bool, int]
"""An output's dtype, whether it is split into request rows, and its elements (per row position if split)."""


@dataclass(frozen=True)
class _Shape:
    """What an output of one `ShapeKey` implies, whatever its values: computed once per forward pass
    (rows change between passes) or once per size (plain `inject`), not at every hook call."""

    numels: np.ndarray
    offsets: np.ndarray
    p_zero: np.ndarray
    eligible_elements: int
    eligible_bits: int
    expected_elements: float
    expected_bits: float


class _Planned(NamedTuple):
    """The faults drawn in advance for one call of one output: valid for that call and size only.
    Its hits are `faults`' [start, stop); `known` their counts but the non-finite ones (flips).
    (A named tuple: a plan makes hundreds of these per forward pass.)"""

    kind: StreamKind
    call: int
    key: ShapeKey
    shape: _Shape
    faults: PlannedFaults
    start: int
    stop: int
    known: tuple[int, int, int, list[int]] | None


MAX_CACHED_SHAPES = 256
"""Output sizes remembered between passes (plain `inject`); beyond it the cache starts over, so a
model that makes a new size at every call keeps memory flat."""


class ActivationInjector(Pausable):
    """Attaches fault hooks to modules; `stats` accumulates per module over all calls (the
    `activations` site's `Injector`)."""

    def __init__(self, spec: FaultSpec, sites: list[ModuleSite], selected: list[ModuleSite] | None = None) -> None:
        self.spec = spec
        self.sites = sites
        self.selected = sites if selected is None else selected
        """What the spec selected, backed-up modules included (they compute fault-free)."""
        self.stats: dict[str, SiteStats] = {}
        self.rows: Rows | None = None
        self.row_mix: np.ndarray | None = None
        self.row_count = 0
        self.forward_number = 0
        self.plan_number = 0
        self._registered = ForwardHooks()
        self._hooks: list[_OutputFaultHook] = []
        self.device_mode = "auto"
        """Where planned faults are written (`device_faults.device_path_mode`, read at `attach`)."""
        self._eligible: dict[torch.dtype, tuple[int, ...]] = {}
        self._samplers: dict[torch.dtype, OutputSampler] = {}
        self._shapes: dict[ShapeKey, _Shape] = {}
        self._last_shapes: dict[tuple[_OutputFaultHook, int], ShapeKey] = {}
        self._plan: dict[tuple[_OutputFaultHook, int], _Planned] = {}
        self._calls_since_plan = 0
        self._spec_key = spec_key(spec.seed, spec.sampling_key())

    @classmethod
    def build(cls, model: torch.nn.Module, spec: FaultSpec, replaying: bool) -> ActivationInjector:
        """The injector of `spec`'s modules; backed-up components compute and store their outputs fault-free."""
        selected = select_modules(model, spec)
        return cls(spec, [site for site in selected if not backed_up(spec, site)], selected)

    def part(self) -> ReportPart:
        return ReportPart(self.stats, per_call=True, settle=self.settle)

    def attach(self, fault_map: FaultMap | None = None, progress: bool = False) -> None:
        """Register one hook per site; if any registration fails, none stays registered. (Maps
        hold weight faults only: a spec with `replay=` selects no activations.)"""
        if self._registered:
            return
        self.device_mode = device_path_mode()
        for site in self.sites:
            self.stats.setdefault(site.name, SiteStats(site.name, site.component, site.layer, "", 0, 0, 0.0, 0.0))
        self._hooks = [_OutputFaultHook(self, site) for site in self.sites]
        try:
            self._registered.attach(((site.module, hook) for site, hook in zip(self.sites, self._hooks, strict=True)), with_kwargs=True)
        except BaseException:
            self._hooks.clear()
            raise

    def restore(self) -> None:
        """Remove the hooks, keeping the counts: the model computes clean outputs again."""
        self.settle()
        self._registered.remove()
        self._hooks.clear()
        self._last_shapes.clear()
        self._plan.clear()

    def settle(self) -> None:
        """Add the counts still held on devices to `stats`: one transfer per device."""
        by_device: dict[torch.device, list[_OutputFaultHook]] = {}
        for hook in self._hooks:
            if hook.device_counts is not None:
                by_device.setdefault(hook.device_counts.device, []).append(hook)
        for hooks in by_device.values():
            counts = torch.stack([cast("torch.Tensor", hook.device_counts) for hook in hooks]).cpu().tolist()
            for hook, (changed, flipped, nonfinite, *histogram) in zip(hooks, counts, strict=True):
                hook.device_counts = None
                add(hook.stats, 0, 0, changed, flipped, nonfinite, histogram[: hook.device_width])

    def next_forward(self, rows: Rows | None) -> None:
        """Start a new forward pass (module call numbers restart); `rows` describes its batch."""
        self.forward_number += 1
        self.rows = rows
        # The request keys' half of `streams.row_keys`, shared by every hook of this pass.
        self.row_mix = None if rows is None else mix64(np.asarray(rows.keys, dtype=np.uint64))
        self.row_count = 0 if rows is None else len(rows)
        self._shapes.clear()
        self._plan.clear()  # planned for other rows

    def eligible_bits(self, layout: BitLayout) -> tuple[int, ...]:
        if layout.dtype not in self._eligible:
            self._eligible[layout.dtype] = resolve_bits(layout, self.spec.bits) if self.spec.per_bit else layout.all_bits
        return self._eligible[layout.dtype]

    def sampler(self, layout: BitLayout) -> OutputSampler:
        sampler = self._samplers.get(layout.dtype)
        if sampler is None:
            sampler = self._samplers[layout.dtype] = OutputSampler(self.spec, layout, self.eligible_bits(layout))
        return sampler

    def shape(self, sampler: OutputSampler, per_row: bool, size: int) -> _Shape:
        """The sites of an output: one per row of `self.rows` (`size` elements per position), or one of `size`."""
        key = (sampler.layout.dtype, per_row, size)
        shape = self._shapes.get(key)
        if shape is not None:
            return shape
        numels, offsets = self._sites(per_row, np.array([size], dtype=np.int64))
        bits = len(sampler.eligible)
        elements = int(numels.sum())
        expected_elements, expected_bits = expected_counts(self.spec, elements, sampler.eligible, sampler.layout.width)
        p_zero = sampler.zero_probability(numels) if sampler.screens else numels
        shape = _Shape(numels, offsets, p_zero, elements, elements * bits, expected_elements, expected_bits)
        if len(self._shapes) >= MAX_CACHED_SHAPES:
            self._shapes.clear()
        self._shapes[key] = shape
        return shape

    def _sites(self, per_row: bool, sizes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Elements and flat offsets of the sites of outputs of `sizes` (flattened, output by output)."""
        if not per_row:
            return sizes, np.zeros(len(sizes), dtype=np.int64)
        rows = self.rows
        assert rows is not None
        starts = rows.starts.astype(np.int64)
        numels = sizes[:, None] * (rows.ends - rows.starts).astype(np.int64)
        offsets = sizes[:, None] * (np.arange(len(rows), dtype=np.int64) * rows.length + starts)
        return numels.ravel(), offsets.ravel()

    def key(self, name: str, kind: StreamKind, *indices: int) -> int:
        return site_key(self._spec_key, name, kind, *indices)

    def plan_ahead(self, hook: _OutputFaultHook, kind: StreamKind, call: int) -> _Planned | None:
        """Before a hook's call: the plan for its first tensor, planning the next call of every
        output seen so far if the plan does not cover this call and a round has passed since it
        was made.

        "A round has passed": this hook was called since the plan and at least half as many hook
        calls were made as there are hooks, so planning costs O(1) per call however modules are
        called (a single module called in a loop replans every half round, not every call).
        """
        self._calls_since_plan += 1
        planned = self.planned(hook, 0, kind, call)
        if planned is None and hook.plan_number == self.plan_number and 2 * self._calls_since_plan >= len(self._hooks):
            self._replan()
            planned = self.planned(hook, 0, kind, call)
        return planned

    def planned(self, hook: _OutputFaultHook, index: int, kind: StreamKind, call: int) -> _Planned | None:
        planned = self._plan.get((hook, index))
        return planned if planned is not None and planned.kind is kind and planned.call == call else None

    def remember(self, hook: _OutputFaultHook, index: int, key: ShapeKey) -> None:
        """The size an output had, to plan its next call by."""
        if self._samplers[key[0]].plannable:
            self._last_shapes[hook, index] = key

    def _replan(self) -> None:
        self.plan_number += 1
        self._calls_since_plan = 0
        self._plan = {}
        groups: dict[tuple[torch.dtype, bool], list[tuple[_OutputFaultHook, int, StreamKind, int, int]]] = {}
        for (hook, index), (dtype, per_row, size) in self._last_shapes.items():
            kind, call = hook.upcoming()
            if per_row and self.rows is None:
                continue
            groups.setdefault((dtype, per_row), []).append((hook, index, kind, call, size))
        for (dtype, per_row), outputs in groups.items():
            sizes = np.array([size for *_, size in outputs], dtype=np.int64)
            numels, offsets = self._sites(per_row, sizes)
            if numels.max(initial=0) >= 1 << POSITION_BITS:  # refused by the sampler: let the hook itself raise
                continue
            keys = np.array([hook.stream_key(kind, call, index) for hook, index, kind, call, _ in outputs], dtype=np.uint64)
            if per_row:
                assert self.row_mix is not None
                keys = mix64(self.row_mix[None, :] ^ keys[:, None]).ravel()  # streams.row_keys, per output
            sampler = self._samplers[dtype]
            faults = PlannedFaults(sampler, numels, keys, offsets, np.full(len(outputs), len(numels) // len(outputs), dtype=np.int64))
            for output, (hook, index, kind, call, size) in enumerate(outputs):
                if output not in faults.redraw:
                    start, stop = faults.bounds[output], faults.bounds[output + 1]
                    shape = self.shape(sampler, per_row, size)
                    self._plan[hook, index] = _Planned(
                        kind, call, (dtype, per_row, size), shape, faults, start, stop, faults.known.get(output)
                    )


class _OutputFaultHook:
    """The forward hook of one module. Holds counters and stream keys only, never tensors."""

    def __init__(self, injector: ActivationInjector, site: ModuleSite) -> None:
        self.injector = injector
        self.name = site.name
        self.stats = injector.stats[site.name]
        self.plan_number = -1
        """The injector's plan number at this hook's last call."""
        self.device_counts: torch.Tensor | None = None
        """Counts summed on the device since the last `settle` (`output_writes.write_on_device`'s vector)."""
        self.device_width = 0
        """The widest layout among them (the histogram's length)."""
        self._forward = -1
        self._calls_in_forward = 0
        # REQUEST stream keys by (call within the pass, tensor index): the same in every pass, so
        # each is hashed once. As many as the module's calls in one pass times its output tensors.
        self._request_keys: dict[tuple[int, int], int] = {}

    def upcoming(self) -> tuple[StreamKind, int]:
        """The stream kind and call number of this hook's next call."""
        injector = self.injector
        if injector.rows is None:
            return StreamKind.CALL, self.stats.calls
        return StreamKind.REQUEST, self._calls_in_forward if self._forward == injector.forward_number else 0

    def __call__(self, module: torch.nn.Module, args: tuple, kwargs: dict, output: Any) -> Any:
        injector = self.injector
        if injector.paused:
            return output
        kind, call = self.upcoming()
        first = injector.plan_ahead(self, kind, call)  # before this call is counted: a replan plans it
        if kind is StreamKind.REQUEST:
            self._forward, self._calls_in_forward = injector.forward_number, call + 1
        self.stats.calls += 1
        self.plan_number = injector.plan_number
        if isinstance(output, torch.Tensor):  # most modules: tensor 0, nothing to traverse
            return self._corrupt_tensor(output, kind, call, 0, first, args, kwargs)
        return self._corrupt(output, itertools.count(), kind, call, first, args, kwargs)

    def _corrupt(
        self, value: Any, index: Iterator[int], kind: StreamKind, call: int, first: _Planned | None, args: tuple, kwargs: dict
    ) -> Any:
        """Every tensor in `value`, numbered in traversal order (the number indexes its stream)."""
        if isinstance(value, torch.Tensor):
            return self._corrupt_tensor(value, kind, call, next(index), first, args, kwargs)
        if isinstance(value, Mapping):  # ModelOutput and plain dicts
            # Both are mutable; a read-only mapping that holds a tensor fails loudly on assignment.
            mapping = cast("MutableMapping[Any, Any]", value)
            for key in list(mapping.keys()):
                if isinstance(mapping[key], torch.Tensor):
                    mapping[key] = self._corrupt_tensor(mapping[key], kind, call, next(index), first, args, kwargs)
            return mapping
        if isinstance(value, (tuple, list)):
            corrupted = [self._corrupt(item, index, kind, call, first, args, kwargs) for item in value]
            return type(value)(corrupted) if isinstance(value, list) else tuple(corrupted)
        return value

    def stream_key(self, kind: StreamKind, call: int, index: int) -> int:
        if kind is not StreamKind.REQUEST:  # call numbers grow without bound: nothing to reuse
            return self.injector.key(self.name, kind, call, index)
        key = self._request_keys.get((call, index))
        if key is None:
            key = self._request_keys[call, index] = self.injector.key(self.name, kind, call, index)
        return key

    def _corrupt_tensor(
        self, tensor: torch.Tensor, kind: StreamKind, call: int, index: int, first: _Planned | None, args: tuple, kwargs: dict
    ) -> torch.Tensor:
        numel = tensor.numel()
        if not numel or not tensor.is_floating_point():
            return tensor
        dtype = tensor.dtype
        layout = LAYOUTS.get(dtype)
        if layout is None:  # float64, float8...: fail, never skip what was selected in silence
            supported = ", ".join(lay.name for lay in LAYOUTS.values() if lay.is_float)
            raise TypeError(f"module {self.name!r} outputs {dtype} activations, which cannot be faulted; supported: {supported}")
        injector = self.injector
        rows, row_count = injector.rows, injector.row_count
        dims = tensor.shape
        per_row = rows is not None and len(dims) >= 2 and dims[1] == rows.length and dims[0] in (1, row_count)
        copies = row_count if per_row and dims[0] != row_count else 0  # a table shared by all rows
        key = (dtype, per_row, math.prod(dims[2:]) if per_row else numel)
        planned = first if index == 0 else injector.planned(self, index, kind, call)
        if planned is not None and planned.key == key:
            self._count_elements(layout, planned.shape)
            if planned.start == planned.stop:
                return tensor
            return self._apply_planned(tensor, planned, layout, copies, args, kwargs)
        sampler = injector.sampler(layout)
        injector.remember(self, index, key)
        shape = injector.shape(sampler, per_row, key[2])
        self._count_elements(layout, shape)
        stream = self.stream_key(kind, call, index)
        if per_row:
            assert injector.row_mix is not None
            keys = mix64(injector.row_mix ^ np.uint64(stream))  # streams.row_keys(stream, rows.keys)
        else:
            keys = np.array([stream], dtype=np.uint64)
        written: list[tuple[torch.Tensor, WordAccess]] = []

        def read_words(hits: Hits) -> np.ndarray:
            target = writable(tensor, copies, args, kwargs)
            written.append((target, WordAccess(target, layout)))
            return written[0][1].read(shape.offsets[hits.site] + hits.position)

        batch = sampler.draw(shape.numels, keys, shape.p_zero, read_words)
        if not len(batch):
            return tensor
        target, access = written[0]
        write_and_count(self.stats, access, shape.offsets[batch.hits.site] + batch.hits.position, batch)
        return target

    def _count_elements(self, layout: BitLayout, shape: _Shape) -> None:
        stats = self.stats
        stats.dtype = layout.name
        stats.elements += shape.eligible_elements
        stats.eligible_bits += shape.eligible_bits
        stats.expected_elements += shape.expected_elements
        stats.expected_bits += shape.expected_bits

    def _apply_planned(
        self, tensor: torch.Tensor, planned: _Planned, layout: BitLayout, copies: int, args: tuple, kwargs: dict
    ) -> torch.Tensor:
        faults, start, stop = planned.faults, planned.start, planned.stop
        target = writable(tensor, copies, args, kwargs)
        if on_device(target, self.injector.device_mode):
            hit_masks = faults.masks[start:stop]
            index, mask = faults.on(target.device)
            counts = write_on_device(target, layout, index[start:stop], mask[start:stop], self.injector.spec.fault)
            self.device_counts = counts if self.device_counts is None else self.device_counts + counts
            self.device_width = max(self.device_width, layout.width)
            fault_bits = planned.known[1] if planned.known is not None else int(np.bitwise_count(hit_masks).sum())
            add(self.stats, stop - start, fault_bits, 0, 0, 0, [])
            return target
        if planned.known is None:  # stuck-at faults: what changes depends on the values
            access = WordAccess(target, layout)
            flat = faults.flat[start:stop]
            write_and_count(self.stats, access, flat, faults.batch(start, stop, access.read(flat)))
            return target
        # A flip's change is its mask: everything but the non-finite count is known. A zero mask
        # (never drawn, but not excluded by construction) writes its word back unchanged.
        positions, masks = faults.flat_list[start:stop], faults.mask_list[start:stop]
        nonfinite = flip(target, layout, positions, masks, faults.flat[start:stop], faults.masks[start:stop])
        hits, bits, changed, histogram = planned.known
        add(self.stats, hits, bits, changed, bits, nonfinite, histogram)
        return target


register_site(SiteKind("activations", ActivationInjector.build, per_call=True, always_reported=True))
