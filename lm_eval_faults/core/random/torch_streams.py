"""The stream table of `streams.py` in torch integer ops: the same 64-bit words on any device.

A fault map must not depend on where a tensor lives, so the device path draws exactly the words
`streams.random_words` draws. torch 2.13's `uint64` cannot do it: on the CPU it has no addition,
shifts, comparisons or remainder. So a 64-bit word is held in an `int64` tensor with the same
bits, and unsigned arithmetic is emulated with ops that are the same on every backend:

- `+` and `*` wrap modulo 2^64 in two's complement, which is unsigned arithmetic on the bits;
- `>>` on int64 is arithmetic (it copies the sign bit), so a logical shift masks the top bits
  off afterwards (`shift_right`);
- unsigned order is signed order after flipping the top bit (`unsigned_less`);
- a remainder by n < 2^63 is taken of the word's top 63 bits first, then of the last bit.

`tests/test_torch_streams.py` proves every function here bit-identical to its numpy original on
the CPU; that is how CI checks the algorithm the GPU runs without a GPU.
"""

from __future__ import annotations

import numpy as np
import torch

from lm_eval_faults.core.random.streams import GAMMA, MIX1, MIX2, PURPOSE_SHIFT, Purpose

_SIGN = -(1 << 63)
"""The top bit of a word, as an int64."""


def signed(word: int) -> int:
    """The int64 whose bits are the unsigned 64-bit `word` (what a torch scalar must be)."""
    word &= (1 << 64) - 1
    return word - (1 << 64) if word >> 63 else word


def to_device(words: np.ndarray, device: torch.device | str) -> torch.Tensor:
    """uint64 (or int64) words as an int64 tensor with the same bits on `device`."""
    return torch.tensor(np.ascontiguousarray(words).view(np.int64), device=device)


def to_numpy(words: torch.Tensor) -> np.ndarray:
    """The inverse of `to_device`: the words as a uint64 array on the host."""
    return words.cpu().numpy().view(np.uint64)


def shift_right(z: torch.Tensor, shift: int) -> torch.Tensor:
    """Logical right shift of 64-bit words (torch shifts int64 arithmetically)."""
    return (z >> shift) & ((1 << (64 - shift)) - 1)


def unsigned_less(a: torch.Tensor, b: torch.Tensor | int) -> torch.Tensor:
    """a < b as unsigned 64-bit words (`b` an int64 tensor or an unsigned Python int)."""
    flipped = signed(b) ^ _SIGN if isinstance(b, int) else b ^ _SIGN
    return (a ^ _SIGN) < flipped


def unsigned_remainder(words: torch.Tensor, n: torch.Tensor) -> torch.Tensor:
    """words mod n for unsigned words and 0 < n < 2^62: (2 (w >> 1) + (w & 1)) mod n, term by term."""
    return ((shift_right(words, 1) % n) * 2 + (words & 1)) % n


def mix64(values: torch.Tensor) -> torch.Tensor:
    """SplitMix64's finaliser, as `streams.mix64`."""
    z = (values ^ shift_right(values, 30)) * signed(MIX1)
    z = (z ^ shift_right(z, 27)) * signed(MIX2)
    return z ^ shift_right(z, 31)


def row_keys(key: int, request_keys: torch.Tensor) -> torch.Tensor:
    """Per-row site keys of a REQUEST stream, as `streams.row_keys`."""
    return mix64(mix64(request_keys) ^ signed(key))


def random_words(keys: torch.Tensor | int, purpose: Purpose, index: torch.Tensor) -> torch.Tensor:
    """Word number `index` of `purpose` in each key's stream, as `streams.random_words`.

    `keys` is one int64 tensor per draw (or one unsigned Python int for all); `index` an int64
    tensor of counters below 2^56. The result lives on `index`'s device.
    """
    counter = index | (int(purpose) << PURPOSE_SHIFT)
    stepped = (counter + 1) * signed(GAMMA)
    return mix64(stepped + (signed(keys) if isinstance(keys, int) else keys))


def to_uniform(words: torch.Tensor) -> torch.Tensor:
    """The top 53 bits of each word as a float64 in [0, 1), as `streams.to_uniform`."""
    return shift_right(words, 11).to(torch.float64) * 2.0**-53
