"""Float storage: each weight stored as one float16 or bfloat16 word (a float32 model stored in
half precision), computed with in the model's own dtype."""

from __future__ import annotations

from collections.abc import Mapping

import torch

from lm_eval_faults.core.storage.codecs import register_codec
from lm_eval_faults.core.storage.layouts import LAYOUTS, BitLayout


class FloatWords:
    coupled_fields: frozenset[str] = frozenset()

    def __init__(self, dtype: torch.dtype, bits: str) -> None:
        self.name = LAYOUTS[dtype].name
        self.description = f"each weight one {self.name} word ({bits})"
        self.field_layouts: Mapping[str, BitLayout] = {"values": LAYOUTS[dtype]}
        self._dtype = dtype

    def block_size(self, weight: torch.Tensor, group_size: int) -> int:
        return 1

    def encode(self, blocks: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"values": blocks.to(self._dtype)}

    def decode(self, fields: Mapping[str, torch.Tensor]) -> torch.Tensor:
        return fields["values"].float()


FLOAT_WORDS = {
    dtype: FloatWords(dtype, f"{LAYOUTS[dtype].width} bits per weight") for dtype in (torch.float32, torch.float16, torch.bfloat16)
}
"""Each float dtype stored as itself: float16 and bfloat16 are storages of a float32 model, and
all three are how a GGUF file stores its float tensors (`storage=file`)."""
register_codec(FLOAT_WORDS[torch.float16])
register_codec(FLOAT_WORDS[torch.bfloat16])
