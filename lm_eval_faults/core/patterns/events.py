"""Drawing a pattern's events: exact Bernoulli draws over its event slots, in O(events).

The slots of every site of a group are drawn in one vectorised pass by the sampler's own
`bernoulli_hits` (a binomial count from the site's key, then that many distinct uniform slots),
from the stream purposes the stream table reserves for patterns, so no draw is shared with an
iid map. The pattern expands the struck slots into (word, bit mask) pairs, and pairs that land on
one word are merged (their masks OR-ed: a bit two events cover is hit once).
"""

from __future__ import annotations

import numpy as np

from lm_eval_faults.core.patterns.registry import Pattern
from lm_eval_faults.core.random.streams import Purpose
from lm_eval_faults.core.sampling.host import POSITION_BITS, HitPurposes, Hits, bernoulli_hits, group_ranks

EVENT_PURPOSES = HitPurposes(Purpose.EVENT_COUNT, Purpose.EVENT_POSITION, Purpose.EVENT_DENSE)
STUCK1_PURPOSES = HitPurposes(Purpose.STUCK1_COUNT, Purpose.STUCK1_POSITION, Purpose.STUCK1_DENSE)


def pattern_hits(
    pattern: Pattern,
    numels: np.ndarray,
    keys: np.ndarray,
    rate: float,
    width: int,
    eligible: tuple[int, ...],
    purposes: HitPurposes = EVENT_PURPOSES,
) -> tuple[Hits, np.ndarray]:
    """(hit words, their bit masks) of `pattern` at event rate `rate`."""
    numels = np.asarray(numels, dtype=np.int64)
    events = bernoulli_hits(pattern.slots(numels, width, eligible), rate, keys, purposes)
    if not len(events):
        return events, np.empty(0, dtype=np.int64)
    event, word, mask = pattern.expand(events.position, numels[events.site], width, eligible)
    return merge_words(events.site[event], word, mask, len(numels))


def merge_words(site: np.ndarray, word: np.ndarray, mask: np.ndarray, sites: int) -> tuple[Hits, np.ndarray]:
    """One hit per distinct (site, word), grouped by site with words sorted, its masks OR-ed."""
    ids, inverse = np.unique(site.astype(np.int64) << POSITION_BITS | word.astype(np.int64), return_inverse=True)
    merged = np.zeros(len(ids), dtype=np.int64)
    np.bitwise_or.at(merged, inverse, mask.astype(np.int64))
    hit_site = ids >> POSITION_BITS
    sizes = np.bincount(hit_site, minlength=sites)
    return Hits(hit_site, ids & ((1 << POSITION_BITS) - 1), group_ranks(sizes[sizes > 0])), merged


def stuck_clusters(
    pattern: Pattern, numels: np.ndarray, keys: np.ndarray, p_sa0: float, p_sa1: float, width: int, eligible: tuple[int, ...]
) -> tuple[Hits, np.ndarray, np.ndarray]:
    """(hit words, stuck-at-0 masks, stuck-at-1 masks) of a stuck-at pattern: the two values'
    clusters drawn from their own streams; a cell in both reads 1."""
    zero, zero_masks = pattern_hits(pattern, numels, keys, p_sa0, width, eligible, EVENT_PURPOSES)
    one, one_masks = pattern_hits(pattern, numels, keys, p_sa1, width, eligible, STUCK1_PURPOSES)
    site = np.concatenate([zero.site, one.site])
    word = np.concatenate([zero.position, one.position])
    hits, _ = merge_words(site, word, np.zeros(len(site), dtype=np.int64), len(numels))
    ids = hits.site << POSITION_BITS | hits.position
    stuck0 = np.zeros(len(hits), dtype=np.int64)
    stuck1 = np.zeros(len(hits), dtype=np.int64)
    stuck0[np.searchsorted(ids, zero.site << POSITION_BITS | zero.position)] = zero_masks
    stuck1[np.searchsorted(ids, one.site << POSITION_BITS | one.position)] = one_masks
    return hits, stuck0 & ~stuck1, stuck1
