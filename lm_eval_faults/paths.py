"""Where this package's data lives, installed from a wheel or from a source checkout.

Imports only the standard library: `_autoload` uses it at interpreter start.
"""

from __future__ import annotations

import argparse
from pathlib import Path

PACKAGE_DIR = Path(__file__).resolve().parent


def tasks_dir() -> Path:
    """The lm-eval task YAMLs: inside the package in a wheel, at the repository top in a checkout."""
    packaged = PACKAGE_DIR / "tasks"
    if packaged.is_dir():
        return packaged
    return PACKAGE_DIR.parent / "tasks"


def demo_model_dir() -> Path:
    """The embedded demo model (config, weights, tokenizer), shipped as package data."""
    return PACKAGE_DIR / "demo_model"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """`lm-eval-faults tasks-path` takes no options."""


def main(args: argparse.Namespace) -> int:
    """Print the task directory, for `--include_path` in setups that bypass the import hook."""
    print(tasks_dir())
    return 0
