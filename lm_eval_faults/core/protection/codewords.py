"""Codes over a tensor's bit stream, simulated exactly: bit-interleaved SECDED and chipkill.

A tensor's stored words, in order, form one bit stream (bit i of word e is bit e*W + i). A code
cuts it into codewords of `data_bits`; interleaving `depth` D takes D*data_bits consecutive bits
(one memory access, a *unit*) and gives bit r of the unit to codeword r mod D, so D adjacent bits
land in D different codewords and a burst of up to D bits is one error in each. D = 1 is the
plain layout. The simulation works at the bits the faults changed: it gathers each touched
codeword's error pattern (data and check bits), decodes it with the code's own decoder, and
writes back what every element of the touched codewords reads, in O(faults x codeword size).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from lm_eval_faults.core.faults.host import FaultBatch
from lm_eval_faults.core.protection import ecc, reed_solomon
from lm_eval_faults.core.sampling.host import POSITION_BITS, Hits

ID_MASK = (1 << POSITION_BITS) - 1


@dataclass(frozen=True)
class CodewordLayout:
    """Which codeword, and which bit of it, each bit of the stream is."""

    data_bits: int
    depth: int = 1

    @property
    def unit_bits(self) -> int:
        return self.data_bits * self.depth

    def codewords(self, numel: int, width: int) -> int:
        """Codewords covering `numel` words (the last unit zero-padded)."""
        return -(-numel * width // self.unit_bits) * self.depth

    def locate(self, bit: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(codeword, bit within it) of stream bits."""
        unit, offset = np.divmod(bit, self.unit_bits)
        return unit * self.depth + offset % self.depth, offset // self.depth

    def stream_bits(self, codeword: np.ndarray) -> np.ndarray:
        """(n, data_bits): the stream bit of each bit of each codeword."""
        unit, lane = np.divmod(np.asarray(codeword, dtype=np.int64), self.depth)
        within = np.arange(self.data_bits, dtype=np.int64) * self.depth
        return (unit * self.unit_bits + lane)[:, None] + within[None, :]


@dataclass(frozen=True)
class WordCode:
    """A code's geometry and its exact encoder and decoder on byte patterns."""

    layout: CodewordLayout
    check_bytes: int
    encode: Callable[[np.ndarray], np.ndarray]
    """(n, data bytes) -> (n, check bytes)"""
    decode: Callable[[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray, np.ndarray]]
    """(data errors, check errors) -> (residual data error, detected, whether the decoder acted)"""


def _secded_encode(data: np.ndarray) -> np.ndarray:
    return ecc.data_syndrome(_as_word(data))[:, None]


