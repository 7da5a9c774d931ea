"""torchao's quantized weights, faulted in the fields they store (`quantize_(model, ...)`).

A torchao weight is a tensor subclass whose elements are not what it stores: an `Int8Tensor`
holds int8 `qdata`, a float32 `scale` per row and a `zero_point`, and decodes them at every
matmul. Its fields are plain tensors, so faulting them in place is faulting the model exactly
as the hardware would (no re-quantization, no copy), and the undo log restores them in O(k).

Only the classes named here are recognised, with the fields each stores per weight: a class's
other inner tensors may be shared lookup tables (NF4's value table) or derived caches, and
faulting those would fault what no memory holds once per weight. torchao is not imported: a
tensor is recognised by its class, so a model without torchao never loads it.
"""

from __future__ import annotations

import torch

from lm_eval_faults.core.storage.formats import StoredField, register_format
from lm_eval_faults.core.storage.layouts import FIELD_LAYOUTS, LAYOUTS, BitLayout

_AFFINE = {"qdata": "codes", "scale": "scales", "zero_point": "zeros"}
STORED_FIELDS: dict[str, dict[str, str]] = {
    "Int8Tensor": _AFFINE,
    "Int4Tensor": _AFFINE,
    "IntxUnpackedToInt8Tensor": _AFFINE,
    "Float8Tensor": {"qdata": "codes", "scale": "scales"},
    "NF4Tensor": {
        "quantized_data": "codes",
        "quantized_scalers": "quantized_scalers",
        "quantization_factor": "quantization_factor",
        "scaler_mean": "scaler_mean",
    },
}
"""Per torchao class, its inner tensors that are stored fields (torchao's names), each with the
field name faults, reports and maps use. Codes, scales and zero points take the names the
simulated storages give them, so a torchao weight and `storage=` with the same layout draw the
same faults (a site's stream is keyed by its name) and `fields=codes` means the same words in
both; NF4's double-quantized scalers have no simulated counterpart and keep torchao's names."""

_LAYOUTS_BY_DTYPE: dict[torch.dtype, BitLayout] = {
    **{layout.dtype: layout for layout in FIELD_LAYOUTS.values() if layout.is_float},
    **LAYOUTS,
}


class TorchaoFormat:
    name = "torchao"

    def recognises(self, tensor: torch.Tensor) -> bool:
        kind = type(tensor.data)
        return kind.__module__.startswith("torchao.") and kind.__name__ in STORED_FIELDS

    def fields(self, tensor: torch.Tensor) -> tuple[StoredField, ...]:
        stored = tensor.data
        fields = []
        for attribute, name in STORED_FIELDS[type(stored).__name__].items():
            words = getattr(stored, attribute, None)
            if words is None:  # an optional field this weight does not have (a symmetric zero point)
                continue
            if words.dtype not in _LAYOUTS_BY_DTYPE:
                raise TypeError(f"torchao field {attribute} is {words.dtype}, which has no bit layout")
            fields.append(StoredField(name, words, _LAYOUTS_BY_DTYPE[words.dtype]))
        return tuple(fields)


TORCHAO = register_format(TorchaoFormat())
