"""`lm-eval-faults targets MODEL`: show how a model splits into fault targets before a long run.

For each component: the decoder layers it spans, its parameter tensors, elements and bits, and
which tensors are shared (tied). With fault keys in `--model_args`, it also shows what that
spec selects, so a typo in `layers=` or `modules=` is caught in seconds, not after a GPU-day.
"""

from __future__ import annotations

import argparse
from collections import defaultdict
from typing import Any

from lm_eval_faults.core.sites.targets import (
    ParamSite,
    all_param_sites,
    decoder_layers,
    select_params,
)
from lm_eval_faults.core.spec import layers_label, parse_arg_string, parse_fault_args
from lm_eval_faults.core.storage.layouts import layout_of
from lm_eval_faults.core.text_table import Column, text_table
from lm_eval_faults.harness.loading import LOAD_KEYS, load_model


def taxonomy_rows(sites: list[ParamSite]) -> list[dict[str, Any]]:
    """One row per component: layers spanned, tensors, elements, bits, shared tensors."""
    groups: dict[str, list[ParamSite]] = defaultdict(list)
    for site in sites:
        groups[site.component].append(site)
    rows = []
    for component, members in sorted(groups.items()):
        layers = sorted({site.layer for site in members if site.layer is not None})
        rows.append(
            {
                "component": component,
                "layers": layers_label(layers) if layers else "-",
                "tensors": len(members),
                "elements": sum(site.param.numel() for site in members),
                "bits": sum(site.param.numel() * layout_of(site.param.dtype).width for site in members),
                "dtypes": "+".join(sorted({layout_of(site.param.dtype).name for site in members})),
                "shared": [list(site.names) for site in members if site.shared],
            }
        )
    return rows


def format_rows(rows: list[dict[str, Any]]) -> str:
    """The taxonomy table, with a line under each shared (tied) tensor and a total."""
    columns = [
        Column("component", 20, align="<"),
        Column("layers", 10, align="<"),
        Column("tensors", 8),
        Column("elements", 16, ","),
        Column("bits", 18, ","),
        Column("  dtype", 0, align="<"),
    ]
    lines = text_table(columns, [])
    for row in rows:
        lines.extend(
            text_table(columns, [(row["component"], row["layers"], row["tensors"], row["elements"], row["bits"], f"  {row['dtypes']}")])[1:]
        )
        lines.extend(f"{'':<20}shared tensor (faulted once): {' = '.join(names)}" for names in row["shared"])
    totals = ("total", "", sum(r["tensors"] for r in rows), sum(r["elements"] for r in rows), sum(r["bits"] for r in rows), "")
    lines.extend(text_table(columns, [totals])[1:])
    return "\n".join(lines)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("pretrained", nargs="?", help="model path or hub id (default: the embedded demo model)")
    parser.add_argument("--model_args", default="", help="as for lm-eval, e.g. dtype=float16,gguf_file=X; fault keys show the selection")


def main(args: argparse.Namespace) -> int:
    model_args = parse_arg_string(args.model_args)
    if args.pretrained:
        model_args["pretrained"] = args.pretrained
    spec, load_args = parse_fault_args(model_args, passthrough=LOAD_KEYS)
    model = load_model(load_args, spec)
    stack = decoder_layers(model)
    print(f"{type(model).__name__}: {len(stack[1]) if stack else 0} decoder layers at '{stack[0] if stack else '-'}'")
    print(format_rows(taxonomy_rows(all_param_sites(model))))
    if {"target", "layers", "modules"} & set(model_args):
        print(f"\nselected by target={'+'.join(spec.target)}, layers={spec.to_dict()['layers'] or 'all'}, modules={spec.modules!r}:")
        print(format_rows(taxonomy_rows(select_params(model, spec))))
    return 0
