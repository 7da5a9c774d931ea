"""What the culprit faults of several bisections have in common: bit positions, magnitudes, components.

Reads every `*.json` written by `lm-eval-faults bisect --json` in a directory and writes, beside
them, `culprits.md` (one row per culprit, then counts per bit position and component) and
`culprits.png` (bit positions of culprits against all faulted bits; |old| -> |new| per culprit).

    python scripts/culprit_stats.py docs/bisection
"""

from __future__ import annotations

import argparse
import json
import math
from collections import Counter
from pathlib import Path

import numpy as np


def load_runs(directory: Path) -> list[tuple[str, dict]]:
    return [(path.stem, json.loads(path.read_text())) for path in sorted(directory.glob("*.json"))]


def table(runs: list[tuple[str, dict]]) -> str:
    lines = [
        "| run | faults | evaluations | clean | all faults | culprits only | all but culprits | residue costs | culprits explain |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name, run in runs:
        clean = run["clean_score"]
        residue = (clean - run["rest_score"]) / clean  # what `Bisection.residue_cost` and `.explained` give
        explained = (clean - run["culprits_score"]) / (clean - run["full_score"])
        lines.append(
            f"| {name} | {run['faults']} | {run['evaluations']} | {clean:.3g} | {run['full_score']:.3g} "
            f"| {run['culprits_score']:.3g} | {run['rest_score']:.3g} | {residue:.0%} | {explained:.0%} |"
        )
    lines += ["", "| run | component | layer | parameter[index] | bits | old -> new | score alone |", "|---|---|---|---|---|---|---|"]
    for name, run in runs:
        for c in run["culprits"]:
            lines.append(
                f"| {name} | {c['component']} | {c['layer']} | {c['param']}[{c['index']}] | {c['bits']} "
                f"| {c['old_value']:.4g} -> {c['new_value']:.4g} | {c['score_alone']:.3g} |"
            )
    culprits = [c for _, run in runs for c in run["culprits"]]
    bits = Counter(bit for c in culprits for bit in c["bits"])
    components = Counter(c["component"] for c in culprits)
    lines += [
        "",
        f"{len(culprits)} culprits in {len(runs)} runs. Bit positions: "
        + ", ".join(f"{bit}: {n}" for bit, n in sorted(bits.items()))
        + ". Components: "
        + ", ".join(f"{name}: {n}" for name, n in components.most_common())
        + ".",
    ]
    return "\n".join(lines) + "\n"


def figure(directory: Path, runs: list[tuple[str, dict]]) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    culprits = [c for _, run in runs for c in run["culprits"]]
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    positions = Counter(bit for c in culprits for bit in c["bits"])
    everything = np.sum([run["fault_bits"] for _, run in runs], axis=0)
    left.bar(np.arange(len(everything)) - 0.2, everything / everything.sum(), width=0.4, color="0.6", label="all faults")
    left.bar(
        np.array(list(positions)) + 0.2, np.array(list(positions.values())) / len(culprits), width=0.4, color="tab:red", label="culprits"
    )
    left.set_xlabel("bit position (31 = sign, 30-23 = exponent, 22-0 = mantissa in float32)")
    left.set_ylabel("share of flipped bits")
    left.legend()
    left.set_xlim(-1, 32)
    left.set_title("Where the culprits' flipped bits sit")
    old = [max(abs(c["old_value"]), 1e-12) for c in culprits]
    new = [abs(c["new_value"]) if math.isfinite(c["new_value"]) else 3.4e38 for c in culprits]
    right.scatter(old, [max(value, 1e-12) for value in new], color="tab:red")
    right.set_xscale("log")
    right.set_yscale("log")
    right.set_xlabel("|weight| before the fault")
    right.set_ylabel("|weight| after the fault (Inf/NaN drawn at 3.4e38)")
    right.set_title("Culprits turn small weights into huge ones")
    fig.tight_layout()
    path = directory / "culprits.png"
    fig.savefig(path, dpi=110)
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("directory", type=Path)
    directory = parser.parse_args().directory
    runs = load_runs(directory)
    if not runs:
        raise SystemExit(f"culprit_stats: no bisect JSON files in {directory}")
    (directory / "culprits.md").write_text(table(runs))
    print(f"culprit_stats: {directory / 'culprits.md'}, {figure(directory, runs)}")


if __name__ == "__main__":
    main()
