"""The tables of docs/patterns/README.md: per model, each scheme's tolerated event rate under each
pattern, from the sweeps `run_pattern_sweeps.sh` leaves under docs/patterns/ (one per model and
pattern, every scheme on the same maps). Tolerated p is the sweep report's (`study.pareto`).
`--shrink-figures` first re-saves the runs' figures with a palette, as committed."""

from __future__ import annotations

import sys
from pathlib import Path

from lm_eval_faults.study.collapse import is_collapsed
from lm_eval_faults.study.metrics import baseline_tasks
from lm_eval_faults.study.pareto import DEFAULT_TOLERANCE, percent, protection_families, tolerances
from lm_eval_faults.study.series import build_series
from lm_eval_faults.study.sweep_report import grid_records

ROOT = Path(__file__).resolve().parent.parent / "docs" / "patterns"
PATTERNS = ("iid", "burst2", "burst4", "burst8", "row1024")
LABELS = {"iid": "iid", "burst2": "burst:2", "burst4": "burst:4", "burst8": "burst:8", "row1024": "row:1024"}


def run_tolerances(run_dir: Path) -> dict[str, tuple[float, str]]:
    """scheme -> (overhead, tolerated p label) of one sweep."""
    records = grid_records(run_dir)
    _, series = build_series(records, tasks=baseline_tasks(records))
    by_id = {str(r["point_id"]): r for r in records}
    rows = {}
    for members in protection_families(series).values():
        for row in tolerances(members, by_id, DEFAULT_TOLERANCE, is_collapsed):
            rows[row.protection] = (row.overhead, row.label)
    return rows


def table(model: str) -> str:
    runs = {pattern: ROOT / f"{model}_{pattern}" for pattern in PATTERNS if (ROOT / f"{model}_{pattern}" / "results.jsonl").exists()}
    results = {pattern: run_tolerances(path) for pattern, path in runs.items()}
    for pattern in runs:  # the recommended scheme's own sweep, on the same maps
        extra = ROOT / f"{model}_{pattern}_recommended"
        if (extra / "results.jsonl").exists():
            results[pattern].update({k: v for k, v in run_tolerances(extra).items() if k != "none"})
    schemes = list(dict.fromkeys(scheme for rows in results.values() for scheme in rows))
    header = "| protection | overhead | " + " | ".join(f"[{LABELS[p]}]({model}_{p}/report.md)" for p in runs) + " |"
    lines = [header, "|---|---|" + "---|" * len(runs)]
    for scheme in schemes:
        overhead = next(rows[scheme][0] for rows in results.values() if scheme in rows)
        cells = [results[p].get(scheme, (0.0, "—"))[1] for p in runs]
        lines.append(f"| `{scheme}` | {percent(overhead)} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def shrink_figures() -> None:
    """Re-save every figure under docs/patterns with a 256-colour palette: 22.6 MB -> 8.3 MB of
    PNGs for the 20 runs, and the charts (a handful of flat colours) look the same."""
    from PIL import Image

    for path in sorted(ROOT.glob("*/figures/*.png")):
        with Image.open(path) as image:
            palette = image.convert("RGB").quantize(colors=256, method=Image.Quantize.MEDIANCUT)
        palette.save(path, optimize=True)


def main() -> int:
    if "--shrink-figures" in sys.argv[1:]:
        shrink_figures()
    for model in ("smollm2_facts", "demo"):
        print(f"## {model}\n\n{table(model)}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
