"""A sweep's run directory: its pinned config, its append-only results, its baseline samples, and a lock.

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
import sys
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from lm_eval_faults.core.files import write_atomically, write_durably
from lm_eval_faults.study.baseline import CleanSamples
from lm_eval_faults.study.grid import SweepConfig, SweepConfigError
from lm_eval_faults.study.records import RESULTS_FILE

CONFIG_FILE = "sweep.json"
LOCK_FILE = ".sweep.lock"
POINTS_FILE = "points.json"
"""The planned point ids, beside sweep.json: the report leaves out records of points not in the
grid (a `groups:N` grid can't be rebuilt without the model, so it is written down once planned)."""
BASELINE_SAMPLES_FILE = "baseline_samples.json"
"""The clean model's per-sample outputs in a run directory: a resumed sweep compares with them."""
SET_ASIDE_SUFFIX = ".rejected"
"""Malformed lines moved out of `results.jsonl` go to `results.jsonl.rejected`, kept for a person to read."""


class RunDir:
    """The on-disk state of one sweep: its config, its results, and a lock against a second writer."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.results = self.path / RESULTS_FILE
        self.config = self.path / CONFIG_FILE
        self.baseline = self.path / BASELINE_SAMPLES_FILE

    @contextlib.contextmanager
    def claim(self, config: SweepConfig) -> Iterator[None]:
        """Hold the run directory for this process, after checking it can belong to `config`."""
        self.path.mkdir(parents=True, exist_ok=True)
        # The directory itself is locked, through an open handle: deleting `.sweep.lock` while a
        # sweep runs cannot let a second one in (a lock on the file alone was lost with its name).
        # The lock file is still taken, for sweeps of earlier versions that lock only it.
        held = [os.open(self.path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)]
        try:
            held.append(_open_lock(self.path / LOCK_FILE))
            for handle in held:
                try:
                    fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    raise SweepConfigError(f"{self.path} is in use by another running sweep") from None
            if self.results.is_symlink():
                raise SweepConfigError(f"{self.results} is a symbolic link; refusing to append results outside {self.path} (remove it)")
            self._check_config(config)
            yield
        finally:
            for handle in held:
                os.close(handle)

    def save_config(self, config: SweepConfig, point_ids: list[str]) -> None:
        """Pin `config` and its planned point ids to the directory (atomically); called once the
        grid has been validated, so that a rejected command leaves nothing behind that would
        block its corrected rerun."""
        if not self.config.exists():
            write_atomically(self.config, (json.dumps(config.to_dict(), indent=2) + "\n").encode())
        write_atomically(self.path / POINTS_FILE, (json.dumps(point_ids) + "\n").encode())

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
        """Point ids already in `results.jsonl`, after dropping a record a killed process left
        half-written and setting aside malformed lines elsewhere in the file (called under the lock)."""
        from lm_eval_faults.study.records import load_records

        if not self.results.exists():
            return set()
        self._repair_tail()
        self._set_aside_malformed()
        return {str(record["point_id"]) for record in load_records(self.results)}

    def _set_aside_malformed(self) -> None:
        """Move lines that are not records (garbage written into the middle of the file) to
        `results.jsonl.rejected`, with a warning, and rewrite the file atomically without them:
        left in place, one such line made every resume and report refuse the run directory."""
        lines = self.results.read_bytes().splitlines(keepends=True)
        bad = [line for line in lines if line.strip() and not _is_record(line)]
        if not bad:
            return
        rejected = self.results.with_name(self.results.name + SET_ASIDE_SUFFIX)
        with open(rejected, "ab") as handle:
            write_durably(handle, b"".join(line if line.endswith(b"\n") else line + b"\n" for line in bad))
        write_atomically(self.results, b"".join(line for line in lines if line not in bad).decode("utf-8", "replace").encode())
        warnings.warn(f"{self.results}: set aside {len(bad)} malformed line(s) in {rejected}; those points run again", stacklevel=3)

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
                write_durably(handle, b"\n")

    def append(self, record: dict[str, Any]) -> None:
        append_line(self.results, json.dumps(record).encode("utf-8"))

    def save_baseline(self, clean: CleanSamples) -> None:
        """Write the baseline's samples atomically: a kill leaves the old file or the new one, never half of one."""
        write_atomically(
            self.baseline, json.dumps({"output_types": clean.output_types, "samples": clean.samples}, default=_jsonable).encode()
        )

    def load_baseline(self) -> CleanSamples | None:
        """The baseline samples saved here; None when absent or unreadable."""
        try:
            data = json.loads(self.baseline.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as error:
            print(f"lm-eval-faults sweep: ignoring unreadable {self.baseline} ({error})", file=sys.stderr)
            return None
        if not isinstance(data, dict) or not isinstance(data.get("samples"), dict):
            return None
        return CleanSamples(data["samples"], dict(data.get("output_types") or {}))


def _jsonable(value: Any) -> Any:
    """numpy scalars and arrays as Python values; anything else as its text."""
    return value.tolist() if hasattr(value, "tolist") else str(value)


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


def planned_point_ids(run_dir: Path) -> set[str] | None:
    """The point ids the sweep in `run_dir` planned, or None where it wrote none (older versions)."""
    path = run_dir / POINTS_FILE
    try:
        ids = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return {str(point_id) for point_id in ids} if isinstance(ids, list) else None


def append_line(path: Path, line: bytes) -> None:
    """Append `line` as one line and fsync it, starting a fresh line if the file does not end with
    one. A symbolic link is refused, never followed: records belong inside the run directory."""
    try:
        descriptor = os.open(path, os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
    except OSError:
        if path.is_symlink():
            raise SweepConfigError(f"{path} is a symbolic link; refusing to append results outside its run directory") from None
        raise
    with os.fdopen(descriptor, "a+b") as handle:
        size = handle.seek(0, os.SEEK_END)
        prefix = b""
        if size:
            handle.seek(size - 1)
            prefix = b"" if handle.read(1) == b"\n" else b"\n"
        write_durably(handle, prefix + line + b"\n")
