"""Expected damage computed exactly from the model's own bits, unprotected and under a protection scheme."""

from lm_eval_faults.core.analysis.exact import Analysis, analyze
from lm_eval_faults.core.analysis.stored import StoredAnalysis, analyze_stored

__all__ = ["Analysis", "StoredAnalysis", "analyze", "analyze_stored"]
