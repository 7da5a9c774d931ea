"""The `lm-eval-faults` command: targets, analyze, sweep, report, bisect, export, generate, playground, drift, tasks-path.

Evaluation itself stays with lm-eval (`lm_eval --model faulty_hf ...`); these subcommands do
what lm-eval has no verb for. Each subcommand lives in its own module, imported only when used.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

SUBCOMMANDS = {
    "targets": ("lm_eval_faults.cli.targets", "show a model's components, layers, parameter and bit counts"),
    "analyze": ("lm_eval_faults.cli.analyze", "exact expected damage (faults, NaN/Inf, huge values) without evaluating"),
    "sweep": ("lm_eval_faults.cli.sweep", "run lm-eval tasks over a grid of fault settings on one loaded model"),
    "report": ("lm_eval_faults.cli.report", "rebuild a sweep's figures and Markdown report from its results file"),
    "bisect": ("lm_eval_faults.cli.bisect", "find the culprit faults: a minimal subset of a damaging fault map"),
    "export": ("lm_eval_faults.cli.export", "write the faulted model for another engine: a GGUF file (storage=file), else safetensors"),
    "generate": ("lm_eval_faults.cli.generate", "clean and faulted generations of the same prompts side by side (HTML page, table)"),
    "playground": ("lm_eval_faults.cli.playground", "a web app of clean and faulted generations with a p slider (the playground extra)"),
    "drift": ("lm_eval_faults.cli.drift", "per-sample drift of a faulted lm-eval run against the clean one (--log_samples dirs)"),
    "tasks-path": ("lm_eval_faults.cli.tasks_path", "print the directory of this package's lm-eval task YAMLs"),
}


def build_parser(selected: str | None = None) -> argparse.ArgumentParser:
    """The parser; only the `selected` subcommand's module is imported (the others may load torch)."""
    parser = argparse.ArgumentParser(prog="lm-eval-faults", description=__doc__.splitlines()[0], allow_abbrev=False)
    commands = parser.add_subparsers(dest="command", required=True)
    for name, (module_name, help_text) in SUBCOMMANDS.items():
        # no abbreviations: `analyze --p 1e-5` was read as --protections, with a puzzling error
        sub = commands.add_parser(name, help=help_text, description=help_text, allow_abbrev=False)
        sub.set_defaults(module=module_name)
        if name == selected:
            importlib.import_module(module_name).add_arguments(sub)
    return parser


USER_ERRORS = (ValueError, TypeError, OSError)
"""What bad input raises here (FaultSpecError and SweepConfigError are ValueErrors; a missing
model path is an OSError): reported in one line. Set LM_EVAL_FAULTS_TRACEBACK=1 for the traceback."""


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser(argv[0] if argv else None).parse_args(argv)
    try:
        return int(importlib.import_module(args.module).main(args) or 0)
    except USER_ERRORS as error:
        if os.environ.get("LM_EVAL_FAULTS_TRACEBACK"):
            raise
        message = str(error).strip().splitlines() or [type(error).__name__]
        print(f"lm-eval-faults {args.command}: error: {message[0]}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        if os.environ.get("LM_EVAL_FAULTS_TRACEBACK"):
            raise
        resume = "; the same command resumes it" if args.command == "sweep" else ""
        print(f"lm-eval-faults {args.command}: interrupted{resume}", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
