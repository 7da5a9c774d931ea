"""GGUF's block types as simulated storage, through the `gguf` package's own codecs.

`gguf.quants` quantizes and dequantizes each type in numpy; this module only says where each
field of a block lies in its bytes, so faults hit the real layout: the float16 scale `d` (and
min `m`), the packed codes `qs`, MXFP4's E8M0 exponent `e`. A block is 32 consecutive weights
along a row (256 for Q4_K, whose 8 sub-blocks of 32 have 6-bit scales and mins of their own).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import numpy as np
import torch
from gguf import GGMLQuantizationType, quants

from lm_eval_faults.core.storage.codecs import register_codec
from lm_eval_faults.core.storage.k_quants import quantize_q4_k
from lm_eval_faults.core.storage.layouts import FIELD_LAYOUTS, LAYOUTS, BitLayout

_NUMPY = {"float16": np.float16, "int8": np.int8}


class GgufBlocks:
    """One GGUF block type: its fields as (name, layout, bytes) in the block's byte order."""

    def __init__(
        self,
        name: str,
        qtype: GGMLQuantizationType,
        fields: tuple[tuple[str, BitLayout, int], ...],
        description: str,
        quantize: Callable[[np.ndarray], np.ndarray] | None = None,
        coupled_fields: frozenset[str] = frozenset(),
    ) -> None:
        self.name = name
        self.coupled_fields = coupled_fields
        self.qtype = qtype
        self.description = description
        self.field_layouts: Mapping[str, BitLayout] = {field: layout for field, layout, _ in fields}
        self._bytes = {field: size for field, _, size in fields}
        block, type_size = quants.GGML_QUANT_SIZES[qtype]
        assert sum(self._bytes.values()) == type_size, name
        self.block = block
        self._quantize = quantize or (lambda blocks: quants.quantize(blocks.reshape(1, -1), qtype).reshape(len(blocks), -1))
        """gguf's own quantizer, or one written here where gguf has none (Q4_K)."""

    def block_size(self, weight: torch.Tensor, group_size: int) -> int:
        return self.block

    def encode(self, blocks: torch.Tensor) -> dict[str, torch.Tensor]:
        return self.split(self._quantize(blocks.detach().cpu().numpy()))

    def decode(self, fields: Mapping[str, torch.Tensor]) -> torch.Tensor:
        # All blocks as one row: gguf's codecs loop in Python over the rows they are given, so
        # blocks given as rows cost one call each (90% of a large decode's time).
        joined = self.join(fields)
        with np.errstate(over="ignore", invalid="ignore"):  # a faulted scale may decode to Inf or NaN: that is the result
            values = quants.dequantize(joined.reshape(1, -1), self.qtype).astype(np.float32, copy=False)
        return torch.from_numpy(values.reshape(joined.shape[0], self.block))

    def split(self, raw: np.ndarray) -> dict[str, torch.Tensor]:
        """Blocks as GGUF stores them (bytes [n, type size]) -> each field's words [n, per block]."""
        fields, start = {}, 0
        for field, size in self._bytes.items():
            column = np.ascontiguousarray(raw[:, start : start + size])
            start += size
            fields[field] = torch.from_numpy(column.view(_NUMPY.get(self.field_layouts[field].name, np.uint8)).copy())
        return fields

    def join(self, fields: Mapping[str, torch.Tensor]) -> np.ndarray:
        """The inverse of `split`: the blocks' bytes, as a GGUF file stores them."""
        return np.concatenate([fields[field].cpu().numpy().view(np.uint8).reshape(-1, size) for field, size in self._bytes.items()], axis=1)


F16, I8 = LAYOUTS[torch.float16], LAYOUTS[torch.int8]
GGUF_CODECS: dict[GGMLQuantizationType, GgufBlocks] = {}
"""Each registered block type by GGUF's own type: how `storage=file` reads a file's blocks."""

for codec in (
    GgufBlocks(
        "q8_0",
        GGMLQuantizationType.Q8_0,
        (("scales", F16, 2), ("codes", I8, 32)),
        "GGUF Q8_0: 32 int8 codes and a float16 scale per block (8.5 bits per weight)",
    ),
    GgufBlocks(
        "q4_0",
        GGMLQuantizationType.Q4_0,
        (("scales", F16, 2), ("codes", FIELD_LAYOUTS["int4x2"], 16)),
        "GGUF Q4_0: 32 4-bit codes and a float16 scale per block (4.5 bits per weight)",
    ),
    GgufBlocks(
        "q4_1",
        GGMLQuantizationType.Q4_1,
        (("scales", F16, 2), ("mins", F16, 2), ("codes", FIELD_LAYOUTS["int4x2"], 16)),
        "GGUF Q4_1: 32 4-bit codes, a float16 scale and min per block (5 bits per weight)",
    ),
    GgufBlocks(
        "mxfp4",
        GGMLQuantizationType.MXFP4,
        (("exponents", FIELD_LAYOUTS["e8m0"], 1), ("codes", FIELD_LAYOUTS["e2m1x2"], 16)),
        "MXFP4: 32 FP4 (E2M1) codes and one E8M0 shared exponent per block (4.25 bits per weight)",
    ),
    GgufBlocks(
        "q4_k",
        GGMLQuantizationType.Q4_K,
        (("scales", F16, 2), ("mins", F16, 2), ("sub_scales", FIELD_LAYOUTS["k_scales"], 12), ("codes", FIELD_LAYOUTS["int4x2"], 128)),
        "GGUF Q4_K: super-blocks of 256, 4-bit codes, 6-bit scales and mins per 32, float16 d and dmin (4.5 bits per weight)",
        quantize=quantize_q4_k,
        coupled_fields=frozenset({"sub_scales"}),  # each sub-block reads two or three of the 12 bytes
    ),
):
    GGUF_CODECS[codec.qtype] = codec
    register_codec(codec)
