"""`lm-eval-faults targets`: show how a model splits into fault targets before a long run.

For each component: the decoder layers it spans, its parameter tensors, elements and bits, and
which tensors are shared (tied). With fault keys in `--model_args`, it also shows what that
spec selects, so a typo in `layers=` or `modules=` is caught in seconds, not after a GPU-day.
"""

from __future__ import annotations

import argparse
from collections import defaultdict
from typing import Any

from lm_eval_faults.formats import layout_of
from lm_eval_faults.loading import LOAD_KEYS, load_model
from lm_eval_faults.spec import layers_label, parse_arg_string, parse_fault_args
from lm_eval_faults.targets import ParamSite, all_param_sites, decoder_layers, select_params

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
    lines = [f"{'component':<20}{'layers':<10}{'tensors':>8}{'elements':>16}{'bits':>18}  dtype"]
    for row in rows:
        lines.append(
            f"{row['component']:<20}{row['layers']:<10}{row['tensors']:>8}{row['elements']:>16,}{row['bits']:>18,}  {row['dtypes']}"
        )
        for names in row["shared"]:
            lines.append(f"{'':<20}shared tensor (faulted once): {' = '.join(names)}")
    lines.append(f"{'total':<20}{'':<10}{sum(r['tensors'] for r in rows):>8}{sum(r['elements'] for r in rows):>16,}{sum(r['bits'] for r in rows):>18,}")
    return "\n".join(lines)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("pretrained", nargs="?", help="model path or hub id (default: the embedded demo model)")
    parser.add_argument("--model_args", default="", help="as for lm-eval, e.g. dtype=float16,gguf_file=X; fault keys show the selection")


def main(args: argparse.Namespace) -> int:
    model_args = parse_arg_string(args.model_args)
    if args.pretrained:
        model_args["pretrained"] = args.pretrained
    spec, load_args = parse_fault_args(model_args, passthrough=LOAD_KEYS)
    model = load_model(load_args)
    stack = decoder_layers(model)
    print(f"{type(model).__name__}: {len(stack[1]) if stack else 0} decoder layers at '{stack[0] if stack else '-'}'")
    print(format_rows(taxonomy_rows(all_param_sites(model))))
    if {"target", "layers", "modules"} & set(model_args):
        print(f"\nselected by target={'+'.join(spec.target)}, layers={spec.to_dict()['layers'] or 'all'}, modules={spec.modules!r}:")
        print(format_rows(taxonomy_rows(select_params(model, spec))))
    return 0
