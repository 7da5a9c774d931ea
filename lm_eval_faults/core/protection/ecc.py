"""SECDED(72,64) as memory controllers implement it: a Hsiao code over each 64-bit data word.

A Hsiao code's parity-check matrix H has 72 distinct odd-weight columns: the 8 unit vectors for
the check bits, and for the data bits the 56 weight-3 vectors plus 8 of weight 5. The decoder
computes the syndrome s = H e of the error pattern e (the stored word XOR the written one):

- s = 0: no error seen (the word is clean, or 4+ errors cancelled: an undetected error);
- s equals a column: that bit is flipped back (a single error is corrected; 3+ errors whose
  syndrome happens to equal a column are *miscorrected*, gaining one more wrong bit);
- anything else (every even-weight syndrome, and odd ones matching no column): detected,
  uncorrectable.

Because H is linear, the syndrome of any pattern is the XOR of its columns, so this module
decides every case exactly from the pattern alone, with no assumption on how many bits flipped.
"""

from __future__ import annotations

from itertools import combinations

import numpy as np

DATA_BITS = 64
CHECK_BITS = 8

NO_ERROR = -1
DETECTED = -2
"""Decoder actions besides 'flip bit i' (0-63: data bits, 64-71: check bits)."""


def _weight_columns(weight: int) -> list[int]:
    return sorted(sum(1 << bit for bit in bits) for bits in combinations(range(CHECK_BITS), weight))


DATA_COLUMNS = np.array((_weight_columns(3) + _weight_columns(5))[:DATA_BITS], dtype=np.int64)
"""H's column for each data bit: all 56 weight-3 vectors, then the 8 smallest of weight 5."""

CHECK_COLUMNS = np.array([1 << bit for bit in range(CHECK_BITS)], dtype=np.int64)


def _byte_syndromes() -> np.ndarray:
    """Row `lane`, column `byte`: the syndrome of those 8 data bits of the word set as in `byte`."""
    table = np.zeros((DATA_BITS // 8, 256), dtype=np.int64)
    for lane in range(DATA_BITS // 8):
        for value in range(256):
            syndrome = 0
            for bit in range(8):
                if value >> bit & 1:
                    syndrome ^= int(DATA_COLUMNS[lane * 8 + bit])
            table[lane, value] = syndrome
    return table


_BYTE_SYNDROMES = _byte_syndromes()


def _decode_table() -> np.ndarray:
    table = np.full(256, DETECTED, dtype=np.int64)
    table[0] = NO_ERROR
    table[DATA_COLUMNS] = np.arange(DATA_BITS)
    table[CHECK_COLUMNS] = DATA_BITS + np.arange(CHECK_BITS)
    return table


DECODE = _decode_table()
"""The decoder's action for each syndrome."""


def data_syndrome(data: np.ndarray) -> np.ndarray:
    """H times 64-bit data words (as int64 bit patterns): the check bits an encoder stores for
    them, or the syndrome contribution of a data error pattern."""
    words = np.asarray(data, dtype=np.int64).astype(np.uint64)
    syndrome = np.zeros(words.shape, dtype=np.int64)
    for lane in range(DATA_BITS // 8):
        syndrome ^= _BYTE_SYNDROMES[lane][((words >> np.uint64(8 * lane)) & np.uint64(0xFF)).astype(np.int64)]
    return syndrome


def decode(data_error: np.ndarray, check_error: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(residual data error after decoding, whether the word was detected as uncorrectable).

    `data_error` holds 64-bit patterns as int64 (bit 63 in the sign bit), `check_error` 8-bit ones.
    """
    residual, detected, _ = decode_actions(data_error, check_error)
    return residual, detected


def decode_actions(data_error: np.ndarray, check_error: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """`decode`, and whether the decoder flipped a bit (data or check): a miscorrection is a wrong
    word the decoder acted on, an undetected error one it did not see; one syndrome decides all."""
    data_error = np.asarray(data_error, dtype=np.int64)
    action = DECODE[data_syndrome(data_error) ^ np.asarray(check_error, dtype=np.int64)]
    fixes_data = (action >= 0) & (action < DATA_BITS)
    correction = np.where(fixes_data, np.left_shift(np.int64(1), np.where(fixes_data, action, 0)), 0)
    return data_error ^ correction, action == DETECTED, action >= 0
