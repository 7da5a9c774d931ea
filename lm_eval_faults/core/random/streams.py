"""The random-stream layout: every random number this package draws, and which stream it comes from.

A fault map is a pure function of (seed, site name, spec) and this package's version. Each draw
is a counter-based SplitMix64 output of (site key, purpose, index), and each site key is a keyed
hash of (spec, stream kind, stream indices, site name). This module is the one place that layout
is written down (the README's copy of these tables points here):

| stream kind | indices | what it draws |
|---|---|---|
| `WEIGHTS` | none | the persistent faults of one parameter tensor |
| `CALL` | forward call c, output tensor t | activation faults of a module outside lm-eval (plain `inject`) |
| `REQUEST` | call c of the module within the forward, output tensor t; then per row, the row's request key (`row_keys`) | activation faults of one lm-eval request row: independent of batching |
| `CHECK_BITS` | none | faults in the check bits that protect one parameter tensor (SECDED: 8 per 64-bit word; parity: 1 per element) |
| `KV_WRITE` | none; then per cache entry, its request key and position (`entry_keys`) | faults written with one KV-cache entry (one layer's keys or values at one position) |
| `KV_RETAIN` | none; then per request row, its request key and the position being decoded (`entry_keys`) | faults that strike a row's stored entries of one layer and part during one decoding step |

| purpose | index | what it draws |
|---|---|---|
| `COUNT` | 0 | the site's fault count (binomial inverse CDF at one uniform) |
| `POSITION` | draw number | positions (first distinct values of the stream, exact modulo rejection) |
| `DENSE` | element index | dense Bernoulli draws when the element rate is high |
| `MASK` | hit rank x chunks + chunk | the bit mask of each hit element, 8 bits at a time |
| `VALUE` | hit rank | the uniform replacement value of a value fault |
| `THIN` | hit rank x 64 + bit | asymmetric flips: whether a candidate flip survives |
| `EVENT_COUNT` | 0 | a correlated pattern's event count (`pattern=` other than iid: bursts, rows, ...) |
| `EVENT_POSITION` | draw number | the event slots struck (as `POSITION`, over the pattern's slots) |
| `EVENT_DENSE` | slot index | dense Bernoulli draws of event slots when the slot rate is high |
| `STUCK1_COUNT` | 0 | `pattern=clustered`: the count of stuck-at-1 clusters (stuck-at-0 ones use `EVENT_*`) |
| `STUCK1_POSITION` | draw number | `pattern=clustered`: the slots of stuck-at-1 clusters |
| `STUCK1_DENSE` | slot index | `pattern=clustered`: dense draws of stuck-at-1 clusters |

Patterns other than iid draw only from the `EVENT_*` and `STUCK1_*` purposes, and their spec (so
their site keys) differs from every iid spec's, so no iid map changes when patterns exist.

Why nothing can reuse another draw's stream: the stream kind and every index are fixed-width
fields of the hashed message (8 bytes per index, so a module output with any number of tensors
and any number of calls has its own key), and the purpose sits in a counter's top byte, above
every index a purpose can reach (< 2^56: tensors hold < 2^40 elements).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from enum import IntEnum
from typing import Any

import numpy as np

GAMMA = 0x9E3779B97F4A7C15
MIX1, MIX2 = 0xBF58476D1CE4E5B9, 0x94D049BB133111EB
PURPOSE_SHIFT = 56
"""A purpose occupies a counter's top byte; indices stay below 2^56."""


class StreamKind(IntEnum):
    """Which kind of draw a site key is for (see the module's table)."""

    WEIGHTS = 0
    CALL = 1
    REQUEST = 2
    CHECK_BITS = 3
    KV_WRITE = 4
    KV_RETAIN = 5


STREAM_INDICES = {
    StreamKind.WEIGHTS: 0,
    StreamKind.CALL: 2,
    StreamKind.REQUEST: 2,
    StreamKind.CHECK_BITS: 0,
    StreamKind.KV_WRITE: 0,
    StreamKind.KV_RETAIN: 0,
}
"""How many 64-bit indices each stream kind takes."""


