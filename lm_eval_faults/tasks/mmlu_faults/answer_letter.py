"""Read the answer letter out of a free-form generation, for the DeepEval-style MMLU protocol.

DeepEval scores MMLU by exact match of the generated text against the gold letter, which marks a
model wrong for answering " B." or "The answer is B". A fault study must not confuse formatting
drift with damage, so the generative tasks first reduce each response to one letter (or to
nothing) and only then compare. The rules, tried in order:

1. the first non-blank line is just a letter with punctuation: "B", " B.", "(b)";
2. the response starts with a capital letter used as a label: "B. 42", "C) Paris", "D: ...";
3. the response states it: "The answer is B", "answer: (c)", "the answer is b.".

Anything else ("I don't know", "A good question") yields "", which matches no gold letter.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

_ONLY_LETTER = re.compile(r"^\W*([A-Da-d])\W*$")
_LEADING_LABEL = re.compile(r"^\W*([A-D])(?:[.):]|$)")
# A lower-case letter counts only at the end of a clause, so "the answer is a ..." is no answer.
_STATED = re.compile(r"\b[Aa]nswer\s*(?:is|:)?\s*:?\s*\(?(?:([A-D])(?![\w'])|([a-d])(?=\)?\s*(?:[.!,;:]|$)))")


def extract_letter(response: str) -> str:
    """The answer letter (upper case) found in `response`, or "" if there is none."""
    text = response.strip()
    first_line = text.split("\n", 1)[0]
    for pattern, where in ((_ONLY_LETTER, first_line), (_LEADING_LABEL, text), (_STATED, text)):
        match = pattern.search(where)
        if match:
            return next(group for group in match.groups() if group).upper()
    return ""


def extract_letters(resps: Iterable[list[str]], docs: Iterable[dict]) -> list[list[str]]:
    """lm-eval `custom` filter: the same reduction on every response of every doc."""
    return [[extract_letter(response) for response in responses] for responses in resps]
