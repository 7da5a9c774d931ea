"""`lm-eval-faults bisect MODEL --tasks T (--fault_args SPEC | --map FILE)`: find the culprit faults.

Loads the model once, scores it clean, draws (or loads) a fault map whose replay degrades the
task below `--fraction` of the clean score, and bisects the map to a 1-minimal subset that still
does it (see `lm_eval_faults.study.bisect`). Prints the culprits; `--json` writes the whole
result and `--save_map` the culprits' own map, for replay.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from lm_eval_faults.cli.paths import check_output_path, prepare_output_path
from lm_eval_faults.core.fault_map import FaultMap
from lm_eval_faults.core.sites.targets import all_param_sites
from lm_eval_faults.core.spec import FAULT_KEYS, FaultSpec, FaultSpecError, parse_arg_string, to_spec


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("pretrained", nargs="?", help="model path or hub id (default: the embedded demo model)")
    parser.add_argument("--model_args", default="", help="HF model arguments as for `--model hf` (no fault keys)")
    parser.add_argument("--tasks", required=True, help="comma-separated lm-eval tasks; their mean primary metric is the score")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--fault_args", help="a weight fault spec to draw the map from, e.g. p=1e-7,seed=0")
    source.add_argument("--map", help="a saved fault map (save_map=PATH in model_args, or --save_map here)")
    parser.add_argument("--fraction", type=float, default=0.5, help="damage = score below this fraction of the clean score")
    parser.add_argument(
        "--tolerance",
        type=float,
        default=0.05,
        help="warn when the faults not blamed still cost more than this fraction of the clean score (default 0.05)",
    )
    parser.add_argument("--limit", type=float, default=None, help="documents per task (a fraction if < 1)")
    parser.add_argument("--batch_size", default="32")
    parser.add_argument("--device", default=None, help="default: cuda where available, else cpu")
    parser.add_argument("--json", default=None, help="write the bisection (culprits, scores, evaluations) here")
    parser.add_argument("--save_map", default=None, help="write the culprits' own fault map here")


def main(args: argparse.Namespace) -> int:
    import torch
    from lm_eval.tasks import TaskManager

    from lm_eval_faults.harness.model import FaultyHFLM
    from lm_eval_faults.study.bisect import bisect, expected_evaluations
    from lm_eval_faults.study.evaluation import evaluation_score, quiet_lm_eval
    from lm_eval_faults.study.progress import ProgressLine

    model_args = parse_arg_string(args.model_args)
    if args.pretrained:
        model_args["pretrained"] = args.pretrained
    tasks = [task.strip() for task in args.tasks.split(",") if task.strip()]
    spec = check_inputs(args, model_args, tasks)
    saved_map = FaultMap.load(args.map) if args.map else None  # a bad file fails before the model loads
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    lm = FaultyHFLM.create_from_arg_obj(model_args, {"batch_size": args.batch_size, "device": device})
    lm.print_report = False
    with quiet_lm_eval():  # no "injecting faults" bar above the trials' line
        fault_map = saved_map if saved_map is not None else lm.set_faults(spec or FaultSpec()).fault_map()

    task_manager = TaskManager()
    first, more = expected_evaluations(len(fault_map))
    line = ProgressLine("lm-eval-faults bisect", first, unit="trials", approximate=True, regrow=more)

    storage = str(fault_map.spec.get("storage", "none"))
    clean = FaultSpec(storage=storage, group_size=int(fault_map.spec.get("group_size", 128)))  # a storage's clean form at p=0

    def score(subset: FaultMap | None) -> float:
        with quiet_lm_eval():  # the replay's "injecting faults" bar too
            if subset is None:
                lm.set_faults(clean)
            else:
                lm.replay_faults(subset)
            value = evaluation_score(lm, tasks, task_manager, args.limit)
        line.advance(f"{0 if subset is None else len(subset)} faults -> {value:.4g}")
        return value

    sites = {name: (site.component, site.layer) for site in all_param_sites(lm.model) for name in site.names}
    print(f"lm-eval-faults bisect: {len(fault_map)} faults; scoring {', '.join(tasks)}", file=sys.stderr)
    with line:
        outcome = bisect(fault_map, score, args.fraction, sites, tolerance=args.tolerance)
    lm.replay_faults(None)
    print(outcome.format_table())
    if outcome.residue_warning and not sys.stdout.isatty():  # stdout to a file: still seen
        print(outcome.residue_warning, file=sys.stderr)
    if args.json:
        Path(prepare_output_path(args.json)).write_text(json.dumps(outcome.to_dict(), indent=2) + "\n")
    if args.save_map:
        fault_map.subset(outcome.indices).save(prepare_output_path(args.save_map))
    return 0


def check_inputs(args: argparse.Namespace, model_args: dict[str, Any], tasks: list[str]) -> FaultSpec | None:
    """Everything the input alone tells, before the model loads and the ~100 evaluations run:
    fault keys in --model_args (ignored there), --fraction, --limit, the tasks, the output paths
    and the spec against the model's config. Returns the spec of --fault_args (None with --map)."""
    from lm_eval_faults.harness.package_data import demo_model_dir
    from lm_eval_faults.harness.preflight import check_against_config, check_tasks, read_config
    from lm_eval_faults.study.grid import parse_limit

    faults = [key for key in model_args if key in FAULT_KEYS]
    if faults:
        raise FaultSpecError(f"bisect --model_args holds fault keys {', '.join(faults)}: give them in --fault_args (or use --map)")
    if not 0 < args.fraction <= 1:
        raise FaultSpecError(f"bisect --fraction {args.fraction!r} is invalid: a fraction of the clean score in (0, 1], e.g. 0.5")
    if not 0 <= args.tolerance < 1:
        raise FaultSpecError(f"bisect --tolerance {args.tolerance!r} is invalid: a fraction of the clean score in [0, 1), e.g. 0.05")
    parse_limit("--limit", args.limit)
    if not tasks:
        raise FaultSpecError("bisect --tasks is empty; name at least one lm-eval task")
    check_tasks("--tasks", tasks)
    check_output_path("--json", args.json)
    check_output_path("--save_map", args.save_map)
    if args.map and not Path(args.map).is_file():
        raise FileNotFoundError(f"--map {args.map!r}: no such file")
    spec = to_spec(args.fault_args) if args.fault_args else None
    if spec is not None and not (spec.active and spec.on_weights):
        raise FaultSpecError(f"--fault_args {args.fault_args!r} draws no weight faults: bisection needs a map of weight faults")
    if spec is not None:
        load_args = {"pretrained": str(demo_model_dir()), **model_args}
        check_against_config(spec, load_args, read_config(load_args))
    return spec
