"""A sweep's generative points side by side: `generations.html` in its run directory.

Each faulted point's record keeps the clean and faulted texts of its first generative documents
(`baseline.point_drift`); the page shows, per document, the clean text beside every point's, in
the order the sweep ran them, with the same highlights and failure classes as `drift --html`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from lm_eval_faults.study.drift_pages import text_pieces, text_view
from lm_eval_faults.study.side_by_side import PromptView, side_by_side_page

PAGE_FILE = "generations.html"


def sweep_views(records: list[dict[str, Any]]) -> list[PromptView]:
    """One view per (task, document) that any point kept texts of, one faulted text per point."""
    docs: dict[tuple[str, str], dict[str, Any]] = {}
    for record in records:
        for task, drift in (record.get("drift") or {}).items():
            for text in drift.get("texts") or []:
                doc = docs.setdefault((task, str(text["doc_id"])), {"prompt": text.get("prompt"), "clean": text["clean"], "points": []})
                doc["points"].append((str(record["point_id"]), text["faulted"]))
    return [
        PromptView(
            f"{task}, doc {doc_id}",
            doc["prompt"] or "(prompt not logged)",
            text_pieces(doc["clean"]),
            [text_view(label, doc["clean"], text) for label, text in doc["points"]],
        )
        for (task, doc_id), doc in docs.items()
    ]


def write_sweep_page(run_dir: Path, records: list[dict[str, Any]]) -> Path | None:
    """Write the page when any point kept generative texts; its path, or None."""
    views = sweep_views(records)
    if not views:
        return None
    path = run_dir / PAGE_FILE
    path.write_text(side_by_side_page(f"Sweep {run_dir.name}: clean and faulted generations", views), encoding="utf-8")
    return path