def _secded_decode(data_error: np.ndarray, check_error: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    word, check = _as_word(data_error), check_error[:, 0].astype(np.int64)
    residual, detected, acted = ecc.decode_actions(word, check)
    return residual.astype("<i8").view(np.uint8).reshape(-1, 8).astype(np.int64), detected, acted


def _as_word(data: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(np.asarray(data, dtype=np.uint8)).view("<i8").reshape(-1)


def word_code(ecc_name: str, depth: int) -> WordCode:
    """The simulated code of `ecc=` (secded, chipkill) at interleaving depth `depth`."""
    if ecc_name == "secded":
        return WordCode(CodewordLayout(ecc.DATA_BITS, depth), 1, _secded_encode, _secded_decode)
    if ecc_name == "chipkill":
        return WordCode(
            CodewordLayout(reed_solomon.DATA_SYMBOLS * 8, depth), reed_solomon.CHECK_SYMBOLS, reed_solomon.encode, reed_solomon.decode
        )
    raise ValueError(f"no codeword simulation for ecc={ecc_name}")


Reader = Callable[[int, np.ndarray], np.ndarray]
"""(site, word positions) -> the clean stored words there, as unsigned int64."""


@dataclass(frozen=True)
class CodeRun:
    """One batch's code simulation: the words as read, and the decoder's outcomes per codeword."""

    site: np.ndarray
    element: np.ndarray
    old: np.ndarray
    new: np.ndarray
    outcomes: dict[str, np.ndarray]
    """outcome name -> the site of each codeword with that outcome"""


CHUNK_CODEWORDS = 1 << 14
"""Codewords decoded at a time: each expands to one int64 per data bit, so this bounds the
temporary memory (a few tens of MB) whatever the number of faults."""


def simulate(
    code: WordCode,
    batch_site: np.ndarray,
    position: np.ndarray,
    error: np.ndarray,
    numels: np.ndarray,
    width: int,
    read: Reader,
    check_faults: Callable[[np.ndarray, Callable[[Hits], np.ndarray]], FaultBatch],
    zero_detected: bool,
) -> CodeRun:
    """Decode every codeword that data errors (`error` at `position` of `batch_site`) or check
    faults touch. `check_faults(numels, read_check)` draws the check bytes' faults (their clean
    values come from `read_check`); a detected codeword zeroes its whole unit if `zero_detected`.
    Units are independent (no element spans two), so they are decoded a chunk at a time."""
    layout = code.layout

    def read_check(hits: Hits) -> np.ndarray:
        codeword, symbol = np.divmod(hits.position, code.check_bytes)
        checks = np.empty(len(hits), dtype=np.int64)
        for start in range(0, len(hits), CHUNK_CODEWORDS):
            part = slice(start, start + CHUNK_CODEWORDS)
            data = _clean_data(layout, hits.site[part], codeword[part], width, numels, read)
            checks[part] = code.encode(data)[np.arange(len(data)), symbol[part]]
        return checks

    check_numels = np.array([layout.codewords(int(n), width) * code.check_bytes for n in numels], dtype=np.int64)
    check = check_faults(check_numels, read_check)
    data_site, stream = _error_bits(batch_site, position, error, width)
    data_unit = data_site << POSITION_BITS | stream // layout.unit_bits
    check_unit = check.hits.site << POSITION_BITS | check.hits.position // code.check_bytes // layout.depth
    data_order, check_order = np.argsort(data_unit, kind="stable"), np.argsort(check_unit, kind="stable")
    data_unit, check_unit = data_unit[data_order], check_unit[check_order]
    units = np.unique(np.concatenate([data_unit, check_unit]))
    bounds = units[:: max(CHUNK_CODEWORDS // layout.depth, 1)]
    parts = []
    flips = check.old ^ check.new
    for index, low in enumerate(bounds.tolist()):
        span = [low, int(bounds[index + 1]) if index + 1 < len(bounds) else np.iinfo(np.int64).max]
        rows = data_order[slice(*np.searchsorted(data_unit, span))]
        checks = check_order[slice(*np.searchsorted(check_unit, span))]
        parts.append(
            _decode_units(
                code,
                (data_site[rows], stream[rows]),
                (check.hits.site[checks], check.hits.position[checks], flips[checks]),
                numels,
                width,
                read,
                zero_detected,
            )
        )
    return _concatenate_runs(parts)


def _error_bits(site: np.ndarray, position: np.ndarray, error: np.ndarray, width: int) -> tuple[np.ndarray, np.ndarray]:
    """(site, stream bit) of every changed bit, expanded a chunk of elements at a time."""
    faulted = np.flatnonzero(error)
    sites, streams = [], []
    for start in range(0, len(faulted), CHUNK_CODEWORDS):
        rows = faulted[start : start + CHUNK_CODEWORDS]
        hit, bit = np.nonzero((error[rows, None] >> np.arange(width)) & 1)
        sites.append(site[rows][hit])
        streams.append(position[rows][hit] * width + bit)
    empty = np.empty(0, dtype=np.int64)
    return (np.concatenate(sites), np.concatenate(streams)) if sites else (empty, empty)


def _clean_data(layout: CodewordLayout, site: np.ndarray, codeword: np.ndarray, width: int, numels: np.ndarray, read: Reader) -> np.ndarray:
    """The clean data bytes (n, data bytes) of codewords, gathered bit by bit from their elements."""
    bits = layout.stream_bits(codeword)
    element, bit = np.divmod(bits, width)
    owner = np.broadcast_to(site[:, None], bits.shape)
    words = _read_elements(owner.ravel(), element.ravel(), numels, read).reshape(bits.shape)
    return np.packbits(((words >> bit) & 1).astype(np.uint8), axis=1, bitorder="little").astype(np.int64)


def _decode_units(
    code: WordCode,
    data: tuple[np.ndarray, np.ndarray],
    checks: tuple[np.ndarray, np.ndarray, np.ndarray],
    numels: np.ndarray,
    width: int,
    read: Reader,
    zero_detected: bool,
) -> CodeRun:
    """Decode the codewords of one chunk of whole units and write back what their elements read:
    `data` is (site, stream bit) of each data error bit, `checks` (site, check byte, flips)."""
    layout = code.layout
    data_site, stream = data
    check_site, check_position, check_flips = checks
    codeword, within = layout.locate(stream)
    data_ids = data_site << POSITION_BITS | codeword
    check_ids = check_site << POSITION_BITS | check_position // code.check_bytes
    ids, inverse = np.unique(np.concatenate([data_ids, check_ids]), return_inverse=True)
    data_bits = np.zeros((len(ids), layout.data_bits), dtype=np.uint8)
    data_bits[inverse[: len(data_ids)], within] = 1
    data_error = np.packbits(data_bits, axis=1, bitorder="little").astype(np.int64)
    check_error = np.zeros((len(ids), code.check_bytes), dtype=np.int64)
    np.bitwise_xor.at(check_error, (inverse[len(data_ids) :], check_position % code.check_bytes), check_flips)
    residual, detected, acted = code.decode(data_error, check_error)
    word_site, word = ids >> POSITION_BITS, ids & ID_MASK
    erroneous = data_error.any(axis=1) | check_error.any(axis=1)
    wrong = residual.any(axis=1)
    outcomes = {
        "detected": word_site[detected],
        "corrected": word_site[erroneous & ~detected & ~wrong],
        "miscorrected": word_site[~detected & wrong & acted],
        "undetected": word_site[~detected & wrong & ~acted],
    }
    read_error = np.where(detected[:, None], data_error, residual)
    bits = layout.stream_bits(word)
    flipped = np.unpackbits(read_error.astype(np.uint8), axis=1, bitorder="little")[:, : layout.data_bits].astype(bool)
    owner = np.broadcast_to(word_site[:, None], bits.shape)
    element_ids = owner << POSITION_BITS | bits // width
    touched, slot = np.unique(element_ids, return_inverse=True)
    element_error = np.zeros(len(touched), dtype=np.int64)
    np.bitwise_or.at(element_error, slot.reshape(bits.shape)[flipped], (1 << (bits % width))[flipped])
    site, element = touched >> POSITION_BITS, touched & ID_MASK
    inside = element < numels[site]
    site, element, element_error = site[inside], element[inside], element_error[inside]
    old = _read_elements(site, element, numels, read)
    new = old ^ element_error
    if zero_detected and detected.any():
        dead = np.unique(word_site[detected] << POSITION_BITS | word[detected] // layout.depth)
        unit = site << POSITION_BITS | element * width // layout.unit_bits
        new = np.where(np.isin(unit, dead), 0, new)
    return CodeRun(site, element, old, new, outcomes)


def _concatenate_runs(parts: list[CodeRun]) -> CodeRun:
    empty = np.empty(0, dtype=np.int64)
    if not parts:
        return CodeRun(empty, empty, empty, empty, {name: empty for name in ("detected", "corrected", "miscorrected", "undetected")})
    site, element, old, new = (np.concatenate([getattr(part, name) for part in parts]) for name in ("site", "element", "old", "new"))
    outcomes = {name: np.concatenate([part.outcomes[name] for part in parts]) for name in parts[0].outcomes}
    return CodeRun(site, element, old, new, outcomes)


def _read_elements(site: np.ndarray, element: np.ndarray, numels: np.ndarray, read: Reader) -> np.ndarray:
    """Clean words at (site, element) pairs; padding beyond a site's end reads 0."""
    words = np.zeros(len(element), dtype=np.int64)
    inside = element < numels[site]
    for s in np.unique(site[inside]).tolist():
        rows = np.flatnonzero(inside & (site == s))
        unique, back = np.unique(element[rows], return_inverse=True)
        words[rows] = read(s, unique)[back]
    return words
