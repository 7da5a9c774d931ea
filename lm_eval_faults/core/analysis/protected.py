"""Expected non-finite values a protection scheme lets through, exactly, from the model's own bits.

A float becomes NaN or Inf exactly when its exponent field reads all ones. So for an element whose
clean exponent has its zero bits at mask m, the event is "the error the model reads flips exactly
the bits of m within the exponent field" -- whatever happens to its other bits. With symmetric bit
flips at rate p, the probability of that event depends only on m and on where the element sits in
its protection word, so one histogram of (slot in word, exponent value) per tensor -- a single read
of the weights -- gives the exact expectation under each scheme:

- none / `protect_bits` / `bits`: the flips of m's bits, none of the exponent's other active bits:
  p^|m| (1-p)^(E-|m|), and 0 if a bit of m is protected or not eligible;
- `protect=` (backup): 0 on backed-up tensors; `clamp=weights`: 0 (a clamped read is finite);
- `ecc=parity`: the event, and an even number of flips over the element's active bits and its
  parity bit (undetected): P(event) (1 + (-1)^|m| (1-2p)^(A-E_A+1)) / 2, since the signs of
  independent bits multiply;
- `ecc=secded`: every error pattern of up to 4 bits over the 72-bit codeword is decoded (as
  `ecc.decode` does) and its residual's exponent fields tallied per weight class; patterns of 5 or
  more bits have total probability below C(72,5) p^5 per word, which `remainder` reports as the
  bound on what the enumeration leaves out.

Defined for symmetric bit flips (`fault=bitflip` with `p`), where a pattern's probability does not
depend on the stored bits; other fault models raise a ValueError that says so.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache
from itertools import combinations

import numpy as np
import torch
from torch import nn

from lm_eval_faults.core.protection import ecc
from lm_eval_faults.core.protection.codes import ECC_CODES
from lm_eval_faults.core.protection.schemes import backed_up, protected_positions
from lm_eval_faults.core.sites.targets import ParamSite, select_params
from lm_eval_faults.core.spec import FaultSpec, FaultSpecError, to_spec
from lm_eval_faults.core.storage.layouts import BitLayout, resolve_bits
from lm_eval_faults.core.storage.words import flat_words

MAX_ENUMERATED_ERRORS = 4
"""SECDED patterns are enumerated up to this many bits; the rest is bounded, not ignored."""


@dataclass(frozen=True)
class ProtectedExpectation:
    """Expected finite values turned NaN/Inf that the model reads, per component and in total."""

    by_component: dict[str, float]
    remainder: float
    """Upper bound on the expectation from error patterns the SECDED enumeration leaves out."""

    @property
    def total(self) -> float:
        return sum(self.by_component.values())


def expected_nonfinite(model: nn.Module, spec: FaultSpec | str) -> ProtectedExpectation:
    """Expected finite weights turned NaN/Inf, after `spec`'s protection, per component."""
    spec = to_spec(spec)
    if spec.pattern_shape is not None or spec.ecc == "chipkill" or spec.interleave > 1:
        raise FaultSpecError(
            f"analyze --protections: pattern={spec.pattern}, ecc={spec.ecc}, interleave={spec.interleave}: the protected analysis "
            "enumerates iid flips through SECDED and parity; measure patterns and chipkill or interleaved codes with a sweep "
            "(docs/patterns), or analyze the pattern without protection"
        )
    if not spec.kind.flips or spec.asymmetric:
        raise ValueError(
            "the protected analysis assumes symmetric bit flips (fault=bitflip with p): other faults depend on the stored bits"
        )
    by_component: dict[str, float] = {}
    remainder = 0.0
    for site in select_params(model, spec):
        layout = site.layout
        if not layout.is_float:
            continue
        expected, bound = _site_expectation(site, spec, layout)
        by_component[site.component] = by_component.get(site.component, 0.0) + expected
        remainder += bound
    return ProtectedExpectation(by_component, remainder)


