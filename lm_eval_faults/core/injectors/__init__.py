"""The injectors, one per site, each registered by its own module (`sites.registry`): persistent
weight faults with an undo log, transient activation faults, faults in the KV cache's entries. Importing this package registers
them; `site=` is written back in registration order, so `weights` comes first."""

from lm_eval_faults.core.injectors import weights

# isort: split
from lm_eval_faults.core.injectors import activations

# isort: split
from lm_eval_faults.core.injectors import kv_cache

__all__ = ["activations", "kv_cache", "weights"]
