"""The fault core: what a fault is, where it lands, how it is applied, undone and counted.

Imports torch and numpy only, never lm-eval, matplotlib or the CLI (a test enforces this), so
`inject(model, spec)` works in any pipeline. The harness (`faulty_hf`), the study tools and the
CLI sit on top of it; nothing here imports them.
"""

from lm_eval_faults.core.analysis import Analysis, analyze
from lm_eval_faults.core.fault_map import FaultMap, FaultMapError
from lm_eval_faults.core.injection import Injection, inject
from lm_eval_faults.core.report import FaultReport
from lm_eval_faults.core.spec import (
    FaultSpec,
    FaultSpecError,
    parse_fault_args,
    to_spec,
)

__all__ = [
    "Analysis",
    "FaultMap",
    "FaultMapError",
    "FaultReport",
    "FaultSpec",
    "FaultSpecError",
    "Injection",
    "analyze",
    "inject",
    "parse_fault_args",
    "to_spec",
]
