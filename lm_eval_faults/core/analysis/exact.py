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

from collections import defaultdict
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from lm_eval_faults.core.analysis.risk import AtLeastOne, RiskModel, bit_rates, count_log, log1m
from lm_eval_faults.core.analysis.stored import StoredAnalysis, analyze_stored, check_storage_analysable
from lm_eval_faults.core.analysis.word_stats import WordStats, word_stats
from lm_eval_faults.core.sampling.host import element_rate
from lm_eval_faults.core.sites.targets import ParamSite, select_params
from lm_eval_faults.core.spec import FaultSpec, FaultSpecError, to_spec
from lm_eval_faults.core.storage.layouts import (
    resolve_bits,
)
from lm_eval_faults.core.storage.words import flat_words
from lm_eval_faults.core.text_table import Column, text_table

# -- expectations ----------------------------------------------------------------------------


@dataclass
class Expectation(AtLeastOne):
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
    keep = count_log(ones, log1m(flip1)) + count_log(bits - ones, log1m(flip0))
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
    remainder: float = 0.0
    """Bound on the expected elements a pattern's analysis leaves out (`analysis.patterns`)."""

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
            "remainder": self.remainder,
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
    if spec.storage != "none":
        check_storage_analysable(spec)
        if spec.pattern_shape is not None:
            raise FaultSpecError(
                f"analyze: pattern={spec.pattern!r} is invalid with storage=: the pattern analysis covers the model's own float words"
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
    pattern = spec.pattern_shape
    if pattern is not None:
        name = pattern.name
        if name in ("mcu", "clustered"):
            notes.append(
                f"pattern={spec.pattern}: exact per word; upper bounds at the first and last words of each tensor, which fewer lines reach"
            )
        if name == "burst":
            notes.append(
                f"pattern={spec.pattern}: one struck start per word, enumerated; words with two or more are bounded by 'remainder'"
            )
        if name != "burst":
            notes.append(f"pattern={spec.pattern} correlates neighbouring words: P(at least one) is not given (nan)")
    return notes


def analyze(
    model: nn.Module, spec: FaultSpec | str, threshold: float | None = None, progress: Callable[[str, int], None] | None = None
) -> Analysis | StoredAnalysis:
    """Expected damage of weight faults under `spec`, computed exactly from the stored words.

    `threshold` is the magnitude above which a finite value counts as "huge" (default: half the
    dtype's largest finite value); under `storage=`, the move in RMS of the weight's tensor (see
    `analysis.stored`, which analyses each stored field). Activation faults are not analysed:
    their operands are not known before a run; a spec on activations alone, or a replay, is
    refused (`check_analysable`). `progress` is the stored analysis's (`analyze_stored`), which
    decodes the model many times; the float analysis takes seconds and does not call it.
    """
    spec = to_spec(spec)
    check_analysable(spec)
    if spec.storage != "none":
        return analyze_stored(model, spec, threshold, progress)
    from lm_eval_faults.core.analysis.patterns import pattern_expectation  # it builds on this module's expectations

    analysis = Analysis(spec)
    with torch.no_grad():
        for site in select_params(model, spec):
            risk, words = site_risk(site, spec, threshold)
            if spec.pattern_shape is None:
                expectation = expect(word_stats(words, risk), risk, spec)
            else:
                expectation, bound = pattern_expectation(words, risk, spec)
                analysis.remainder += bound
            analysis.sites.append(SiteExpectation(site.name, site.component, site.layer, risk.layout.name, risk.threshold, expectation))
    return analysis
