"""Which writing system a token's text is in: the RRAM study saw faulted models emit mostly Chinese
characters and guessed that such tokens fill much of the vocabulary; this measures both sides.

A token's script is that of most of its letters, by the first word of each character's Unicode
name (LATIN, CJK, CYRILLIC, ...: Python's `unicodedata` has no script property, and the name's
first word is the script for every letter in the Basic Multilingual Plane but a few symbols).
Tokens with no letters are `digits`, `punctuation`, `whitespace` or `other` (symbols, emoji,
and the byte fragments of characters split over several tokens, which decode to U+FFFD).
"""

from __future__ import annotations

import unicodedata
from collections import Counter
from collections.abc import Iterable

SCRIPT_ALIASES = {
    "HIRAGANA": "JAPANESE",
    "KATAKANA": "JAPANESE",
    "KATAKANA-HIRAGANA": "JAPANESE",
    "HALFWIDTH": "JAPANESE",
    "HANGUL": "KOREAN",
    "MICRO": "GREEK",
    "MASCULINE": "LATIN",
    "FEMININE": "LATIN",
    "MODIFIER": "OTHER",
}
"""Letters whose name does not start with their script: the kana marks, the micro sign (a Greek mu),
the ordinal indicators (Latin), modifier letters (phonetic marks of several scripts)."""


def char_script(char: str) -> str | None:
    """The script of a letter; None for anything that is not a letter."""
    if not unicodedata.category(char).startswith("L"):
        return None
    name = unicodedata.name(char, "")
    first = name.split(" ", 1)[0] if name else "UNKNOWN"
    return SCRIPT_ALIASES.get(first, first).lower()


def token_script(text: str) -> str:
    """The script of most of a token's letters, or what it is made of when it has none."""
    scripts = Counter(script for char in text if (script := char_script(char)) is not None)
    if scripts:
        return scripts.most_common(1)[0][0]
    if not text:
        return "other"
    if all(char.isspace() for char in text):
        return "whitespace"
    if any(char.isdigit() for char in text) and all(char.isdigit() or char.isspace() for char in text):
        return "digits"
    if "\ufffd" not in text and all(unicodedata.category(char).startswith("P") or char.isspace() for char in text):
        return "punctuation"
    return "other"


def script_shares(texts: Iterable[str]) -> dict[str, float]:
    """Each script's share of `texts` (one token each), largest first."""
    counts = Counter(token_script(text) for text in texts)
    total = sum(counts.values())
    return {script: count / total for script, count in counts.most_common()} if total else {}
