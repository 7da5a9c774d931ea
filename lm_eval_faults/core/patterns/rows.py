"""`pattern=row:BYTES`: every eligible bit of every word in an aligned span of the stored bytes
(a failing DRAM row or RRAM word line)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from lm_eval_faults.core.patterns.registry import Pattern, PatternError, positive, register_pattern


@register_pattern
@dataclass(frozen=True)
class Row(Pattern):
    """An event is one aligned span of BYTES bytes of a tensor's stored words (rows 0, 1, ... from
    its first byte; the last may be cut short); it hits every eligible bit of every word in it."""

    name = "row"
    syntax = "row:BYTES"
    definition = (
        "a failing row: an event is an aligned span of BYTES stored bytes, struck with probability p; it hits every eligible "
        "bit of every word in the span"
    )
    whole_words = True
    size: int = 1024

    @classmethod
    def parse(cls, args: list[int]) -> Row:
        if len(args) != 1:
            raise PatternError("write row:BYTES, the bytes of one failing row (e.g. row:1024)")
        return cls(positive(cls, args[0], "BYTES"))

    def label(self) -> str:
        return f"row:{self.size}"

    def row_words(self, width: int) -> int:
        if self.size * 8 % width:
            raise PatternError(f"row:{self.size} does not hold whole {width}-bit words; give a multiple of {width // 8 or 1} bytes")
        return self.size * 8 // width

    def slots(self, numels: np.ndarray, width: int, eligible: tuple[int, ...]) -> np.ndarray:
        return -(-np.asarray(numels, dtype=np.int64) // self.row_words(width))

    def expand(
        self, slot: np.ndarray, numel: np.ndarray, width: int, eligible: tuple[int, ...]
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        words = self.row_words(width)
        event = np.repeat(np.arange(len(slot), dtype=np.int64), words)
        word = np.repeat(slot * words, words) + np.tile(np.arange(words, dtype=np.int64), len(slot))
        inside = word < np.repeat(numel, words)
        mask = sum(1 << bit for bit in eligible)
        return event[inside], word[inside], np.full(int(inside.sum()), mask, dtype=np.int64)

    def words_per_event(self, width: int, eligible: tuple[int, ...]) -> int:
        return self.row_words(width)

    def bits_per_word(self, width: int, eligible: tuple[int, ...]) -> int:
        return len(eligible)

    def bits_per_slot(self) -> int:
        return self.size * 8
