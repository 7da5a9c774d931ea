"""Quiet lm-eval while a command that runs it many times (a sweep, a bisection) shows its own progress.

Each `simple_evaluate` call draws lm-eval's nested progress bars (building requests, "Tokenizing
inputs", "Running loglikelihood requests"), our "injecting faults" bar, repeats identical
warnings, and runs `git describe`, which prints "fatal: not a git repository" outside a
checkout. Over 80 points that buries the one line a user wants. `silenced_lm_eval` turns all of
it off for the duration of a block and restores it afterwards, without changing lm-eval.
A plain `lm_eval --model faulty_hf` run keeps lm-eval's git hash in its results, but without
git's complaint (`install_quiet_git_hash`).
"""

from __future__ import annotations

import contextlib
import logging
import os
import subprocess
from collections.abc import Iterator
from typing import Any


@contextlib.contextmanager
def silenced_lm_eval() -> Iterator[None]:
    """While the block runs: lm-eval logs errors only, every tqdm bar created is disabled (bars
    created before the block, such as the command's own progress line, keep drawing), and
    lm-eval's environment survey (git hash, pip and torch versions: a sweep record keeps none of
    them) is skipped. Everything is restored on exit, also after an error."""
    with _lm_eval_logs_errors_only(), _no_new_progress_bars(), _no_environment_survey():
        yield


@contextlib.contextmanager
def _lm_eval_logs_errors_only() -> Iterator[None]:
    """Raise lm-eval's loggers (and any child logger given its own level) to ERROR: its per-call
    warnings, e.g. "Custom kwargs can be passed...", repeat identically for every evaluation."""
    loggers = [logging.getLogger("lm_eval")] + [
        logger
        for name, logger in logging.root.manager.loggerDict.items()
        if name.startswith("lm_eval.") and isinstance(logger, logging.Logger) and logger.level != logging.NOTSET
    ]
    levels = [logger.level for logger in loggers]
    try:
        for logger in loggers:
            logger.setLevel(logging.ERROR)
        yield
    finally:
        for logger, level in zip(loggers, levels, strict=True):
            logger.setLevel(level)


@contextlib.contextmanager
def _no_new_progress_bars() -> Iterator[None]:
    """Create every tqdm bar disabled. lm-eval builds its bars with `from tqdm import tqdm` at
    import, and the request-building one has no switch at all, so the class is patched: every
    variant (tqdm.auto, tqdm.asyncio) runs `tqdm.std.tqdm.__init__`."""
    from tqdm import std

    saved = vars(std.tqdm)["__init__"]  # a partialmethod (tqdm's TQDM_* environment defaults): restored as it was
    original = std.tqdm.__init__

    def disabled(self: Any, *args: Any, **kwargs: Any) -> None:
        kwargs["disable"] = True
        original(self, *args, **kwargs)

    std.tqdm.__init__ = disabled
    try:
        yield
    finally:
        std.tqdm.__init__ = saved


@contextlib.contextmanager
def _no_environment_survey() -> Iterator[None]:
    """Skip `get_git_commit_hash` (a `git describe` subprocess whose stderr reaches the terminal)
    and `add_env_info`, as lm-eval's evaluator imported them."""
    from lm_eval import evaluator

    saved = {name: getattr(evaluator, name) for name in ("get_git_commit_hash", "add_env_info")}
    try:
        evaluator.get_git_commit_hash = lambda: None
        evaluator.add_env_info = lambda storage: None
        yield
    finally:
        for name, function in saved.items():
            setattr(evaluator, name, function)


def quiet_git_commit_hash() -> str | None:
    """lm-eval's `get_git_commit_hash` (`git describe --always`, else the hash read from
    ./.git), with git's stderr discarded: outside a checkout it printed
    "fatal: not a git repository" into every run's output."""
    try:
        return subprocess.check_output(["git", "describe", "--always"], stderr=subprocess.DEVNULL).strip().decode()
    except (subprocess.CalledProcessError, FileNotFoundError):
        from lm_eval.loggers.utils import get_commit_from_path

        return get_commit_from_path(os.getcwd())


def install_quiet_git_hash() -> None:
    """Make lm-eval's evaluator use `quiet_git_commit_hash`: the same value, no stderr."""
    from lm_eval import evaluator

    evaluator.get_git_commit_hash = quiet_git_commit_hash
