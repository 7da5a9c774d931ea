"""Persistent faults on parameters, with an undo log so that restoring is exact and O(k).

The undo log holds only the touched words (positions and original bits), so a sweep can inject,
evaluate and restore thousands of times on one loaded model without ever reloading weights and
without keeping a copy of the model.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from tqdm.auto import tqdm

from lm_eval_faults.faults import bit_histogram, draw_faults, popcount
from lm_eval_faults.formats import BitLayout, from_unsigned, layout_of, resolve_bits, to_unsigned
from lm_eval_faults.report import SiteStats
from lm_eval_faults.sampling import SiteStream, element_rate, site_key, spec_key
from lm_eval_faults.spec import FaultSpec
from lm_eval_faults.targets import ParamSite


@dataclass(frozen=True)
class UndoEntry:
    """The original stored words at the positions one injection changed."""

    words: torch.Tensor
    positions: torch.Tensor
    original: torch.Tensor


def flat_words(tensor: torch.Tensor, layout: BitLayout) -> torch.Tensor:
    """A flat integer view sharing storage with `tensor`: writes to it change the tensor's bits."""
    if not tensor.is_contiguous():
        raise ValueError("cannot fault a non-contiguous parameter in place")
    if tensor.device.type == "meta":
        raise ValueError("cannot fault a parameter on the meta device (offloaded weights are not supported)")
    return tensor.detach().view(-1).view(layout.int_view)


def expected_counts(spec: FaultSpec, numel: int, eligible_bits: int) -> tuple[float, float]:
    """Expected (hit elements, fault bits) at one site: what `check_not_silent` compares against."""
    if spec.per_bit:
        rates = (spec.p01 or 0.0, spec.p10 or 0.0) if spec.asymmetric else (spec.p,)
        rate = max(rates)
        # For asymmetric flips the exact expectation depends on the data; this is an upper bound.
        return numel * element_rate(rate, eligible_bits), numel * eligible_bits * rate
    return numel * spec.p, 0.0


class WeightInjector:
    """Injects one spec's faults into a list of parameter sites, and undoes them."""

    def __init__(self, spec: FaultSpec, sites: list[ParamSite]) -> None:
        self.spec = spec
        self.sites = sites
        self._spec_key = spec_key(spec.seed, spec.sampling_key())
        self._undo: list[UndoEntry] = []

    def apply(self, progress: bool = False) -> list[SiteStats]:
        """Fault every site once; returns per-site counts. Calling twice without restore is an error."""
        if self._undo:
            raise RuntimeError("faults are already applied; call restore() first")
        stats = []
        with torch.no_grad():
            for site in tqdm(self.sites, desc="injecting faults", unit="tensor", disable=not progress):
                stats.append(self._fault_site(site))
        return stats

    def _fault_site(self, site: ParamSite) -> SiteStats:
        layout = layout_of(site.param.dtype)
        eligible = resolve_bits(layout, self.spec.bits) if self.spec.per_bit else layout.all_bits
        numel = site.param.numel()
        words: torch.Tensor | None = None

        def read_words(positions: np.ndarray) -> np.ndarray:
            nonlocal words
            words = flat_words(site.param, layout)
            index = torch.from_numpy(positions).to(words.device)
            return to_unsigned(words[index].cpu(), layout).numpy()

        stream = SiteStream(site_key(self._spec_key, site.name))
        batch = draw_faults(numel, read_words, self.spec, layout, eligible, stream)
        expected_elements, expected_bits = expected_counts(self.spec, numel, len(eligible))
        stats = SiteStats(
            name=site.name,
            component=site.component,
            layer=site.layer,
            dtype=layout.name,
            elements=numel,
            eligible_bits=numel * len(eligible),
            expected_elements=expected_elements,
            expected_bits=expected_bits,
            bit_histogram=[0] * layout.width,
            shared_with=list(site.names[1:]),
        )
        if words is None:  # no fault landed: the tensor was never touched
            return stats
        changed = batch.only_changed()
        if len(changed.positions):
            positions = torch.from_numpy(changed.positions).to(words.device)
            self._undo.append(UndoEntry(words, positions, from_unsigned(torch.from_numpy(changed.old), layout).to(words.device)))
            words[positions] = from_unsigned(torch.from_numpy(changed.new), layout).to(words.device)
        stats.hit_elements = len(batch.positions)
        stats.fault_bits = popcount(batch.fault_bits)
        stats.changed_elements = len(changed.positions)
        stats.flipped_bits = popcount(changed.old ^ changed.new)
        stats.nonfinite_created = nonfinite_created(changed.old, changed.new, layout)
        stats.bit_histogram = bit_histogram(changed.old, changed.new, layout.width).tolist()
        return stats

    def restore(self) -> None:
        """Write the original words back: the model is bit-identical to before `apply`."""
        with torch.no_grad():
            for entry in reversed(self._undo):
                entry.words[entry.positions] = entry.original
        self._undo.clear()


def nonfinite_created(old: np.ndarray, new: np.ndarray, layout: BitLayout) -> int:
    """Elements that were finite before the fault and are NaN or +-Inf after it.

    A float is non-finite exactly when its exponent field is all ones: read it off the words.
    """
    if not layout.is_float or not len(old):
        return 0
    shift, ones = layout.exponent[0], (1 << len(layout.exponent)) - 1
    was_finite = (old >> shift) & ones != ones
    is_finite = (new >> shift) & ones != ones
    return int(np.count_nonzero(was_finite & ~is_finite))
