"""Where faults land: iid Bernoulli positions drawn in O(number of faults), reproducibly.

Every bit (or element) of a site is hit independently with probability p. Drawing a Bernoulli
variable per bit, as dense simulators do, costs O(model size x bits). We draw the same
distribution in two exact steps instead:

1. *Which elements* have at least one faulty bit. Each element is hit independently with
   q = 1 - (1 - p)^B (B eligible bits). At small q: the count k ~ Binomial(n, q), then k distinct
   uniform positions (first k distinct values of an iid uniform stream: a uniform k-subset).
   At large q, where positions are a sizeable fraction anyway, a chunked dense draw is faster.
2. *Which bits* of each hit element: the B-bit mask conditioned on being non-zero, drawn
   8 bits at a time from exact lookup tables (inverse CDF in float64).

Randomness comes from a hash of (seed, sampling key, site name, stream) on the CPU: a uniform
number that decides the fault count when few are expected (a clean site costs one hash), and a
Philox generator for positions and masks. The map is a pure function of those, identical on CPU
and GPU, in every data-parallel rank and in every run. Positions move to the device afterwards.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass
from functools import lru_cache
from typing import Any, Mapping

import numpy as np

DENSE_ABOVE = 0.05
"""Element rate above which a chunked dense draw beats the sparse one (measured in bench/)."""

DENSE_CHUNK = 1 << 22
"""Elements per dense chunk: bounds temporary memory whatever the tensor size."""

TABLE_BITS = 8


SMALL_MEAN = 100.0
"""Expected fault count below which the count is drawn by inverse CDF from the site's uniform:
a site with no fault then costs one hash, no generator and no tensor access."""


def spec_key(seed: int, sampling_key: Mapping[str, Any]) -> bytes:
    """The part of every site key that depends on the spec: hashed once per injection."""
    text = json.dumps([int(seed), dict(sampling_key)], sort_keys=True)
    return hashlib.blake2b(text.encode(), digest_size=32).digest()


def site_key(spec: bytes, name: str) -> bytes:
    """The key of one site (parameter or module): a keyed hash of its name."""
    return hashlib.blake2b(name.encode(), key=spec, digest_size=32).digest()


class SiteStream:
    """The randomness of one draw at one site: stream `stream` (e.g. a forward call) of `key`.

    `u` is a uniform number that decides the fault count when few faults are expected; the
    Philox generator is only built when at least one fault lands. Both derive from a hash of
    (key, stream), so they are the same in every process, on every device.
    """

    __slots__ = ("u", "_philox_key", "_rng")

    def __init__(self, key: bytes, stream: int = 0) -> None:
        digest = hashlib.blake2b(stream.to_bytes(8, "little"), key=key, digest_size=24).digest()
        self.u = (int.from_bytes(digest[:8], "little") >> 11) * 2.0**-53
        self._philox_key = int.from_bytes(digest[8:], "little")
        self._rng: np.random.Generator | None = None

    @property
    def rng(self) -> np.random.Generator:
        if self._rng is None:
            self._rng = np.random.Generator(np.random.Philox(key=self._philox_key))
        return self._rng


def element_rate(p: float, eligible_bits: int) -> float:
    """Probability that at least one of `eligible_bits` independent bits is hit."""
    if p >= 1.0:
        return 1.0
    return -math.expm1(eligible_bits * math.log1p(-p))


def binomial_from_uniform(n: int, q: float, u: float) -> int:
    """The Binomial(n, q) quantile at u (inverse CDF), for small n*q: exact to float64 precision."""
    pmf = math.exp(n * math.log1p(-q))
    cdf, k, ratio = pmf, 0, q / (1.0 - q)
    while u >= cdf and k < n and pmf > 0.0:
        pmf *= (n - k) / (k + 1) * ratio
        k += 1
        cdf += pmf
    return k


def bernoulli_positions(n: int, q: float, stream: SiteStream) -> np.ndarray:
    """Sorted positions in [0, n), each present independently with probability q."""
    if n == 0 or q <= 0.0:
        return np.empty(0, dtype=np.int64)
    if q >= 1.0:
        return np.arange(n, dtype=np.int64)
    if q > DENSE_ABOVE:
        chunks = [
            np.flatnonzero(stream.rng.random(min(DENSE_CHUNK, n - start)) < q) + start
            for start in range(0, n, DENSE_CHUNK)
        ]
        return np.concatenate(chunks).astype(np.int64, copy=False)
    k = binomial_from_uniform(n, q, stream.u) if n * q <= SMALL_MEAN else int(stream.rng.binomial(n, q))
    if k == 0:
        return np.empty(0, dtype=np.int64)
    return distinct_uniform(n, k, stream.rng)


def distinct_uniform(n: int, k: int, rng: np.random.Generator) -> np.ndarray:
    """A uniformly random k-subset of [0, n), sorted, in O(k) expected time for k << n.

    Takes the first k distinct values of an iid uniform stream, extending the stream only by
    what is still missing; by exchangeability that set is uniform over all k-subsets.
    """
    if k == 0:
        return np.empty(0, dtype=np.int64)
    draws = rng.integers(0, n, size=k, dtype=np.int64)
    ordered = np.sort(draws)
    if k < 2 or np.all(ordered[1:] != ordered[:-1]):  # the common case: no collision at all
        return ordered
    while True:
        distinct, first_seen = np.unique(draws, return_index=True)
        if len(distinct) >= k:
            break
        draws = np.concatenate([draws, rng.integers(0, n, size=k - len(distinct), dtype=np.int64)])
    return np.sort(draws[np.sort(first_seen)[:k]])


@dataclass(frozen=True)
class _MaskTables:
    """Inverse-CDF tables to draw a non-zero mask over `bits` with per-bit probability p."""

    unconditional: tuple[np.ndarray, ...]
    given_rest_zero: tuple[np.ndarray, ...]
    words: tuple[np.ndarray, ...]


@lru_cache(maxsize=64)
def _mask_tables(p: float, bits: tuple[int, ...]) -> _MaskTables:
    chunks = [bits[i : i + TABLE_BITS] for i in range(0, len(bits), TABLE_BITS)]
    unconditional, conditional, words = [], [], []
    for index, chunk in enumerate(chunks):
        values = np.arange(1 << len(chunk))
        ones = np.array([bin(v).count("1") for v in values])
        prob = p**ones * (1.0 - p) ** (len(chunk) - ones)
        # P(some later chunk is non-zero): what a zero here must be weighted by when all earlier
        # chunks were zero too, so that the whole mask is non-zero.
        later_nonzero = element_rate(p, sum(len(c) for c in chunks[index + 1 :]))
        cond = prob.copy()
        cond[0] *= later_nonzero
        unconditional.append(_cdf(prob))
        conditional.append(_cdf(cond))
        words.append(np.array([sum(1 << chunk[b] for b in range(len(chunk)) if v >> b & 1) for v in values], dtype=np.int64))
    return _MaskTables(tuple(unconditional), tuple(conditional), tuple(words))


def _cdf(prob: np.ndarray) -> np.ndarray:
    cdf = np.cumsum(prob / prob.sum())
    cdf[-1] = 1.0
    return cdf


def nonzero_masks(k: int, p: float, bits: tuple[int, ...], rng: np.random.Generator) -> np.ndarray:
    """k bit masks over positions `bits`, each bit set w.p. p, conditioned on the mask being non-zero.

    Together with `element_rate` this is exactly iid Bernoulli(p) per bit.
    """
    tables = _mask_tables(float(p), tuple(bits))
    masks = np.zeros(k, dtype=np.int64)
    all_zero_so_far = np.ones(k, dtype=bool)
    for uncond, cond, words in zip(tables.unconditional, tables.given_rest_zero, tables.words):
        u = rng.random(k)
        value = np.searchsorted(cond, u, side="right")
        settled = ~all_zero_so_far
        if settled.any():
            value[settled] = np.searchsorted(uncond, u[settled], side="right")
        value = np.minimum(value, len(words) - 1)
        masks |= words[value]
        all_zero_so_far &= value == 0
    return masks
