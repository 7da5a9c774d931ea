"""lm-eval-faults: count-exact, reproducible hardware-fault injection for language models.

`from lm_eval_faults import inject, FaultSpec` gives the plain Python API; `--model faulty_hf`
gives the lm-eval one. Attributes load lazily so that `import lm_eval_faults` (which the `.pth`
hook triggers in every interpreter) never imports torch, nor anything else: no `__future__`,
`typing` or `importlib` here, they cost every Python process milliseconds.
"""

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

__version__ = "0.3.0"
"""The one place the version is set (pyproject.toml reads it); fault maps record it."""

_LAZY = {
    "FaultSpec": "lm_eval_faults.core",
    "FaultSpecError": "lm_eval_faults.core",
    "parse_fault_args": "lm_eval_faults.core",
    "inject": "lm_eval_faults.core",
    "Injection": "lm_eval_faults.core",
    "FaultReport": "lm_eval_faults.core",
    "analyze": "lm_eval_faults.core",
    "run_sweep": "lm_eval_faults.study.runner",
    "FaultyHFLM": "lm_eval_faults.harness.model",
    "attach_gguf_storage": "lm_eval_faults.harness.gguf_storage",
}

__all__ = sorted(_LAZY)


def __getattr__(name: str) -> "Any":
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'lm_eval_faults' has no attribute {name!r}")
