"""Know before you run: the exact expected damage of a fault spec, computed from the model's own bits.

A fault spec's expected effect is not a property of p alone: what a flip does depends on the bit
it lands on, and on the words the model actually stores. `analyze(model, spec)` reads every
targeted tensor once and returns, per parameter site and rolled up per component, the expected
number of corrupted elements and flipped bits, and the *exact* probability that each element
becomes NaN, +-Inf or a finite value larger in magnitude than a threshold -- no evaluation run,
no sampling, no assumed weight distribution.

Why it can be exact and cheap: bits flip independently, and "NaN / Inf / huge" is decided by the
exponent field, whether the mantissa ends up zero, and (for a threshold whose mantissa is not all
ones) the mantissa's leading bits. So each word is reduced to a small key -- exponent value,
number of eligible mantissa ones, whether an ineligible mantissa bit is set, leading mantissa
bits -- and one pass over the data histograms the keys. The outcome for each key is then computed
exactly: the exponent field's outcome distribution by enumerating its 2^5 or 2^8 values, times a
closed form for the mantissa. Cost: O(numel) once, plus a tiny enumeration per key.

The pass is one read of each tensor in cache-sized chunks, a handful of numpy ufuncs and one
bincount per chunk, the chunks shared among torch's threads (see `word_histogram`): 16-bit and
8-bit words are counted as they are; a float32 word is first reduced to its bits from the
threshold's deciding mantissa bit up plus its eligible popcount, a histogram of 2^15 bins for the
default threshold. Everything after the pass (keys, probabilities) works on distinct values only,
so its cost does not grow with the model.
"""

from __future__ import annotations

import math
import os
from collections import defaultdict
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from functools import cached_property, lru_cache
from typing import Any

import numpy as np
import torch
from torch import nn

from lm_eval_faults.core.sampling.host import element_rate
from lm_eval_faults.core.sites.targets import ParamSite, select_params
from lm_eval_faults.core.spec import FaultSpec, FaultSpecError, to_spec
from lm_eval_faults.core.storage.layouts import (
    BitLayout,
    from_unsigned,
    resolve_bits,
    word_value,
)
from lm_eval_faults.core.storage.words import UNSIGNED_ARRAYS, flat_words
from lm_eval_faults.core.text_table import Column, text_table

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


def bit_rates(spec: FaultSpec) -> tuple[float, float]:
    """(probability an eligible bit holding 0 changes, same for a bit holding 1) under `spec`.

    Every bit fault is a per-bit change whose probability depends only on the bit's stored value
    (see `faults.kinds.FaultKind.bit_rates`)."""
    return spec.bit_rates()


def default_threshold(layout: BitLayout) -> float:
    """Half the largest finite value: one doubling away from overflow (integers: half the max)."""
    if layout.is_float:
        return torch.finfo(layout.dtype).max / 2
    return torch.iinfo(layout.dtype).max / 2


