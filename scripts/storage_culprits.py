"""Which stored fields the damaging faults are in: `lm-eval-faults bisect` per storage, one table.

    python scripts/storage_culprits.py --model smollm2     # after storage_robustness.py

For each storage, the rate is the lowest p of its robustness curve (docs/storage/MODEL/curves.json)
whose mean score is below half the storage's clean score: where it breaks. The first seed whose
whole map scores below half the clean score there is bisected to a minimal set of culprits
(`bisect`'s default fraction 0.5), and the table gives the culprits per stored field beside the
map's faults per field: a field that holds few of the faults and most of the culprits is the
fragile part. Each bisection's JSON and culprit map stay in docs/storage/MODEL/culprits/; a
storage whose JSON is there is not bisected again (delete it after changing the storage).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

from storage_robustness import MODELS, ROOT, item_slug, storage_args

STORAGES = {"smollm2": "file,q4_1,int4:32,int4:64,nf4,mxfp4,q8_0,fp8_e4m3,int8", "demo": "q4_1,int4:32,int4:64,int8,nf4,fp8_e4m3,q8_0,q4_0"}


def breaking_rate(curve: dict) -> float | None:
    """The lowest p whose mean score is below half the clean score."""
    return next((p for p, score in sorted(curve["points"]) if score < 0.5 * curve["clean"]), None)


def bisect_storage(model_args: str, task: str, fault_args: str, out: Path, seeds: int, limit: int | None) -> dict | None:
    """Bisect the first seed whose map breaks the model; its JSON, or None if no seed does."""
    pretrained, _, rest = model_args.partition(",")
    for seed in range(seeds):
        stem = out.with_name(f"{out.name}_seed{seed}")
        if Path(f"{stem}.json").is_file():  # bisected already: runs resume (delete it to bisect again)
            return {"seed": seed, **json.loads(Path(f"{stem}.json").read_text())}
        command = ["lm-eval-faults", "bisect", pretrained.removeprefix("pretrained=")] if pretrained else ["lm-eval-faults", "bisect"]
        command += ["--tasks", task, "--fault_args", f"{fault_args},seed={seed}", "--device", "cpu", "--batch_size", "32"]
        command += ["--json", f"{stem}.json", "--save_map", f"{stem}_culprits.npz"] + (["--model_args", rest] if rest else [])
        command += ["--limit", str(limit)] if limit else []
        print(" ".join(command), flush=True)
        done = subprocess.run(command, cwd=ROOT, env={**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"})
        if done.returncode == 0:
            return {"seed": seed, **json.loads(Path(f"{stem}.json").read_text())}
    return None


def table_row(label: str, p: float, outcome: dict | None) -> str:
    if outcome is None:
        return f"| {label} | {p:.3g} | no seed's map breaks it | | | |"
    shares = ", ".join(f"{name} {count}" for name, count in outcome["faults_by_field"].items())
    culprits = ", ".join(f"{name} **{count}**" if count else f"{name} 0" for name, count in outcome["culprits_by_field"].items())
    bits = ", ".join(sorted({f"{c['param'].rpartition('.')[2]} {'+'.join(map(str, c['bits']))}" for c in outcome["culprits"]}))
    return f"| {label} | {p:.3g} (seed {outcome['seed']}) | {outcome['faults']}: {shares} | {culprits} | {bits} | {outcome['culprits_score']:.3g} |"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", choices=sorted(MODELS), default="demo")
    parser.add_argument("--storages", help="comma-separated storage items (default: the model's quantized storages)")
    parser.add_argument("--seeds", type=int, default=3, help="seeds to try, in order, for a map that breaks the model")
    parser.add_argument("--limit", type=int, help="documents per task: the robustness sweep's own --limit (default: all)")
    parser.add_argument("--out", type=Path, help="the robustness sweep's --out, read and written (default: docs/storage/MODEL)")
    args = parser.parse_args()
    model_args, task, _ = MODELS[args.model]
    folder = args.out or ROOT / "docs" / "storage" / args.model
    curves = json.loads((folder / "curves.json").read_text())
    (folder / "culprits").mkdir(exist_ok=True)
    saved = folder / "culprits" / "outcomes.json"
    outcomes = json.loads(saved.read_text()) if saved.is_file() else {}  # the storages not run this time keep their rows
    for item in (args.storages or STORAGES[args.model]).split(","):
        label, fault_args = storage_args(item)
        p = breaking_rate(curves[label]) if label in curves else None
        if p is None:
            sys.exit(f"{label}: no point of {folder / 'curves.json'} scores below half its clean score; run storage_robustness.py first")
        name = item_slug(item)
        outcome = bisect_storage(model_args, task, f"{fault_args},p={p:.6g}", folder / "culprits" / name, args.seeds, args.limit)
        outcomes[label] = {"p": p, "outcome": outcome}
        saved.write_text(json.dumps(outcomes, indent=1))
    order = list(curves)
    rows = [table_row(label, row["p"], row["outcome"]) for label, row in sorted(outcomes.items(), key=lambda item: order.index(item[0]))]
    header = [
        "| storage | p (where it breaks) | faults in the map, by field | culprits, by field | culprits' bits (field bit) | culprits alone score |",
        "|---|---|---|---|---|---|",
    ]
    (folder / "culprits.md").write_text("\n".join(header + rows) + "\n")
    print("\n".join(header + rows))


if __name__ == "__main__":
    main()
