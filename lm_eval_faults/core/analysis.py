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
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from lm_eval_faults.core.formats import (
    BitLayout,
    from_unsigned,
    layout_of,
    resolve_bits,
    to_unsigned,
    word_value,
)
from lm_eval_faults.core.sampling import element_rate
from lm_eval_faults.core.spec import FaultSpec, to_spec
from lm_eval_faults.core.targets import ParamSite, select_params
from lm_eval_faults.core.text_table import Column, text_table
from lm_eval_faults.core.words import flat_words

CHUNK = 1 << 22
"""Elements read per pass step: bounds temporary memory whatever the tensor size."""

SMALL = 1 << 16
"""float32 tensors below this size are sorted into distinct words: cheaper than a 2M-bin histogram."""

_POPCOUNT16 = np.array([bin(v).count("1") for v in range(1 << 16)], dtype=np.int64)


def bit_rates(spec: FaultSpec) -> tuple[float, float]:
    """(probability an eligible bit holding 0 changes, same for a bit holding 1) under `spec`.

    Every bit fault is a per-bit change whose probability depends only on the bit's stored value:
    stuck-at-0 changes only ones, stuck-at-1 only zeros, asymmetric flips use p01/p10.
    """
    if spec.fault == "stuck0":
        return 0.0, spec.p
    if spec.fault == "stuck1":
        return spec.p, 0.0
    if spec.asymmetric:
        return spec.p01 or 0.0, spec.p10 or 0.0
    return spec.p, spec.p


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

    @classmethod
    def build(cls, layout: BitLayout, eligible: Iterable[int], threshold: float | None = None) -> RiskModel:
        threshold = default_threshold(layout) if threshold is None else float(threshold)
        if not threshold >= 0:
            raise ValueError(f"threshold={threshold!r}: a magnitude threshold must be >= 0")
        limit = 0
        if layout.is_float:
            # Finite magnitudes are ordered like their words, so bisect the words for the threshold.
            low, high = 0, ((1 << len(layout.exponent)) - 1 << len(layout.mantissa)) - 1
            while low < high:
                middle = (low + high + 1) // 2
                low, high = (middle, high) if word_value(middle, layout) <= threshold else (low, middle - 1)
            limit = low
        return cls(layout, tuple(sorted(eligible)), threshold, limit)

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

    @property
    def lead_low(self) -> int:
        """Lowest mantissa bit that can decide "magnitude > limit" (the limit's lowest zero bit).

        Below it the limit's mantissa is all ones, so a word equal to the limit down to there can
        no longer exceed it. `man_bits` when the limit's mantissa is all ones (the default).
        """
        mantissa = self.limit & ((1 << self.man_bits) - 1)
        low = 0
        while low < self.man_bits and mantissa >> low & 1:
            low += 1
        return low

    @property
    def lead_bits(self) -> int:
        return self.man_bits - self.lead_low

    def _mask(self, positions: Iterable[int]) -> int:
        return sum(1 << b for b in positions)

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
        lead = keys & ((1 << lead_bits) - 1)
        rest = keys >> lead_bits
        ones = rest % (man + 1)
        fixed_one = (rest // (man + 1)) % 2
        exponent = rest // (2 * (man + 1))
        transition = field_transition(self.layout.exponent, self.eligible, flip0, flip1)[exponent]
        to_top = transition[:, self.exp_max]
        zeros = sum(1 for b in self.eligible if b < man) - ones
        # The mantissa ends up zero iff every eligible one changes and every eligible zero holds.
        log_zero_mantissa = np.where(fixed_one == 1, -np.inf, _count_log(ones, _log(flip1)) + _count_log(zeros, _log1m(flip0)))
        inf = to_top * np.exp(log_zero_mantissa)
        nan = to_top * -np.expm1(log_zero_mantissa)
        limit_exponent = self.limit >> man
        huge = transition[:, limit_exponent + 1 : self.exp_max].sum(axis=1)
        huge = huge + transition[:, limit_exponent] * self._lead_exceeds(lead, flip0, flip1)
        return nan, inf, huge

    def _lead_exceeds(self, lead: np.ndarray, flip0: float, flip1: float) -> np.ndarray:
        """P(faulted mantissa > the limit's mantissa), from the leading bits that can decide it."""
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


def _magnitude_share(low: float, high: float, start: float, stop: float) -> float:
    """Share of U(low, high) with start <= |u| < stop."""
    covered = sum(max(0.0, min(high, b) - max(low, a)) for a, b in ((start, stop), (-stop, -start)))
    return covered / (high - low)


def field_transition(positions: tuple[int, ...], eligible: Iterable[int], flip0: float, flip1: float) -> np.ndarray:
    """P(field value after the fault = j | before = i) for a field made of bit `positions`.

    Bits change independently (with flip0 or flip1 according to the stored value) and only when
    eligible, so the matrix is a product over bits; 2^8 x 2^8 at most for float exponents.
    """
    eligible = set(eligible)
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
    return matrix


def popcount(words: np.ndarray) -> np.ndarray:
    """Set bits of each non-negative word below bit 32 (two lookups in a 16-bit table)."""
    return _POPCOUNT16[words & 0xFFFF] + _POPCOUNT16[(words >> 16) & 0xFFFF]


# -- one pass over the data ------------------------------------------------------------------


def word_histogram(words: torch.Tensor, risk: RiskModel) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(representative words, how many stored words each stands for, ones per bit position).

    Everything the expectations need is a function of a word's risk key and its popcount over
    the eligible bits, so words may be merged when those agree. 8- and 16-bit words are simply
    bincounted. For float32 (2^32 words) the low 16 bits -- all mantissa -- are reduced to their
    eligible popcount and whether an ineligible one is set, which is lossless whenever the
    threshold's limit has its low 16 bits all ones (the default max/2, or any value just below a
    power of two); other thresholds, and small tensors, use exact distinct words (a sort).
    """
    layout = risk.layout
    width = layout.width
    if width <= 16:
        hist = np.zeros(1 << width, dtype=np.int64)
        for chunk in _chunks(words, layout):
            hist += torch.bincount(chunk, minlength=len(hist)).cpu().numpy()
        values = np.flatnonzero(hist)
        return values, hist[values], _ones_per_bit(values, hist[values], width)
    if risk.lead_low < 16 or words.numel() < SMALL:
        found = [torch.unique(chunk, return_counts=True) for chunk in _chunks(words, layout)]
        values, inverse = np.unique(np.concatenate([v.cpu().numpy() for v, _ in found]), return_inverse=True)
        counts = np.bincount(inverse, weights=np.concatenate([c.cpu().numpy() for _, c in found])).astype(np.int64)
        return values, counts, _ones_per_bit(values, counts, width)
    eligible_low = sum(1 << b for b in risk.eligible if b < 16)
    fixed_low = 0xFFFF & ~eligible_low
    reduced = np.zeros((1 << 16) * 17 * 2, dtype=np.int64)
    low_hist = np.zeros(1 << 16, dtype=np.int64)
    table = torch.from_numpy(_POPCOUNT16).to(words.device)
    for chunk in _chunks(words, layout):
        low = chunk & 0xFFFF
        key = ((chunk >> 16) * 17 + table[low & eligible_low]) * 2 + ((low & fixed_low) != 0).to(torch.int64)
        reduced += torch.bincount(key, minlength=len(reduced)).cpu().numpy()
        low_hist += torch.bincount(low, minlength=len(low_hist)).cpu().numpy()
    keys = np.flatnonzero(reduced)
    high, ones_low, fixed = keys // 34, keys // 2 % 17, keys % 2
    # A stand-in for the low half: the same eligible popcount, the same "ineligible one set".
    eligible_positions = [b for b in range(16) if eligible_low >> b & 1]
    first_eligible = np.array([sum(1 << b for b in eligible_positions[:k]) for k in range(len(eligible_positions) + 1)])
    stand_in = first_eligible[ones_low] | fixed * (fixed_low & -fixed_low)
    values = high << 16 | stand_in
    ones = _ones_per_bit(values, reduced[keys], width)
    ones[:16] = _ones_per_bit(np.arange(1 << 16), low_hist, 16)
    return values, reduced[keys], ones


def _chunks(words: torch.Tensor, layout: BitLayout) -> Iterable[torch.Tensor]:
    for start in range(0, words.numel(), CHUNK):
        yield to_unsigned(words[start : start + CHUNK], layout)


def _ones_per_bit(values: np.ndarray, counts: np.ndarray, width: int) -> np.ndarray:
    return np.array([counts[(values >> bit & 1) == 1].sum() for bit in range(width)], dtype=np.int64)


@dataclass
class WordStats:
    """What the expectations need from one tensor's stored words; independent of p."""

    numel: int
    key_values: np.ndarray
    key_counts: np.ndarray
    ones_per_bit: np.ndarray
    eligible_popcount: np.ndarray
    nonzero: int


