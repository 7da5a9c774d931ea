"""Transient faults on module outputs: fresh faults at every forward call, nothing retained.

One forward hook per targeted module corrupts the floating-point tensors in its output (a
tensor, a tuple or list of them, or a ModelOutput / dict), in loglikelihood scoring and in
generation with a KV cache alike. Tensor j of call i of module m draws from stream i * 256 + j
of the site keyed by (seed, m, spec), so a run is reproducible; the hook keeps only integer
counters, so memory stays flat however many calls are made (the RRAM study's tool leaked).
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator, Mapping
from typing import Any

import numpy as np
import torch
from torch.utils.hooks import RemovableHandle

from lm_eval_faults.faults import count_by_site, draw_faults
from lm_eval_faults.formats import LAYOUTS, BitLayout, resolve_bits
from lm_eval_faults.report import SiteStats
from lm_eval_faults.sampling import Hits, site_key, spec_key
from lm_eval_faults.spec import FaultSpec
from lm_eval_faults.targets import ModuleSite
from lm_eval_faults.weights import expected_counts
from lm_eval_faults.words import WordAccess


TENSORS_PER_CALL = 256
"""Streams reserved per forward call, one per output tensor (outputs hold a handful)."""


class ActivationInjector:
    """Attaches fault hooks to modules; `stats` accumulates per module over all calls."""

    def __init__(self, spec: FaultSpec, sites: list[ModuleSite]) -> None:
        self.spec = spec
        self.sites = sites
        self.stats: dict[str, SiteStats] = {}
        self._handles: list[RemovableHandle] = []
        self._eligible: dict[torch.dtype, tuple[int, ...]] = {}

    def attach(self) -> None:
        if self._handles:
            return
        key_of_spec = spec_key(self.spec.seed, self.spec.sampling_key())
        for site in self.sites:
            self.stats.setdefault(site.name, SiteStats(site.name, site.component, site.layer, "", 0, 0, 0.0, 0.0))
            hook = _OutputFaultHook(self, site, key_of_spec)
            self._handles.append(site.module.register_forward_hook(hook, with_kwargs=True))

    def detach(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def eligible_bits(self, layout: BitLayout) -> tuple[int, ...]:
        if layout.dtype not in self._eligible:
            self._eligible[layout.dtype] = resolve_bits(layout, self.spec.bits) if self.spec.per_bit else layout.all_bits
        return self._eligible[layout.dtype]


class _OutputFaultHook:
    """The forward hook of one module. Holds counters only, never tensors."""

    def __init__(self, injector: ActivationInjector, site: ModuleSite, key_of_spec: bytes) -> None:
        self.injector = injector
        self.stats = injector.stats[site.name]
        self.key_of_spec = key_of_spec
        self.name = f"activation:{site.name}"

    def __call__(self, module: torch.nn.Module, args: tuple, kwargs: dict, output: Any) -> Any:
        # Tensor i of call c draws with the key of stream c * 256 + i: independent, reproducible.
        first = self.stats.calls * TENSORS_PER_CALL
        keys = (site_key(self.key_of_spec, self.name, first + i) for i in itertools.count())
        self.stats.calls += 1
        inputs = (*args, *kwargs.values())  # looked at only if a fault lands (see read_words)
        with torch.no_grad():
            return self._corrupt(output, keys, inputs)

    def _corrupt(self, value: Any, keys: Iterator[int], inputs: tuple) -> Any:
        if isinstance(value, torch.Tensor):
            return self._corrupt_tensor(value, next(keys), inputs)
        if isinstance(value, Mapping):  # ModelOutput and plain dicts
            for key in list(value.keys()):
                if isinstance(value[key], torch.Tensor):
                    value[key] = self._corrupt_tensor(value[key], next(keys), inputs)
            return value
        if isinstance(value, (tuple, list)):
            corrupted = [self._corrupt(item, keys, inputs) for item in value]
            return type(value)(corrupted) if isinstance(value, list) else tuple(corrupted)
        return value

    def _corrupt_tensor(self, tensor: torch.Tensor, key: int, inputs: tuple) -> torch.Tensor:
        layout = LAYOUTS.get(tensor.dtype)
        if layout is None or not layout.is_float or tensor.numel() == 0:
            return tensor
        spec = self.injector.spec
        eligible = self.injector.eligible_bits(layout)
        numel = tensor.numel()
        expected_elements, expected_bits = expected_counts(spec, numel, len(eligible))
        stats = self.stats
        stats.dtype = layout.name
        stats.elements += numel
        stats.eligible_bits += numel * len(eligible)
        stats.expected_elements += expected_elements
        stats.expected_bits += expected_bits

        target = tensor
        access: WordAccess | None = None

        def read_words(hits: Hits) -> np.ndarray:
            nonlocal target, access
            # Outputs that alias an input (Identity, eval-mode Dropout, views) must not be
            # corrupted in place: the input may be read again (residual connections).
            if not target.is_contiguous() or target.untyped_storage().data_ptr() in _storages(inputs):
                target = target.contiguous() if not target.is_contiguous() else target.clone()
            access = WordAccess(target, layout)
            return access.read(hits.position)

        batch = draw_faults(np.array([numel]), np.array([key], dtype=np.uint64), read_words, spec, layout, eligible)
        if not len(batch):
            return tensor
        changed = batch.only_changed()
        assert access is not None
        access.write(changed.hits.position, changed.new)
        count_by_site(batch, 1, layout).add_to([stats])
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
