"""How a faulted generation failed, in one word: the classes of the side-by-side views.

The definitions (docs/generation/README.md repeats them) are checked in this order; the first
that holds names the class:

1. `non-finite`: the faulted model's logits held NaN or ±Inf at some step (the text after it was
   chosen from logits made safe, and means nothing).
   `collapsed`: its logits were finite but flat (all equal) at some step: the model had no
   preference left, and greedy decoding emits token 0 from there (what lm-eval counts as a
   degenerate request). Such a text reads as empty or repetitive, and is neither.
2. `identical`: the faulted tokens are the clean tokens.
3. `empty`: the faulted continuation is empty or only whitespace (and the clean one is not).
4. `repetitive`: at least `MIN_TOKENS_FOR_REPETITION` tokens, of which fewer than
   `REPETITIVE_BELOW` of the trigrams are distinct (a loop such as "the the the").
5. `gibberish`: from the first divergence on, the clean model finds the faulted text at least
   `GIBBERISH_RATIO` times as perplexing as its own continuation over the same positions.
6. `diverged`: diverged but fluent; none of the above.

Without a model to measure perplexity (texts from lm-eval output directories), classes 1 and 5
cannot be told, and a text that would be `gibberish` or `diverged` reads `diverged` (and one that
is `non-finite` or `collapsed` reads as what its text looks like: the run's drift table counts
those requests).
"""

from __future__ import annotations

from collections.abc import Sequence

FAILURE_CLASSES = ("identical", "diverged", "repetitive", "gibberish", "empty", "collapsed", "non-finite")
"""Every class, from the mildest to the worst (the order of the figures' legends)."""

MIN_TOKENS_FOR_REPETITION = 12
REPETITIVE_BELOW = 0.5
GIBBERISH_RATIO = 10.0


def first_divergence(clean: Sequence[int | str], faulted: Sequence[int | str]) -> int | None:
    """The first position where the two differ; the shorter length if one is a prefix of the
    other; None when they are identical."""
    for position, (a, b) in enumerate(zip(clean, faulted, strict=False)):
        if a != b:
            return position
    return None if len(clean) == len(faulted) else min(len(clean), len(faulted))


def distinct_trigrams(tokens: Sequence[int | str]) -> float:
    """The share of distinct trigrams among a text's trigrams (1.0 under three tokens)."""
    grams = [tuple(tokens[i : i + 3]) for i in range(len(tokens) - 2)]
    return len(set(grams)) / len(grams) if grams else 1.0


def failure_class(
    clean: Sequence[int | str],
    faulted: Sequence[int | str],
    faulted_text: str,
    clean_text: str,
    nonfinite: bool = False,
    tail_perplexity_ratio: float | None = None,
    flat: bool = False,
) -> str:
    """The class of one faulted generation against the clean one (see the module docstring)."""
    if nonfinite:
        return "non-finite"
    if flat:
        return "collapsed"
    if list(clean) == list(faulted):
        return "identical"
    if not faulted_text.strip() and clean_text.strip():
        return "empty"
    if len(faulted) >= MIN_TOKENS_FOR_REPETITION and distinct_trigrams(faulted) < REPETITIVE_BELOW:
        return "repetitive"
    if tail_perplexity_ratio is not None and tail_perplexity_ratio >= GIBBERISH_RATIO:
        return "gibberish"
    return "diverged"
