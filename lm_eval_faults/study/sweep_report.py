"""Turn a finished (or interrupted) sweep's `results.jsonl` into figures and a Markdown report.

Works from the results file alone, so a report can be rebuilt anywhere, at any time, and again
while a sweep is still running: it then covers the points finished so far.

Series are grouped into the study's two kinds of experiment, each becoming a set of figures
and a ranking: *components* (layers = "all", one line per target) within a fault model and
site, and *layer groups* (layers other than "all", one line per group) within a fault model,
site and target.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any

from lm_eval_faults.study.awrcl import WEIGHTINGS, Weighting
from lm_eval_faults.study.bootstrap import sampling_of
from lm_eval_faults.study.collapse import grid_marks
from lm_eval_faults.study.metrics import baseline_tasks
from lm_eval_faults.study.pareto import DEFAULT_TOLERANCE, pareto_section
from lm_eval_faults.study.rankings import summarize_series
from lm_eval_faults.study.records import RESULTS_FILE, load_records
from lm_eval_faults.study.report_figures import draw_figures, protection_figures
from lm_eval_faults.study.report_sections import (
    figure_section,
    header_section,
    points_section,
    ranking_section,
    summary_section,
)
from lm_eval_faults.study.run_dir import CONFIG_FILE, planned_point_ids
from lm_eval_faults.study.series import CountUnit, build_series
from lm_eval_faults.study.sweep_pages import write_sweep_page

REPORT_FILE = "report.md"
FIGURES_DIR = "figures"


def build_report(
    run_dir: str | Path,
    p_for_layer_bars: float | None = None,
    weighting: Weighting = "uniform",
    *,
    fraction: float = 0.5,
    count: CountUnit = "elements",
    chance: float | None = None,
    tolerance: float = DEFAULT_TOLERANCE,
) -> Path:
    """Read `run_dir/results.jsonl`, write `run_dir/figures/*.png` and `run_dir/report.md`.

    `p_for_layer_bars` picks the fault rate of the layer-group bar charts; by default it is
    `default_layer_bar_p` of each layer family. `weighting` is the AWRCL weighting (see
    `awrcl.grid_weights`), `fraction` the relative drop that defines the threshold, `count`
    whether injected faults are counted as values ("elements") or bits, and `chance` an
    optional chance-level line on the accuracy plots, `tolerance` the relative drop within which
    a protection scheme counts as holding (the Pareto chart). Returns the report's path.
    """
    if weighting not in WEIGHTINGS:
        raise ValueError(f"unknown weighting {weighting!r}; choose one of {WEIGHTINGS}")
    run_dir = Path(run_dir)
    records = grid_records(run_dir)
    tasks = baseline_tasks(records)
    baseline, series = build_series(records, tasks=tasks, count=count)
    summaries = [summarize_series(s, weighting=weighting, fraction=fraction) for s in series]
    by_id = {str(r["point_id"]): r for r in records}
    marks = grid_marks(series, by_id)
    figures = draw_figures(series, baseline, run_dir / FIGURES_DIR, p_for_layer_bars, fraction, count, chance, by_id, marks)
    fixed = fixed_fault_args(run_dir)
    protection_tables = protection_figures(series, baseline, run_dir / FIGURES_DIR, tolerance, chance, by_id, figures, marks, fixed)
    header = header_section(records, series, tasks, baseline, weighting, fraction, count, sampling_of(records, tasks))
    if fixed:  # a pattern, bits=, ...: what every point shares, which the series keys do not say
        header += f"\nFault keys fixed across the grid (`--fault_args`): `{fixed}`.\n"
    text = "\n".join(
        [
            header,
            summary_section(series, summaries, fraction, records),
            ranking_section(summaries, fraction),
            pareto_section(protection_tables, tolerance),
            figure_section(figures, run_dir),
            points_section(records, tasks, baseline, count),
        ]
    )
    page = write_sweep_page(run_dir, records)
    if page is not None:
        text += f"\n## Generations side by side\n\nThe generative points' texts beside the clean ones: [{page.name}]({page.name}).\n"
    report = run_dir / REPORT_FILE
    report.write_text(text, encoding="utf-8")
    return report


def fixed_fault_args(run_dir: Path) -> str:
    """The sweep's `--fault_args` from its sweep.json ("" where it has none or none is readable)."""
    try:
        config = json.loads((run_dir / CONFIG_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return ""
    value = config.get("fault_args", "") if isinstance(config, dict) else ""
    return value if isinstance(value, str) else ""


def grid_records(run_dir: Path) -> list[dict[str, Any]]:
    """The run's records, less malformed lines (a sweep sets them aside on resume; the report
    only reads) and records of points its grid never planned, each left out with a warning."""
    records = load_records(run_dir / RESULTS_FILE, skip_malformed=True)
    planned = planned_point_ids(run_dir)
    if planned is None:
        return records
    foreign = [str(record["point_id"]) for record in records if str(record["point_id"]) not in planned]
    if foreign:
        warnings.warn(
            f"{run_dir / RESULTS_FILE}: leaving out {len(foreign)} record(s) of points not in this sweep's grid (first: {foreign[0]!r})",
            stacklevel=3,
        )
    return [record for record in records if str(record["point_id"]) in planned]
