"""Where faults land: iid Bernoulli positions drawn in O(number of faults), for many sites at once.

Every bit (or element) of a site is hit independently with probability p. Drawing a Bernoulli
variable per bit, as dense simulators do, costs O(model size x bits). We draw the same
distribution in two exact steps instead:

1. *Which elements* have at least one faulty bit. Each element is hit independently with
   q = 1 - (1 - p)^B (B eligible bits). At small q: the count k ~ Binomial(n, q), then k distinct
   uniform positions (the first k distinct values of an iid uniform stream: a uniform k-subset).
   At large q, where positions are a sizeable fraction anyway, a chunked dense draw is faster.
2. *Which bits* of each hit element: the B-bit mask conditioned on being non-zero, drawn 8 bits
   at a time from exact alias tables (Walker's method, float64 probabilities).

Randomness is counter-based: draw number i of purpose P at a site is a SplitMix64 output computed
directly from (the site's 64-bit key, P, i), where the key is a keyed hash of (seed, spec, site
name, stream). No generator state exists, so the draws of every site of a model are computed in
one vectorised pass (a clean site costs one hash and a few array lanes, a faulted one a few more),
and the map is a pure function of (seed, name, spec): the same on CPU and GPU, in every
data-parallel rank and in every run. `device_sampling.py` draws the same positions and masks with
torch ops on a tensor's own device.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache

import numpy as np

from lm_eval_faults.core.random.streams import Purpose, random_words, to_uniform

DENSE_ABOVE = 0.05
"""Element rate above which a chunked dense draw beats the sparse one (measured in bench/)."""

DENSE_CHUNK = 1 << 22
"""Elements per dense chunk: bounds temporary memory whatever the tensor size."""

TABLE_BITS = 8

SMALL_MEAN = 100.0
"""Expected fault count up to which the count's inverse CDF is tabulated from 0 for all such sites
at once; above it, per site, over a window around the mean. Both use the site's own COUNT uniform
(never numpy's samplers, whose algorithms numpy does not promise to keep)."""

WINDOW_SIGMAS = 40.0
"""Half-width of the large-mean window in standard deviations: the binomial mass outside it is
below 1e-300, so the window holds every count a float64 uniform can reach."""

POSITION_BITS = 40
"""Positions and site indices share one 64-bit sort key: tensors hold fewer than 2^40 elements."""


@dataclass(frozen=True)
class HitPurposes:
    """The stream purposes one Bernoulli draw takes its count, positions and dense words from:
    iid faults use COUNT/POSITION/DENSE; a correlated pattern's events use their own."""

    count: Purpose
    position: Purpose
    dense: Purpose


IID_PURPOSES = HitPurposes(Purpose.COUNT, Purpose.POSITION, Purpose.DENSE)


def element_rate(p: float, eligible_bits: int) -> float:
    """Probability that at least one of `eligible_bits` independent bits is hit."""
    if p >= 1.0:
        return 1.0
    return -math.expm1(eligible_bits * math.log1p(-p))


def fault_counts(numels: np.ndarray, q: float, keys: np.ndarray, purpose: Purpose = Purpose.COUNT) -> np.ndarray:
    """Binomial(numel, q) per site, each a function of its own key only.

    The count is the binomial inverse CDF at the site's COUNT uniform, so a site that holds no
    fault (the common case at small p) is settled by one comparison with P(0) = (1 - q)^n.
    """
    numels = np.asarray(numels, dtype=np.int64)
    counts = np.zeros(len(numels), dtype=np.int64)
    if q <= 0.0 or not len(numels):
        return counts
    if q >= 1.0:
        return numels.copy()
    u = to_uniform(random_words(keys, purpose, 0))
    p_zero = np.exp(numels * math.log1p(-q))
    some = np.flatnonzero(u >= p_zero)
    if not len(some):
        return counts
    mean = numels[some] * q
    small, large = some[mean <= SMALL_MEAN], some[mean > SMALL_MEAN]
    if len(small):
        counts[small] = _binomial_inverse_cdf(numels[small], q, u[small], p_zero[small])
    for site in large:
        counts[site] = _binomial_inverse_cdf_around_mean(int(numels[site]), q, float(u[site]))
    return counts


def _binomial_inverse_cdf(n: np.ndarray, q: float, u: np.ndarray, p_zero: np.ndarray) -> np.ndarray:
    """Smallest k with CDF(k) > u for each site (n*q <= SMALL_MEAN), exact to float64 precision.

    The pmf comes from the recurrence pmf(k+1) = pmf(k) (n-k)/(k+1) q/(1-q), evaluated for every
    site at once up to a tail far beyond any site's mean; a u beyond it is finished one by one.
    """
    mean = float(n.max()) * q
    width = int(mean + 12.0 * math.sqrt(mean) + 16.0)
    k = np.arange(width - 1, dtype=np.float64)
    ratio = np.clip(n[:, None] - k, 0.0, None) / (k + 1.0) * (q / (1.0 - q))
    pmf = np.concatenate([p_zero[:, None], p_zero[:, None] * np.cumprod(ratio, axis=1)], axis=1)
    cdf = np.cumsum(pmf, axis=1)
    counts = np.count_nonzero(cdf <= u[:, None], axis=1)
    for i in np.flatnonzero(counts == width):
        counts[i] = _extend_inverse_cdf(int(n[i]), q, float(u[i]), width - 1, float(pmf[i, -1]), float(cdf[i, -1]))
    return np.minimum(counts, n)


def _binomial_inverse_cdf_around_mean(n: int, q: float, u: float) -> int:
    """Smallest k with CDF(k) > u for Binomial(n, q) with a large mean, from our own uniform u.

    The pmf is built outward from the mode by the ratio recurrence in log space (no lgamma of huge
    arguments, so no cancellation), over mode +- WINDOW_SIGMAS standard deviations, normalised over
    that window. O(sqrt(n q)) work, deterministic in float64.
    """
    mode = min(n, int((n + 1) * q))
    half = int(WINDOW_SIGMAS * math.sqrt(n * q * (1.0 - q))) + 16
    low, high = max(0, mode - half), min(n, mode + half)
    k_up = np.arange(mode, high, dtype=np.float64)  # log pmf(k+1) - log pmf(k), k = mode .. high-1
    k_down = np.arange(mode - 1, low - 1, -1, dtype=np.float64)  # log pmf(k) - log pmf(k+1), k = mode-1 .. low
    log_odds = math.log(q) - math.log1p(-q)
    up = np.cumsum(np.log((n - k_up) / (k_up + 1.0)) + log_odds)
    down = np.cumsum(np.log((k_down + 1.0) / (n - k_down)) - log_odds)
    log_pmf = np.concatenate([down[::-1], [0.0], up])  # relative to pmf(mode), for k = low .. high
    pmf = np.exp(log_pmf - log_pmf.max())
    cdf = np.cumsum(pmf)
    return low + int(np.count_nonzero(cdf <= u * cdf[-1]))


def _extend_inverse_cdf(n: int, q: float, u: float, k: int, pmf: float, cdf: float) -> int:
    ratio = q / (1.0 - q)
    while u >= cdf and k < n and pmf > 0.0:
        pmf *= (n - k) / (k + 1) * ratio
        k += 1
        cdf += pmf
    return k


@dataclass(frozen=True)
class Hits:
    """Hit elements of a group of sites, grouped by site in site order, positions sorted per site.

    `rank` numbers the hits of each site 0, 1, ...: the index of their per-hit draws (masks,
    values) in the site's stream, so those draws do not depend on the other sites.
    """

    site: np.ndarray
    position: np.ndarray
    rank: np.ndarray

    def __len__(self) -> int:
        return len(self.site)

    def select(self, keep: np.ndarray) -> Hits:
        return Hits(self.site[keep], self.position[keep], self.rank[keep])

    def by_site(self) -> list[tuple[int, slice]]:
        """(site, slice of its hits) for every site that holds at least one hit."""
        if not len(self.site):
            return []
        starts = [0, *(np.flatnonzero(self.site[1:] != self.site[:-1]) + 1).tolist()]  # hits are grouped by site
        ends = [*starts[1:], len(self.site)]
        return [(int(self.site[start]), slice(start, end)) for start, end in zip(starts, ends, strict=True)]


def bernoulli_hits(numels: np.ndarray, q: float, keys: np.ndarray, purposes: HitPurposes = IID_PURPOSES) -> Hits:
    """Every element of every site present independently with probability q."""
    numels = np.asarray(numels, dtype=np.int64)
    keys = np.asarray(keys, dtype=np.uint64)
    if q <= 0.0 or not len(numels):
        return _no_hits()
    if q > DENSE_ABOVE:
        parts = [(site, _dense_positions(int(numels[site]), q, keys[site], purposes.dense)) for site in range(len(numels))]
        return _hits_from_parts(parts)
    counts = fault_counts(numels, q, keys, purposes.count)
    return distinct_uniform(numels, counts, keys, purposes.position)


def _no_hits() -> Hits:
    empty = np.empty(0, dtype=np.int64)
    return Hits(empty, empty, empty)


def _hits_from_parts(parts: list[tuple[int, np.ndarray]]) -> Hits:
    parts = [(site, positions) for site, positions in parts if len(positions)]
    if not parts:
        return _no_hits()
    sizes = [len(positions) for _, positions in parts]
    site = np.repeat(np.array([s for s, _ in parts], dtype=np.int64), sizes)
    return Hits(site, np.concatenate([positions for _, positions in parts]), group_ranks(np.asarray(sizes)))


def group_ranks(sizes: np.ndarray) -> np.ndarray:
    """0..size-1 for each group of consecutive hits, concatenated."""
    starts = np.cumsum(sizes) - sizes
    return np.arange(int(sizes.sum()), dtype=np.int64) - np.repeat(starts, sizes)


def _dense_positions(n: int, q: float, key: np.uint64, purpose: Purpose = Purpose.DENSE) -> np.ndarray:
    """Positions where element i's DENSE word falls below q * 2^64: chunked, so memory stays bounded."""
    if q >= 1.0:
        return np.arange(n, dtype=np.int64)
    threshold = np.uint64(dense_threshold(q))
    chunks = []
    for start in range(0, n, DENSE_CHUNK):
        index = np.arange(start, min(n, start + DENSE_CHUNK), dtype=np.uint64)
        chunks.append(np.flatnonzero(random_words(key, purpose, index) < threshold) + start)
    return np.concatenate(chunks).astype(np.int64, copy=False) if chunks else np.empty(0, dtype=np.int64)


def dense_threshold(q: float) -> int:
    """The DENSE word below which an element is hit: q * 2^64, as an unsigned 64-bit integer."""
    return min(int(q * 2.0**64), 2**64 - 1)


def distinct_uniform(numels: np.ndarray, counts: np.ndarray, keys: np.ndarray, purpose: Purpose = Purpose.POSITION) -> Hits:
    """A uniformly random counts[s]-subset of [0, numels[s]) for every site s, in O(total) time.

    Each site's subset is the first counts[s] distinct values of its POSITION stream (uniform by
    exchangeability). All sites are drawn in one vectorised pass; sites where two draws collide
    (or a word falls in the modulo's rejection zone) are redrawn together with a longer stream.
    """
    numels = np.asarray(numels, dtype=np.int64)
    if numels.max(initial=0) >= 1 << POSITION_BITS:
        raise ValueError(f"tensors of 2^{POSITION_BITS} elements or more are not supported")
    faulted = np.flatnonzero(counts)
    if not len(faulted):
        return _no_hits()
    sizes = counts[faulted]
    site = np.repeat(faulted, sizes)
    words = random_words(keys[site], purpose, group_ranks(sizes).astype(np.uint64))
    n = numels[site].astype(np.uint64)
    sort_key = np.sort(_site_major(site, words % n))
    redo = np.union1d(site[_rejected(words, n)], _site_of(sort_key[1:][sort_key[1:] == sort_key[:-1]]))
    if len(redo):
        sort_key = np.sort(
            np.concatenate([sort_key[np.isin(_site_of(sort_key), redo, invert=True)], _first_distinct(numels, counts, keys, redo, purpose)])
        )
    return Hits(_site_of(sort_key), (sort_key & np.uint64((1 << POSITION_BITS) - 1)).astype(np.int64), group_ranks(sizes))


def _site_major(site: np.ndarray, position: np.ndarray) -> np.ndarray:
    """One sortable key per hit: site index in the high bits, position in the low 40."""
    return site.astype(np.uint64) << np.uint64(POSITION_BITS) | position.astype(np.uint64)


def _site_of(sort_key: np.ndarray) -> np.ndarray:
    return (sort_key >> np.uint64(POSITION_BITS)).astype(np.int64)


def _rejected(words: np.ndarray, n: np.ndarray) -> np.ndarray:
    """Words at or above 2^64 - (2^64 mod n): rejecting them makes `word % n` exactly uniform."""
    return words > rejection_limit(n)


def rejection_limit(n: np.ndarray) -> np.ndarray:
    """The largest word whose `word % n` is accepted: 2^64 - 1 - (2^64 mod n), per uint64 n."""
    remainder = (np.uint64(0) - n) % n  # 2^64 mod n
    return np.uint64(2**64 - 1) - remainder


def _first_distinct(numels: np.ndarray, counts: np.ndarray, keys: np.ndarray, sites: np.ndarray, purpose: Purpose) -> np.ndarray:
    """Site-major keys of the first counts[s] distinct accepted POSITION values of each of `sites`.

    Draws a prefix of each stream long enough for the expected collisions plus a margin, keeps
    each value's first draw, and the counts[s] earliest of those; sites whose prefix fell short
    are redrawn with a prefix twice as long (a longer prefix has the same first values).
    """
    result = []
    extra = np.ceil(2.0 * counts[sites] ** 2 / numels[sites]).astype(np.int64) + 8
    while len(sites):
        k, length = counts[sites], counts[sites] + extra
        site = np.repeat(sites, length)
        draw = group_ranks(length)
        words = random_words(keys[site], purpose, draw.astype(np.uint64))
        n = numels[site].astype(np.uint64)
        accepted = ~_rejected(words, n)
        site, value = site[accepted], _site_major(site[accepted], (words % n)[accepted])
        # Draws are in (site, draw) order: a stable sort by value puts each value's first draw first.
        order = np.argsort(value, kind="stable")
        ordered = value[order]
        first = np.ones(len(value), dtype=bool)
        first[order[1:][ordered[1:] == ordered[:-1]]] = False
        site, value = site[first], value[first]  # each site's distinct values, in the order drawn
        found = np.bincount(site, minlength=len(numels))
        rank = group_ranks(found[found > 0])  # `site` is sorted
        done = found[sites] >= k
        keep = (rank < counts[site]) & np.isin(site, sites[done])
        result.append(value[keep])
        sites, extra = sites[~done], 2 * extra[~done]
    return np.concatenate(result)


@dataclass(frozen=True)
class _AliasTable:
    """Walker's alias table over the 2^b values of one b-bit chunk: O(1) per draw, exact in float64."""

    bits: int
    probability: np.ndarray
    alias: np.ndarray

    def draw(self, words: np.ndarray) -> np.ndarray:
        """Top `bits` bits pick a column; the low 53 bits decide between it and its alias."""
        column = (words >> np.uint64(64 - self.bits)).astype(np.int64)
        fraction = (words & np.uint64((1 << 53) - 1)).astype(np.float64) * 2.0**-53
        return np.where(fraction < self.probability[column], column, self.alias[column])


def _alias_table(prob: np.ndarray) -> _AliasTable:
    """Vose's construction of the alias table of a distribution over 2^b values."""
    size = len(prob)
    scaled = prob / prob.sum() * size
    probability, alias = np.ones(size), np.arange(size)
    small = [i for i in range(size) if scaled[i] < 1.0]
    large = [i for i in range(size) if scaled[i] >= 1.0]
    while small and large:
        low, high = small.pop(), large.pop()
        probability[low], alias[low] = scaled[low], high
        scaled[high] -= 1.0 - scaled[low]
        (small if scaled[high] < 1.0 else large).append(high)
    for i in small:  # rounding leftovers: columns that are really full
        probability[i] = 1.0
    return _AliasTable(size.bit_length() - 1, probability, alias)


@dataclass(frozen=True)
class _MaskTables:
    """Per chunk of <= 8 eligible bits: the chunk's value distribution, unconditionally and given
    that all earlier chunks were zero (so that the whole mask is non-zero), and its bit words."""

    unconditional: tuple[_AliasTable, ...]
    given_earlier_zero: tuple[_AliasTable, ...]
    words: tuple[np.ndarray, ...]


@lru_cache(maxsize=64)
def mask_tables(p: float, bits: tuple[int, ...]) -> _MaskTables:
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
        unconditional.append(_alias_table(prob))
        conditional.append(_alias_table(cond))
        words.append(np.array([sum(1 << chunk[b] for b in range(len(chunk)) if v >> b & 1) for v in values], dtype=np.int64))
    return _MaskTables(tuple(unconditional), tuple(conditional), tuple(words))


def nonzero_masks(p: float, bits: tuple[int, ...], keys: np.ndarray, rank: np.ndarray) -> np.ndarray:
    """One bit mask over positions `bits` per hit, each bit set w.p. p, conditioned on being non-zero.

    Together with `element_rate` this is exactly iid Bernoulli(p) per bit. Hit number r of a site
    uses MASK words r * chunks + c of the site's stream (`keys` holds each hit's site key).
    """
    tables = mask_tables(float(p), tuple(bits))
    chunks = len(tables.words)
    masks = np.zeros(len(rank), dtype=np.int64)
    all_zero_so_far = np.ones(len(rank), dtype=bool)
    first_word = rank.astype(np.uint64) * np.uint64(chunks)
    for chunk, (uncond, cond, words) in enumerate(zip(tables.unconditional, tables.given_earlier_zero, tables.words, strict=True)):
        draws = random_words(keys, Purpose.MASK, first_word + np.uint64(chunk))
        # Each hit needs one of the two tables; draw from the one most hits need, then fix the rest.
        unsettled = np.flatnonzero(all_zero_so_far)
        if 2 * len(unsettled) < len(rank):
            value = uncond.draw(draws)
            value[unsettled] = cond.draw(draws[unsettled])
        else:
            value = cond.draw(draws)
            settled = np.flatnonzero(~all_zero_so_far)
            value[settled] = uncond.draw(draws[settled])
        masks |= words[value]
        all_zero_so_far &= value == 0
    return masks
