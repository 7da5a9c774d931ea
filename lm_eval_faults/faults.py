"""What a fault does at the positions the sampler chose: bit flips, stuck-at bits, value errors.

All arithmetic happens on the CPU, in numpy, on the k stored words that were hit (as unsigned
integers), so the result is bit-identical wherever the tensor lives. Callers gather the old
words and scatter the new ones; the cost is O(k).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch

from lm_eval_faults.formats import BitLayout, to_unsigned
from lm_eval_faults.sampling import SiteStream, bernoulli_positions, element_rate, nonzero_masks
from lm_eval_faults.spec import FaultSpec

WordReader = Callable[[np.ndarray], np.ndarray]
"""Reads the stored words at given flat element positions, as unsigned int64."""


@dataclass(frozen=True)
class FaultBatch:
    """The faults drawn for one tensor: where, which bits, and the words before and after."""

    positions: np.ndarray
    fault_bits: np.ndarray
    old: np.ndarray
    new: np.ndarray

    @property
    def changed(self) -> np.ndarray:
        return self.old != self.new

    def only_changed(self) -> "FaultBatch":
        keep = self.changed
        return FaultBatch(self.positions[keep], self.fault_bits[keep], self.old[keep], self.new[keep])


_EMPTY = np.empty(0, dtype=np.int64)
_EMPTY.flags.writeable = False
NO_FAULTS = FaultBatch(_EMPTY, _EMPTY, _EMPTY, _EMPTY)
"""The batch of a site where no fault landed (the common case at small p): shared, read-only."""


def draw_faults(
    numel: int,
    read_words: WordReader,
    spec: FaultSpec,
    layout: BitLayout,
    eligible_bits: tuple[int, ...],
    stream: SiteStream,
) -> FaultBatch:
    """Draw this spec's faults for a tensor of `numel` elements and compute the new words.

    `read_words` is only called when a fault lands, so a clean site never touches its tensor.
    """
    if spec.per_bit:
        return _bit_faults(numel, read_words, spec, layout, eligible_bits, stream)
    positions = bernoulli_positions(numel, spec.p, stream)
    if not len(positions):
        return NO_FAULTS
    old = read_words(positions)
    if spec.fault == "zero":
        new = np.zeros_like(old)
    else:
        new = uniform_words(stream.rng.uniform(*spec.value_range, size=len(positions)), layout)
    return FaultBatch(positions, np.zeros_like(old), old, new)


def _bit_faults(
    numel: int,
    read_words: WordReader,
    spec: FaultSpec,
    layout: BitLayout,
    eligible_bits: tuple[int, ...],
    stream: SiteStream,
) -> FaultBatch:
    rate = max(spec.p01 or 0.0, spec.p10 or 0.0) if spec.asymmetric else spec.p
    positions = bernoulli_positions(numel, element_rate(rate, len(eligible_bits)), stream)
    if not len(positions):
        return NO_FAULTS
    rng = stream.rng
    masks = nonzero_masks(len(positions), rate, eligible_bits, rng)
    old = read_words(positions)
    if spec.fault == "stuck0":
        return FaultBatch(positions, masks, old, old & ~masks)
    if spec.fault == "stuck1":
        return FaultBatch(positions, masks, old, old | masks)
    if spec.asymmetric:
        masks = _thin_by_bit_value(masks, old, (spec.p01 or 0.0) / rate, (spec.p10 or 0.0) / rate, layout, rng)
        hit = masks != 0
        positions, masks, old = positions[hit], masks[hit], old[hit]
    return FaultBatch(positions, masks, old, old ^ masks)


def _thin_by_bit_value(
    masks: np.ndarray,
    old: np.ndarray,
    keep_if_zero: float,
    keep_if_one: float,
    layout: BitLayout,
    rng: np.random.Generator,
) -> np.ndarray:
    """Asymmetric flips by thinning: a candidate drawn at max(p01, p10) survives w.p. p01/max or p10/max."""
    kept = masks.copy()
    for bit in range(layout.width):
        candidates = np.flatnonzero(masks >> bit & 1)
        if not len(candidates):
            continue
        is_one = (old[candidates] >> bit & 1).astype(bool)
        survive = rng.random(len(candidates)) < np.where(is_one, keep_if_one, keep_if_zero)
        kept[candidates[~survive]] &= ~(1 << bit)
    return kept


def uniform_words(values: np.ndarray, layout: BitLayout) -> np.ndarray:
    """Stored words of float64 `values` rounded to the layout's dtype (ints: rounded and clamped)."""
    tensor = torch.from_numpy(np.ascontiguousarray(values, dtype=np.float64))
    if layout.is_float:
        stored = tensor.to(layout.dtype).view(layout.int_view)
    else:
        info = torch.iinfo(layout.dtype)
        stored = tensor.round().clamp(info.min, info.max).to(layout.dtype)
    return to_unsigned(stored, layout).numpy()


def bit_histogram(old: np.ndarray, new: np.ndarray, width: int) -> np.ndarray:
    """How many elements changed at each bit position (index 0 = least significant bit)."""
    if not len(old):
        return np.zeros(width, dtype=np.int64)
    diff_bytes = (old ^ new).astype("<u8").view(np.uint8).reshape(-1, 8)
    return np.unpackbits(diff_bytes, axis=1, bitorder="little").sum(axis=0, dtype=np.int64)[:width]


def popcount(words: np.ndarray) -> int:
    """Total number of set bits in non-negative int64 words."""
    return int(np.unpackbits(words.astype("<u8").view(np.uint8)).sum())
