"""The fault patterns `pattern=` chooses, and the one shape every pattern has.

Every pattern but `iid` is a set of *event slots* per tensor: places where one event can strike
(a start bit of a burst, a failing row, a bit line). Each slot is struck independently with the
spec's rate p (an event rate), drawn exactly and in O(events) over the slots with the sampler's
own Bernoulli draw (`events.py`); the pattern then says which words and bits each struck slot
covers. A bit several events cover is hit once. A new pattern is one module that subclasses
`Pattern` and one `register_pattern` call, as a site or a storage format is.

`iid` is the default and today's draw: every bit its own event (`faults.host` draws it as it did
before patterns existed, so its maps are unchanged).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import ClassVar

import numpy as np


class PatternError(ValueError):
    """A `pattern=` value that names no pattern or gives it bad parameters."""


@dataclass(frozen=True)
class Pattern(ABC):
    """One correlated fault pattern with its parameters (frozen: a spec holds it)."""

    name: ClassVar[str]
    syntax: ClassVar[str]
    """How `pattern=` writes it, e.g. `burst:K`."""
    definition: ClassVar[str]
    """What one event is and which bits it hits: the README's and the report's line."""
    whole_words: ClassVar[bool] = False
    """Whether an event covers whole words (so element faults, value and zero, can follow it)."""
    stuck_at: ClassVar[bool] = False
    """Whether the pattern sets its own stuck-at values (`p_sa0`, `p_sa1`) instead of `fault=`."""

    @classmethod
    @abstractmethod
    def parse(cls, args: list[int]) -> Pattern:
        """The pattern from the integers after its name (`burst:4` -> [4]); PatternError if bad."""

    @abstractmethod
    def label(self) -> str:
        """The `pattern=` text that gives this pattern back."""

    @abstractmethod
    def slots(self, numels: np.ndarray, width: int, eligible: tuple[int, ...]) -> np.ndarray:
        """Event slots per site of `numels` words of `width` bits, `eligible` bits each."""

    @abstractmethod
    def expand(
        self, slot: np.ndarray, numel: np.ndarray, width: int, eligible: tuple[int, ...]
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(event index, word index, bit mask) of every word the struck `slot`s cover; `numel`
        is each event's site size, and no word index reaches it."""

    @abstractmethod
    def words_per_event(self, width: int, eligible: tuple[int, ...]) -> int:
        """Words one event covers (at most: a row or line cut off at a tensor's end covers fewer)."""

    @abstractmethod
    def bits_per_word(self, width: int, eligible: tuple[int, ...]) -> int:
        """Eligible bits one event hits in each word it covers."""

    def bits_per_slot(self) -> int:
        """Stored bits one event slot stands for: how `fit=` (events per Mbit) becomes a slot rate.
        One for patterns with a slot per bit (a burst's start bit, a cell); a row's bits for rows."""
        return 1


_PATTERNS: dict[str, type[Pattern]] = {}


def register_pattern(pattern: type[Pattern]) -> type[Pattern]:
    """Make `pattern=<name>` choose `pattern` (a decorator on the class)."""
    if pattern.name in _PATTERNS or pattern.name == IID:
        raise ValueError(f"pattern {pattern.name!r} is registered twice")
    _PATTERNS[pattern.name] = pattern
    return pattern


IID = "iid"
IID_DEFINITION = "every eligible bit is its own event, hit independently with probability p (today's faults)"


def pattern_syntaxes() -> dict[str, str]:
    """`pattern=` forms and their definitions, iid first: for errors and the README."""
    return {IID: IID_DEFINITION, **{cls.syntax: cls.definition for cls in _PATTERNS.values()}}


def parse_pattern(value: object) -> Pattern | None:
    """`"burst:4"` -> the burst pattern of 4 bits; `"iid"` -> None (the independent draw)."""
    text = str(value).strip().lower()
    name, _, rest = text.partition(":")
    if name == IID and not rest:
        return None
    if name not in _PATTERNS:
        raise PatternError(f"choose {', '.join(pattern_syntaxes())}")
    try:
        args = [int(part) for part in rest.split(":")] if rest else []
    except ValueError:
        raise PatternError(f"write {_PATTERNS[name].syntax} with whole numbers") from None
    return _PATTERNS[name].parse(args)


def positive(pattern: type[Pattern], value: int, what: str, least: int = 1) -> int:
    """A pattern parameter of at least `least`, or a PatternError naming the syntax."""
    if value < least:
        raise PatternError(f"{pattern.syntax}: {what} must be at least {least}, got {value}")
    return value
