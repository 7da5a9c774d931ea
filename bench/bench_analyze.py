"""`analyze` time against one read of all weights (a copy), side by side in one process.

    python bench/bench_analyze.py                       # SmolLM2-135M-Instruct from ../shared (float32), p=1e-6
    python bench/bench_analyze.py --dtype bfloat16      # the same weights stored as bfloat16
    python bench/bench_analyze.py --model default       # a 162M-parameter float32 Llama built from a config
    python bench/bench_analyze.py --spec p=1e-6,bits=exponent --threshold 1023.9999999999999

What is timed, taking turns so each ratio compares like with like:
- copy: `copy_` of every parameter into a preallocated buffer, the memory-bandwidth floor of
  anything that reads every weight (what bench_injection.py compares against);
- clone: `clone()` of every parameter, a read plus fresh memory, as `torch.cat` or a state-dict
  copy would do;
- analyze: `analyze(model, spec)`, the whole analysis past loading (pass over the words, keys,
  expectations, per-site records).
Prints medians over repeats and the ratios analyze/copy and analyze/clone.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch
from lm_eval_faults.core.analysis.exact import analyze
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

SMOLLM = Path(__file__).resolve().parents[2] / "shared" / "models" / "smollm2-135m-instruct"
GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"

CONFIGS = {
    "small": dict(vocab_size=8000, hidden_size=512, intermediate_size=1376, num_hidden_layers=4, num_attention_heads=8),
    "default": dict(vocab_size=32000, hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12),
}
"""Randomly initialised Llamas (20.8M and 162.4M parameters): every float32 mantissa distinct,
unlike SmolLM2's weights, which are dequantized from 4-bit blocks and hold few distinct values."""


def load(name: str, dtype: torch.dtype) -> torch.nn.Module:
    if name == "smollm2":
        return AutoModelForCausalLM.from_pretrained(SMOLLM, gguf_file=GGUF, dtype=dtype).eval()
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(**CONFIGS[name])).to(dtype).eval()


def seconds(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=["smollm2", *CONFIGS], default="smollm2")
    parser.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32")
    parser.add_argument("--spec", default="p=1e-6")
    parser.add_argument("--threshold", type=float, default=None)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    model = load(args.model, getattr(torch, args.dtype))
    params = [param.data for param in model.parameters()]
    n = sum(param.numel() for param in params)
    print(f"model: {args.model}, {n / 1e6:.1f}M {args.dtype} parameters in {len(params)} tensors; torch threads: {torch.get_num_threads()}")
    print(f"analyze(model, {args.spec!r}, threshold={args.threshold})")
    buffers = [torch.empty_like(param) for param in params]

    def copy() -> None:
        for param, buffer in zip(params, buffers, strict=True):
            buffer.copy_(param)

    def clone() -> list[torch.Tensor]:
        return [param.clone() for param in params]

    def run() -> object:
        return analyze(model, args.spec, threshold=args.threshold)

    run()  # caches and allocator warm, as in a sweep of many specs
    times: dict[str, list[float]] = {"copy": [], "clone": [], "analyze": []}
    for _ in range(args.repeats):
        times["copy"].append(seconds(copy))
        times["clone"].append(seconds(clone))
        times["analyze"].append(seconds(run))
    copy_s, clone_s, analyze_s = (statistics.median(times[name]) for name in ("copy", "clone", "analyze"))
    print(f"{'copy ms':>10}{'clone ms':>10}{'analyze ms':>12}{'ns/param':>10}{'analyze/copy':>14}{'analyze/clone':>15}")
    print(
        f"{copy_s * 1e3:>10.1f}{clone_s * 1e3:>10.1f}{analyze_s * 1e3:>12.1f}{analyze_s / n * 1e9:>10.2f}"
        f"{analyze_s / copy_s:>14.2f}{analyze_s / clone_s:>15.2f}"
    )


if __name__ == "__main__":
    main()
