"""Expected damage computed exactly from the model's own bits, unprotected and under a protection scheme."""

from lm_eval_faults.core.analysis.exact import Analysis, analyze

__all__ = ["Analysis", "analyze"]
