"""The risk model of the exact analysis: which stored words count as bad (NaN, Inf, or beyond a
magnitude threshold), and how a fault spec's per-bit change rates move words between classes.

`analysis.exact` combines it with the model's own word statistics (`analysis.word_stats`).
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass
from functools import cached_property, lru_cache

import numpy as np
import torch

from lm_eval_faults.core.spec import FaultSpec
from lm_eval_faults.core.storage.layouts import (
    BitLayout,
    from_unsigned,
    word_value,
)


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
        log_zero_mantissa = np.where(fixed_one == 1, -np.inf, count_log(ones, log_of(flip1)) + count_log(zeros, log1m(flip0)))
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
            log_all_zero = count_log(low_ones, log_of(flip1)) + count_log(len(eligible_low) - low_ones, log1m(flip0))
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


def count_log(count: np.ndarray, log_probability: float) -> np.ndarray:
    """count * log_probability, with 0 * log(0) = 0 (an impossible event required zero times)."""
    with np.errstate(invalid="ignore"):
        return np.where(count > 0, count * log_probability, 0.0)


class AtLeastOne:
    """P(at least one weight goes bad), for an expectation that carries sums of log(1 - p) over
    its independent events (`log_no_nonfinite`, `log_no_bad`): sums add across sites and fields,
    probabilities do not."""

    log_no_nonfinite: float
    log_no_bad: float

    @property
    def p_any_nonfinite(self) -> float:
        """P(at least one element becomes NaN or Inf)."""
        return 0.0 - math.expm1(self.log_no_nonfinite)

    @property
    def p_any_bad(self) -> float:
        """P(at least one element becomes NaN, Inf or huge)."""
        return 0.0 - math.expm1(self.log_no_bad)


def log_of(probability: float) -> float:
    return math.log(probability) if probability > 0 else -math.inf


def log1m(probability: float) -> float:
    """log(1 - probability), accurate for tiny probabilities."""
    return math.log1p(-probability) if probability < 1 else -math.inf


# -- the whole model -------------------------------------------------------------------------
