"""A chipkill code: Reed-Solomon RS(18,16) over GF(2^8), one symbol per byte, as x8 chipkill DIMMs use.

A codeword holds 16 data bytes (symbols 0-15, the tensor's bytes in order) and 2 check bytes
(symbols 16, 17). Its parity-check matrix has the rows (1, 1, ..., 1) and (a^0, a^1, ..., a^17),
a the field's generator (x^8 + x^4 + x^3 + x^2 + 1, as in most RS hardware), so the syndromes of
an error pattern e are S0 = sum e_j and S1 = sum e_j a^j (XOR sums). The code's distance is 3:

- S0 = S1 = 0: no error seen (clean, or an undetected error);
- both non-zero and S1/S0 = a^j for a symbol j < 18: symbol j is corrected by XOR with S0 (a single
  wrong byte, any number of its bits, is always corrected; a wider error whose syndromes happen to
  look like one is *miscorrected*);
- anything else: detected, uncorrectable.

The decoder is linear in e, so, as for SECDED, every outcome is decided exactly from the pattern.
Its cost: 16 check bits per 128 data bits (12.5%, SECDED's), in exchange for correcting any one
byte instead of any one bit.
"""

from __future__ import annotations

import numpy as np

DATA_SYMBOLS = 16
CHECK_SYMBOLS = 2
SYMBOLS = DATA_SYMBOLS + CHECK_SYMBOLS
PRIMITIVE = 0x11D


def _tables() -> tuple[np.ndarray, np.ndarray]:
    exp = np.zeros(512, dtype=np.int64)
    log = np.zeros(256, dtype=np.int64)
    value = 1
    for power in range(255):
        exp[power] = value
        log[value] = power
        value <<= 1
        if value & 0x100:
            value ^= PRIMITIVE
    exp[255:510] = exp[:255]
    return exp, log


EXP, LOG = _tables()


def multiply(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Products in GF(2^8), elementwise."""
    a, b = np.asarray(a, dtype=np.int64), np.asarray(b, dtype=np.int64)
    product = EXP[(LOG[a] + LOG[b]) % 255]
    return np.where((a == 0) | (b == 0), 0, product)


_TIMES_POWER = np.stack([multiply(np.arange(256), EXP[j]) for j in range(SYMBOLS)])
"""Row j, column v: v * a^j."""


def syndromes(symbols: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(S0, S1) of patterns of `symbols` (n, 18) bytes, or (n, 16) data bytes (check bytes zero)."""
    symbols = np.asarray(symbols, dtype=np.int64)
    s0 = np.bitwise_xor.reduce(symbols, axis=1)
    s1 = np.zeros(len(symbols), dtype=np.int64)
    for j in range(symbols.shape[1]):
        s1 ^= _TIMES_POWER[j][symbols[:, j]]
    return s0, s1


def encode(data: np.ndarray) -> np.ndarray:
    """The 2 check bytes (n, 2) an encoder stores for `data` (n, 16) bytes: both syndromes zero."""
    d0, d1 = syndromes(data)
    # c16 + c17 = d0 and a^16 c16 + a^17 c17 = d1, so c16 (a^16 + a^17) = d1 + a^17 d0.
    inverse = EXP[(255 - LOG[EXP[16] ^ EXP[17]]) % 255]
    c16 = multiply(d1 ^ multiply(d0, EXP[17]), inverse)
    return np.stack([c16, d0 ^ c16], axis=1)


def decode(data_error: np.ndarray, check_error: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(residual data error (n, 16) after decoding, detected as uncorrectable, whether the decoder
    changed a symbol) for error patterns in the data (n, 16) and check (n, 2) bytes."""
    pattern = np.concatenate([np.asarray(data_error, dtype=np.int64), np.asarray(check_error, dtype=np.int64)], axis=1)
    s0, s1 = syndromes(pattern)
    both = (s0 != 0) & (s1 != 0)
    location = np.where(both, (LOG[np.where(both, s1, 1)] - LOG[np.where(both, s0, 1)]) % 255, SYMBOLS)
    acts = both & (location < SYMBOLS)
    detected = ((s0 != 0) | (s1 != 0)) & ~acts
    residual = pattern.copy()
    rows = np.flatnonzero(acts)
    residual[rows, location[rows]] ^= s0[rows]
    return residual[:, :DATA_SYMBOLS], detected, acts
