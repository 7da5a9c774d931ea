"""Integer storage written out here (none of gguf's or torchao's codecs lays these out as
fields we can fault): per-channel symmetric int8, and group-wise asymmetric int4.

- `int8`: one int8 code per weight, one float16 scale per output row (w = s * q, |q| <= 127).
- `int4`: GPTQ's and AWQ's layout. 4-bit codes packed two per byte, low nibble first; per group
  of `group_size` consecutive weights along a row, a float16 scale and a 4-bit integer zero point
  (w = s * (q - z), q and z in 0..15). The zero is an integer, as theirs is: a fault in it moves
  its group by whole steps of the scale (at most 8), where a float zero (q4_1's min) can become
  huge. Codes are rounded to nearest over the group's range widened to hold 0 (GPTQ's
  `Quantizer.find_params`; GPTQ's own algorithm then chooses codes to cancel rounding errors,
  which changes which codes are stored, not how they are stored or decoded).
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from lm_eval_faults.core.storage.codecs import register_codec
from lm_eval_faults.core.storage.layouts import FIELD_LAYOUTS, LAYOUTS, BitLayout


def _fp16(values: torch.Tensor) -> torch.Tensor:
    """A positive float16 scale (a zero range gets 1, so codes decode to the min exactly)."""
    return torch.where(values > 0, values, torch.ones_like(values)).to(torch.float16)


class Int8PerChannel:
    coupled_fields: frozenset[str] = frozenset()

    name = "int8"
    description = "int8 codes, symmetric, one float16 scale per output channel (8.x bits per weight)"

    def __init__(self) -> None:
        self.field_layouts: Mapping[str, BitLayout] = {"codes": LAYOUTS[torch.int8], "scales": LAYOUTS[torch.float16]}

    def block_size(self, weight: torch.Tensor, group_size: int) -> int:
        return weight.shape[-1] if weight.dim() else 1

    def encode(self, blocks: torch.Tensor) -> dict[str, torch.Tensor]:
        scales = _fp16(blocks.abs().amax(dim=1, keepdim=True) / 127)
        codes = torch.round(blocks / scales.float()).clamp(-127, 127).to(torch.int8)
        return {"codes": codes, "scales": scales}

    def decode(self, fields: Mapping[str, torch.Tensor]) -> torch.Tensor:
        return fields["codes"].float() * fields["scales"].float()


class Int4Groups:
    coupled_fields: frozenset[str] = frozenset()

    name = "int4"
    description = (
        "4-bit codes packed two per byte, float16 scale and 4-bit zero point per group of group_size (4 + 20/group_size bits per weight)"
    )

    def __init__(self) -> None:
        self.field_layouts: Mapping[str, BitLayout] = {
            "codes": FIELD_LAYOUTS["int4x2"],
            "scales": LAYOUTS[torch.float16],
            "zeros": FIELD_LAYOUTS["uint4"],
        }

    def block_size(self, weight: torch.Tensor, group_size: int) -> int:
        return group_size

    def encode(self, blocks: torch.Tensor) -> dict[str, torch.Tensor]:
        """torchao's asymmetric affine quantization (`choose_qparams_affine`, `quantize_affine`)
        with a float16 scale, to the bit: the zero comes from the float32 step, codes from the
        float16 scale's float16 reciprocal; a group of zeros gets scale 1."""
        low = blocks.amin(dim=1, keepdim=True).clamp(max=0)
        step = (blocks.amax(dim=1, keepdim=True).clamp(min=0) - low) / 15
        scales = _fp16(step)
        zeros = (-torch.round(low / torch.where(step > 0, step, torch.ones_like(step)))).clamp(0, 15)
        scaled = (blocks * (1.0 / scales)).nan_to_num(0.0)  # 0 x an overflowed reciprocal: the weight 0, code = zero
        codes = (torch.round(scaled) + zeros).clamp(0, 15).to(torch.uint8)
        return {"codes": codes[:, 0::2] | codes[:, 1::2] << 4, "scales": scales, "zeros": zeros.to(torch.uint8)}

    def decode(self, fields: Mapping[str, torch.Tensor]) -> torch.Tensor:
        packed = fields["codes"]
        codes = torch.stack([packed & 0xF, packed >> 4], dim=2).reshape(packed.shape[0], -1)
        return (codes.float() - fields["zeros"].float()) * fields["scales"].float()


register_codec(Int8PerChannel())
register_codec(Int4Groups())
