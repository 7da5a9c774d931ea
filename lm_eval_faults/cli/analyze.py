"""`lm-eval-faults analyze MODEL`: exact expected damage of a spec, from the model's own bits."""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from contextlib import ExitStack
from typing import Any

from lm_eval_faults.cli.paths import check_output_path, prepare_output_path
from lm_eval_faults.core.analysis.exact import analyze, check_analysable
from lm_eval_faults.core.analysis.protected import expected_nonfinite
from lm_eval_faults.core.spec import FAULT_KEYS, PROTECTION_KEYS, FaultSpec, FaultSpecError, parse_arg_string, parse_fault_args, to_spec
from lm_eval_faults.core.storage.codecs import FILE
from lm_eval_faults.core.text_table import Column, text_table
from lm_eval_faults.harness.gguf_storage import attach_gguf_storage, gguf_path
from lm_eval_faults.harness.loading import LOAD_KEYS, load_model
from lm_eval_faults.harness.package_data import demo_model_dir
from lm_eval_faults.harness.preflight import check_against_config, read_config
from lm_eval_faults.study.progress import ProgressLine


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("pretrained", nargs="?", help="model path or hub id (default: the embedded demo model)")
    parser.add_argument("--model_args", default="", help="p=1e-7,target=attention[,dtype=float16,gguf_file=F,bits=exponent,...]")
    parser.add_argument(
        "--threshold",
        type=float,
        default=None,
        help="magnitude counted as 'huge' (default: half the dtype's largest finite value); under storage=, a weight's move "
        "in RMS of its tensor (default 10)",
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
    check_analysable(spec)
    check_output_path("--json", args.json)
    schemes = [item.strip() for item in (args.protections or "").split(";") if item.strip()]
    if schemes and spec.storage != "none":
        raise FaultSpecError(
            f"analyze: --protections compares schemes on float weights, not under storage={spec.storage}; give one scheme's "
            "keys in --model_args (protect_fields=scales, protect_bits=...) to analyse the stored fields under it"
        )
    if spec.protected and not schemes and spec.storage == "none":  # under storage=, the stored analysis applies them itself
        schemes = [",".join(f"{key}={value}" for key, value in model_args.items() if key in PROTECTION_KEYS)]
    base = {key: value for key, value in model_args.items() if key in FAULT_KEYS and key not in PROTECTION_KEYS}
    scheme_specs = [scheme_spec(base, scheme) for scheme in schemes]  # a bad scheme fails before the model loads
    load_config = {"pretrained": str(demo_model_dir()), **load_args}
    config = read_config(load_config)
    for scheme_spec_ in scheme_specs:
        check_against_config(scheme_spec_, load_config, config)
    model = load_model(load_args, spec)
    if spec.storage == FILE:
        attach_gguf_storage(model, gguf_path(str(load_config["pretrained"]), str(load_args.get("gguf_file"))))
    with ExitStack() as stack:
        analysis = analyze(model, spec, threshold=args.threshold, progress=_progress_line(stack))
    print(analysis.format_table())
    if schemes:
        print(protection_table(model, base, schemes))
    if args.json:
        with open(prepare_output_path(args.json), "w") as handle:
            json.dump(analysis.to_dict(), handle, indent=2)
    return 0


def _progress_line(stack: ExitStack) -> Callable[[str, int], None]:
    """One progress line over the stored fields, drawn from the first one done (a stored
    analysis decodes the model many times; a float one never calls it)."""
    line: list[ProgressLine] = []

    def advance(name: str, total: int) -> None:
        if not line:
            line.append(stack.enter_context(ProgressLine("lm-eval-faults analyze", total, unit="stored fields")))
        line[0].advance(name)

    return advance


def scheme_spec(base: dict[str, Any], scheme: str) -> FaultSpec:
    """The spec of one `--protections` item over the fault keys of --model_args."""
    fields = {} if scheme.lower() == "none" else parse_arg_string(scheme)
    wrong = [key for key in fields if key not in PROTECTION_KEYS]
    if wrong:
        raise FaultSpecError(
            f"--protections item {scheme!r}: {', '.join(wrong)} not protection keys (those are {', '.join(PROTECTION_KEYS)})"
        )
    return to_spec({**base, **fields})


def protection_table(model: Any, base: dict[str, Any], schemes: list[str]) -> str:
    """Expected finite weights turned NaN/Inf that each scheme lets through, per component."""
    rows = []
    components: list[str] = []
    for scheme in schemes:
        expectation = expected_nonfinite(model, scheme_spec(base, scheme))
        components = components or sorted(expectation.by_component)
        remainder = f" (+ at most {expectation.remainder:.2g} from 5+ errors per word)" if expectation.remainder else ""
        rows.append((scheme, expectation.total, *(expectation.by_component.get(c, 0.0) for c in components), remainder))
    columns = [Column("protection", 42, align="<"), Column("NaN/Inf total", 15, ".4g")]
    columns += [Column(component, max(12, len(component) + 2), ".4g") for component in components]
    columns.append(Column("", 2, align="<"))
    lines = ["Expected weights read as NaN/Inf after protection (exact; symmetric bit flips):", *text_table(columns, rows)]
    lines += [f"note: {note}" for scheme in schemes if (note := scheme_note(scheme, scheme_spec(base, scheme)))]
    return "\n".join(lines)


def scheme_note(scheme: str, spec: FaultSpec) -> str | None:
    """What the row of a scheme does not model: clamping activations is a run-time bound on
    module outputs, which an analysis of the stored weights cannot see."""
    if "activations" not in spec.clamp:
        return None
    shown = "its row models only the weight clamping" if "weights" in spec.clamp else "its row shows the weights as if unclamped"
    return f"{scheme!r}: activation clamping is not modelled by the weight analysis; {shown}"
