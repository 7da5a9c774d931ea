"""Injection and restore time vs a dense per-bit mask (the UCLA study's method) and a plain copy.

    python bench/bench_injection.py                     # ~160M-parameter float32 Llama built from a config
    python bench/bench_injection.py --size small        # a 20M-parameter model, for a quick look
    python bench/bench_injection.py --size 1b --p 1e-9,1e-7,1e-6,1e-5 --no-dense   # TinyLlama-1.1B's shape
    python bench/bench_injection.py --path numpy,torch  # the host (numpy) path beside the device (torch) path

Everything is measured side by side in one process, so the ratios hold on a noisy machine:
- ours: `inject(model, p=...)` over all weights (all 32 bits), then `restore()`, by each path of
  `--path`: `numpy` (the host path, `LM_EVAL_FAULTS_DEVICE_PATH=never`) and `torch` (the device
  path run on the CPU, `=always`); every path's report must equal the first's, and its fault map
  too where the map is small enough to compare (under 10M faults);
- dense: for every bit position a Bernoulli(p) mask over the whole tensor, XOR-ed in (what a
  dropout-mask simulator such as the study's PyTEI extension does);
- copy: one `copy_` of every parameter into a preallocated buffer: the memory-bandwidth floor
  of any method that touches every weight.
Prints medians over repeats (copy, then each path's inject and restore, interleaved) and the
ratios ours/copy and dense/ours.
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import time

import torch
from lm_eval_faults import inject
from lm_eval_faults.core.faults.device import DEVICE_PATH_ENV
from transformers import LlamaConfig, LlamaForCausalLM

P_VALUES = (1e-9, 1e-7, 1e-5, 1e-3, 1e-1)
PATHS = {"numpy": "never", "torch": "always"}
"""`--path` names and the `LM_EVAL_FAULTS_DEVICE_PATH` value that selects each."""
MAP_CHECK_LIMIT = 10_000_000
"""Fault maps up to this many faults are compared between paths (a bigger one costs gigabytes)."""


CONFIGS = {
    "small": dict(vocab_size=8000, hidden_size=512, intermediate_size=1376, num_hidden_layers=4, num_attention_heads=8),
    "default": dict(vocab_size=32000, hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12),
    "1b": dict(
        vocab_size=32000, hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32, num_key_value_heads=4
    ),
}
"""Model shapes: 20.8M, 162.4M (111 tensors) and TinyLlama-1.1B's 1.1B (201 tensors) parameters."""


def build_model(size: str) -> LlamaForCausalLM:
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(**CONFIGS[size])).float().eval()


def median_seconds(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def plain_copy(params: list[torch.Tensor], buffers: list[torch.Tensor]) -> None:
    for param, buffer in zip(params, buffers, strict=True):
        buffer.copy_(param)


def dense_bitflip(params: list[torch.Tensor], p: float, generator: torch.Generator) -> None:
    """One Bernoulli(p) mask per bit of every element, XOR-ed in: O(model size x 32)."""
    for param in params:
        words = param.view(torch.int32)
        mask = torch.zeros_like(words)
        for bit in range(32):
            hit = torch.rand(words.shape, generator=generator) < p
            mask |= hit.to(torch.int32) << bit
        words ^= mask


def same_faults(a, b, compare_map: bool) -> bool:
    """Whether two injections wrote the same faults: the same report, and the same map if asked."""
    if a.report.weights != b.report.weights:
        return False
    if not compare_map:
        return True
    map_a, map_b = a.fault_map(), b.fault_map()
    return map_a.params == map_b.params and all(
        (getattr(map_a, name) == getattr(map_b, name)).all() for name in ("param", "index", "old", "new")
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", choices=list(CONFIGS), default="default")
    parser.add_argument("--p", type=lambda text: [float(v) for v in text.split(",")], default=list(P_VALUES))
    parser.add_argument("--path", type=lambda text: text.split(","), default=["numpy"], help="comma-separated: numpy, torch")
    parser.add_argument("--no-dense", action="store_true", help="skip the dense reference (slow on big models)")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    unknown = sorted(set(args.path) - set(PATHS))
    if unknown:
        parser.error(f"--path: unknown {', '.join(unknown)}; choose from {', '.join(PATHS)}")
    model = build_model(args.size)
    params = [param.data for param in model.parameters()]
    n = sum(param.numel() for param in params)
    print(
        f"model: {n / 1e6:.1f}M float32 parameters in {len(params)} tensors, {n * 32 / 1e9:.2f}G bits; torch threads: {torch.get_num_threads()}"
    )
    buffers = [torch.empty_like(param) for param in params]
    print(
        f"{'p':>8}{'path':>7}{'faults':>14}{'copy ms':>10}{'inject ms':>12}{'restore ms':>12}{'inject/copy':>13}{'restore/copy':>14}"
        f"{'dense ms':>12}{'dense/ours':>12}{'same':>6}"
    )
    generator = torch.Generator().manual_seed(0)
    for p in args.p:
        state: dict = {}

        def run_inject(path: str, p: float = p, state: dict = state) -> None:  # defaults bind this iteration's values
            os.environ[DEVICE_PATH_ENV] = PATHS[path]
            state[path] = inject(model, p=p, seed=1)

        def run_restore(path: str, state: dict = state) -> None:
            state[path].restore()

        # Copy, then each path's inject and restore take turns, so each ratio compares like with
        # like: every injection starts, like one in a sweep, from caches that a pass over the
        # weights flushed.
        copy_times: list[float] = []
        inject_times: dict[str, list[float]] = {path: [] for path in args.path}
        restore_times: dict[str, list[float]] = {path: [] for path in args.path}
        for _ in range(args.repeats):
            copy_times.append(median_seconds(lambda: plain_copy(params, buffers), 1))
            for path in args.path:
                inject_times[path].append(median_seconds(lambda path=path: run_inject(path), 1))
                restore_times[path].append(median_seconds(lambda path=path: run_restore(path), 1))
        copy_s = statistics.median(copy_times)
        dense_s = math.nan
        if not args.no_dense:
            snapshot = [param.clone() for param in params]
            dense_s = median_seconds(lambda p=p: dense_bitflip(params, p, generator), 1)
            for param, original in zip(params, snapshot, strict=True):
                param.copy_(original)
            del snapshot
        reference = state[args.path[0]]
        compare_map = reference.report.totals()["hit_elements"] <= MAP_CHECK_LIMIT
        for path in args.path:
            inject_s, restore_s = statistics.median(inject_times[path]), statistics.median(restore_times[path])
            faults = state[path].report.totals()["flipped_bits"]
            same = "yes" if same_faults(state[path], reference, compare_map) else "NO"
            print(
                f"{p:>8.0e}{path:>7}{int(faults):>14,}{copy_s * 1e3:>10.1f}{inject_s * 1e3:>12.2f}{restore_s * 1e3:>12.2f}"
                f"{inject_s / copy_s:>13.4f}{restore_s / copy_s:>14.4f}{dense_s * 1e3:>12.0f}{dense_s / inject_s:>12.1f}{same:>6}"
            )
        state.clear()


if __name__ == "__main__":
    main()
