"""Output paths of our commands, checked before the work they would record.

`bisect --json /proc/nope/out.json` used to fail after all its evaluations, losing the result;
a path that cannot be written is refused first, in one line naming the option.
"""

from __future__ import annotations

import os

from lm_eval_faults.core.files import output_path_problem


def check_output_path(option: str, path: str | None) -> None:
    """Refuse `path` for `option` unless a file can be created there (`core.output_paths`)."""
    if not path:
        return
    problem = output_path_problem(path)
    if problem is not None:
        raise OSError(f"{option} {path!r} cannot be written: {problem}")


def prepare_output_path(path: str) -> str:
    """Create the parent directories of a checked output path, just before it is written."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    return path
