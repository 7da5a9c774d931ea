"""Events that hit one bit position along a line of words: multi-cell upsets (`mcu:K`), failing bit
lines (`column:STRIDE:ROWS`) and clusters of stuck cells (`clustered:C`)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from lm_eval_faults.core.patterns.registry import Pattern, PatternError, positive, register_pattern


def _line_words(first: np.ndarray, step: int, length: int, numel: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(event index, word) of `length` words from `first` every `step` words, cut at each site's end."""
    event = np.repeat(np.arange(len(first), dtype=np.int64), length)
    word = np.repeat(first, length) + np.tile(np.arange(length, dtype=np.int64) * step, len(first))
    inside = word < np.repeat(numel, length)
    return event[inside], word[inside]


@register_pattern
@dataclass(frozen=True)
class MultiCell(Pattern):
    """An event is (first word w, eligible bit b): bit b of words w .. w+K-1, the same cell of K
    neighbouring words (an upset that crosses adjacent cells). A tensor of n words has n-K+1 first
    words (one if n < K), each with one slot per eligible bit."""

    name = "mcu"
    syntax = "mcu:K"
    definition = (
        "a multi-cell upset: an event is a word and an eligible bit, struck with probability p; it hits that bit in the word "
        "and in the K-1 words after it"
    )
    whole_words = True
    words: int = 2

    @classmethod
    def parse(cls, args: list[int]) -> MultiCell:
        if len(args) != 1:
            raise PatternError(f"write {cls.syntax}, the number of neighbouring words one event hits")
        return cls(positive(cls, args[0], "K"))

    def label(self) -> str:
        return f"{self.name}:{self.words}"

    def slots(self, numels: np.ndarray, width: int, eligible: tuple[int, ...]) -> np.ndarray:
        numels = np.asarray(numels, dtype=np.int64)
        return np.where(numels > 0, np.maximum(numels - self.words + 1, 1), 0) * len(eligible)

    def expand(
        self, slot: np.ndarray, numel: np.ndarray, width: int, eligible: tuple[int, ...]
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        bits = np.array([1 << bit for bit in eligible], dtype=np.int64)
        event, word = _line_words(slot // len(eligible), 1, self.words, numel)
        return event, word, bits[slot % len(eligible)][event]

    def words_per_event(self, width: int, eligible: tuple[int, ...]) -> int:
        return self.words

    def bits_per_word(self, width: int, eligible: tuple[int, ...]) -> int:
        return 1


@register_pattern
@dataclass(frozen=True)
class Clustered(MultiCell):
    """`mcu:C`'s geometry with stuck cells: a cluster of C neighbouring cells along a bit line is
    stuck at 0 (rate `p_sa0` per slot) or at 1 (`p_sa1`), the two drawn independently, as RRAM
    crossbars' stuck cells are; a cell in clusters of both reads 1."""

    name = "clustered"
    syntax = "clustered:C"
    definition = (
        "stuck-at cells in clusters: an event is a word and an eligible bit, struck with probability p_sa0 (stuck at 0) or "
        "p_sa1 (stuck at 1), independently; it sticks that bit in the word and in the C-1 words after it"
    )
    stuck_at = True


@register_pattern
@dataclass(frozen=True)
class Column(Pattern):
    """A failing bit line: the words are laid out in crossbar tiles of ROWS rows of STRIDE words;
    an event is (tile, word column c, eligible bit b), and hits bit b of word c in each of the
    tile's ROWS rows, i.e. words c, c+STRIDE, ..., c+(ROWS-1)*STRIDE of the tile."""

    name = "column"
    syntax = "column:STRIDE:ROWS"
    definition = (
        "a failing bit line: words sit in tiles of ROWS rows of STRIDE words; an event is a tile, a word column and an eligible "
        "bit, struck with probability p, and hits that bit in the column's word of every row of the tile"
    )
    whole_words = True
    stride: int = 64
    rows: int = 64

    @classmethod
    def parse(cls, args: list[int]) -> Column:
        if not 1 <= len(args) <= 2:
            raise PatternError("write column:STRIDE:ROWS (words per crossbar row, rows per tile; ROWS defaults to 64)")
        return cls(positive(cls, args[0], "STRIDE"), positive(cls, args[1], "ROWS") if len(args) > 1 else 64)

    def label(self) -> str:
        return f"column:{self.stride}:{self.rows}"

    def slots(self, numels: np.ndarray, width: int, eligible: tuple[int, ...]) -> np.ndarray:
        tile = self.stride * self.rows
        return -(-np.asarray(numels, dtype=np.int64) // tile) * self.stride * len(eligible)

    def expand(
        self, slot: np.ndarray, numel: np.ndarray, width: int, eligible: tuple[int, ...]
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        per_tile = self.stride * len(eligible)
        tile, within = slot // per_tile, slot % per_tile
        first = tile * self.stride * self.rows + within // len(eligible)
        bits = np.array([1 << bit for bit in eligible], dtype=np.int64)
        event, word = _line_words(first, self.stride, self.rows, numel)
        return event, word, bits[within % len(eligible)][event]

    def words_per_event(self, width: int, eligible: tuple[int, ...]) -> int:
        return self.rows

    def bits_per_word(self, width: int, eligible: tuple[int, ...]) -> int:
        return 1

    def bits_per_slot(self) -> int:
        return self.rows
