"""`lm-eval-faults tasks-path`: print the task directory, for setups that bypass the import hook."""

from __future__ import annotations

import argparse

from lm_eval_faults.harness.package_data import tasks_dir


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """`tasks-path` takes no options."""


def main(args: argparse.Namespace) -> int:
    print(tasks_dir())
    return 0
