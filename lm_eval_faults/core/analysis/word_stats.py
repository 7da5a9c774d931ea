"""Word statistics of the exact analysis: the model's own stored words, histogrammed once per
tensor into the classes the risk model tells apart, in bounded memory and one read.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import torch

from lm_eval_faults.core.analysis.risk import RiskModel, popcount
from lm_eval_faults.core.storage.layouts import (
    BitLayout,
)
from lm_eval_faults.core.storage.words import UNSIGNED_ARRAYS

CHUNK = 1 << 17
"""Words read per pass step: the step's temporaries (about 10 bytes a word) stay in a core's L2
cache, and memory stays bounded whatever the tensor size."""

LOW_BITS = 6
"""Bits of a reduced float32 key below the word's high part: its eligible popcount (0-32) or, when
an ineligible bit lies below `RiskModel.lead_low`, that popcount (0-31) and a flag "one of those is set"."""

MIN_LEAD_LOW = 16
"""float32 is reduced only when the threshold's deciding mantissa bits all lie in the high half
(`RiskModel.lead_low` >= this); the histogram then has at most 2^22 bins. Otherwise distinct words
are counted (a sort): thresholds whose limit ends in a run of equal mantissa bits shorter than 16,
such as 1e4 (mantissa 0x1C4000) or 2.2; max/2, 100, 1000, powers of two and the value just below
any of them are reduced."""

BINCOUNT_BINS = 1 << 16
"""Histograms up to this many bins are bincounted step by step, larger ones added to in place."""

SORT_CHUNK = 1 << 22
"""Words sorted at a time when distinct words must be counted: few, long sorts, bounded memory."""


KeyFn = Callable[[np.ndarray], np.ndarray]
"""Unsigned words of one pass step -> their histogram keys (non-negative integers below the bins)."""


def word_histogram(words: torch.Tensor, risk: RiskModel) -> tuple[np.ndarray, np.ndarray]:
    """(representative words, how many stored words each stands for), from one read of `words`.

    Everything the expectations need is a function of a word's risk key, its eligible popcount and
    whether it is zero, so words may be merged when those agree. 8- and 16-bit words are simply
    counted. A float32 word (2^32 values) is reduced to its bits from `risk.lead_low` up (sign,
    exponent and the mantissa bits that can decide "above the threshold"), its eligible popcount
    and whether an ineligible bit below those is set; the lowest word with each reduced key then
    stands in for all that have it. Thresholds whose deciding bits reach below bit 16 count
    distinct words (a sort: slow, but exact).
    """
    layout = risk.layout
    if layout.width <= 16:
        return _counted_words(words, layout)
    if risk.lead_low < MIN_LEAD_LOW:
        return _distinct_words(words, layout)
    return _reduced_words(words, risk)


Reader = Callable[[int, int], np.ndarray]
"""words[start:stop] as an unsigned numpy array."""


def _reader(words: torch.Tensor, layout: BitLayout) -> Reader:
    """Views of a CPU tensor's memory; copies, chunk by chunk, from a device."""
    unsigned = UNSIGNED_ARRAYS[layout.width]
    if words.device.type == "cpu":
        array = words.numpy().view(unsigned)
        return lambda start, stop: array[start:stop]
    return lambda start, stop: words[start:stop].cpu().numpy().view(unsigned)


def _key_counts(words: torch.Tensor, layout: BitLayout, bins: int, make_keys: Callable[[int], KeyFn]) -> tuple[np.ndarray, np.ndarray]:
    """(the distinct keys of all words, as int64, and how many words have each).

    `make_keys(step)` gives a key function with its own scratch memory for that many words. A
    tensor with few words for the bins has its keys sorted (cheaper than zeroing and scanning the
    bins); otherwise a histogram is filled a step of words at a time, the steps shared out among
    torch's threads (numpy's loops run without the GIL).
    """
    read = _reader(words, layout)
    numel = words.numel()
    if numel * 8 < bins:
        keys, counts = np.unique(make_keys(numel)(read(0, numel)), return_counts=True)
        return keys.astype(np.int64), counts.astype(np.int64)
    hist = _key_histogram(read, numel, bins, make_keys)
    keys = np.flatnonzero(hist)
    return keys, hist[keys]


def _key_histogram(read: Reader, numel: int, bins: int, make_keys: Callable[[int], KeyFn]) -> np.ndarray:
    """Up to `BINCOUNT_BINS` bins, each step is bincounted (steps of at least 4x the bins, so zeroing
    the step's histogram stays a small share); above, counts are added in place (`np.add.at`),
    which never zeroes a histogram and beats bincount there."""
    dense = bins <= BINCOUNT_BINS
    step = max(CHUNK, 4 * bins) if dense else CHUNK
    starts = range(0, numel, step)
    workers = min(torch.get_num_threads(), len(starts))

    def count(share: range) -> np.ndarray:
        keys_of = make_keys(step)
        hist = np.zeros(bins, dtype=np.int64)
        for start in share:
            keys = keys_of(read(start, start + step))
            if dense:
                hist += np.bincount(keys, minlength=bins)
            else:
                np.add.at(hist, keys, 1)
        return hist

    if workers <= 1:
        return count(starts)
    return np.sum(list(_pool(workers, os.getpid()).map(count, [starts[i::workers] for i in range(workers)])), axis=0)


