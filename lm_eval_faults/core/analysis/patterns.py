"""Exact expected damage under a correlated fault pattern (`pattern=`), from the model's own words.

What an expectation needs is each word's marginal: the distribution of the bits one word has hit,
whatever happens to its neighbours. Per pattern:

- `column:STRIDE:ROWS`: each (word, bit) lies on exactly one bit line, so a word's bits are hit
  independently at rate p: the iid analysis at p, exact.
- `mcu:K`, `clustered:C`: a (word, bit) lies on the lines of K words starting at it and at the K-1
  words before, so its bits are independent at q = 1 - (1-p)^K (per stuck value for clusters; a
  cell in both reads 1). Exact but for the K-1 words at either end of a tensor, which fewer
  lines reach: there the figures are upper bounds.
- `row:BYTES`: a word is in one row, hit with probability p in every eligible bit at once: p times
  the count of words that go bad under that one mask, counted on the words themselves.
- `burst:K`: S = E-K+1 starts per word, each struck with p. One struck start gives its window's
  mask: p times the words that go bad under each window, summed over windows. Two or more struck
  starts in one word (probability below C(S,2) p^2) are not enumerated; `remainder` bounds them.

P(at least one) multiplies per-word probabilities, which only holds where words are independent:
under rows, lines and clusters it is not given (NaN), and the analysis says so.
"""

from __future__ import annotations

import math
from dataclasses import replace

import numpy as np
import torch

from lm_eval_faults.core.analysis.exact import Expectation, expect, expect_bit_changes
from lm_eval_faults.core.analysis.risk import RiskModel
from lm_eval_faults.core.analysis.word_stats import word_stats
from lm_eval_faults.core.faults.kinds import bit_fault_words
from lm_eval_faults.core.patterns.burst import Burst
from lm_eval_faults.core.patterns.lines import Clustered, Column, MultiCell
from lm_eval_faults.core.patterns.rows import Row
from lm_eval_faults.core.spec import IID, FaultSpec
from lm_eval_faults.core.storage.layouts import BitLayout, from_unsigned

CHUNK = 1 << 22
"""Words classified at a time by the direct count (bounded temporary memory)."""


def pattern_expectation(words: torch.Tensor, risk: RiskModel, spec: FaultSpec) -> tuple[Expectation, float]:
    """(expectation at one tensor under `spec`'s pattern, bound on what it leaves out)."""
    pattern = spec.pattern_shape
    eligible = risk.eligible
    if isinstance(pattern, Clustered):
        q0, q1 = (-math.expm1(pattern.words * math.log1p(-(rate or 0.0))) for rate in (spec.p_sa0, spec.p_sa1))
        result = expect_bit_changes(word_stats(words, risk), risk, q1, q0 * (1 - q1))
        return _without_any(result), 0.0
    iid = replace(spec, pattern=IID, fit=None, hours=None)  # the same p, per word
    if isinstance(pattern, (MultiCell, Column)):
        reach = pattern.words if isinstance(pattern, MultiCell) else 1
        lines = reach if spec.per_bit else reach * len(eligible)  # an element fault: any line through the word
        rate = -math.expm1(lines * math.log1p(-spec.p))
        return _without_any(expect(word_stats(words, risk), risk, replace(iid, p=rate))), 0.0
    if isinstance(pattern, Row):
        if not spec.per_bit:
            return _without_any(expect(word_stats(words, risk), risk, iid)), 0.0
        mask = sum(1 << bit for bit in eligible)
        return _without_any(_deterministic(words, risk, spec, [mask])), 0.0
    if isinstance(pattern, Burst):
        masks = pattern.masks(eligible).tolist()
        starts = len(masks)
        bound = words.numel() * math.comb(starts, 2) * spec.p**2
        return _deterministic(words, risk, spec, masks), bound
    raise ValueError(f"no analysis for pattern={spec.pattern}")


def _without_any(result: Expectation) -> Expectation:
    result.log_no_nonfinite = result.log_no_bad = math.nan
    return result


def _deterministic(words: torch.Tensor, risk: RiskModel, spec: FaultSpec, masks: list[int]) -> Expectation:
    """Each mask struck with probability p per word (one event at a time): counted on the words."""
    layout = risk.layout
    flat = words.reshape(-1).to(torch.int64) & ((1 << layout.width) - 1)
    result = Expectation(elements=flat.numel(), eligible_bits=flat.numel() * len(risk.eligible))
    p = spec.p
    bad_per_word = torch.zeros(flat.numel(), dtype=torch.int64)
    nonfinite_per_word = torch.zeros(flat.numel(), dtype=torch.int64)
    for start in range(0, flat.numel(), CHUNK):
        old = flat[start : start + CHUNK]
        was_ok = _classes(old, layout, risk.threshold) == 0
        for mask in masks:
            new = bit_fault_words(spec.fault, old, torch.full_like(old, mask))
            changed = new != old
            result.changed_elements += p * float(changed.sum())
            result.hit_elements += p * old.numel()
            result.flipped_bits = (result.flipped_bits or 0.0) + p * float(np.bitwise_count(torch.bitwise_xor(new, old).numpy()).sum())
            after = _classes(new, layout, risk.threshold) * was_ok
            result.nan += p * float((after == 1).sum())
            result.inf += p * float((after == 2).sum())
            result.huge += p * float((after == 3).sum())
            bad_per_word[start : start + CHUNK] += after != 0
            nonfinite_per_word[start : start + CHUNK] += (after == 1) | (after == 2)
    for name, per_word in (("log_no_nonfinite", nonfinite_per_word), ("log_no_bad", bad_per_word)):
        counts = np.bincount(per_word.numpy(), minlength=len(masks) + 1)
        with np.errstate(divide="ignore"):
            setattr(result, name, float(counts @ np.log1p(-np.minimum(np.arange(len(counts)) * p, 1.0))))
    return result


def _classes(words: torch.Tensor, layout: BitLayout, threshold: float) -> torch.Tensor:
    """0 fine, 1 NaN, 2 +-Inf, 3 finite with |x| > threshold, per stored word."""
    values = from_unsigned(words, layout).view(layout.dtype).double()
    classes = torch.zeros(words.numel(), dtype=torch.int64)
    classes[values.isnan()] = 1
    classes[values.isinf()] = 2
    classes[values.isfinite() & (values.abs() > threshold)] = 3
    return classes
