"""Plain tensors: a float or integer tensor stored as itself, one word per element.

The first storage format, and the last one asked: only a plain `torch.Tensor` (not a subclass,
whose elements are not what it stores) of a dtype with a bit layout.
"""

from __future__ import annotations

import torch

from lm_eval_faults.core.storage.formats import StoredField, register_format
from lm_eval_faults.core.storage.layouts import LAYOUTS


class PlainFormat:
    name = "plain"

    def recognises(self, tensor: torch.Tensor) -> bool:
        return type(tensor.data) is torch.Tensor and tensor.dtype in LAYOUTS

    def fields(self, tensor: torch.Tensor) -> tuple[StoredField, ...]:
        return (StoredField("", tensor, LAYOUTS[tensor.dtype]),)


PLAIN = register_format(PlainFormat())
