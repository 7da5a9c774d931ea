"""How a tensor stores its values: bit layouts of each dtype, reading and writing stored words,
the storage formats that say which words a tensor is stored as (plain tensors), and the
simulated storages `storage=` encodes weights into (half precision, int8, int4, GGUF blocks)."""

from lm_eval_faults.core.storage import casts, gguf_blocks, integer, plain

__all__ = ["casts", "gguf_blocks", "integer", "plain"]
