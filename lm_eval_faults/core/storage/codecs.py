"""Simulated storage (`storage=`): a weight encoded into the fields a deployed format stores,
faulted there, and decoded into the tensor the model computes with.

A `BlockCodec` encodes blocks of consecutive weights along the last dimension (a GGUF block, a
GPTQ group, a row for per-channel int8) into fields of stored words: codes, scales, mins, shared
exponents, each with its own bit layout and packed as the real format packs them. An `Encoding`
holds one weight's fields and its clean float values. Installing it makes the model compute with
the decoded stored form (the quantization's own error is part of the clean baseline);
`refresh` re-decodes only the blocks whose words a fault changed (a code fault one block, a scale
fault its group), so injection stays O(faults); `uninstall` gives the float weights back.

A weight is encoded once per model and storage, and the encoding is kept with the weight, so a
sweep's points reuse it: faults are undone in its words, which then hold the clean form again.
"""

from __future__ import annotations

import math
import weakref
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np
import torch

from lm_eval_faults.core.storage.layouts import BitLayout


class BlockCodec(Protocol):
    """A storage format over blocks of `block_size(weight)` consecutive weights."""

    name: str
    description: str
    coupled_fields: frozenset[str]
    """Fields of which one weight reads several words of its block (Q4_K's 6-bit sub-scales and
    mins, packed across 12 bytes); in every other field a weight reads one word (its code, its
    block's scale), which is what lets `analysis.stored` flip a bit in all of a field's words at once."""

    @property
    def field_layouts(self) -> Mapping[str, BitLayout]:
        """Each stored field's word layout, in the order the format lays a block out."""
        ...

    def block_size(self, weight: torch.Tensor, group_size: int) -> int:
        """Weights per block for `weight` (`group_size` is the `group_size=` key, for codecs whose
        groups are chosen)."""
        ...

    def encode(self, blocks: torch.Tensor) -> dict[str, torch.Tensor]:
        """float32 [n, block] -> per field, its words [n, words per block] (dtype of its layout)."""
        ...

    def decode(self, fields: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """Per field, the words of k blocks -> their float32 values [k, block]."""
        ...


class StorageError(ValueError):
    """A weight that a chosen storage cannot hold (a last dimension its blocks do not divide)."""


FILE = "file"
"""`storage=file`: the stored form a model was loaded from (a GGUF file's own blocks), attached
to its weights when it loads (`attach_stored_form`), never encoded here."""

_CODECS: dict[str, BlockCodec] = {}


def register_codec(codec: BlockCodec) -> BlockCodec:
    if codec.name in _CODECS or codec.name in ("none", FILE):
        raise ValueError(f"storage {codec.name!r} is registered already or reserved")
    _CODECS[codec.name] = codec
    return codec


def codec_names() -> tuple[str, ...]:
    return tuple(_CODECS)


def codec(name: str) -> BlockCodec:
    return _CODECS[name]


def codec_fields(name: str) -> tuple[str, ...]:
    """The fields storage `name` stores (what `fields=` and `protect_fields=` may name); a file
    may hold any registered format's fields."""
    chosen = list(_CODECS.values()) if name == FILE else [_CODECS[name]]
    return tuple(dict.fromkeys(field for one in chosen for field in one.field_layouts))


@dataclass
class Encoding:
    """One weight in one storage: its fields' words (1-D, block-major) and its clean values."""

    codec: BlockCodec
    weight_ref: weakref.ref[torch.Tensor]
    """The weight, weakly: the weight holds its encodings, so a strong reference back would make
    a cycle that keeps every model ever encoded alive (a sweep over storages ran out of memory)."""
    block: int
    fields: dict[str, torch.Tensor]
    original: torch.Tensor = field(repr=False)
    clean_error: float = 0.0
    """Squared error of the clean decoded form against the float weights (the quantization's own)."""
    decoded: torch.Tensor | None = field(default=None, repr=False)
    """The clean decoded form, kept after the first install: later installs are one copy."""
    original_norm: float = 0.0
    """Sum of squares of the float weights: the clean error's denominator, computed once."""
    element_positions: torch.Tensor | None = field(default=None, repr=False)
    """The weight's flat position of each stored element, in stored order; None where they are
    the same. A GGUF file stores Llama's Q and K rows permuted (llama.cpp's RoPE layout), which
    transformers undoes when it loads the file."""
    source: object = field(default=None, repr=False)
    """Where a stored form came from, for writing it back (a GGUF file's tensor); None when it
    was encoded here."""
    affected: dict[str, list[np.ndarray]] = field(default_factory=dict, repr=False)
    """Per field, flat indices of the weights its faults changed since the last install (a scale
    fault: its group), one array per refresh; a weight changed twice is counted once."""

    @property
    def weight(self) -> torch.Tensor:
        weight = self.weight_ref()
        if weight is None:
            raise RuntimeError("the weight of this encoding is gone")
        return weight

    @property
    def blocks(self) -> int:
        return self.weight.numel() // self.block

    def words_per_block(self, name: str) -> int:
        return self.fields[name].numel() // self.blocks

    @torch.no_grad()
    def install(self) -> None:
        """The model computes with the decoded stored form from now on."""
        if self.decoded is None:  # the fields hold the clean form whenever no injection is applied
            shaped = {name: words.view(self.blocks, -1) for name, words in self.fields.items()}
            stored = self.codec.decode(shaped).to(self.weight.device, self.weight.dtype).view(-1)
            if self.element_positions is not None:
                stored = torch.empty_like(stored).index_copy_(0, self.element_positions.to(stored.device), stored)
            self.decoded = stored.view(self.weight.shape)
            self.clean_error = float(((self.decoded.double() - self.original.double()) ** 2).sum())
            self.original_norm = float((self.original.double() ** 2).sum())
        self.weight.copy_(self.decoded)
        self.affected = {}

    @torch.no_grad()
    def uninstall(self) -> None:
        """The float weights again, bit for bit."""
        self.weight.copy_(self.original)

    @torch.no_grad()
    def refresh(self, name: str, positions: np.ndarray) -> None:
        """Re-decode the blocks holding words `positions` of field `name`."""
        if not len(positions):
            return
        index = torch.from_numpy(np.unique(np.asarray(positions) // self.words_per_block(name))).to(self.weight.device)
        shaped = {field_name: words.view(self.blocks, -1)[index.to(words.device)] for field_name, words in self.fields.items()}
        new = self.codec.decode(shaped).to(self.weight.device, self.weight.dtype).view(-1)
        targets = (index[:, None] * self.block + torch.arange(self.block, device=index.device)).view(-1)
        if self.element_positions is not None:
            targets = self.element_positions.to(targets.device)[targets]
        flat = self.weight.view(-1)
        old = flat[targets]
        moved = (new != old) & ~(new.isnan() & old.isnan())
        self.affected.setdefault(name, []).append(targets[moved].cpu().numpy())
        flat[targets] = new

    def changed_weights(self, name: str | None = None) -> np.ndarray:
        """Distinct flat indices of the weights faults changed since the last install: those of
        field `name`'s faults, or of any field's."""
        parts = [part for field_name, arrays in self.affected.items() if name in (None, field_name) for part in arrays]
        return np.unique(np.concatenate(parts)) if parts else np.empty(0, dtype=np.int64)

    def weights_affected(self, name: str | None = None) -> int:
        return len(self.changed_weights(name))

    @torch.no_grad()
    def damage(self, name: str | None = None) -> tuple[float, int]:
        """Over the weights `changed_weights(name)`: the largest change as a multiple of the clean
        weights' RMS (relative to each weight's own value, a weight that decodes to nearly zero
        would make any change look enormous; Inf where a finite weight became non-finite), and how
        many finite weights the faults made non-finite (an fp16 scale turned Inf or NaN)."""
        index = self.changed_weights(name)
        if not len(index) or self.decoded is None:
            return 0.0, 0
        where = torch.from_numpy(index).to(self.weight.device)
        now, clean = self.weight.view(-1)[where].double(), self.decoded.view(-1)[where].double()
        created = int((~now.isfinite() & clean.isfinite()).sum())
        rms = math.sqrt(self.original_norm / self.weight.numel()) or 1.0
        measured = clean.isfinite() & now.isfinite()
        largest = float((now - clean)[measured].abs().max()) / rms if bool(measured.any()) else 0.0
        return (math.inf if created else largest), created

    def stored_bits(self) -> int:
        return sum(words.numel() * self.codec.field_layouts[name].width for name, words in self.fields.items())


_CACHE_ATTRIBUTE = "_lm_eval_faults_encodings"
"""Where a weight keeps its encodings: on the tensor itself, so they live and die with it (a
cache keyed by the tensor would keep every model it ever saw alive)."""


def attach_stored_form(weight: torch.Tensor, encoding: Encoding) -> None:
    """Give `weight` the stored form it was loaded from: `storage=file` faults it there."""
    weight.__dict__.setdefault(_CACHE_ATTRIBUTE, {})[(FILE, 0)] = encoding


@torch.no_grad()
def encoding_of(weight: torch.Tensor, storage: str, group_size: int, name: str) -> Encoding:
    """`weight` encoded in `storage` (once per weight and storage: later calls reuse it)."""
    cache: dict[tuple[str, int], Encoding] = weight.__dict__.setdefault(_CACHE_ATTRIBUTE, {})
    key = (storage, 0 if storage == FILE else group_size)
    if key not in cache and storage == FILE:
        raise StorageError(
            f"storage=file: {name} has no stored form from a file (the file does not hold it, or the model was not loaded "
            "from one); load it with gguf_file=, or narrow target/modules to the weights the file holds"
        )
    if key not in cache:
        chosen = _CODECS[storage]
        size = chosen.block_size(weight, group_size)
        if not weight.is_contiguous():
            raise StorageError(
                f"storage={storage}: {name} is not contiguous in memory, so its blocks are not its rows; fault it without storage="
            )
        if weight.dim() == 0 or weight.shape[-1] % size:
            raise StorageError(
                f"storage={storage}: {name} has last dimension {weight.shape[-1] if weight.dim() else 1}, which blocks of {size} do not divide; "
                "choose another storage, a group_size that divides it, or narrow target/modules"
            )
        original = weight.detach().clone()
        fields = chosen.encode(original.reshape(-1, size).float())
        cache[key] = Encoding(chosen, weakref.ref(weight), size, {n: w.reshape(-1).contiguous() for n, w in fields.items()}, original)
    return cache[key]
