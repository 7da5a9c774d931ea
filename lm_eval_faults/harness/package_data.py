"""Where this package's data lives, installed from a wheel or from a source checkout.

Imports only the standard library. The import hook (`autoload`) uses it only once lm-eval's
`lm_eval.tasks` is imported, never at interpreter start.
"""

from __future__ import annotations

from pathlib import Path

PACKAGE_DIR = Path(__file__).resolve().parent.parent


def tasks_dir() -> Path:
    """The lm-eval task YAMLs and their helpers, shipped inside the package as lm-eval's own are."""
    return PACKAGE_DIR / "tasks"


def demo_model_dir() -> Path:
    """The embedded demo model (config, weights, tokenizer), shipped as package data."""
    return PACKAGE_DIR / "demo_model"