@lru_cache(maxsize=1)
def _pool(workers: int, pid: int) -> ThreadPoolExecutor:
    """One pool per process (keyed by pid: a forked child must not inherit a pool without threads)."""
    return ThreadPoolExecutor(workers, thread_name_prefix="lm_eval_faults-analysis")


def _counted_words(words: torch.Tensor, layout: BitLayout) -> tuple[np.ndarray, np.ndarray]:
    bins = 1 << layout.width
    return _key_counts(words, layout, bins, lambda step: lambda chunk: chunk)


def _distinct_words(words: torch.Tensor, layout: BitLayout) -> tuple[np.ndarray, np.ndarray]:
    read = _reader(words, layout)
    found = [np.unique(read(start, start + SORT_CHUNK), return_counts=True) for start in range(0, words.numel(), SORT_CHUNK)]
    values, inverse = np.unique(np.concatenate([v for v, _ in found]), return_inverse=True)
    counts = np.bincount(inverse, weights=np.concatenate([c for _, c in found])).astype(np.int64)
    return values.astype(np.int64), counts


def _reduced_words(words: torch.Tensor, risk: RiskModel) -> tuple[np.ndarray, np.ndarray]:
    layout, shift = risk.layout, risk.lead_low
    unsigned = UNSIGNED_ARRAYS[layout.width]
    eligible = risk.eligible_mask
    every = eligible == (1 << layout.width) - 1
    fixed = risk.ineligible_low_mask
    bins = 1 << (layout.width - shift + LOW_BITS)

    def make_keys(step: int) -> KeyFn:
        scratch, ones, key = np.empty(step, unsigned), np.empty(step, np.uint8), np.empty(step, unsigned)

        def keys_of(chunk: np.ndarray) -> np.ndarray:
            n = len(chunk)
            s, o, k = scratch[:n], ones[:n], key[:n]
            np.bitwise_count(chunk if every else np.bitwise_and(chunk, eligible, out=s), out=o)
            np.right_shift(chunk, shift, out=k)
            np.left_shift(k, LOW_BITS, out=k)
            np.bitwise_or(k, o, out=k)
            if fixed:
                np.bitwise_and(chunk, fixed, out=s)
                np.minimum(s, 1, out=s)
                np.left_shift(s, LOW_BITS - 1, out=s)
                np.bitwise_or(k, s, out=k)
            return k

        return keys_of

    keys, counts = _key_counts(words, layout, bins, make_keys)
    return _stand_ins(keys, risk, fixed), counts


def _stand_ins(keys: np.ndarray, risk: RiskModel, fixed: int) -> np.ndarray:
    """The lowest word with each reduced key: the same bits from `lead_low` up, the same eligible
    popcount (its remaining ones in the lowest eligible positions below), and the lowest of the
    ineligible bits below (`fixed`) where the key says one of them is set."""
    shift = risk.lead_low
    flag = 1 << (LOW_BITS - 1)
    low = keys & ((1 << LOW_BITS) - 1)
    ones, has_fixed = (low & (flag - 1), low >= flag) if fixed else (low, np.zeros(len(keys), dtype=bool))
    high = (keys >> LOW_BITS) << shift
    below = np.array([1 << b for b in range(shift) if risk.eligible_mask >> b & 1], dtype=np.int64)
    first_ones = np.concatenate([[0], np.cumsum(below)])
    words = high | first_ones[ones - popcount(high & risk.eligible_mask)]
    return words | np.where(has_fixed, fixed & -fixed, 0)


@dataclass
class WordStats:
    """What the expectations need from one tensor's stored words; independent of the fault rates.

    `key_values`/`key_counts`: histogram of the risk keys of good words (finite, not above the
    threshold). `eligible_popcount[k]`: words with k ones among the eligible bits. `nonzero`:
    words that are not all-zero bits.
    """

    numel: int
    key_values: np.ndarray
    key_counts: np.ndarray
    eligible_popcount: np.ndarray
    nonzero: int

    @property
    def eligible_ones(self) -> int:
        """Ones stored in eligible bits, over all words."""
        return int(np.arange(len(self.eligible_popcount)) @ self.eligible_popcount)


def word_stats(words: torch.Tensor, risk: RiskModel) -> WordStats:
    """Risk-key histogram (of good words), eligible-popcount histogram and non-zero count of a tensor."""
    values, counts = word_histogram(words, risk)
    keys, good = risk.keys(values)
    key_values, inverse = np.unique(keys[good], return_inverse=True)
    key_counts = np.bincount(inverse, weights=counts[good], minlength=len(key_values)).astype(np.int64)
    eligible_popcount = np.bincount(popcount(values & risk.eligible_mask), weights=counts, minlength=len(risk.eligible) + 1)
    return WordStats(words.numel(), key_values, key_counts, eligible_popcount.astype(np.int64), int(counts[values != 0].sum()))
