"""What a fault does at the positions the sampler chose: bit flips, stuck-at bits, value errors.

All arithmetic happens on the CPU, in numpy, on the k stored words that were hit (as unsigned
integers), for every site of a group at once, so the result is bit-identical wherever the
tensors live. Callers gather the old words and scatter the new ones; the cost is O(k).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

import numpy as np
import torch

from lm_eval_faults.core.report import FAULT_COUNT_FIELDS, SiteStats, add_lists
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

Words = TypeVar("Words", np.ndarray, torch.Tensor)


def bit_fault_words(fault: str, old: Words, masks: Words) -> Words:
    """What a bit fault makes of the stored words it hits: stuck-at clears or sets the mask's bits,
    a flip toggles them. The same operators on numpy arrays (host) and torch tensors (device)."""
    if fault == "stuck0":
        return old & ~masks
    if fault == "stuck1":
        return old | masks
    return old ^ masks


_THIN_STRIDE = 64
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
    if spec.per_bit:
        return _bit_faults(numels, keys, read_words, spec, layout, eligible_bits)
    hits = bernoulli_hits(numels, spec.p, keys)
    if not len(hits):
        return NO_FAULTS
    old = read_words(hits)
    if spec.fault == "zero":
        new = np.zeros_like(old)
    else:
        low, high = spec.value_range
        u = to_uniform(random_words(keys[hits.site], Purpose.VALUE, hits.rank.astype(np.uint64)))
        new = uniform_words(low + (high - low) * u, layout)
    return FaultBatch(hits, np.zeros_like(old), old, new)


def _bit_faults(
    numels: np.ndarray,
    keys: np.ndarray,
    read_words: WordReader,
    spec: FaultSpec,
    layout: BitLayout,
    eligible_bits: tuple[int, ...],
) -> FaultBatch:
    rate = max(spec.p01 or 0.0, spec.p10 or 0.0) if spec.asymmetric else spec.p
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
        index = rank[candidates].astype(np.uint64) * np.uint64(_THIN_STRIDE) + np.uint64(bit)
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


@dataclass(frozen=True)
class SiteCounts:
    """What a batch did to each of `sites` sites: one entry (or histogram row) per site."""

    hit_elements: np.ndarray
    fault_bits: np.ndarray
    changed_elements: np.ndarray
    flipped_bits: np.ndarray
    nonfinite_created: np.ndarray
    bit_histogram: np.ndarray

    def add_to(self, stats: list[SiteStats]) -> None:
        """Add each site's counts to its running stats (activations add one batch per call)."""
        columns = [getattr(self, name).tolist() for name in FAULT_COUNT_FIELDS]
        for site in np.flatnonzero(self.hit_elements | self.changed_elements).tolist():
            target = stats[site]
            for name, column in zip(FAULT_COUNT_FIELDS, columns, strict=True):
                setattr(target, name, getattr(target, name) + column[site])
            target.bit_histogram = add_lists(target.bit_histogram, self.bit_histogram[site].tolist())


def count_by_site(batch: FaultBatch, sites: int, layout: BitLayout, read: FaultBatch | None = None) -> SiteCounts:
    """Per-site counts of a batch in a few vectorised passes (bincounts), never a loop over hits.

    Hits and fault bits count the faults drawn (`batch`); changes count what the model reads
    (`read`: the batch after protection, by default the batch itself).
    """
    read = batch if read is None else read
    site = read.hits.site
    diff = read.old ^ read.new

    def per_site(where: np.ndarray, weights: np.ndarray | None = None) -> np.ndarray:
        return np.bincount(where, weights=weights, minlength=sites).astype(np.int64)

    return SiteCounts(
        hit_elements=per_site(batch.hits.site),
        fault_bits=per_site(batch.hits.site, np.bitwise_count(batch.fault_bits)),
        changed_elements=per_site(site, (diff != 0).astype(np.float64)),
        flipped_bits=per_site(site, np.bitwise_count(diff)),
        nonfinite_created=per_site(site, becomes_nonfinite(read.old, read.new, layout).astype(np.float64)),
        bit_histogram=_bit_histograms(site, diff, sites, layout.width),
    )


_BITS_OF_BYTE = ((np.arange(256)[:, None] >> np.arange(8)) & 1).astype(np.float64)
"""Row v: the 8 bits of byte value v, least significant first. Float, so the product below runs
in BLAS (an integer matmul does not); counts stay exact far beyond any fault count (2^53)."""


def _bit_histograms(site: np.ndarray, diff: np.ndarray, sites: int, width: int) -> np.ndarray:
    """Changed elements per (site, bit position): a bincount of (site, byte value) per byte lane,
    then byte values to bits by one small matrix product (an order faster than unpacking bits).
    Only sites that hold hits take part, so a model's clean tensors cost nothing here."""
    histogram = np.zeros((sites, width), dtype=np.int64)
    if not len(site):
        return histogram
    present, compact = np.unique(site, return_inverse=True)
    lanes = (width + 7) // 8
    as_bytes = diff.astype("<u8").view(np.uint8).reshape(-1, 8)
    per_lane = [
        np.bincount(compact * 256 + as_bytes[:, lane], minlength=len(present) * 256).reshape(-1, 256) @ _BITS_OF_BYTE
        for lane in range(lanes)
    ]
    histogram[present] = np.concatenate(per_lane, axis=1)[:, :width].round().astype(np.int64)
    return histogram


def becomes_nonfinite(old: np.ndarray, new: np.ndarray, layout: BitLayout) -> np.ndarray:
    """Elements that were finite before the fault and are NaN or +-Inf after it.

    A float is non-finite exactly when its exponent field is all ones: read it off the words.
    """
    if not layout.is_float:
        return np.zeros(len(old), dtype=bool)
    shift, ones = layout.exponent[0], (1 << len(layout.exponent)) - 1
    return ((old >> shift) & ones != ones) & ((new >> shift) & ones == ones)
