"""FP8 weight storage (`fp8_e4m3`, `fp8_e5m2`): one FP8 code per weight and a float32 scale per
output channel, the layout of FP8 weight-only checkpoints (torchao's `Float8Tensor` per row,
vLLM's per-channel FP8): w = code * scale, with the scale chosen so the row's largest magnitude
is the format's largest finite value.

The casts are torch's own (round to nearest even, saturating to the finite range as the scale
guarantees); only the scale is chosen here.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from lm_eval_faults.core.storage.codecs import register_codec
from lm_eval_faults.core.storage.layouts import FIELD_LAYOUTS, LAYOUTS, BitLayout


class Float8PerChannel:
    coupled_fields: frozenset[str] = frozenset()

    def __init__(self, name: str, dtype: torch.dtype) -> None:
        self.name = name
        self._dtype = dtype
        self._largest = torch.finfo(dtype).max
        code = FIELD_LAYOUTS[str(dtype).removeprefix("torch.")]
        self.description = f"{code.name} codes, one float32 scale per output channel (8 + 32/row bits per weight)"
        self.field_layouts: Mapping[str, BitLayout] = {"codes": code, "scales": LAYOUTS[torch.float32]}

    def block_size(self, weight: torch.Tensor, group_size: int) -> int:
        return weight.shape[-1] if weight.dim() else 1

    def encode(self, blocks: torch.Tensor) -> dict[str, torch.Tensor]:
        largest = blocks.abs().amax(dim=1, keepdim=True)
        scales = torch.where(largest > 0, largest / self._largest, torch.ones_like(largest))
        codes = (blocks / scales).clamp(-self._largest, self._largest).to(self._dtype)
        return {"codes": codes, "scales": scales}

    def decode(self, fields: Mapping[str, torch.Tensor]) -> torch.Tensor:
        return fields["codes"].float() * fields["scales"].float()


register_codec(Float8PerChannel("fp8_e4m3", torch.float8_e4m3fn))
register_codec(Float8PerChannel("fp8_e5m2", torch.float8_e5m2))
