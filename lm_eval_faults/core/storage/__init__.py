"""How a tensor stores its values: bit layouts of each dtype, reading and writing stored words,
and the storage formats (plain tensors today) that say which words a tensor is stored as."""

from lm_eval_faults.core.storage import plain

__all__ = ["plain"]