@dataclass(frozen=True)
class RiskModel:
    """Turns stored words into risk keys and keys into exact (NaN, Inf, huge) probabilities.

    Fixed by (dtype, eligible bits, threshold); the fault rates come in only at `evaluate`, so one
    histogram of keys serves every p.
    """

    layout: BitLayout
    eligible: tuple[int, ...]
    threshold: float
    limit: int
    """Floats: the largest magnitude word whose value is <= threshold. Integers: unused."""

    @staticmethod
    def build(layout: BitLayout, eligible: Iterable[int], threshold: float | None = None) -> RiskModel:
        """The model of `layout` words with these eligible bits and threshold (default: max/2).

        Cached: every site of a dtype gets the same model, so what it derives (limit, masks) is
        computed once per analysis rather than once per tensor.
        """
        threshold = default_threshold(layout) if threshold is None else float(threshold)
        if not threshold >= 0:
            raise ValueError(f"threshold={threshold!r}: a magnitude threshold must be >= 0")
        return _risk_model(layout, tuple(sorted(eligible)), threshold)

    # -- the shape of a key ---------------------------------------------------------------

    @property
    def man_bits(self) -> int:
        return len(self.layout.mantissa)

    @property
    def exp_bits(self) -> int:
        return len(self.layout.exponent)

    @property
    def exp_max(self) -> int:
        return (1 << self.exp_bits) - 1

    @cached_property
    def lead_low(self) -> int:
        """Lowest mantissa bit that can decide "magnitude > limit" on its own.

        The bits below it are the limit mantissa's lowest run of equal bits. A run of ones (the
        default max/2, whose limit's mantissa is all ones; any threshold just below a power of
        two): a word equal to the limit down to there can no longer exceed it. A run of zeros (a
        limit such as 1000.0 or 1024.0): it exceeds iff a bit below ends up one, which depends only
        on how many eligible ones are stored there and whether an ineligible one is.
        """
        mantissa = self.limit & ((1 << self.man_bits) - 1)
        low = 0
        while low < self.man_bits and (mantissa >> low & 1) == (mantissa & 1):
            low += 1
        return low

    @property
    def low_run_zeros(self) -> bool:
        """Whether the limit mantissa's bits below `lead_low` are zeros (else ones); see `lead_low`."""
        return (self.limit & 1) == 0

    @property
    def ineligible_low_mask(self) -> int:
        """Ineligible mantissa bits below `lead_low`."""
        return ((1 << self.lead_low) - 1) & ~self.eligible_mask

    @property
    def lead_bits(self) -> int:
        return self.man_bits - self.lead_low

    def _mask(self, positions: Iterable[int]) -> int:
        return sum(1 << b for b in positions)

    @cached_property
    def eligible_mask(self) -> int:
        return self._mask(self.eligible)

    # -- words -> keys --------------------------------------------------------------------

    def keys(self, words: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(risk key of each unsigned word, mask of "good" words: finite, not above the threshold)."""
        if not self.layout.is_float:
            return words, ~self._int_bad(words)
        man = self.man_bits
        magnitude = words & ((1 << (self.layout.width - 1)) - 1)
        eligible_man = self._mask(b for b in self.eligible if b < man)
        ones = popcount(words & eligible_man)
        fixed_one = (words & ((1 << man) - 1 - eligible_man) != 0).astype(np.int64)
        lead = (words & ((1 << man) - 1)) >> self.lead_low
        key = ((((magnitude >> man) * 2 + fixed_one) * (man + 1) + ones) << self.lead_bits) | lead
        if self.low_run_zeros:
            # The low run's eligible ones are `ones` less those in `lead`; add whether an ineligible one is set there.
            key = key * 2 + ((words & self.ineligible_low_mask) != 0)
        return key, magnitude <= self.limit

    def _int_bad(self, words: np.ndarray) -> np.ndarray:
        values = from_unsigned(torch.from_numpy(words), self.layout).to(torch.float64).numpy()
        return np.abs(values) > self.threshold

    # -- keys -> probabilities ------------------------------------------------------------

    def evaluate(self, keys: np.ndarray, flip0: float, flip1: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Exact per-key probabilities that a good word becomes (NaN, +-Inf, huge finite)."""
        keys = np.asarray(keys, dtype=np.int64)
        if not self.layout.is_float:
            words = np.arange(1 << self.layout.width)
            bad = self._int_bad(words)
            transition = field_transition(tuple(range(self.layout.width)), self.eligible, flip0, flip1)
            huge = transition[:, bad].sum(axis=1)[keys]
            return np.zeros(len(keys)), np.zeros(len(keys)), huge
        man, lead_bits = self.man_bits, self.lead_bits
        low_fixed = keys & 1 if self.low_run_zeros else np.zeros(len(keys), dtype=np.int64)
        keys = keys >> 1 if self.low_run_zeros else keys
        lead = keys & ((1 << lead_bits) - 1)
        rest = keys >> lead_bits
        ones = rest % (man + 1)
        fixed_one = (rest // (man + 1)) % 2
        exponent = rest // (2 * (man + 1))
        # Rows are picked after the reductions: the matrix is 2^8 rows, the keys may be many more.
        transition = field_transition(self.layout.exponent, self.eligible, flip0, flip1)
        to_top = transition[exponent, self.exp_max]
        zeros = sum(1 for b in self.eligible if b < man) - ones
        # The mantissa ends up zero iff every eligible one changes and every eligible zero holds.
        log_zero_mantissa = np.where(fixed_one == 1, -np.inf, _count_log(ones, _log(flip1)) + _count_log(zeros, _log1m(flip0)))
        inf = to_top * np.exp(log_zero_mantissa)
        nan = to_top * -np.expm1(log_zero_mantissa)
        limit_exponent = self.limit >> man
        huge = transition[:, limit_exponent + 1 : self.exp_max].sum(axis=1)[exponent]
        huge = huge + transition[exponent, limit_exponent] * self._lead_exceeds(lead, ones, low_fixed, flip0, flip1)
        return nan, inf, huge

    def _lead_exceeds(self, lead: np.ndarray, ones: np.ndarray, low_fixed: np.ndarray, flip0: float, flip1: float) -> np.ndarray:
        """P(faulted mantissa > the limit's mantissa), from the leading bits that can decide it and,
        when the limit's low run is zeros, the eligible ones and ineligible-one flag below them."""
        equal = np.ones(len(lead))
        greater = np.zeros(len(lead))
        for bit in range(self.man_bits - 1, self.lead_low - 1, -1):
            stored = lead >> (bit - self.lead_low) & 1
            if bit in self.eligible:
                one = np.where(stored == 1, 1.0 - flip1, flip0)
                zero = np.where(stored == 1, flip1, 1.0 - flip0)
            else:
                one, zero = stored.astype(np.float64), 1.0 - stored
            if self.limit >> bit & 1:
                equal = equal * one
            else:
                greater = greater + equal * one
                equal = equal * zero
        if self.low_run_zeros:
            # Equal down to lead_low, the mantissa exceeds iff the low run does not end all zeros.
            eligible_low = [b for b in self.eligible if b < self.lead_low]
            low_ones = ones - popcount(lead << self.lead_low & self.eligible_mask)
            log_all_zero = _count_log(low_ones, _log(flip1)) + _count_log(len(eligible_low) - low_ones, _log1m(flip0))
            greater = greater + equal * -np.expm1(np.where(low_fixed == 1, -np.inf, log_all_zero))
        return greater

    def word_risks(self, words: np.ndarray, flip0: float, flip1: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Per-word (NaN, Inf, huge) probabilities of unsigned stored words (0 for words already bad)."""
        keys, good = self.keys(np.asarray(words, dtype=np.int64))
        nan, inf, huge = self.evaluate(keys, flip0, flip1)
        return nan * good, inf * good, huge * good

    def uniform_risks(self, low: float, high: float) -> tuple[float, float]:
        """(P(+-Inf), P(huge finite)) for one value fault: a U(low, high) draw rounded to the dtype."""
        if self.layout.is_float:
            value = lambda word: word_value(word, self.layout)  # noqa: E731
            largest = (self.exp_max << self.man_bits) - 1
            overflow = value(largest) + (value(largest) - value(largest - 1)) / 2
            rounds_above = (value(self.limit) + value(self.limit + 1)) / 2 if self.limit < largest else overflow
        else:
            overflow, rounds_above = math.inf, math.floor(self.threshold) + 0.5
        return _magnitude_share(low, high, overflow, math.inf), _magnitude_share(low, high, rounds_above, overflow)


@lru_cache(maxsize=256)
def _risk_model(layout: BitLayout, eligible: tuple[int, ...], threshold: float) -> RiskModel:
    limit = 0
    if layout.is_float:
        # Finite magnitudes are ordered like their words, so bisect the words for the threshold.
        low, high = 0, ((1 << len(layout.exponent)) - 1 << len(layout.mantissa)) - 1
        while low < high:
            middle = (low + high + 1) // 2
            low, high = (middle, high) if word_value(middle, layout) <= threshold else (low, middle - 1)
        limit = low
    return RiskModel(layout, eligible, threshold, limit)


def _magnitude_share(low: float, high: float, start: float, stop: float) -> float:
    """Share of U(low, high) with start <= |u| < stop."""
    covered = sum(max(0.0, min(high, b) - max(low, a)) for a, b in ((start, stop), (-stop, -start)))
    return covered / (high - low)


def field_transition(positions: tuple[int, ...], eligible: Iterable[int], flip0: float, flip1: float) -> np.ndarray:
    """P(field value after the fault = j | before = i) for a field made of bit `positions`.

    Bits change independently (with flip0 or flip1 according to the stored value) and only when
    eligible, so the matrix is a product over bits; 2^8 x 2^8 at most for float exponents. Cached
    (read-only): every site of a model asks for the same few matrices.
    """
    return _field_transition(tuple(positions), frozenset(eligible), flip0, flip1)


@lru_cache(maxsize=64)
def _field_transition(positions: tuple[int, ...], eligible: frozenset[int], flip0: float, flip1: float) -> np.ndarray:
    values = np.arange(1 << len(positions))
    matrix = np.ones((len(values), len(values)))
    for index, position in enumerate(positions):
        before = (values[:, None] >> index) & 1
        after = (values[None, :] >> index) & 1
        if position in eligible:
            change = np.where(before == 1, flip1, flip0)
            keep = np.where(before == 1, 1.0 - flip1, 1.0 - flip0)
            matrix = matrix * np.where(before == after, keep, change)
        else:
            matrix = matrix * (before == after)
    matrix.flags.writeable = False
    return matrix


def popcount(words: np.ndarray) -> np.ndarray:
    """Set bits of each non-negative word, as int64."""
    return np.bitwise_count(words).astype(np.int64)


# -- one pass over the data ------------------------------------------------------------------


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


# -- expectations ----------------------------------------------------------------------------


@dataclass
class Expectation:
    """Expected damage at one site or group of sites.

    `hit_elements` counts fault events as the injector reports them (a stuck bit that already
    held its value is hit but not changed); `changed_elements`/`flipped_bits` count what differs
    from the clean model. `nan`/`inf`/`huge` are expected counts of elements that were finite and
    not above the threshold before and are NaN / +-Inf / finite above the threshold after.
    `log_no_nonfinite` and `log_no_bad` are sum(log(1 - p_i)) over elements, so probabilities of
    "at least one" combine across sites by adding them.
    """

    elements: int = 0
    eligible_bits: int = 0
    hit_elements: float = 0.0
    changed_elements: float = 0.0
    flipped_bits: float | None = 0.0
    nan: float = 0.0
    inf: float = 0.0
    huge: float = 0.0
    log_no_nonfinite: float = 0.0
    log_no_bad: float = 0.0

    @property
    def p_any_nonfinite(self) -> float:
        """P(at least one element becomes NaN or Inf)."""
        return 0.0 - math.expm1(self.log_no_nonfinite)

    @property
    def p_any_bad(self) -> float:
        """P(at least one element becomes NaN, Inf or huge)."""
        return 0.0 - math.expm1(self.log_no_bad)

    @property
    def huge_share(self) -> float | None:
        """Of all elements expected to go NaN, Inf or huge, the share that stays finite (huge)."""
        bad = self.nan + self.inf + self.huge
        return self.huge / bad if bad else None

    def add(self, other: Expectation) -> None:
        for name in (
            "elements",
            "eligible_bits",
            "hit_elements",
            "changed_elements",
            "nan",
            "inf",
            "huge",
            "log_no_nonfinite",
            "log_no_bad",
        ):
            setattr(self, name, getattr(self, name) + getattr(other, name))
        self.flipped_bits = None if self.flipped_bits is None or other.flipped_bits is None else self.flipped_bits + other.flipped_bits

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "p_any_nonfinite": self.p_any_nonfinite, "p_any_bad": self.p_any_bad, "huge_share": self.huge_share}


def expect(stats: WordStats, risk: RiskModel, spec: FaultSpec) -> Expectation:
    """Exact expectations for one tensor under `spec`, from its `word_stats`."""
    if spec.per_bit:
        flip0, flip1 = bit_rates(spec)
        result = expect_bit_changes(stats, risk, flip0, flip1)
        if spec.kind.stuck_at is not None:
            # The injector counts a stuck bit that already held its value as hit, not changed.
            result.hit_elements = stats.numel * element_rate(spec.p, len(risk.eligible))
        return result
    result = Expectation(elements=stats.numel, eligible_bits=stats.numel * len(risk.eligible))
    result.hit_elements = stats.numel * spec.p
    if spec.kind.zeroes:
        result.changed_elements = stats.nonzero * spec.p
        result.flipped_bits = float(stats.eligible_ones * spec.p)  # every bit is eligible for element faults
        nan = inf = huge = np.zeros(len(stats.key_values))
    else:
        # A uniform draw equals the stored word with negligible probability for floats; the
        # bits it changes depend on each draw, which the injector's report counts.
        result.changed_elements = result.hit_elements
        result.flipped_bits = None
        p_inf, p_huge = risk.uniform_risks(*spec.value_range)
        per_key = np.ones(len(stats.key_values))
        nan, inf, huge = 0 * per_key, spec.p * p_inf * per_key, spec.p * p_huge * per_key
    _add_bad(result, stats, nan, inf, huge)
    return result


def expect_bit_changes(stats: WordStats, risk: RiskModel, flip0: float, flip1: float) -> Expectation:
    """Exact expectations when every eligible bit of `risk` changes independently: a stored 0 with
    probability flip0, a stored 1 with flip1 (`hit_elements` = elements with a changed bit).

    The rates are parameters, not a spec, so a caller can ask for residual rates (what a protection
    scheme leaves uncorrected) from the same `word_stats`; other eligible bits need another pass,
    as the keys depend on them.
    """
    bits = len(risk.eligible)
    result = Expectation(elements=stats.numel, eligible_bits=stats.numel * bits)
    ones = np.arange(bits + 1)
    keep = _count_log(ones, _log1m(flip1)) + _count_log(bits - ones, _log1m(flip0))
    result.changed_elements = float(stats.eligible_popcount.astype(np.float64) @ -np.expm1(keep))
    result.hit_elements = result.changed_elements
    ones_stored = stats.eligible_ones
    result.flipped_bits = float(ones_stored * flip1 + (stats.numel * bits - ones_stored) * flip0)
    _add_bad(result, stats, *risk.evaluate(stats.key_values, flip0, flip1))
    return result


def _add_bad(result: Expectation, stats: WordStats, nan: np.ndarray, inf: np.ndarray, huge: np.ndarray) -> None:
    """Fill the NaN/Inf/huge expectations and log-probabilities from per-key probabilities."""
    counts = stats.key_counts.astype(np.float64)
    result.nan, result.inf, result.huge = (float(counts @ x) for x in (nan, inf, huge))
    with np.errstate(divide="ignore"):
        result.log_no_nonfinite = float(counts @ np.log1p(-(nan + inf)))
        result.log_no_bad = float(counts @ np.log1p(-(nan + inf + huge)))


def _count_log(count: np.ndarray, log_probability: float) -> np.ndarray:
    """count * log_probability, with 0 * log(0) = 0 (an impossible event required zero times)."""
    with np.errstate(invalid="ignore"):
        return np.where(count > 0, count * log_probability, 0.0)


def _log(probability: float) -> float:
    return math.log(probability) if probability > 0 else -math.inf


def _log1m(probability: float) -> float:
    """log(1 - probability), accurate for tiny probabilities."""
    return math.log1p(-probability) if probability < 1 else -math.inf


# -- the whole model -------------------------------------------------------------------------


@dataclass
class SiteExpectation:
    """`Expectation` of one parameter tensor, with where it sits."""

    name: str
    component: str
    layer: int | None
    dtype: str
    threshold: float
    expectation: Expectation


@dataclass
class Analysis:
    """Expected damage of `spec` on a model, per site, per component, and in total."""

    spec: FaultSpec
    sites: list[SiteExpectation] = field(default_factory=list)

    def total(self) -> Expectation:
        total = Expectation()
        for site in self.sites:
            total.add(site.expectation)
        return total

    def by_component(self) -> dict[str, Expectation]:
        groups: dict[str, Expectation] = defaultdict(Expectation)
        for site in self.sites:
            groups[site.component].add(site.expectation)
        return dict(sorted(groups.items()))

    def to_dict(self) -> dict[str, Any]:
        return {
            "spec": {**self.spec.to_dict(), "description": self.spec.describe()},
            "notes": analysis_notes(self.spec),
            "thresholds": {site.dtype: site.threshold for site in self.sites},
            "total": self.total().to_dict(),
            "by_component": {name: e.to_dict() for name, e in self.by_component().items()},
            "sites": [
                {"name": s.name, "component": s.component, "layer": s.layer, "dtype": s.dtype, **s.expectation.to_dict()}
                for s in self.sites
            ],
        }

    def format_table(self) -> str:
        thresholds = ", ".join(f"{dtype} {value:.4g}" for dtype, value in sorted({s.dtype: s.threshold for s in self.sites}.items()))
        lines = [
            f"Expected damage of: {self.spec.describe()}",
            f"(huge = finite with |x| > threshold: {thresholds}; P(...) = probability of at least one such element)",
            *(f"note: {note}" for note in analysis_notes(self.spec)),
        ]
        columns = [
            Column("component", 22, align="<"),
            Column("elements", 14, ","),
            Column("bits", 16, ","),
            Column("E[elements]", 13, ".4g"),
            Column("E[bits]", 12, ".4g"),
            Column("E[NaN]", 11, ".3g"),
            Column("E[Inf]", 11, ".3g"),
            Column("E[huge]", 11, ".3g"),
            Column("P(NaN/Inf)", 12, ".3g"),
            Column("P(any bad)", 12, ".3g"),
        ]
        rows = [
            (
                name,
                e.elements,
                e.eligible_bits,
                e.changed_elements,
                "n/a" if e.flipped_bits is None else e.flipped_bits,
                e.nan,
                e.inf,
                e.huge,
                e.p_any_nonfinite,
                e.p_any_bad,
            )
            for name, e in [*self.by_component().items(), ("total", self.total())]
        ]
        lines.extend(text_table(columns, rows))
        return "\n".join(lines)


def site_risk(site: ParamSite, spec: FaultSpec, threshold: float | None) -> tuple[RiskModel, torch.Tensor]:
    """The risk model and flat word view of one parameter site."""
    layout = site.layout
    eligible = resolve_bits(layout, spec.bits) if spec.per_bit else tuple(range(layout.width))
    return RiskModel.build(layout, eligible, threshold), flat_words(site.param, layout)


def check_analysable(spec: FaultSpec) -> None:
    """Refuse, in one line, the specs whose analysis would print figures that are not theirs.

    The analysis is an expectation over faults drawn at rate p in the stored weights: a spec on
    activations alone has no weight faults (their operands are not known before a run), and a
    replayed map is not a draw at all (its faults are known exactly), so either would print the
    weights' figures, or zeros, under a title that says otherwise."""
    if spec.replay is not None:
        raise FaultSpecError(
            f"analyze: replay={spec.replay!r} is invalid here: analyze gives the expectation of faults drawn at rate p, "
            "and a replayed map is exact, not a draw; read its own counts (FaultMap.load, or the report of an lm_eval "
            "run that replays it), or analyze the spec it was drawn from"
        )
    if not spec.on_weights:
        raise FaultSpecError(
            f"analyze: site={spec.site!r} is invalid here: analyze covers faults in the stored weights, and activation "
            "faults depend on operands not known before a run; use site=weights (or weights+activations for its weight part)"
        )


def analysis_notes(spec: FaultSpec) -> list[str]:
    """What the analysis of `spec` leaves out, to print beside its figures."""
    notes = []
    if spec.on_activations:
        notes.append(f"site={spec.site}: only the weight faults are analysed; the activation faults are not in these figures")
    if spec.protected:
        notes.append("these figures are before protection")
    return notes


def analyze(model: nn.Module, spec: FaultSpec | str, threshold: float | None = None) -> Analysis:
    """Expected damage of weight faults under `spec`, computed exactly from the stored words.

    `threshold` is the magnitude above which a finite value counts as "huge" (default: half the
    dtype's largest finite value). Activation faults are not analysed: their operands are not
    known before a run; a spec on activations alone, or a replay, is refused (`check_analysable`).
    """
    spec = to_spec(spec)
    check_analysable(spec)
    analysis = Analysis(spec)
    with torch.no_grad():
        for site in select_params(model, spec):
            risk, words = site_risk(site, spec, threshold)
            expectation = expect(word_stats(words, risk), risk, spec)
            analysis.sites.append(SiteExpectation(site.name, site.component, site.layer, risk.layout.name, risk.threshold, expectation))
    return analysis
