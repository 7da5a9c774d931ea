"""`lm-eval-faults report RUN_DIR`: rebuild a sweep's figures and report.md from results.jsonl alone."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from lm_eval_faults.study.awrcl import WEIGHTINGS
from lm_eval_faults.study.records import RESULTS_FILE
from lm_eval_faults.study.sweep_report import build_report


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run_dir", help="a sweep's run directory (holds results.jsonl)")
    parser.add_argument("--weighting", default="uniform", choices=WEIGHTINGS, help="AWRCL weights over the p grid")
    parser.add_argument("--layer_bars_p", type=float, default=None, help="p for the per-layer-group bar chart")
    parser.add_argument("--fraction", type=float, default=0.5, help="relative accuracy drop that defines the threshold")
    parser.add_argument(
        "--tolerance", type=float, default=0.05, help="relative drop within which a protection scheme holds (the Pareto chart)"
    )


def main(args: argparse.Namespace) -> int:
    """0 with the report's path on stdout; 2 with one line on stderr when the directory holds
    nothing to report (no results file, no baseline yet, a malformed record), since that is a
    state of the run directory for the user to fix, not a bug to show a traceback for."""
    results = Path(args.run_dir) / RESULTS_FILE
    try:
        if not 0 < args.fraction < 1:
            raise ValueError(f"--fraction {args.fraction!r} is invalid: a relative accuracy drop in (0, 1), e.g. 0.5")
        if not 0 <= args.tolerance < 1:
            raise ValueError(f"--tolerance {args.tolerance!r} is invalid: a relative drop in [0, 1), e.g. 0.05")
        if not results.is_file():
            raise FileNotFoundError(f"{results} does not exist: no sweep point has finished in {args.run_dir}")
        report = build_report(args.run_dir, args.layer_bars_p, args.weighting, fraction=args.fraction, tolerance=args.tolerance)
    except (OSError, ValueError) as err:
        print(f"lm-eval-faults report: {err}", file=sys.stderr)
        return 2
    print(report)
    return 0