class Purpose(IntEnum):
    """Disjoint segments of a site's stream, so that no two kinds of draw share a number."""

    COUNT = 1
    POSITION = 2
    DENSE = 3
    MASK = 4
    VALUE = 5
    THIN = 6
    EVENT_COUNT = 7
    EVENT_POSITION = 8
    EVENT_DENSE = 9
    STUCK1_COUNT = 10
    STUCK1_POSITION = 11
    STUCK1_DENSE = 12


def spec_key(seed: int, sampling_key: Mapping[str, Any]) -> bytes:
    """The part of every site key that depends on the spec: hashed once per injection."""
    text = json.dumps([int(seed), dict(sampling_key)], sort_keys=True)
    return hashlib.blake2b(text.encode(), digest_size=32).digest()


def site_key(spec: bytes, name: str, kind: StreamKind = StreamKind.WEIGHTS, *indices: int) -> int:
    """The 64-bit key of one stream at site `name`: a keyed hash of fixed-width fields, then the name."""
    if len(indices) != STREAM_INDICES[kind]:
        raise ValueError(f"stream {kind.name} takes {STREAM_INDICES[kind]} indices, got {len(indices)}")
    message = bytes([kind]) + b"".join(index.to_bytes(8, "little") for index in indices) + name.encode()
    return int.from_bytes(hashlib.blake2b(message, key=spec, digest_size=8).digest(), "little")


def mix64(values: np.ndarray) -> np.ndarray:
    """SplitMix64's finaliser: a bijection of 64-bit words that spreads every input bit."""
    z = np.asarray(values, dtype=np.uint64)
    z = (z ^ (z >> np.uint64(30))) * np.uint64(MIX1)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(MIX2)
    return z ^ (z >> np.uint64(31))


def row_keys(key: int, request_keys: np.ndarray) -> np.ndarray:
    """Per-row site keys of a REQUEST stream: the stream's key combined with each row's request key."""
    return mix64(mix64(np.asarray(request_keys, dtype=np.uint64)) ^ np.uint64(key))


def entry_keys(key: int, request_keys: np.ndarray, positions: np.ndarray) -> np.ndarray:
    """Per-entry site keys of a KV stream: the stream's key, each entry's request key and its
    position in that request (one more mixing round, so position p of one request never shares a
    key with position p of another)."""
    return entry_key_table(np.array([key], dtype=np.uint64), request_keys, positions)[0]


def entry_key_table(keys: np.ndarray, request_keys: np.ndarray, positions: np.ndarray) -> np.ndarray:
    """`entry_keys` of several streams at once: row s is `entry_keys(keys[s], request_keys, positions)`
    (one vectorised pass for every layer of a decoding step)."""
    requests = mix64(np.asarray(request_keys, dtype=np.uint64))
    spread = mix64((np.asarray(positions, dtype=np.uint64) + np.uint64(1)) * np.uint64(GAMMA))
    return mix64(mix64(requests[None, :] ^ np.asarray(keys, dtype=np.uint64)[:, None]) ^ spread[None, :])


def request_key(tokens: Any) -> int:
    """A request's 64-bit key: a hash of its token ids (the same tokens, the same faults)."""
    data = np.ascontiguousarray(np.asarray(tokens, dtype=np.int64)).tobytes()
    return int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "little")


def random_words(keys: np.ndarray | np.uint64, purpose: Purpose, index: np.ndarray | int) -> np.ndarray:
    """Uniform 64-bit words: number `index` of `purpose` in the SplitMix64 stream seeded by each key.

    SplitMix64 (Steele, Lea and Flood 2014; Java's SplittableRandom) passes BigCrush; as a function
    of the counter it is a counter-based generator, so any draw is computed without the ones
    before it. Keys are 64-bit hashes, so two sites' streams overlap with negligible probability.
    """
    # 1-d arrays throughout: array arithmetic wraps modulo 2^64 silently, as it must.
    counter = np.atleast_1d(np.asarray(index, dtype=np.uint64)) | np.uint64(int(purpose) << PURPOSE_SHIFT)
    return mix64(np.atleast_1d(np.asarray(keys, dtype=np.uint64)) + (counter + np.uint64(1)) * np.uint64(GAMMA))


def to_uniform(words: np.ndarray) -> np.ndarray:
    """The top 53 bits of each word as a float64 in [0, 1)."""
    return (words >> np.uint64(11)).astype(np.float64) * 2.0**-53
