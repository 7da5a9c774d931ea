"""`lm-eval-faults sweep`: run (or resume) a grid of fault settings on one loaded model."""

from __future__ import annotations

import argparse
import sys
from dataclasses import fields
from pathlib import Path

from lm_eval_faults.core.sites.registry import site_names
from lm_eval_faults.core.spec import FAULT_KINDS, FaultSpecError
from lm_eval_faults.study.grid import SweepConfig, SweepConfigError
from lm_eval_faults.study.ray_pool import INSTALL_HINT, LOCAL, RayOptions
from lm_eval_faults.study.records import RESULTS_FILE
from lm_eval_faults.study.runner import run_sweep


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of `lm-eval-faults sweep`; lm-eval's own options keep lm-eval's names."""
    parser.add_argument(
        "--model_args",
        default="",
        help="HF model arguments as for `--model hf`, e.g. pretrained=mistralai/Mistral-7B-v0.1,dtype=float16 (default: the embedded demo model)",
    )
    parser.add_argument("--tasks", required=True, help="comma-separated lm-eval tasks")
    parser.add_argument(
        "--run_dir",
        "--output_path",
        dest="run_dir",
        required=True,
        help="directory for sweep.json, results.jsonl and the report; rerun the same command to resume",
    )
    grid = parser.add_argument_group("grid (one point per combination, plus one clean baseline)")
    grid.add_argument("--p", default="", help="fault rates: 1e-9:1e-1 (one per decade), 1e-9:1e-1:17 (17 log-spaced), or a list 1e-5,1e-4")
    grid.add_argument(
        "--fit",
        default="",
        help="instead of --p: FIT rates per Mbit in the same syntax (1e2:1e6), with --fault_args hours=H; each point's p is recorded",
    )
    grid.add_argument("--faults", default="bitflip", help=f"comma list of fault kinds ({', '.join(FAULT_KINDS)})")
    grid.add_argument("--sites", default="weights", help=f"comma list of sites ({', '.join(site_names())}, or several joined with +)")
    grid.add_argument(
        "--targets", default="all", help="comma list, one series each, e.g. embedding,attention,mlp,norm,lm_head (join with + to merge)"
    )
    grid.add_argument("--layers", default="all", help="comma list of layer groups: all, groups:4 (consecutive groups of 4), or 0-3,4-7")
    grid.add_argument("--seeds", default="1", help="repeats (3 = seeds 0,1,2) or explicit seeds (0,1,2 or 5-7)")
    grid.add_argument(
        "--protections",
        default="none",
        help="protection schemes, one series each, separated by ';': none;protect_bits=exponent_msb;ecc=secded;protect=norm+lm_head",
    )
    grid.add_argument(
        "--storages",
        default=None,
        help="storage formats, one sweep each under RUN_DIR/<storage>/ plus RUN_DIR/storages.md comparing them, separated by ';': "
        "none;int8;int4,group_size=32;q4_1 (the float model, none, is always one of them)",
    )
    grid.add_argument("--fault_args", default="", help="fault keys fixed across the grid, e.g. bits=exponent or value_range=-1:1")
    evaluation = parser.add_argument_group("lm-eval options")
    evaluation.add_argument("--num_fewshot", type=int, default=None)
    evaluation.add_argument("--limit", type=float, default=None, help="documents per task (a fraction if < 1)")
    evaluation.add_argument(
        "--batch_size", default="32", help="lm-eval's batch size (default 32; auto re-probes and is slower on small models)"
    )
    evaluation.add_argument("--max_batch_size", type=int, default=None)
    evaluation.add_argument("--device", default=None)
    evaluation.add_argument("--include_path", default="", help="comma list of extra task directories")
    evaluation.add_argument("--gen_kwargs", default=None)
    evaluation.add_argument("--apply_chat_template", action="store_true")
    evaluation.add_argument("--fewshot_as_multiturn", action=argparse.BooleanOptionalAction, default=True)
    evaluation.add_argument("--system_instruction", default=None)
    evaluation.add_argument("--bootstrap_iters", type=int, default=100000)
    evaluation.add_argument(
        "--seed", dest="random_seed", type=int, default=0, help="lm-eval's random seed (few-shot sampling etc.), not the fault seed"
    )
    parser.add_argument("--no_report", action="store_true", help="skip building report.md and figures at the end")
    parser.add_argument("--no_progress", action="store_true", help="no progress bar over points")
    add_ray_arguments(parser)


def add_ray_arguments(parser: argparse.ArgumentParser) -> None:
    """`--ray [ADDRESS]` and how many actors: points run on Ray actors, one model each."""
    ray = parser.add_argument_group(f"Ray (optional: {INSTALL_HINT})")
    ray.add_argument(
        "--ray",
        nargs="?",
        const=LOCAL,
        default=None,
        metavar="ADDRESS",
        help="evaluate points on Ray actors, one model each; alone it starts a local Ray instance, "
        "with an ADDRESS (auto, HOST:6379, ray://HOST:10001) it joins a running cluster",
    )
    ray.add_argument(
        "--ray_actors", type=int, default=None, help="number of actors (default: one per GPU, else one per --ray_actor_cpus CPUs)"
    )
    ray.add_argument("--ray_actor_cpus", type=int, default=1, help="CPUs each actor reserves, and its torch threads (default 1)")


def ray_options_from_args(args: argparse.Namespace) -> RayOptions | None:
    """The `RayOptions` named by `--ray*`, or None for a sweep in this process."""
    if args.ray is None:
        if args.ray_actors is not None or args.ray_actor_cpus != 1:
            raise SweepConfigError("--ray_actors and --ray_actor_cpus apply to a sweep on Ray: add --ray [ADDRESS]")
        return None
    return RayOptions(address=args.ray, actors=args.ray_actors, cpus_per_actor=args.ray_actor_cpus)


def config_from_args(args: argparse.Namespace) -> SweepConfig:
    """The `SweepConfig` named by parsed command-line options."""
    names = {f.name for f in fields(SweepConfig)}
    return SweepConfig(**{name: value for name, value in vars(args).items() if name in names})


def main(args: argparse.Namespace) -> int:
    """`lm-eval-faults sweep`: 0 on success, 2 on a configuration error (message on stderr)."""
    try:
        config = config_from_args(args)
        ray = ray_options_from_args(args)
        if args.storages is not None:
            from lm_eval_faults.study.storage_sweeps import run_storage_sweeps  # matplotlib only for this comparison
            from lm_eval_faults.study.storage_table import TABLE_FILE

            curves = run_storage_sweeps(
                args.run_dir, config, args.storages, ray=ray, report=not args.no_report, progress=not args.no_progress
            )
            print(f"lm-eval-faults sweep: {len(curves)} storages compared in {Path(args.run_dir) / TABLE_FILE}", file=sys.stderr)
            return 0
        outcome = run_sweep(args.run_dir, config, ray=ray, report=not args.no_report, progress=not args.no_progress)
    except (SweepConfigError, FaultSpecError) as err:  # FaultSpecError: a typo of a fault key in --model_args
        print(f"lm-eval-faults sweep: {err}", file=sys.stderr)
        return 2
    print(
        f"lm-eval-faults sweep: {len(outcome.ran)} points run, {len(outcome.skipped)} already done; "
        f"results in {outcome.run_dir / RESULTS_FILE}"
        + (f", report {outcome.report}" if outcome.report else "")
        + (f"; {outcome.retries} evaluation(s) retried after a Ray actor died" if outcome.retries else ""),
        file=sys.stderr,
    )
    return 0
