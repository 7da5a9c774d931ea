"""Fault counts: what a drawn batch did at each site, and what a spec is expected to do there.

The report's counts (`report.SiteStats`) are filled from these, and `check_not_silent`
compares them with the expectation: the RRAM simulator once applied no noise in silence.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from lm_eval_faults.core.faults.host import FaultBatch
from lm_eval_faults.core.report import FAULT_COUNT_FIELDS, SiteStats, add_lists
from lm_eval_faults.core.sampling.host import element_rate
from lm_eval_faults.core.spec import FaultSpec
from lm_eval_faults.core.storage.layouts import BitLayout


def expected_counts(spec: FaultSpec, numel: int, eligible: tuple[int, ...], width: int) -> tuple[float, float]:
    """Expected (hit elements, fault bits) at one site: what `check_not_silent` compares against.

    Under a pattern the first figure is the expected number of *events* (each hits one or more
    words), so that "none landed" is judged by P(no event) = exp(-events); the bits are the
    events' bits (an upper bound: overlapping events, or a row cut off at a tensor's end, hit fewer).
    """
    pattern = spec.pattern_shape
    if pattern is not None:
        rate = (spec.p_sa0 or 0.0) + (spec.p_sa1 or 0.0) if pattern.stuck_at else spec.rate
        events = float(pattern.slots(np.array([numel]), width, eligible)[0]) * rate
        words = min(pattern.words_per_event(width, eligible), numel)
        return events, events * words * (pattern.bits_per_word(width, eligible) if spec.per_bit else 0)
    eligible_bits = len(eligible)
    if spec.per_bit:
        # For asymmetric flips the exact expectation depends on the data; this is an upper bound.
        return numel * element_rate(spec.rate, eligible_bits), numel * eligible_bits * spec.rate
    return numel * spec.p, 0.0


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

    Read off the words: a float is non-finite exactly when its `nonfinite_mask` bits are all ones
    (the exponent field's, but for FP8 E4M3, whose only non-finite words are S.1111.111).
    """
    mask = layout.nonfinite_mask
    if not mask:
        return np.zeros(len(old), dtype=bool)
    return (old & mask != mask) & (new & mask == mask)
