"""How a tensor stores its values: bit layouts of each dtype, reading and writing stored words,
the storage formats that say which words a tensor is stored as (plain tensors, torchao's quantized tensors), and the
simulated storages `storage=` encodes weights into (half precision, FP8, int8, int4, NF4, GGUF blocks)."""

from lm_eval_faults.core.storage import casts, float8, gguf_blocks, integer, normal_float, plain, torchao_tensors

__all__ = ["casts", "float8", "gguf_blocks", "integer", "normal_float", "plain", "torchao_tensors"]
