"""`lm-eval-faults analyze MODEL`: exact expected damage of a spec, from the model's own bits."""

from __future__ import annotations

import argparse
import json
import os
from typing import Any

from lm_eval_faults.core.analysis import analyze
from lm_eval_faults.core.protected_analysis import expected_nonfinite
from lm_eval_faults.core.spec import FAULT_KEYS, PROTECTION_KEYS, parse_arg_string, parse_fault_args, to_spec
from lm_eval_faults.core.text_table import Column, text_table
from lm_eval_faults.harness.loading import LOAD_KEYS, load_model


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("pretrained", nargs="?", help="model path or hub id (default: the embedded demo model)")
    parser.add_argument("--model_args", default="", help="p=1e-7,target=attention[,dtype=float16,gguf_file=F,bits=exponent,...]")
    parser.add_argument(
        "--threshold", type=float, default=None, help="magnitude counted as 'huge' (default: half the dtype's largest finite value)"
    )
    parser.add_argument("--json", default=None, help="also write the full analysis (per site) to this JSON file")
    parser.add_argument(
        "--protections",
        default=None,
        help="compare protection schemes, separated by ';' (none;protect_bits=exponent_msb;ecc=secded): "
        "expected weights each lets through as NaN/Inf, for symmetric bit flips",
    )


def main(args: argparse.Namespace) -> int:
    """Print the expected-damage table (and optionally write JSON)."""
    model_args = parse_arg_string(args.model_args)
    if args.pretrained:
        model_args["pretrained"] = args.pretrained
    spec, load_args = parse_fault_args(model_args, passthrough=LOAD_KEYS)
    model = load_model(load_args, spec)
    analysis = analyze(model, spec, threshold=args.threshold)
    print(analysis.format_table() + ("\n(the table above is before protection)" if spec.protected else ""))
    schemes = [item.strip() for item in (args.protections or "").split(";") if item.strip()]
    if spec.protected and not schemes:
        schemes = [",".join(f"{key}={value}" for key, value in model_args.items() if key in PROTECTION_KEYS)]
    if schemes:
        base = {key: value for key, value in model_args.items() if key in FAULT_KEYS and key not in PROTECTION_KEYS}
        print(protection_table(model, base, schemes))
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as handle:
            json.dump(analysis.to_dict(), handle, indent=2)
    return 0


def protection_table(model: Any, base: dict[str, Any], schemes: list[str]) -> str:
    """Expected finite weights turned NaN/Inf that each scheme lets through, per component."""
    rows = []
    components: list[str] = []
    for scheme in schemes:
        fields = {} if scheme.lower() == "none" else parse_arg_string(scheme)
        expectation = expected_nonfinite(model, to_spec({**base, **fields}))
        components = components or sorted(expectation.by_component)
        remainder = f" (+ at most {expectation.remainder:.2g} from 5+ errors per word)" if expectation.remainder else ""
        rows.append((scheme, expectation.total, *(expectation.by_component.get(c, 0.0) for c in components), remainder))
    columns = [Column("protection", 42, align="<"), Column("NaN/Inf total", 15, ".4g")]
    columns += [Column(component, max(12, len(component) + 2), ".4g") for component in components]
    columns.append(Column("", 2, align="<"))
    lines = ["Expected weights read as NaN/Inf after protection (exact; symmetric bit flips):", *text_table(columns, rows)]
    return "\n".join(lines)
