"""How much bit-flip damage each storage format tolerates: one sweep per storage, one table and figure.

    python scripts/storage_robustness.py                     # the demo model on faults_demo
    python scripts/storage_robustness.py --model smollm2     # SmolLM2-135M (../shared) on faults_facts

Each storage is a sweep of its own (`--fault_args storage=...`), so its baseline is that storage at
p=0: its own clean score, the quantization's error included. p is the probability per *stored* bit;
"faults per weight" is p times the storage's stored bits per weight, which is what compares a
5-bit format with a 32-bit one. The table gives, per storage: its clean score, the highest p whose
score stays within 5% of that clean score (every lower p too), and the faults per weight there.
Runs resume (each storage's run directory is a normal sweep directory under --out).
"""

from __future__ import annotations

import argparse
import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import NamedTuple

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
from lm_eval_faults.core.report import stored_bits_per_weight as storage_bits
from lm_eval_faults.study.grid import SweepConfig
from lm_eval_faults.study.metrics import baseline_score, baseline_tasks, record_score
from lm_eval_faults.study.records import load_records
from lm_eval_faults.study.runner import run_sweep

ROOT = Path(__file__).resolve().parents[1]
SMOLLM = "pretrained=../shared/models/smollm2-135m-instruct,gguf_file=SmolLM2-135M-Instruct.Q4_1.gguf,dtype=float32"
MODELS = {
    "demo": (
        "",
        "faults_demo",
        "none,float16,bfloat16,fp8_e4m3,int8,int4:32,int4:64,nf4,q8_0,q4_0,q4_1,mxfp4,int8@scales,int4:32@scales,q4_1@scales+mins",
    ),
    "smollm2": (
        SMOLLM,
        "faults_facts",
        "none,bfloat16,float16,fp8_e4m3,int8,int4:32,int4:64,nf4,q8_0,q4_1,mxfp4,file,int8@scales,int4:32@scales,q4_1@scales+mins",
    ),
}
"""Per model: model_args (relative to the repository root), task, storages. SmolLM2's hidden size
576 is not a multiple of 128 or 256, so its int4 groups are 32 and 64, and Q4_K's super-blocks of
256 do not fit it (llama.cpp stores such tensors in another type); `file` is the GGUF file's own
blocks (Q4_1, with Q8_0 for the embedding and F32 norms), where `q4_1` re-quantizes the loaded
weights."""
TOLERANCE = 0.05


def storage_args(item: str) -> tuple[str, str]:
    """`int4:32` -> (`int4 (groups of 32)`, `storage=int4,group_size=32`); `none` is the float
    model; `@FIELDS` backs fields up (`int8@scales` -> `storage=int8,protect_fields=scales`)."""
    name, _, group = item.partition("@")[0].partition(":")
    if name == "none":
        label, args = "float32 (the model's own)", ""
    elif name == "file":
        label, args = "the GGUF file's own blocks (Q4_1 + Q8_0 + F32)", "storage=file"
    else:
        label = f"{name} (groups of {group})" if group else name
        args = f"storage={name}" + (f",group_size={group}" if group else "")
    if backed := backed_fields(item):
        label, args = f"{label}, {' and '.join(backed)} backed up", f"{args},protect_fields={'+'.join(backed)}"
    return label, args


def item_slug(item: str) -> str:
    """A storage item as a file name: `int4:32@scales` -> `int4_g32_backed_scales`."""
    return item.replace(":", "_g").replace("@", "_backed_").replace("+", "_")


def backed_fields(item: str) -> list[str]:
    """The fields an item backs up: `q4_1@scales+mins` -> [scales, mins]."""
    backed = item.partition("@")[2]
    return backed.split("+") if backed else []


