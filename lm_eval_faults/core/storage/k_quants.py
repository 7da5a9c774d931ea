"""A Q4_K quantizer: the one GGUF block type in this package's list that `gguf.quants` decodes
but cannot encode (its `quantize` raises NotImplementedError for the K-quants).

A Q4_K super-block holds 256 weights as 8 sub-blocks of 32: a float16 `d` and `dmin`, 12 bytes
of 6-bit sub-block scales and mins, and 128 bytes of 4-bit codes, so that
w = d * sc[j] * q - dmin * m[j] for sub-block j. This is the min/max choice of each sub-block's
range (llama.cpp refines it iteratively, `make_qkx2_quants`); the bytes it writes are decoded
by `gguf.quants`, whose reading of the layout is the reference, and the tests check the
round trip.
"""

from __future__ import annotations

import numpy as np

SUPER_BLOCK = 256
SUB_BLOCKS = 8
SUB_BLOCK = SUPER_BLOCK // SUB_BLOCKS


def _positive_fp16(values: np.ndarray) -> np.ndarray:
    """A float16 step, 1 where the range is empty (all its weights then decode to the min)."""
    return np.where(values > 0, values, 1).astype(np.float16)


def _ratio(values: np.ndarray, step: np.ndarray, top: int) -> np.ndarray:
    return np.clip(np.round(values / step), 0, top).astype(np.uint8)


def pack_scales(sc: np.ndarray, m: np.ndarray) -> np.ndarray:
    """Eight 6-bit scales and mins per super-block -> the 12 bytes `get_scale_min_k4` reads:
    bytes 0-3 and 4-7 hold sc[0:4] and m[0:4] with the top 2 bits of sc[4:8] and m[4:8] above
    them; bytes 8-11 hold the low 4 bits of sc[4:8] (low nibble) and m[4:8] (high nibble)."""
    low, high = slice(0, 4), slice(4, 8)
    first = (sc[:, low] & 0x3F) | ((sc[:, high] >> 4) << 6)
    second = (m[:, low] & 0x3F) | ((m[:, high] >> 4) << 6)
    third = (sc[:, high] & 0x0F) | ((m[:, high] & 0x0F) << 4)
    return np.concatenate([first, second, third], axis=1).astype(np.uint8)


def quantize_q4_k(blocks: np.ndarray) -> np.ndarray:
    """float32 [n, 256] -> Q4_K blocks as bytes [n, 144] (d, dmin, scales, codes)."""
    n = blocks.shape[0]
    sub = blocks.astype(np.float32).reshape(n, SUB_BLOCKS, SUB_BLOCK)
    low = np.minimum(sub.min(axis=2), 0)  # Q4_K subtracts a non-negative min: ranges include 0
    scale, minimum = (sub.max(axis=2) - low) / 15, -low
    d, dmin = _positive_fp16(scale.max(axis=1, keepdims=True) / 63), _positive_fp16(minimum.max(axis=1, keepdims=True) / 63)
    sc, m = _ratio(scale, d.astype(np.float32), 63), _ratio(minimum, dmin.astype(np.float32), 63)
    step = (d.astype(np.float32) * sc)[:, :, None]
    offset = (dmin.astype(np.float32) * m)[:, :, None]
    with np.errstate(divide="ignore", invalid="ignore"):
        codes = np.where(step > 0, np.clip(np.round((sub + offset) / step), 0, 15), 0).astype(np.uint8)
    pairs = codes.reshape(n, SUB_BLOCKS // 2, 2, SUB_BLOCK)  # sub-blocks 2i and 2i+1 share 32 bytes
    packed = (pairs[:, :, 0] | (pairs[:, :, 1] << 4)).reshape(n, SUPER_BLOCK // 2)
    return np.concatenate([d.view(np.uint8), dmin.view(np.uint8), pack_scales(sc, m), packed], axis=1)
