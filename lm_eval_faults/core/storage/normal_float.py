"""NF4 storage (`nf4`, QLoRA's NormalFloat4): per block of 64 consecutive weights, one float32
absmax, and 4-bit indices into a fixed table of 16 values spaced as quantiles of a normal
distribution, packed two per byte with the first index in the high nibble (as bitsandbytes and
torchao's `NF4Tensor` pack them): w = NF4[index] * absmax.

This is bitsandbytes' layout without double quantization (`compress_statistics=False`): the
absmax is itself a stored float32 field, so a fault in it scales its whole block. Nearest-value
rounding matches torchao's `NF4Tensor.quantize_tensor_nearest`, which the tests check on torchao's table.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from lm_eval_faults.core.storage.codecs import register_codec
from lm_eval_faults.core.storage.layouts import FIELD_LAYOUTS, LAYOUTS, BitLayout

NF4_VALUES = (
    -1.0,
    -0.6961928009986877,
    -0.5250730514526367,
    -0.39491748809814453,
    -0.28444138169288635,
    -0.18477343022823334,
    -0.09105003625154495,
    0.0,
    0.07958029955625534,
    0.16093020141124725,
    0.24611230194568634,
    0.33791524171829224,
    0.44070982933044434,
    0.5626170039176941,
    0.7229568362236023,
    1.0,
)
"""The NF4 table of QLoRA (Dettmers et al., 2023), as bitsandbytes' kernels hold it (torchao
rounds it to four decimals)."""


class NormalFloat4:
    coupled_fields: frozenset[str] = frozenset()

    name = "nf4"
    description = "NF4 (QLoRA): 4-bit indices into a normal-quantile table, one float32 absmax per block of 64 (4.5 bits per weight)"
    block = 64

    def __init__(self, table: tuple[float, ...] = NF4_VALUES) -> None:
        self.field_layouts: Mapping[str, BitLayout] = {"codes": FIELD_LAYOUTS["int4x2"], "scales": LAYOUTS[torch.float32]}
        self._table = torch.tensor(table, dtype=torch.float32)

    def block_size(self, weight: torch.Tensor, group_size: int) -> int:
        return self.block

    def encode(self, blocks: torch.Tensor) -> dict[str, torch.Tensor]:
        absmax = blocks.abs().amax(dim=1, keepdim=True)
        scales = torch.where(absmax > 0, absmax, torch.ones_like(absmax))
        codes = self._nearest(blocks / scales).to(torch.uint8)
        return {"codes": codes[:, 0::2] << 4 | codes[:, 1::2], "scales": scales}

    def _nearest(self, values: torch.Tensor) -> torch.Tensor:
        """The index of the table value nearest each value, the lower on a tie (torchao's argmin),
        without a 16-wide difference per weight: the midpoints give the bucket, and the bucket's
        neighbours settle the rounding of the midpoints themselves."""
        table = self._table.to(values.device)
        guess = torch.bucketize(values, (table[1:] + table[:-1]) / 2)
        candidates = (guess.unsqueeze(-1) + torch.tensor([-1, 0, 1], device=values.device)).clamp(0, len(table) - 1)
        nearest = (values.unsqueeze(-1) - table[candidates]).abs().argmin(dim=-1, keepdim=True)
        return candidates.gather(-1, nearest).squeeze(-1)

    def decode(self, fields: Mapping[str, torch.Tensor]) -> torch.Tensor:
        packed = fields["codes"]
        codes = torch.stack([packed >> 4, packed & 0xF], dim=2).reshape(packed.shape[0], -1)
        return self._table.to(packed.device)[codes.long()] * fields["scales"].float()


register_codec(NormalFloat4())
