"""Correlated fault patterns (`pattern=`): bursts, multi-cell upsets, failing rows and bit lines,
stuck-cell clusters; one module per geometry, registered in `registry`."""

from lm_eval_faults.core.patterns import burst, lines, rows  # noqa: F401  (each registers its patterns)
from lm_eval_faults.core.patterns.registry import IID, Pattern, PatternError, parse_pattern, pattern_syntaxes

__all__ = ["IID", "Pattern", "PatternError", "parse_pattern", "pattern_syntaxes"]
