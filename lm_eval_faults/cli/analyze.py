"""`lm-eval-faults analyze MODEL`: exact expected damage of a spec, from the model's own bits."""

from __future__ import annotations

import argparse
import json
import os

from lm_eval_faults.core.analysis import analyze
from lm_eval_faults.core.spec import parse_arg_string, parse_fault_args
from lm_eval_faults.harness.loading import LOAD_KEYS, load_model


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("pretrained", nargs="?", help="model path or hub id (default: the embedded demo model)")
    parser.add_argument("--model_args", default="", help="p=1e-7,target=attention[,dtype=float16,gguf_file=F,bits=exponent,...]")
    parser.add_argument(
        "--threshold", type=float, default=None, help="magnitude counted as 'huge' (default: half the dtype's largest finite value)"
    )
    parser.add_argument("--json", default=None, help="also write the full analysis (per site) to this JSON file")


def main(args: argparse.Namespace) -> int:
    """Print the expected-damage table (and optionally write JSON)."""
    model_args = parse_arg_string(args.model_args)
    if args.pretrained:
        model_args["pretrained"] = args.pretrained
    spec, load_args = parse_fault_args(model_args, passthrough=LOAD_KEYS)
    analysis = analyze(load_model(load_args, spec), spec, threshold=args.threshold)
    print(analysis.format_table())
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as handle:
            json.dump(analysis.to_dict(), handle, indent=2)
    return 0