def tolerated(points: list[tuple[float, float]], clean: float) -> float | None:
    """The highest p at which this and every lower p score within TOLERANCE of `clean`."""
    best = None
    for p, score in sorted(points):
        if not score >= (1 - TOLERANCE) * clean:
            break
        best = p
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=MODELS, default="demo")
    parser.add_argument(
        "--storages",
        help="comma list; int4:G sets the group size, NAME@FIELDS backs FIELDS up (default: "
        + "; ".join(f"{model}: {items}" for model, (_, _, items) in MODELS.items())
        + ")",
    )
    parser.add_argument("--p", default="1e-6:1e-1:11", help="rates LOW:HIGH:COUNT, log-spaced, or a comma list (default: %(default)s)")
    parser.add_argument("--limit", default=None, help="documents per task (default: all)")
    parser.add_argument("--seeds", default="1", help="seeds per rate (default: %(default)s)")
    parser.add_argument(
        "--out",
        type=Path,
        help="where the table, figure, curves and run directories go (default: docs/storage/MODEL, the committed results)",
    )
    args = parser.parse_args()
    model_args, task, storages = MODELS[args.model]
    out = args.out or ROOT / "docs" / "storage" / args.model
    saved = out / "curves.json"
    curves = {  # the storages not run this time keep the points of their last run
        label: Curve(
            curve["bits_per_weight"], curve.get("exposed_bits_per_weight", curve["bits_per_weight"]), curve["points"], curve["clean"]
        )
        for label, curve in (json.loads(saved.read_text()).items() if saved.is_file() else ())
    }
    for item in (args.storages or storages).split(","):
        label, fault_args = storage_args(item)
        config = SweepConfig(model_args=model_args, tasks=task, p=args.p, seeds=args.seeds, fault_args=fault_args, limit=args.limit)
        run_dir = out / "runs" / item_slug(item)
        run_sweep(run_dir, config, report=False, progress=True)
        records = load_records(run_dir / "results.jsonl")
        tasks = baseline_tasks(records)
        clean = baseline_score(records, tasks)
        by_p: dict[float, list[float]] = {}
        for record in records:
            if not record.get("baseline"):
                by_p.setdefault(float(record["p"]), []).append(record_score(record, tasks))
        points = [(p, sum(scores) / len(scores)) for p, scores in sorted(by_p.items())]
        faulty = next(record for record in records if not record.get("baseline"))
        curves[label] = Curve(
            stored_bits_per_weight(faulty), stored_bits_per_weight(faulty, leaving_out=backed_fields(item)), points, clean
        )
    order = [storage_args(item)[0] for item in storages.split(",")]
    curves = dict(sorted(curves.items(), key=lambda item: order.index(item[0]) if item[0] in order else len(order)))
    rows = []
    for label, curve in curves.items():
        best = tolerated(curve.points, curve.clean)
        rows.append((label, curve, best, None if best is None else best * curve.exposed))
    write_table(out, args, task, rows)
    write_figure(out, curves)


class Curve(NamedTuple):
    """One storage's points, its clean score, and its bits per weight: all it stores, and those
    faults can hit (fields backed up are stored in fault-free memory)."""

    bits: float
    exposed: float
    points: list[tuple[float, float]]
    clean: float


def stored_bits_per_weight(record: dict, leaving_out: Sequence[str] = ()) -> float:
    """From a record's stored-form summary (`storage=` runs), else 32: the float32 model's own;
    without the bits of the fields `leaving_out`."""
    summary = record.get("storage")
    if not summary:
        return 32.0
    left_out = sum(field["eligible_bits"] for row in summary.values() for name, field in row["fields"].items() if name in leaving_out)
    return storage_bits(summary) - left_out / sum(row["weights"] for row in summary.values())


def write_table(out: Path, args: argparse.Namespace, task: str, rows: list[tuple]) -> None:
    lines = [
        f"| storage ({task}) | clean score | stored bits per weight | highest p within 5% of clean | faults per weight there |",
        "|---|---|---|---|---|",
    ]
    for label, curve, best, per_weight in rows:
        bits = f"{curve.bits:.2f}" + (f" ({curve.bits - curve.exposed:.2f} backed up)" if curve.exposed < curve.bits else "")
        lines.append(
            f"| {label} | {curve.clean:.3f} | {bits} | {'< lowest p' if best is None else f'{best:.2g}'} | "
            f"{'—' if per_weight is None else f'{per_weight:.2g}'} |"
        )
    (out / "table.md").write_text("\n".join(lines) + "\n")
    (out / "command.txt").write_text(
        f"python scripts/storage_robustness.py --model {args.model} --p {args.p} --seeds {args.seeds}"
        + (f" --limit {args.limit}" if args.limit else "")
        + "\n"
    )
    print("\n".join(lines))


def write_figure(out: Path, curves: dict[str, Curve]) -> None:
    figure, (per_bit, per_weight) = plt.subplots(1, 2, figsize=(15, 4.8), sharey=True)
    colours = plt.get_cmap("tab20").colors  # one colour per storage: the default cycle repeats after 10
    for (label, curve), colour in zip(curves.items(), colours * 2, strict=False):
        ps = [p for p, _ in curve.points]
        relative = [score / curve.clean if curve.clean else math.nan for _, score in curve.points]
        style = ":" if curve.exposed < curve.bits else "-"  # backed-up storages dotted
        per_bit.plot(ps, relative, marker="o", linestyle=style, color=colour, label=label)
        per_weight.plot([p * curve.exposed for p in ps], relative, marker="o", linestyle=style, color=colour, label=label)
    for axis, xlabel in ((per_bit, "p per stored bit"), (per_weight, "faults per weight (p x bits per weight faults can hit)")):
        axis.set_xscale("log")
        axis.axhline(1 - TOLERANCE, color="grey", linestyle=":", linewidth=1)
        axis.set_xlabel(xlabel)
    per_bit.set_ylabel("score / the storage's own clean score")
    per_weight.legend(fontsize=8, loc="center left", bbox_to_anchor=(1.01, 0.5))
    figure.tight_layout()
    figure.savefig(out / "robustness.png", dpi=120)
    (out / "curves.json").write_text(
        json.dumps(
            {
                label: {
                    "bits_per_weight": curve.bits,
                    "exposed_bits_per_weight": curve.exposed,
                    "clean": curve.clean,
                    "points": curve.points,
                }
                for label, curve in curves.items()
            },
            indent=1,
        )
    )


if __name__ == "__main__":
    main()
