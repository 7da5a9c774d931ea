"""Cost of drawing a pattern's faults: O(events), not O(tensor), measured side by side.

    python bench/bench_patterns.py            # 8M float16 words, ~1000 events per draw
    python bench/bench_patterns.py --rounds 9

For each pattern, p is chosen so that a draw holds about `--events` events, and the draw
(`faults.host.draw_faults`: counts, slots, expansion, merging, new words) is timed on a tensor of
N words and on one of 16 N words with the same expected events. Printed: each pattern's time
against iid at the same events (same size), and its time on 16 N against N (flat means O(events)).
Medians over rounds of this process's CPU time; rounds rotate the order, so drift cancels.
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import torch
from lm_eval_faults.core.faults.host import draw_faults
from lm_eval_faults.core.spec import FaultSpec
from lm_eval_faults.core.storage.layouts import layout_of

LAYOUT = layout_of(torch.float16)
BITS = tuple(range(16))
PATTERNS = ("iid", "burst:2", "burst:8", "mcu:4", "row:1024", "column:64:64")


def rate_for(pattern: str, numel: int, events: float) -> float:
    spec = FaultSpec(p=1e-9, pattern=pattern)
    shape = spec.pattern_shape
    slots = numel * 16 if shape is None else int(shape.slots(np.array([numel]), 16, BITS)[0])
    return events / slots


def time_draw(pattern: str, numel: int, events: float, seed: int) -> float:
    spec = FaultSpec(p=rate_for(pattern, numel, events), pattern=pattern, seed=seed)
    keys = np.array([0x1234567 + seed], dtype=np.uint64)
    start = time.process_time()
    batch = draw_faults(np.array([numel]), keys, lambda hits: np.full(len(hits), 0x3C00, dtype=np.int64), spec, LAYOUT, BITS)
    elapsed = time.process_time() - start
    assert len(batch) > 0
    return elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--numel", type=int, default=1 << 23)
    parser.add_argument("--events", type=float, default=1000.0)
    parser.add_argument("--rounds", type=int, default=7)
    args = parser.parse_args()
    sizes = (args.numel, 16 * args.numel)
    times: dict[tuple[str, int], list[float]] = {(p, n): [] for p in PATTERNS for n in sizes}
    for round_ in range(args.rounds):
        order = [(p, n) for p in PATTERNS for n in sizes]
        order = order[round_ % len(order) :] + order[: round_ % len(order)]
        for pattern, numel in order:
            times[pattern, numel].append(time_draw(pattern, numel, args.events, round_))
    iid = statistics.median(times["iid", sizes[0]])
    print(f"{args.events:.0f} expected events per draw; N = {sizes[0]:,} float16 words; medians of {args.rounds} rounds")
    print(f"{'pattern':<14}{'ms at N':>10}{'vs iid':>9}{'16N / N':>10}")
    for pattern in PATTERNS:
        small, large = (statistics.median(times[pattern, n]) for n in sizes)
        print(f"{pattern:<14}{1e3 * small:>10.2f}{small / iid:>9.2f}{large / small:>10.2f}")


if __name__ == "__main__":
    main()