def _site_expectation(site: ParamSite, spec: FaultSpec, layout: BitLayout) -> tuple[float, float]:
    if backed_up(spec, site) or "weights" in spec.clamp or spec.p == 0:
        return 0.0, 0.0
    code = ECC_CODES.get(spec.ecc)
    slots = 1 if code is None else code.elements_per_word(layout)
    counts = exponent_histogram(site.param, layout, slots)
    active = frozenset(resolve_bits(layout, spec.bits)) - frozenset(protected_positions(spec, layout))
    probability = event_probabilities(layout, spec.p, active, spec.ecc, spec.ecc_policy)
    finite = np.arange(counts.shape[1]) != (1 << len(layout.exponent)) - 1  # already non-finite: not created
    expected = float((counts[:, finite] * probability[:, finite]).sum())
    words = -(-site.param.numel() // slots)
    bound = words * math.comb(72, MAX_ENUMERATED_ERRORS + 1) * spec.p ** (MAX_ENUMERATED_ERRORS + 1) if spec.ecc == "secded" else 0.0
    return expected, bound


def exponent_histogram(tensor: torch.Tensor, layout: BitLayout, slots: int) -> np.ndarray:
    """Elements per (slot in the protection word, exponent value): one pass over the tensor."""
    words = flat_words(tensor, layout).to(torch.int64) & ((1 << layout.width) - 1)
    exponent_bits = len(layout.exponent)
    exponent = (words >> layout.exponent[0]) & ((1 << exponent_bits) - 1)
    slot = torch.arange(words.numel(), device=words.device) % slots
    counts = torch.bincount(slot * (1 << exponent_bits) + exponent, minlength=slots << exponent_bits)
    return counts.cpu().numpy().reshape(slots, 1 << exponent_bits).astype(np.float64)


def event_probabilities(layout: BitLayout, p: float, active: frozenset[int], scheme: str, policy: str) -> np.ndarray:
    """P(the read flips exactly the zero bits of each exponent value), per slot and exponent value."""
    exponent_bits = len(layout.exponent)
    values = np.arange(1 << exponent_bits)
    zero_masks = ~values & ((1 << exponent_bits) - 1)
    active_exponent = sum(1 << (bit - layout.exponent[0]) for bit in layout.exponent if bit in active)
    flips = np.bitwise_count(zero_masks).astype(np.int64)
    reachable = (zero_masks & ~active_exponent) == 0
    n_exponent = bin(active_exponent).count("1")
    event = np.where(reachable, p**flips * (1 - p) ** (n_exponent - flips), 0.0)
    if scheme == "none":
        return event[None, :]
    if scheme == "parity":
        others = len(active) - n_exponent + 1  # the element's other active bits and its parity bit
        return (event * (1 + (-1.0) ** flips * (1 - 2 * p) ** others) / 2)[None, :]
    tallies = _secded_tallies(layout, active, policy == "keep")
    weights = np.array([p**w * (1 - p) ** (_active_codeword_bits(layout, active) - w) for w in range(MAX_ENUMERATED_ERRORS + 1)])
    per_field = np.tensordot(weights, tallies, axes=1)  # (slots, exponent fields)
    return per_field[:, zero_masks]


def _active_codeword_bits(layout: BitLayout, active: frozenset[int]) -> int:
    return len(active) * (ecc.DATA_BITS // layout.width) + ecc.CHECK_BITS


@lru_cache(maxsize=32)
def _secded_tallies(layout: BitLayout, active: frozenset[int], keep_detected: bool) -> np.ndarray:
    """Patterns of w errors (w <= MAX_ENUMERATED_ERRORS) over the codeword's active bits whose
    decoded residual has each exponent field, per slot: shape (w, slots, 2^E)."""
    per_word = ecc.DATA_BITS // layout.width
    positions = [slot * layout.width + bit for slot in range(per_word) for bit in sorted(active)]
    positions += [ecc.DATA_BITS + check for check in range(ecc.CHECK_BITS)]
    exponent_bits = len(layout.exponent)
    tallies = np.zeros((MAX_ENUMERATED_ERRORS + 1, per_word, 1 << exponent_bits))
    for weight in range(MAX_ENUMERATED_ERRORS + 1):
        patterns = np.array(list(combinations(positions, weight)), dtype=np.int64).reshape(math.comb(len(positions), weight), weight)
        data = np.zeros(len(patterns), dtype=np.uint64)
        check = np.zeros(len(patterns), dtype=np.int64)
        for column in patterns.T:
            is_data = column < ecc.DATA_BITS
            data[is_data] |= np.uint64(1) << column[is_data].astype(np.uint64)
            check[~is_data] |= 1 << (column[~is_data] - ecc.DATA_BITS)
        residual, detected = ecc.decode(data.astype(np.int64), check)
        # a detected word reads as its corrupted data (keep) or as zeros (finite: no event)
        read_error = np.where(detected, data.astype(np.int64) if keep_detected else 0, residual).astype(np.uint64)
        for slot in range(per_word):
            field = (read_error >> np.uint64(slot * layout.width + layout.exponent[0])) & np.uint64((1 << exponent_bits) - 1)
            tallies[weight, slot] = np.bincount(field.astype(np.int64), minlength=1 << exponent_bits)
    return tallies
