"""Simulated storage: inject and restore with `storage=` beside the float path and a plain copy.

    python bench/bench_storage.py                  # the ~160M-parameter float32 Llama of bench_injection
    python bench/bench_storage.py --size small     # a 20M-parameter model, for a quick look

Measured side by side in one process, so the ratios hold on a noisy machine. For each storage
(`none` is the float path) and p: the median time of `inject(model, p=..., storage=...)` plus
`restore()` over all weights, and `copy`: one `copy_` of every parameter (the bandwidth floor of
anything that touches every weight). The first injection of a storage encodes the model (once
per load, reused by every later point: printed apart); each later one installs the decoded form
(one copy of every selected weight), faults the stored words, re-decodes only the blocks they
hit, and restores (the undo log, then one copy back to float).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from bench_injection import build_model, median_seconds
from lm_eval_faults import inject

STORAGES = ("none", "int4", "q4_1")
GROUPS = {"int4": 32}
"""int4 in groups of 32: every bench shape's rows divide by it (the small shape's 1376 not by 128)."""
P_VALUES = (1e-9, 1e-7, 1e-5)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", default="default", choices=("small", "default", "1b"))
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(1)
    model = build_model(args.size)
    params = [p for p in model.parameters()]
    buffers = [torch.empty_like(p) for p in params]
    weights = sum(p.numel() for p in params)

    def copy() -> None:
        with torch.no_grad():
            for buffer, param in zip(buffers, params, strict=True):
                buffer.copy_(param)

    copy_s = median_seconds(copy, args.repeats)
    print(f"model: {weights / 1e6:.1f}M weights; copy of every parameter: {copy_s * 1e3:.1f} ms")
    print(f"{'storage':>8} {'p':>8} {'inject+restore':>15} {'/copy':>7} {'faults':>10}")
    for storage in STORAGES:
        fields: dict[str, str | int] = (
            {} if storage == "none" else {"storage": storage, **({"group_size": GROUPS[storage]} if storage in GROUPS else {})}
        )
        if fields:
            start = time.perf_counter()
            inject(model, p=0, **fields).restore()  # encodes every weight once
            print(f"{storage:>8} encode once: {time.perf_counter() - start:.2f} s")
        for p in P_VALUES:
            counts: list[float] = []
            seconds = median_seconds(lambda p=p, fields=fields, counts=counts: _inject_and_restore(model, p, fields, counts), args.repeats)
            print(f"{storage:>8} {p:>8.0e} {seconds * 1e3:>12.1f} ms {seconds / copy_s:>7.2f} {statistics.median(counts):>10.0f}")


def _inject_and_restore(model: torch.nn.Module, p: float, fields: dict[str, str | int], counts: list[float]) -> None:
    """One point: inject (a fresh seed each time), note the words changed, restore."""
    with inject(model, p=p, seed=len(counts), **fields) as faults:
        counts.append(faults.report.totals()["changed_elements"])


if __name__ == "__main__":
    main()
