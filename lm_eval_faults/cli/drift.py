"""`lm-eval-faults drift CLEAN_DIR FAULTY_DIR`: per-sample drift of a faulted run against the clean one."""

from __future__ import annotations

import argparse
import json

from lm_eval_faults.cli.paths import check_output_path, prepare_output_path
from lm_eval_faults.study.drift import drift
from lm_eval_faults.study.drift_pages import drift_views
from lm_eval_faults.study.drift_table import format_drift_table
from lm_eval_faults.study.side_by_side import side_by_side_page


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("clean_dir", help="lm-eval --output_path of the clean run (made with --log_samples)")
    parser.add_argument("faulty_dir", help="lm-eval --output_path of the faulted run (made with --log_samples)")
    parser.add_argument("--json", default=None, help="also write the report, with every per-sample record, to this JSON file")
    parser.add_argument("--html", default=None, help="write a page of generative tasks' clean and faulted texts side by side")
    parser.add_argument("--html_limit", type=int, default=50, help="samples per task on the page, those that diverged first (default 50)")


def main(args: argparse.Namespace) -> int:
    """Print the per-task drift table (and optionally write JSON); missing or unreadable
    directories raise OSError/ValueError, which the command reports in one line."""
    check_output_path("--json", args.json)
    check_output_path("--html", args.html)
    report = drift(args.clean_dir, args.faulty_dir)
    print("\n".join(format_drift_table(report)))
    if args.html:
        views, notes = drift_views(report, args.html_limit)
        if not views:
            notes.append("no generative task in common: nothing to show side by side")
        title = f"Clean and faulted texts: {args.clean_dir} against {args.faulty_dir}"
        with open(prepare_output_path(args.html), "w", encoding="utf-8") as handle:
            handle.write(side_by_side_page(title, views, notes))
    if args.json:
        with open(prepare_output_path(args.json), "w", encoding="utf-8") as handle:
            json.dump(report.to_dict(), handle, indent=2)
            handle.write("\n")
    return 0
