"""Half-precision storage of a float32 model: each weight stored as one float16 or bfloat16
word, and computed with in the model's own dtype."""

from __future__ import annotations

from collections.abc import Mapping

import torch

from lm_eval_faults.core.storage.codecs import register_codec
from lm_eval_faults.core.storage.layouts import LAYOUTS, BitLayout


class HalfPrecision:
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


register_codec(HalfPrecision(torch.float16, "16 bits per weight"))
register_codec(HalfPrecision(torch.bfloat16, "16 bits per weight"))
