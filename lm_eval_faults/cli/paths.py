"""Output paths of our commands, checked before the work they would record.

`bisect --json /proc/nope/out.json` used to fail after all its evaluations, losing the result;
a path that cannot be written is refused first, in one line naming the option.
"""

from __future__ import annotations

import os
import tempfile


def check_output_path(option: str, path: str | None) -> None:
    """Refuse `path` for `option` unless a file can be created there: not a directory, and its
    nearest existing ancestor a writable directory (probed by a temporary file, removed at once,
    since `os.access` says yes to root under /proc)."""
    if not path:
        return
    target = os.path.abspath(path)
    if os.path.isdir(target):
        raise OSError(f"{option} {path!r} is a directory; give a file name")
    parent = os.path.dirname(target)
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent):
        raise OSError(f"{option} {path!r} cannot be written: {parent} is not a directory")
    try:
        with tempfile.NamedTemporaryFile(dir=parent, prefix=".lm-eval-faults-probe-"):
            pass
    except OSError as error:
        raise OSError(f"{option} {path!r} cannot be written: {parent} is not writable ({error.strerror})") from None


def prepare_output_path(path: str) -> str:
    """Create the parent directories of a checked output path, just before it is written."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    return path
