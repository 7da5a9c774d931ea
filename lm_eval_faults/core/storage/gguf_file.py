"""`storage=file` for GGUF: a weight faulted in the blocks its GGUF file stores it in, in the
tensor's own type, with no re-quantization; and the faulted blocks written back as a GGUF file.

A file tensor becomes an `Encoding` whose fields are the file's own bytes (copied: the file is
never written), decoded by `gguf.quants` exactly as transformers decodes it when it loads the
file, and scattered into the weight through the index map of transformers' own conversion (see
`harness.gguf_storage`). Float tensors (F32, F16, BF16: norms, some embeddings) are stored as
themselves, one word per weight.
"""

from __future__ import annotations

import shutil
import weakref
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import numpy as np
import torch
from gguf import GGMLQuantizationType, quants
from gguf.gguf_reader import ReaderTensor

from lm_eval_faults.core.files import write_atomically
from lm_eval_faults.core.storage.casts import FLOAT_WORDS
from lm_eval_faults.core.storage.codecs import BlockCodec, Encoding, StorageError, attach_stored_form
from lm_eval_faults.core.storage.gguf_blocks import GGUF_CODECS

FLOAT_TYPES = {GGMLQuantizationType.F32: torch.float32, GGMLQuantizationType.F16: torch.float16, GGMLQuantizationType.BF16: torch.bfloat16}


@dataclass(frozen=True)
class FileTensor:
    """Where a stored form lies in its file: enough to write the faulted form back."""

    path: Path
    name: str
    qtype: GGMLQuantizationType
    data_offset: int
    n_bytes: int


def file_types() -> tuple[str, ...]:
    """The GGUF tensor types `storage=file` can fault."""
    return tuple(kind.name for kind in (*FLOAT_TYPES, *GGUF_CODECS))


def attach_file_tensor(weight: torch.Tensor, tensor: ReaderTensor, path: Path, element_positions: np.ndarray | None) -> None:
    """Give `weight` the stored form of file tensor `tensor` (`element_positions`: the weight's
    flat position of each of the tensor's elements, in the file's order; None: the same order)."""
    kind = GGMLQuantizationType(tensor.tensor_type)
    raw = np.array(tensor.data, copy=True)
    chosen: BlockCodec
    if kind in FLOAT_TYPES:
        chosen = FLOAT_WORDS[FLOAT_TYPES[kind]]
        fields = {"values": torch.from_numpy(raw.reshape(-1).view(np.uint8).copy()).view(FLOAT_TYPES[kind])}
        block = 1
    elif kind in GGUF_CODECS:
        blocks = GGUF_CODECS[kind]
        block, type_size = quants.GGML_QUANT_SIZES[kind]
        chosen, fields = blocks, blocks.split(raw.reshape(-1).view(np.uint8).reshape(-1, type_size))
    else:
        raise StorageError(f"storage=file: {tensor.name} is {kind.name}; the types storage=file can fault: {', '.join(file_types())}")
    if weight.numel() != int(tensor.n_elements):
        raise StorageError(f"storage=file: {tensor.name} holds {int(tensor.n_elements)} weights, the model's weight {weight.numel()}")
    positions = None if element_positions is None else torch.from_numpy(np.ascontiguousarray(element_positions, dtype=np.int64))
    encoding = Encoding(
        chosen,
        weakref.ref(weight),
        block,
        {name: words.reshape(-1).contiguous() for name, words in fields.items()},
        weight.detach().clone(),
        element_positions=positions,
        source=FileTensor(path, tensor.name, kind, int(tensor.data_offset), int(tensor.n_bytes)),
    )
    attach_stored_form(weight, encoding)


def stored_bytes(encoding: Encoding) -> bytes:
    """An encoding's fields as the bytes its file tensor stores (faults included)."""
    source = encoding.source
    assert isinstance(source, FileTensor)
    if source.qtype in FLOAT_TYPES:
        return encoding.fields["values"].cpu().view(torch.uint8).numpy().tobytes()
    return GGUF_CODECS[source.qtype].join(encoding.fields).tobytes()


def write_gguf(source: Path, encodings: Iterable[Encoding], out: Path) -> Mapping[str, int]:
    """A copy of GGUF file `source` with each encoding's bytes written over its tensor's: equal to
    the source byte for byte except the words faults changed. Returns bytes changed per tensor."""
    changed: dict[str, int] = {}

    def write(copy: BinaryIO) -> None:
        with open(source, "rb") as original:
            shutil.copyfileobj(original, copy)
            for encoding in encodings:
                tensor = encoding.source
                assert isinstance(tensor, FileTensor) and tensor.path == source
                new = stored_bytes(encoding)
                if len(new) != tensor.n_bytes:
                    raise StorageError(f"{tensor.name}: {len(new)} bytes to write where the file holds {tensor.n_bytes}")
                original.seek(tensor.data_offset)
                old = original.read(tensor.n_bytes)
                differ = int(np.count_nonzero(np.frombuffer(old, np.uint8) != np.frombuffer(new, np.uint8)))
                if differ:
                    copy.seek(tensor.data_offset)
                    copy.write(new)
                    changed[tensor.name] = differ

    write_atomically(out, write)
    return changed
