"""The fault kinds, one entry each: what a kind does to a stored word, and what that implies.

`fault=` names an entry. The host sampler, the device sampler, the activation hooks, the
analysis and the report all ask the entry (is it per bit? which bit values can it change?
what does it write?) instead of comparing the name: before this table the names were compared
in six modules. A new kind is one entry here.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

import numpy as np
import torch

Words = TypeVar("Words", np.ndarray, torch.Tensor)


@dataclass(frozen=True)
class FaultKind:
    """One kind of fault.

    A bit fault (`per_bit`) hits each eligible bit with probability p and writes
    `bit_words(old, masks)`; `stuck_at` is the value a stuck bit holds (None for a flip, which
    changes every bit it hits). An element fault replaces whole elements: with zero
    (`zeroes`) or with a uniform draw from `value_range`.
    """

    name: str
    description: str
    per_bit: bool
    stuck_at: int | None = None
    zeroes: bool = False
    bit_words: Callable[[Words, Words], Words] | None = None

    @property
    def flips(self) -> bool:
        """Every bit it hits changes (a bit flip), so hits and changes are one count."""
        return self.per_bit and self.stuck_at is None

    def bit_rates(self, p: float, p01: float | None = None, p10: float | None = None) -> tuple[float, float]:
        """(probability an eligible bit holding 0 changes, same for a bit holding 1): a stuck-at
        bit changes only the other value; asymmetric flips give p01/p10."""
        if self.stuck_at == 0:
            return 0.0, p
        if self.stuck_at == 1:
            return p, 0.0
        if p01 is not None or p10 is not None:
            return p01 or 0.0, p10 or 0.0
        return p, p


FAULT_KIND_TABLE: dict[str, FaultKind] = {
    kind.name: kind
    for kind in (
        FaultKind(
            "bitflip",
            "each eligible bit flips with probability p (0->1 and 1->0; or p01/p10 separately)",
            per_bit=True,
            bit_words=lambda old, masks: old ^ masks,
        ),
        FaultKind(
            "stuck0",
            "each eligible bit is stuck at 0 with probability p",
            per_bit=True,
            stuck_at=0,
            bit_words=lambda old, masks: old & ~masks,
        ),
        FaultKind(
            "stuck1",
            "each eligible bit is stuck at 1 with probability p",
            per_bit=True,
            stuck_at=1,
            bit_words=lambda old, masks: old | masks,
        ),
        FaultKind("value", "each element is replaced, with probability p, by a uniform draw from value_range", per_bit=False),
        FaultKind("zero", "each element is set to 0 with probability p", per_bit=False, zeroes=True),
    )
}


def bit_fault_words(fault: str, old: Words, masks: Words) -> Words:
    """What a bit fault makes of the stored words it hits (numpy on the host, torch on a device)."""
    words = FAULT_KIND_TABLE[fault].bit_words
    if words is None:
        raise ValueError(f"fault={fault} replaces whole elements; it has no bit masks")
    return words(old, masks)
