"""The injectors, one per site, each registered by its own module (`sites.registry`): persistent
weight faults with an undo log, transient activation faults. Importing this package registers
them; `site=` is written back in registration order, so `weights` comes first."""

from lm_eval_faults.core.injectors import weights

# isort: split
from lm_eval_faults.core.injectors import activations

__all__ = ["activations", "weights"]
