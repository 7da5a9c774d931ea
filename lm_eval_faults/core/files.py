"""Result files written safely: asked whether they can be written before the work, replaced
atomically and durably after it.

Why: a map, a bisection or an analysis that fails to save after its work loses that work. The
only honest test is to create a file: `os.access` says yes to root under /proc, and a missing
parent folder is only a problem if its nearest existing ancestor can't hold one. The probe
file is removed at once; missing parents are created by the writer, just before it writes.
And a file is written once, whole: through a unique temporary file in its own directory,
fsynced, then renamed over the old one, so a reader or a kill sees the old file or the new one,
never a mix, and two processes saving one path never share a temporary name.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO


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


def write_atomically(path: str | os.PathLike[str], data: bytes | Callable[[BinaryIO], None]) -> Path:
    """Replace `path` with `data` (bytes, or a function writing to the open file), durably;
    missing parent folders are made. Returns the path written."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    descriptor, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(descriptor, "wb") as handle:
            if isinstance(data, bytes):
                handle.write(data)
            else:
                data(handle)
            write_durably(handle, b"")
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(temporary)
        raise
    return path


def write_durably(handle: BinaryIO, data: bytes) -> None:
    """Write and fsync: once this returns, a kill (or power loss) cannot take the data back."""
    handle.write(data)
    handle.flush()
    os.fsync(handle.fileno())
