"""A sweep's run directory: its pinned config, its append-only results, and a lock.

Why: a long sweep gets killed. Every finished point is appended to `results.jsonl` and fsynced
before the next one starts, and running the same command again skips the points already there,
so nothing is lost or repeated. `sweep.json` pins the configuration the results belong to;
resuming with a different one is refused rather than silently mixing two experiments in one file.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any, BinaryIO

from lm_eval_faults.study.grid import SweepConfig, SweepConfigError
from lm_eval_faults.study.metrics import RESULTS_FILE

CONFIG_FILE = "sweep.json"
LOCK_FILE = ".sweep.lock"


class RunDir:
    """The on-disk state of one sweep: its config, its results, and a lock against a second writer."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.results = self.path / RESULTS_FILE
        self.config = self.path / CONFIG_FILE

    @contextlib.contextmanager
    def claim(self, config: SweepConfig) -> Iterator[None]:
        """Hold the run directory for this process, after checking it can belong to `config`."""
        self.path.mkdir(parents=True, exist_ok=True)
        lock = _open_lock(self.path / LOCK_FILE)
        try:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise SweepConfigError(f"{self.path} is in use by another running sweep") from None
            self._check_config(config)
            yield
        finally:
            os.close(lock)

    def save_config(self, config: SweepConfig) -> None:
        """Pin `config` to the directory (atomically); called once the grid has been validated,
        so that a rejected command leaves nothing behind that would block its corrected rerun."""
        if not self.config.exists():
            temporary = self.config.with_suffix(".json.tmp")
            temporary.write_text(json.dumps(config.to_dict(), indent=2) + "\n", encoding="utf-8")
            os.replace(temporary, self.config)

    def _check_config(self, config: SweepConfig) -> None:
        wanted = config.to_dict()
        if not self.config.exists():
            if self.results.exists():
                raise SweepConfigError(f"{self.results} exists but {self.config} does not: not a sweep run directory")
            return
        stored = json.loads(self.config.read_text(encoding="utf-8"))
        if stored != wanted:
            differences = [
                f"  {key}: run directory has {stored.get(key)!r}, this command has {wanted.get(key)!r}"
                for key in sorted(set(stored) | set(wanted))
                if stored.get(key) != wanted.get(key)
            ]
            raise SweepConfigError(
                f"{self.path} holds a sweep with a different configuration, so its results would not be comparable:\n"
                + "\n".join(differences)
                + "\nRerun with the original options to resume, or choose a new --run_dir."
            )

    def finished(self) -> set[str]:
        """Point ids already in `results.jsonl`, after dropping a record a killed process left half-written."""
        from lm_eval_faults.study.metrics import load_records

        if not self.results.exists():
            return set()
        self._repair_tail()
        return {str(record["point_id"]) for record in load_records(self.results)}

    def _repair_tail(self) -> None:
        """Make the file end with a complete record and a newline: end a complete last record,
        cut an incomplete one whether or not a newline follows it. Left in place, an incomplete
        line would sit in the middle once the next record is appended, and every later resume
        and report would refuse the file."""
        data = self.results.read_bytes()
        body = data.rstrip(b"\r\n\t ")
        if not body:
            return
        start = body.rfind(b"\n") + 1
        if not _is_record(body[start:]):
            warnings.warn(
                f"{self.results}: dropping an incomplete last record ({len(body) - start} bytes) "
                "left by an interrupted sweep; that point runs again",
                stacklevel=3,
            )
            with open(self.results, "r+b") as handle:
                handle.truncate(start)
                os.fsync(handle.fileno())
            return
        if not data.endswith(b"\n"):
            with open(self.results, "ab") as handle:
                _write_durably(handle, b"\n")

    def append(self, record: dict[str, Any]) -> None:
        append_line(self.results, json.dumps(record).encode("utf-8"))


def _is_record(line: bytes) -> bool:
    """Whether `line` is a complete JSON record with a `point_id`."""
    try:
        record = json.loads(line)
    except ValueError:
        return False
    return isinstance(record, dict) and "point_id" in record


def _open_lock(path: Path) -> int:
    """Open (never truncate) the lock file, refusing a symbolic link: following one planted in
    the run directory would let the sweep create or lock a file elsewhere."""
    try:
        return os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
    except OSError as err:
        if path.is_symlink():
            raise SweepConfigError(f"{path} is a symbolic link; refusing to use it as the sweep lock (remove it)") from None
        raise SweepConfigError(f"cannot open the sweep lock {path}: {err.strerror}") from None


def append_line(path: Path, line: bytes) -> None:
    """Append `line` as one line and fsync it, starting a fresh line if the file does not end with one."""
    with open(path, "a+b") as handle:
        size = handle.seek(0, os.SEEK_END)
        prefix = b""
        if size:
            handle.seek(size - 1)
            prefix = b"" if handle.read(1) == b"\n" else b"\n"
        _write_durably(handle, prefix + line + b"\n")


def _write_durably(handle: BinaryIO, data: bytes) -> None:
    """Write and fsync: once this returns, a kill (or power loss) cannot take the data back."""
    handle.write(data)
    handle.flush()
    os.fsync(handle.fileno())
