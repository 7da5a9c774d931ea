"""What a fault does at the positions the sampler chose: bit flips, stuck-at bits, value errors.

All arithmetic happens on the CPU, in numpy, on the k stored words that were hit (as unsigned
integers), for every site of a group at once, so the result is bit-identical wherever the
tensors live. Callers gather the old words and scatter the new ones; the cost is O(k).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from lm_eval_faults.core.faults.kinds import bit_fault_words
from lm_eval_faults.core.patterns.events import pattern_hits, stuck_clusters
from lm_eval_faults.core.sampling.host import (
    Hits,
    Purpose,
    bernoulli_hits,
    element_rate,
    nonzero_masks,
    random_words,
    to_uniform,
)
from lm_eval_faults.core.spec import FaultSpec
from lm_eval_faults.core.storage.layouts import BitLayout, to_unsigned

WordReader = Callable[[Hits], np.ndarray]
"""Reads the stored words at the hits (site index, flat element position), as unsigned int64."""


@dataclass(frozen=True)
class FaultBatch:
    """The faults drawn for a group of sites: where, which bits, and the words before and after."""

    hits: Hits
    fault_bits: np.ndarray
    old: np.ndarray
    new: np.ndarray

    def __len__(self) -> int:
        return len(self.hits)

    def only_changed(self) -> FaultBatch:
        keep = self.old != self.new
        return FaultBatch(self.hits.select(keep), self.fault_bits[keep], self.old[keep], self.new[keep])


_EMPTY = np.empty(0, dtype=np.int64)
_EMPTY.flags.writeable = False
NO_FAULTS = FaultBatch(Hits(_EMPTY, _EMPTY, _EMPTY), _EMPTY, _EMPTY, _EMPTY)
"""The batch of sites where no fault landed (the common case at small p): shared, read-only."""

THIN_STRIDE = 64
"""THIN draws of hit r use words r * 64 + bit: one per bit position of the widest word."""


def draw_faults(
    numels: np.ndarray,
    keys: np.ndarray,
    read_words: WordReader,
    spec: FaultSpec,
    layout: BitLayout,
    eligible_bits: tuple[int, ...],
) -> FaultBatch:
    """Draw this spec's faults for sites of `numels` elements keyed by `keys`; compute the new words.

    `read_words` is only called when a fault lands, so clean sites never touch their tensors.
    """
    keys = np.asarray(keys, dtype=np.uint64)
    if spec.pattern_shape is not None:
        return _pattern_faults(numels, keys, read_words, spec, layout, eligible_bits)
    if spec.per_bit:
        return _bit_faults(numels, keys, read_words, spec, layout, eligible_bits)
    hits = bernoulli_hits(numels, spec.p, keys)
    if not len(hits):
        return NO_FAULTS
    old = read_words(hits)
    return FaultBatch(hits, np.zeros_like(old), old, _element_words(spec, keys, hits, old, layout))


def _pattern_faults(
    numels: np.ndarray,
    keys: np.ndarray,
    read_words: WordReader,
    spec: FaultSpec,
    layout: BitLayout,
    eligible_bits: tuple[int, ...],
) -> FaultBatch:
    """A correlated pattern's events (`patterns`), as the words and bit masks they hit."""
    pattern = spec.pattern_shape
    assert pattern is not None
    if pattern.stuck_at:
        hits, stuck0, stuck1 = stuck_clusters(pattern, numels, keys, spec.p_sa0 or 0.0, spec.p_sa1 or 0.0, layout.width, eligible_bits)
        if not len(hits):
            return NO_FAULTS
        old = read_words(hits)
        return FaultBatch(hits, stuck0 | stuck1, old, old & ~stuck0 | stuck1)
    hits, masks = pattern_hits(pattern, numels, keys, spec.rate, layout.width, eligible_bits)
    if not len(hits):
        return NO_FAULTS
    old = read_words(hits)
    if spec.per_bit:
        return FaultBatch(hits, masks, old, bit_fault_words(spec.fault, old, masks))
    return FaultBatch(hits, np.zeros_like(old), old, _element_words(spec, keys, hits, old, layout))


def _element_words(spec: FaultSpec, keys: np.ndarray, hits: Hits, old: np.ndarray, layout: BitLayout) -> np.ndarray:
    """What an element fault writes at `hits`: zeros, or uniform values drawn by hit rank."""
    if spec.kind.zeroes:
        return np.zeros_like(old)
    low, high = spec.value_range
    u = to_uniform(random_words(keys[hits.site], Purpose.VALUE, hits.rank.astype(np.uint64)))
    return uniform_words(low + (high - low) * u, layout)


def _bit_faults(
    numels: np.ndarray,
    keys: np.ndarray,
    read_words: WordReader,
    spec: FaultSpec,
    layout: BitLayout,
    eligible_bits: tuple[int, ...],
) -> FaultBatch:
    rate = spec.rate
    hits = bernoulli_hits(numels, element_rate(rate, len(eligible_bits)), keys)
    if not len(hits):
        return NO_FAULTS
    hit_keys = keys[hits.site]
    masks = nonzero_masks(rate, eligible_bits, hit_keys, hits.rank)
    old = read_words(hits)
    if spec.asymmetric:  # bit flips only (the spec refuses p01/p10 with another fault)
        masks = _thin_by_bit_value(masks, old, (spec.p01 or 0.0) / rate, (spec.p10 or 0.0) / rate, layout, hit_keys, hits.rank)
        kept = masks != 0
        hits, masks, old = hits.select(kept), masks[kept], old[kept]
    return FaultBatch(hits, masks, old, bit_fault_words(spec.fault, old, masks))


def _thin_by_bit_value(
    masks: np.ndarray,
    old: np.ndarray,
    keep_if_zero: float,
    keep_if_one: float,
    layout: BitLayout,
    hit_keys: np.ndarray,
    rank: np.ndarray,
) -> np.ndarray:
    """Asymmetric flips by thinning: a candidate drawn at max(p01, p10) survives w.p. p01/max or p10/max."""
    kept = masks.copy()
    for bit in range(layout.width):
        candidates = np.flatnonzero(masks >> bit & 1)
        if not len(candidates):
            continue
        is_one = (old[candidates] >> bit & 1).astype(bool)
        index = rank[candidates].astype(np.uint64) * np.uint64(THIN_STRIDE) + np.uint64(bit)
        u = to_uniform(random_words(hit_keys[candidates], Purpose.THIN, index))
        survive = u < np.where(is_one, keep_if_one, keep_if_zero)
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
