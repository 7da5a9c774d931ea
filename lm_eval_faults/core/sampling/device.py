"""`sampling.py` on the tensors' own device: the same positions and bit masks, bit for bit.

Only what depends on the key alone is computed on the host: each site's fault count (one COUNT
uniform, `sampling.fault_counts`), which fixes every array size. Positions (the first distinct
accepted values of the POSITION stream) and bit masks (the same alias tables, MASK words) are
computed by `torch_streams` on the device from the same counters as the numpy path, so they are
the numpy path's. Host round trips: one flag per faulted site (did its first prefix of draws
hold enough distinct positions; a rare miss draws that site again with a longer prefix, as
`sampling._first_distinct` does), and, for dense draws (element rates above `DENSE_ABOVE`, where
nearly every element is hit anyway), each chunk's hit count.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import torch

from lm_eval_faults.core.random import torch_streams as ts
from lm_eval_faults.core.random.streams import Purpose
from lm_eval_faults.core.sampling.host import (
    DENSE_ABOVE,
    DENSE_CHUNK,
    POSITION_BITS,
    dense_threshold,
    fault_counts,
    group_ranks,
    mask_tables,
    rejection_limit,
)

_NO_VALUE = torch.iinfo(torch.int64).max
"""Sorts after every site-major position: marks a rejected or repeated POSITION draw."""


def column(values: np.ndarray, device: torch.device) -> torch.Tensor:
    """A copy of a host int64 column on `device` (a copy: the array may be read-only)."""
    return torch.tensor(np.ascontiguousarray(values, dtype=np.int64), device=device)


@dataclass(frozen=True)
class DeviceHits:
    """`sampling.Hits` on a device: grouped by site in site order, positions sorted per site.

    Which sites hold hits and how many is known on the host (`sites`, `sizes`); `site`,
    `position` and `rank` are the columns of `sampling.Hits`, on the device.
    """

    sites: np.ndarray
    sizes: np.ndarray
    site: torch.Tensor
    position: torch.Tensor
    rank: torch.Tensor

    def __len__(self) -> int:
        return int(self.sizes.sum())

    def by_site(self) -> Iterator[tuple[int, slice]]:
        """(site, slice of its hits) for every site that holds at least one hit."""
        ends = np.cumsum(self.sizes).tolist()
        for site, size, end in zip(self.sites.tolist(), self.sizes.tolist(), ends, strict=True):
            yield site, slice(end - size, end)


def _hits(sites: np.ndarray, sizes: np.ndarray, position: torch.Tensor) -> DeviceHits:
    """`sizes[i]` sorted positions at each of `sites`, concatenated in `position`."""
    device, total = position.device, int(sizes.sum())
    site = torch.repeat_interleave(column(sites, device), column(sizes, device), output_size=total)
    return DeviceHits(sites, sizes, site, position, column(group_ranks(sizes), device))


def no_hits(device: torch.device) -> DeviceHits:
    empty = np.empty(0, dtype=np.int64)
    return _hits(empty, empty, torch.empty(0, dtype=torch.int64, device=device))


def bernoulli_hits(numels: np.ndarray, q: float, keys: np.ndarray, device: torch.device) -> DeviceHits:
    """`sampling.bernoulli_hits` on `device`: every element of every site hit w.p. q."""
    numels = np.asarray(numels, dtype=np.int64)
    keys = np.asarray(keys, dtype=np.uint64)
    if q <= 0.0 or not len(numels):
        return no_hits(device)
    if q > DENSE_ABOVE:
        parts = [_dense_positions(n, q, key, device) for n, key in zip(numels.tolist(), keys.tolist(), strict=True)]
        sizes = np.array([len(part) for part in parts], dtype=np.int64)
        present = np.flatnonzero(sizes)
        return _hits(present, sizes[present], torch.cat(parts))
    return distinct_uniform(numels, fault_counts(numels, q, keys), keys, device)


def _dense_positions(n: int, q: float, key: int, device: torch.device) -> torch.Tensor:
    """`sampling._dense_positions`: element i is hit when its DENSE word is below q * 2^64."""
    if q >= 1.0:
        return torch.arange(n, dtype=torch.int64, device=device)
    threshold = dense_threshold(q)
    chunks = [torch.empty(0, dtype=torch.int64, device=device)]
    for start in range(0, n, DENSE_CHUNK):
        index = torch.arange(start, min(n, start + DENSE_CHUNK), dtype=torch.int64, device=device)
        hit = ts.unsigned_less(ts.random_words(key, Purpose.DENSE, index), threshold)
        chunks.append(torch.nonzero(hit).view(-1) + start)  # learns the chunk's hit count: a host round trip
    return torch.cat(chunks)


def distinct_uniform(numels: np.ndarray, counts: np.ndarray, keys: np.ndarray, device: torch.device) -> DeviceHits:
    """`sampling.distinct_uniform` on `device`: the first counts[s] distinct accepted POSITION values.

    Every faulted site draws a prefix of its stream long enough for the expected collisions plus
    a margin (`sampling._first_distinct`'s length); the rare sites whose prefix fell short are
    drawn again with a prefix twice as long. Which values a site keeps does not depend on the
    prefix length, so the positions are the numpy path's.
    """
    numels = np.asarray(numels, dtype=np.int64)
    if numels.max(initial=0) >= 1 << POSITION_BITS:
        raise ValueError(f"tensors of 2^{POSITION_BITS} elements or more are not supported")
    sites = np.flatnonzero(counts)
    if not len(sites):
        return no_hits(device)
    keys_on_device = ts.to_device(np.asarray(keys, dtype=np.uint64), device)
    found: list[torch.Tensor] = []
    todo = sites
    extra = np.ceil(2.0 * counts[sites] ** 2 / numels[sites]).astype(np.int64) + 8
    while len(todo):
        values, done = _first_distinct(todo, numels[todo], counts[todo], keys_on_device, extra)
        found.append(values)
        todo, extra = todo[~done], 2 * extra[~done]
    site_major = found[0] if len(found) == 1 else torch.sort(torch.cat(found)).values
    return _hits(sites, counts[sites], site_major & ((1 << POSITION_BITS) - 1))


def _first_distinct(
    sites: np.ndarray, n: np.ndarray, k: np.ndarray, keys: torch.Tensor, extra: np.ndarray
) -> tuple[torch.Tensor, np.ndarray]:
    """Sorted site-major keys of the first k distinct accepted values among each site's k + extra
    POSITION draws, for the sites where there were k; and which sites those were (host flags)."""
    device = keys.device
    length = k + extra
    total = int(length.sum())
    starts = np.cumsum(length) - length
    lengths = column(length, device)

    def per_draw(per_site: torch.Tensor) -> torch.Tensor:
        return torch.repeat_interleave(per_site, lengths, output_size=total)

    site = per_draw(column(sites, device))
    words = ts.random_words(keys[site], Purpose.POSITION, torch.arange(total, device=device) - per_draw(column(starts, device)))
    accepted = ~ts.unsigned_less(per_draw(ts.to_device(rejection_limit(n.astype(np.uint64)), device)), words)
    value = torch.where(accepted, site << POSITION_BITS | ts.unsigned_remainder(words, per_draw(column(n, device))), _NO_VALUE)
    # Draws are in (site, draw) order: a stable sort by value puts each value's first draw first.
    ordered, order = torch.sort(value, stable=True)
    first_in_order = torch.ones_like(ordered, dtype=torch.bool)
    first_in_order[1:] = ordered[1:] != ordered[:-1]
    first = torch.empty_like(first_in_order)
    first[order] = first_in_order
    first &= accepted
    distinct = torch.cumsum(first, 0)  # distinct values drawn so far, this draw included
    first_draw, last_draw = column(starts, device), column(starts + length - 1, device)
    before = distinct[first_draw] - first[first_draw].to(torch.int64)  # those of earlier sites
    done_on_device = distinct[last_draw] - before >= column(k, device)
    done = done_on_device.cpu().numpy()  # the host round trip of the position draw
    rank = distinct - 1 - per_draw(before)
    keep = (first & (rank < per_draw(column(k, device))) & per_draw(done_on_device))[order]
    # The kept values in sorted order, packed to the front by a scatter (no second sort, no
    # mask indexing, which would learn their number on the host again); the rest land in a spare slot.
    kept = int(k[done].sum())
    slot = torch.where(keep, torch.cumsum(keep, 0) - 1, kept)
    return torch.empty(kept + 1, dtype=torch.int64, device=device).scatter_(0, slot, ordered)[:kept], done


@dataclass(frozen=True)
class _ChunkTables:
    """One mask chunk's two `sampling._AliasTable`s (unconditional; given earlier chunks zero) side
    by side on a device, so that each hit draws from the one it needs in one gather."""

    bits: int
    probability: torch.Tensor
    alias: torch.Tensor
    words: torch.Tensor

    def draw(self, words: torch.Tensor, given_earlier_zero: torch.Tensor) -> torch.Tensor:
        """Top `bits` bits pick a column; the low 53 bits decide between it and its alias."""
        chunk_value = ts.shift_right(words, 64 - self.bits)
        fraction = (words & ((1 << 53) - 1)).to(torch.float64) * 2.0**-53
        column_index = chunk_value + (given_earlier_zero.to(torch.int64) << self.bits)
        return torch.where(fraction < self.probability[column_index], chunk_value, self.alias[column_index])


@lru_cache(maxsize=64)
def _device_tables(p: float, bits: tuple[int, ...], device: torch.device) -> tuple[_ChunkTables, ...]:
    tables = mask_tables(p, bits)
    return tuple(
        _ChunkTables(
            unconditional.bits,
            torch.tensor(np.concatenate([unconditional.probability, conditional.probability]), dtype=torch.float64, device=device),
            column(np.concatenate([unconditional.alias, conditional.alias]), device),
            column(words, device),
        )
        for unconditional, conditional, words in zip(tables.unconditional, tables.given_earlier_zero, tables.words, strict=True)
    )


def nonzero_masks(p: float, bits: tuple[int, ...], keys: torch.Tensor, rank: torch.Tensor) -> torch.Tensor:
    """`sampling.nonzero_masks` on the hits' device: each hit's mask over `bits`, non-zero.

    Hit number r of a site uses MASK words r * chunks + c of its stream (`keys`: each hit's site key).
    """
    tables = _device_tables(float(p), tuple(bits), rank.device)
    masks = torch.zeros_like(rank)
    all_zero_so_far = torch.ones_like(rank, dtype=torch.bool)
    first_word = rank * len(tables)
    for chunk, table in enumerate(tables):
        value = table.draw(ts.random_words(keys, Purpose.MASK, first_word + chunk), all_zero_so_far)
        masks |= table.words[value]
        all_zero_so_far &= value == 0
    return masks
