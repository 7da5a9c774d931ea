"""The dispatch of storage formats: which words a tensor is stored as, and their bit layout.

A weight is not always its own words: a plain float16 tensor is, but a quantized one stores
integer codes and the scales that turn them into values, each with its own layout. A
`StorageFormat` says which tensors it recognises and the fields each one is stored in; the
first registered format that recognises a tensor wins (the newest is asked first, as in peft's
`dispatch_*` chain, so a specific format can claim what a general one would take). Every fault
site, map and analysis works on fields, so a new format is one module and one
`register_format(...)` call.

A tensor no format recognises (a tensor subclass such as torchao's, a dtype without a layout)
is refused by name when selected, before anything is written: faulting the words torch happens
to show for it would fault something the hardware does not store.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch

from lm_eval_faults.core.storage.layouts import BitLayout


@dataclass(frozen=True)
class StoredField:
    """One field of a tensor's storage: the tensor whose elements are its stored words (it
    shares memory with what the model computes with, so writing it is faulting the model), and
    their bit layout. `name` is empty for a tensor stored as itself."""

    name: str
    words: torch.Tensor
    layout: BitLayout


class StorageFormat(Protocol):
    """A way tensors are stored: which ones it recognises, and their fields."""

    name: str

    def recognises(self, tensor: torch.Tensor) -> bool: ...

    def fields(self, tensor: torch.Tensor) -> tuple[StoredField, ...]: ...


class UnsupportedStorageError(TypeError):
    """A selected tensor is stored in a way no registered format knows how to fault."""


_FORMATS: list[StorageFormat] = []


def register_format(storage_format: StorageFormat) -> StorageFormat:
    """Add a format, asked before every format registered earlier."""
    if any(known.name == storage_format.name for known in _FORMATS):
        raise ValueError(f"storage format {storage_format.name!r} is registered already")
    _FORMATS.insert(0, storage_format)
    return storage_format


def unregister_format(name: str) -> None:
    _FORMATS[:] = [known for known in _FORMATS if known.name != name]


def format_names() -> tuple[str, ...]:
    """The registered formats, in the order they are asked."""
    return tuple(known.name for known in _FORMATS)


def storage_format(tensor: torch.Tensor) -> StorageFormat | None:
    """The format `tensor` is stored in, or None if no registered format recognises it."""
    return next((known for known in _FORMATS if known.recognises(tensor)), None)


def storage_problem(tensor: torch.Tensor) -> str:
    """Why no format recognises `tensor`, in words that name what it is."""
    kind = type(tensor.data)
    if kind is not torch.Tensor:
        return f"{kind.__module__}.{kind.__qualname__}, a tensor subclass no storage format recognises"
    return f"{tensor.dtype}, a dtype no storage format recognises"
