"""`pattern=burst:K`: K adjacent bits of one stored word, struck together (a multi-bit upset in a word)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from lm_eval_faults.core.patterns.registry import Pattern, PatternError, positive, register_pattern


@register_pattern
@dataclass(frozen=True)
class Burst(Pattern):
    """An event is a start bit s of a word; it hits the K eligible bits s, s+1, ..., s+K-1 (with
    `bits=all`, K physically adjacent bits). A word of E eligible bits has E-K+1 starts, each struck
    with probability p; a word with fewer than K eligible bits has one start, hitting all of them."""

    name = "burst"
    syntax = "burst:K"
    definition = (
        "an event is a start bit of a word, struck with probability p: it hits that bit and the K-1 next eligible bits of the "
        "same word (E eligible bits give E-K+1 starts per word)"
    )
    bits: int = 2

    @classmethod
    def parse(cls, args: list[int]) -> Burst:
        if len(args) != 1:
            raise PatternError("write burst:K, the number of adjacent bits one event hits (2 to 32)")
        return cls(positive(cls, args[0], "K", least=1))

    def label(self) -> str:
        return f"burst:{self.bits}"

    def starts(self, eligible: tuple[int, ...]) -> int:
        return max(len(eligible) - self.bits + 1, 1)

    def masks(self, eligible: tuple[int, ...]) -> np.ndarray:
        """The bit mask of each start."""
        return np.array(
            [sum(1 << bit for bit in eligible[start : start + self.bits]) for start in range(self.starts(eligible))], dtype=np.int64
        )

    def slots(self, numels: np.ndarray, width: int, eligible: tuple[int, ...]) -> np.ndarray:
        return np.asarray(numels, dtype=np.int64) * self.starts(eligible)

    def expand(
        self, slot: np.ndarray, numel: np.ndarray, width: int, eligible: tuple[int, ...]
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        starts = self.starts(eligible)
        return np.arange(len(slot), dtype=np.int64), slot // starts, self.masks(eligible)[slot % starts]

    def words_per_event(self, width: int, eligible: tuple[int, ...]) -> int:
        return 1

    def bits_per_word(self, width: int, eligible: tuple[int, ...]) -> int:
        return min(self.bits, len(eligible))
