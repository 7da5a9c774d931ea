"""Read and write a tensor's stored words at flat element positions, wherever the tensor lives.

Faults are computed on the CPU in numpy (see faults.py); this is the only place that touches the
tensors. A CPU tensor is accessed through a numpy view of its memory (no copy, no per-access torch
dispatch: gathering a few words costs well under a microsecond); a device tensor through torch
indexing with the positions moved to the device.
"""

from __future__ import annotations

import numpy as np
import torch

from lm_eval_faults.core.storage.layouts import BitLayout, from_unsigned, to_unsigned

UNSIGNED_ARRAYS = {4: np.uint8, 8: np.uint8, 16: np.uint16, 32: np.uint32}
"""The numpy unsigned type of each word width: how stored words are read on the host (a 4-bit
word, an integer zero point, is held in a byte whose high nibble is always 0)."""


def flat_words(tensor: torch.Tensor, layout: BitLayout) -> torch.Tensor:
    """A flat integer view sharing storage with `tensor`: writes to it change the tensor's bits."""
    if not tensor.is_contiguous():
        raise ValueError("cannot fault a non-contiguous tensor in place")
    if tensor.device.type == "meta":
        raise ValueError("cannot fault a parameter on the meta device (offloaded weights are not supported)")
    return tensor.detach().view(-1).view(layout.int_view)


class WordAccess:
    """The stored words of one tensor, as unsigned integers; writes change the tensor's bits."""

    __slots__ = ("_array", "_words", "layout")

    def __init__(self, tensor: torch.Tensor, layout: BitLayout) -> None:
        self.layout = layout
        words = flat_words(tensor, layout)
        self._words = None if words.device.type == "cpu" else words
        self._array = words.numpy().view(UNSIGNED_ARRAYS[layout.width]) if self._words is None else None

    def read(self, positions: np.ndarray) -> np.ndarray:
        """The words at `positions` as non-negative int64."""
        if self._array is not None:
            return self._array[positions].astype(np.int64)
        assert self._words is not None  # exactly one of _array and _words is set
        index = torch.from_numpy(positions).to(self._words.device)
        return to_unsigned(self._words[index].cpu(), self.layout).numpy()

    def write(self, positions: np.ndarray, values: np.ndarray) -> None:
        """Store non-negative int64 `values` (< 2^width) at `positions`."""
        if self._array is not None:
            self._array[positions] = values.astype(self._array.dtype)
            return
        assert self._words is not None  # exactly one of _array and _words is set
        index = torch.from_numpy(positions).to(self._words.device)
        self._words[index] = from_unsigned(torch.from_numpy(values), self.layout).to(self._words.device)
