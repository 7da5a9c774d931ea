"""`lm-eval-faults report RUN_DIR`: rebuild a sweep's figures and report.md from results.jsonl alone."""

from __future__ import annotations

import argparse

from lm_eval_faults.study.metrics import WEIGHTINGS
from lm_eval_faults.study.sweep_report import build_report


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run_dir", help="a sweep's run directory (holds results.jsonl)")
    parser.add_argument("--weighting", default="uniform", choices=WEIGHTINGS, help="AWRCL weights over the p grid")
    parser.add_argument("--layer_bars_p", type=float, default=None, help="p for the per-layer-group bar chart")
    parser.add_argument("--fraction", type=float, default=0.5, help="relative accuracy drop that defines the threshold")


def main(args: argparse.Namespace) -> int:
    print(build_report(args.run_dir, args.layer_bars_p, args.weighting, fraction=args.fraction))
    return 0
