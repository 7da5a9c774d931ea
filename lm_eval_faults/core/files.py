"""Whether a file can be written at a path, asked before the work whose result it would hold.

Why: a map, a bisection or an analysis that fails to save after its work loses that work. The
only honest test is to create a file: `os.access` says yes to root under /proc, and a missing
parent folder is only a problem if its nearest existing ancestor can't hold one. The probe
file is removed at once; missing parents are created by the writer, just before it writes.
"""

from __future__ import annotations

import os
import tempfile


def output_path_problem(path: str | os.PathLike[str]) -> str | None:
    """Why no file can be written at `path`, or None when one can."""
    target = os.path.abspath(path)
    if os.path.isdir(target):
        return "it is a directory; give a file name"
    parent = os.path.dirname(target)
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent):
        return f"{parent} is a file, not a folder"
    if os.path.exists(target) and not os.access(target, os.W_OK):
        return "the file is not writable"
    try:
        with tempfile.NamedTemporaryFile(dir=parent, prefix=".lm-eval-faults-probe-"):
            pass
    except OSError as error:
        return f"{parent} is not writable ({error.strerror})"
    return None
