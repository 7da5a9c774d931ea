"""A sweep's results file read back: one record per finished point, malformed lines named, not dropped.

`runner.run_sweep` writes the records; `metrics` says how one is scored.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any

Record = dict[str, Any]
RESULTS_FILE = "results.jsonl"
"""A sweep run directory's results file: one JSON record per finished point."""


class MalformedRecordError(ValueError):
    """A line of a results file that is not a JSON object with a `point_id`, and is not the
    tolerated partial last line."""


def load_records(path: str | Path, *, skip_malformed: bool = False) -> list[Record]:
    """Read a sweep's results JSONL, one record per finished point.

    A killed sweep can leave its last line half-written, so an unparsable *last* line is
    skipped with a warning. Any other malformed line raises `MalformedRecordError` naming the
    line: silently dropping a point would bias AWRCL without anyone noticing. Pass
    ``skip_malformed=True`` to skip (with a warning) such lines instead, e.g. when a resumed
    sweep appended a new record onto an old partial line.

    Records are keyed by `point_id`; when a point appears twice (it was re-run), the later
    line wins, because it is the newer result. Order of first appearance is kept.
    """
    path = Path(path)
    lines = path.read_text(encoding="utf-8").splitlines()
    last = max((i for i, line in enumerate(lines) if line.strip()), default=-1)
    records: dict[str, Record] = {}
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        problem = _record_problem(line)
        if problem is None:
            record = json.loads(line)
            records[str(record["point_id"])] = record
            continue
        where = f"{path}:{i + 1}: {problem}"
        if i == last:
            warnings.warn(f"skipping partial last line {where}", stacklevel=2)
        elif skip_malformed:
            warnings.warn(f"skipping malformed line {where}", stacklevel=2)
        else:
            raise MalformedRecordError(where)
    return list(records.values())


def _record_problem(line: str) -> str | None:
    """Why a line is not a usable record, or None when it is."""
    try:
        record = json.loads(line)
    except json.JSONDecodeError as exc:
        return f"invalid JSON ({exc.msg})"
    if not isinstance(record, dict):
        return "not a JSON object"
    if "point_id" not in record:
        return "no point_id"
    return None
