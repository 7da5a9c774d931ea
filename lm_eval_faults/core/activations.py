"""Transient faults on module outputs: fresh faults at every forward call, nothing retained.

One forward hook per targeted module corrupts the floating-point tensors in its output (a
tensor, a tuple or list of them, or a ModelOutput / dict), in loglikelihood scoring and in
generation with a KV cache alike. The hook keeps only integer counters, so memory stays flat
however many calls are made (the RRAM study's tool leaked).

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

import contextlib
import itertools
from collections.abc import Iterator, Mapping, MutableMapping
from dataclasses import dataclass
from typing import Any, cast

import numpy as np
import torch
from torch.utils.hooks import RemovableHandle

from lm_eval_faults.core.faults import count_by_site, draw_faults
from lm_eval_faults.core.formats import LAYOUTS, BitLayout, resolve_bits
from lm_eval_faults.core.report import SiteStats
from lm_eval_faults.core.sampling import Hits
from lm_eval_faults.core.spec import FaultSpec
from lm_eval_faults.core.streams import StreamKind, row_keys, site_key, spec_key
from lm_eval_faults.core.targets import ModuleSite
from lm_eval_faults.core.weights import expected_counts
from lm_eval_faults.core.words import WordAccess


@dataclass(frozen=True)
class Rows:
    """The rows of one forward call: each row's request key and its real positions [start, end).

    Positions index the sequence dimension (dim 1) of batch-first outputs; everything outside
    [start, end) is padding and is never faulted.
    """

    keys: np.ndarray
    starts: np.ndarray
    ends: np.ndarray
    length: int

    def __len__(self) -> int:
        return len(self.keys)


class ActivationInjector:
    """Attaches fault hooks to modules; `stats` accumulates per module over all calls."""

    def __init__(self, spec: FaultSpec, sites: list[ModuleSite]) -> None:
        self.spec = spec
        self.sites = sites
        self.stats: dict[str, SiteStats] = {}
        self.paused = False
        self.rows: Rows | None = None
        self.forward_number = 0
        self._handles: list[RemovableHandle] = []
        self._eligible: dict[torch.dtype, tuple[int, ...]] = {}
        self._spec_key = spec_key(spec.seed, spec.sampling_key())

    def attach(self) -> None:
        """Register one hook per site; if any registration fails, none stays registered."""
        if self._handles:
            return
        try:
            for site in self.sites:
                self.stats.setdefault(site.name, SiteStats(site.name, site.component, site.layer, "", 0, 0, 0.0, 0.0))
                hook = _OutputFaultHook(self, site)
                self._handles.append(site.module.register_forward_hook(hook, with_kwargs=True))
        except BaseException:
            self.detach()
            raise

    def detach(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    @contextlib.contextmanager
    def pause(self) -> Iterator[None]:
        """No faults and no counts inside (lm-eval's batch-size probes, calibration passes)."""
        previous, self.paused = self.paused, True
        try:
            yield
        finally:
            self.paused = previous

    def next_forward(self, rows: Rows | None) -> None:
        """Start a new forward pass (module call numbers restart); `rows` describes its batch."""
        self.forward_number += 1
        self.rows = rows

    def eligible_bits(self, layout: BitLayout) -> tuple[int, ...]:
        if layout.dtype not in self._eligible:
            self._eligible[layout.dtype] = resolve_bits(layout, self.spec.bits) if self.spec.per_bit else layout.all_bits
        return self._eligible[layout.dtype]

    def key(self, name: str, kind: StreamKind, *indices: int) -> int:
        return site_key(self._spec_key, name, kind, *indices)


class _OutputFaultHook:
    """The forward hook of one module. Holds counters only, never tensors."""

    def __init__(self, injector: ActivationInjector, site: ModuleSite) -> None:
        self.injector = injector
        self.name = site.name
        self.stats = injector.stats[site.name]
        self._forward = -1
        self._calls_in_forward = 0

    def __call__(self, module: torch.nn.Module, args: tuple, kwargs: dict, output: Any) -> Any:
        injector = self.injector
        if injector.paused:
            return output
        rows = injector.rows
        if rows is None:
            call, kind = self.stats.calls, StreamKind.CALL
        else:
            if self._forward != injector.forward_number:
                self._forward, self._calls_in_forward = injector.forward_number, 0
            call, kind = self._calls_in_forward, StreamKind.REQUEST
            self._calls_in_forward += 1
        self.stats.calls += 1
        tensor_index = itertools.count()
        inputs = (*args, *kwargs.values())  # looked at only if a fault lands (see _corrupt_tensor)
        with torch.no_grad():
            return self._corrupt(output, lambda: injector.key(self.name, kind, call, next(tensor_index)), rows, inputs)

    def _corrupt(self, value: Any, next_key: Any, rows: Rows | None, inputs: tuple) -> Any:
        if isinstance(value, torch.Tensor):
            return self._corrupt_tensor(value, next_key(), rows, inputs)
        if isinstance(value, Mapping):  # ModelOutput and plain dicts
            # Both are mutable; a read-only mapping that holds a tensor fails loudly on assignment.
            mapping = cast("MutableMapping[Any, Any]", value)
            for key in list(mapping.keys()):
                if isinstance(mapping[key], torch.Tensor):
                    mapping[key] = self._corrupt_tensor(mapping[key], next_key(), rows, inputs)
            return mapping
        if isinstance(value, (tuple, list)):
            corrupted = [self._corrupt(item, next_key, rows, inputs) for item in value]
            return type(value)(corrupted) if isinstance(value, list) else tuple(corrupted)
        return value

    def _corrupt_tensor(self, tensor: torch.Tensor, key: int, rows: Rows | None, inputs: tuple) -> torch.Tensor:
        if not tensor.is_floating_point() or tensor.numel() == 0:
            return tensor
        layout = LAYOUTS.get(tensor.dtype)
        if layout is None:  # float64, float8...: fail, never skip what was selected in silence
            supported = ", ".join(lay.name for lay in LAYOUTS.values() if lay.is_float)
            raise TypeError(f"module {self.name!r} outputs {tensor.dtype} activations, which cannot be faulted; supported: {supported}")
        per_row = rows is not None and tensor.dim() >= 2 and tensor.shape[1] == rows.length and tensor.shape[0] in (1, len(rows))
        broadcast = per_row and rows is not None and tensor.shape[0] != len(rows)  # a table shared by all rows
        if per_row:
            assert rows is not None
            inner = tensor[0, 0].numel()
            row_size = rows.length * inner
            numels = (rows.ends - rows.starts).astype(np.int64) * inner
            offsets = np.arange(len(rows), dtype=np.int64) * row_size + rows.starts.astype(np.int64) * inner
            keys = row_keys(key, rows.keys)
        else:
            numels = np.array([tensor.numel()], dtype=np.int64)
            offsets = np.zeros(1, dtype=np.int64)
            keys = np.array([key], dtype=np.uint64)
        spec = self.injector.spec
        eligible = self.injector.eligible_bits(layout)
        eligible_elements = int(numels.sum())
        expected_elements, expected_bits = expected_counts(spec, eligible_elements, len(eligible))
        stats = self.stats
        stats.dtype = layout.name
        stats.elements += eligible_elements
        stats.eligible_bits += eligible_elements * len(eligible)
        stats.expected_elements += expected_elements
        stats.expected_bits += expected_bits

        target = tensor
        access: WordAccess | None = None

        def read_words(hits: Hits) -> np.ndarray:
            nonlocal target, access
            # Outputs that alias an input (Identity, eval-mode Dropout, views) must not be
            # corrupted in place: the input may be read again (residual connections).
            if broadcast:  # each row gets its own faults, so each needs its own copy
                target = target.expand(len(numels), *target.shape[1:]).contiguous()
            elif not target.is_contiguous() or target.untyped_storage().data_ptr() in _storages(inputs):
                target = target.contiguous() if not target.is_contiguous() else target.clone()
            access = WordAccess(target, layout)
            return access.read(offsets[hits.site] + hits.position)

        batch = draw_faults(numels, keys, read_words, spec, layout, eligible)
        if not len(batch):
            return tensor
        changed = batch.only_changed()
        assert access is not None
        access.write(offsets[changed.hits.site] + changed.hits.position, changed.new)
        count_by_site(batch, len(numels), layout).add_to([stats] * len(numels))
        return target


def _storages(values: tuple) -> set[int]:
    """Storage addresses of the tensors among `values` (one level deep, as modules receive them)."""
    found: set[int] = set()
    for value in values:
        if isinstance(value, torch.Tensor):
            found.add(value.untyped_storage().data_ptr())
        elif isinstance(value, (tuple, list)):
            found |= {v.untyped_storage().data_ptr() for v in value if isinstance(v, torch.Tensor)}
    return found