def word_stats(words: torch.Tensor, risk: RiskModel) -> WordStats:
    """Risk-key histogram (of good words), eligible-popcount histogram and ones per bit of a tensor."""
    values, counts, ones = word_histogram(words, risk)
    keys, good = risk.keys(values)
    key_values, inverse = np.unique(keys[good], return_inverse=True)
    key_counts = np.bincount(inverse, weights=counts[good], minlength=len(key_values)).astype(np.int64)
    eligible_mask = sum(1 << b for b in risk.eligible)
    eligible_popcount = np.bincount(popcount(values & eligible_mask), weights=counts, minlength=len(risk.eligible) + 1)
    return WordStats(words.numel(), key_values, key_counts, ones, eligible_popcount, int(counts[values != 0].sum()))


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
    bits = len(risk.eligible)
    result = Expectation(elements=stats.numel, eligible_bits=stats.numel * bits)
    if spec.per_bit:
        flip0, flip1 = bit_rates(spec)
        ones = np.arange(bits + 1)
        keep = _count_log(ones, _log1m(flip1)) + _count_log(bits - ones, _log1m(flip0))
        result.changed_elements = float(stats.eligible_popcount @ -np.expm1(keep))
        # The injector counts a stuck bit that already held its value as hit, not changed.
        stuck = spec.fault in ("stuck0", "stuck1")
        result.hit_elements = stats.numel * element_rate(spec.p, bits) if stuck else result.changed_elements
        ones = stats.ones_per_bit[list(risk.eligible)]
        result.flipped_bits = float(ones.sum() * flip1 + (stats.numel - ones).sum() * flip0)
        nan, inf, huge = risk.evaluate(stats.key_values, flip0, flip1)
    else:
        result.hit_elements = stats.numel * spec.p
        if spec.fault == "zero":
            result.changed_elements = stats.nonzero * spec.p
            result.flipped_bits = float(stats.ones_per_bit.sum() * spec.p)
            nan = inf = huge = np.zeros(len(stats.key_values))
        else:
            # A uniform draw equals the stored word with negligible probability for floats; the
            # bits it changes depend on each draw, which the injector's report counts.
            result.changed_elements = result.hit_elements
            result.flipped_bits = None
            p_inf, p_huge = risk.uniform_risks(*spec.value_range)
            per_key = np.ones(len(stats.key_values))
            nan, inf, huge = 0 * per_key, spec.p * p_inf * per_key, spec.p * p_huge * per_key
    counts = stats.key_counts.astype(np.float64)
    result.nan, result.inf, result.huge = (float(counts @ x) for x in (nan, inf, huge))
    with np.errstate(divide="ignore"):
        result.log_no_nonfinite = float(counts @ np.log1p(-(nan + inf)))
        result.log_no_bad = float(counts @ np.log1p(-(nan + inf + huge)))
    return result


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
    layout = layout_of(site.param.dtype)
    eligible = resolve_bits(layout, spec.bits) if spec.per_bit else tuple(range(layout.width))
    return RiskModel.build(layout, eligible, threshold), flat_words(site.param, layout)


def analyze(model: nn.Module, spec: FaultSpec | str, threshold: float | None = None) -> Analysis:
    """Expected damage of weight faults under `spec`, computed exactly from the stored words.

    `threshold` is the magnitude above which a finite value counts as "huge" (default: half the
    dtype's largest finite value). Activation faults are not analysed: their operands are not
    known before a run.
    """
    spec = to_spec(spec)
    analysis = Analysis(spec)
    with torch.no_grad():
        for site in select_params(model, spec):
            risk, words = site_risk(site, spec, threshold)
            expectation = expect(word_stats(words, risk), risk, spec)
            analysis.sites.append(SiteExpectation(site.name, site.component, site.layer, risk.layout.name, risk.threshold, expectation))
    return analysis
