"""`storage=file` on a model loaded with `gguf_file=`: each weight given the blocks its GGUF file
stores it in, through transformers' own mapping from the file's tensors to the model's.

Which file tensor is which weight, and in what element order, is transformers' business (its
name map and its tensor processors, which undo llama.cpp's Q/K permutation): rather than
re-implement either, this runs them on an index tensor (the integers 0..n-1 in the file
tensor's shape), so the weight's flat position of each stored element is whatever transformers'
conversion makes of it, in this transformers version.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import numpy as np
from gguf import GGMLQuantizationType, GGUFReader, quants
from torch import nn

from lm_eval_faults.core.storage.gguf_blocks import GGUF_CODECS
from lm_eval_faults.core.storage.gguf_file import FLOAT_TYPES, attach_file_tensor, file_types


def gguf_path(pretrained: str, gguf_file: str) -> Path:
    """The file transformers loads for `pretrained` + `gguf_file` (a local folder or file)."""
    folder = Path(pretrained)
    path = folder / gguf_file if folder.is_dir() else Path(gguf_file)
    if not path.is_file():
        raise FileNotFoundError(f"model_args storage=file: the GGUF file {path} is not a local file (storage=file reads its blocks)")
    return path


def attach_gguf_storage(model: nn.Module, path: str | Path) -> int:
    """Give every weight of `model` that GGUF file `path` holds its stored form there (what
    `storage=file` faults). Returns the number of weights given one; tensors of types this
    package can't fault are named on stderr, and refused by name if a spec selects them."""
    from transformers.modeling_gguf_pytorch_utils import TENSOR_PROCESSORS, TensorProcessor, get_gguf_hf_weights_map, read_field

    path = Path(path)
    reader = GGUFReader(path)
    unwrap: Any = getattr(model, "get_base_model", None)
    base: Any = unwrap() if callable(unwrap) else model  # a PEFT model's own weights
    architecture = read_field(reader, "general.architecture")[0]
    processor = TENSOR_PROCESSORS.get(architecture, TensorProcessor)(config=base.config.to_dict())
    names = get_gguf_hf_weights_map(base, processor)
    parameters = dict(base.named_parameters())
    attached, unsupported = 0, []
    for tensor in reader.tensors:
        kind = GGMLQuantizationType(tensor.tensor_type)
        shape = quants.quant_shape_from_byte_shape(tensor.data.shape, kind) if kind in GGUF_CODECS else tensor.data.shape
        index = np.arange(int(tensor.n_elements), dtype=np.int64).reshape(shape)
        result = processor.process(
            weights=index, name=tensor.name, tensor_key_mapping=names, parsed_parameters={"config": {}, "tensors": {}}
        )
        if result.name not in names or names[result.name] not in parameters:
            continue
        if kind not in GGUF_CODECS and kind not in FLOAT_TYPES:
            unsupported.append(f"{tensor.name} ({kind.name})")
            continue
        order = np.asarray(result.weights).reshape(-1)
        positions = None
        if not np.array_equal(order, np.arange(len(order))):
            positions = np.empty(len(order), dtype=np.int64)
            positions[order] = np.arange(len(order))
        attach_file_tensor(parameters[names[result.name]], tensor, path, positions)
        attached += 1
    if unsupported:
        print(
            f"lm_eval_faults: storage=file can't fault {len(unsupported)} tensors of {path.name} (e.g. {', '.join(unsupported[:3])}); "
            f"the types it faults: {', '.join(file_types())}",
            file=sys.stderr,
        )
    return attached
