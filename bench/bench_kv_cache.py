"""Time per decoding step with KV-cache faults against clean decoding, side by side.

    python bench/bench_kv_cache.py                 # SmolLM2-135M (fp32), 1 thread, batch 1, 32 steps
    python bench/bench_kv_cache.py --batch 4 --rounds 9

One process, one loaded model. A configuration is a rate p and a `kv_fault` mode. Each round
visits every configuration in a rotating order: a clean decode, then under `inject(site=kv_cache)`
with the rows declared as `faulty_hf` declares them (`harness.row_keying.generation_rows`), the
same decode. A decode is a prefill of the prompt (untimed) and `--steps` greedy single-token
forwards with a DynamicCache (timed, this process's CPU time). A faulted decode's ratio is to the
mean of the clean decodes just before and after it, so drift on a shared machine cancels; each
figure is a median over rounds. Also printed: the entries written and faults hit per step.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch
from lm_eval_faults import inject
from lm_eval_faults.harness.row_keying import generation_rows
from transformers import AutoModelForCausalLM, DynamicCache

SMOLLM = Path(__file__).resolve().parents[2] / "shared" / "models" / "smollm2-135m-instruct"
GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
PROMPT = "Could you please explain Quantum Gravity to me? Start with what gravity is, then what quantum means."


def decode(model: torch.nn.Module, ids: torch.Tensor, steps: int) -> float:
    """Prefill `ids`, then `steps` greedy single-token forwards: their CPU seconds per step."""
    cache = DynamicCache()
    with torch.no_grad():
        logits = model(ids, cache=cache, use_cache=True).logits
        token = logits[:, -1].argmax(-1, keepdim=True)
        start = time.process_time()
        for _ in range(steps):
            logits = model(token, cache=cache, use_cache=True).logits
            token = logits[:, -1].argmax(-1, keepdim=True)
        return (time.process_time() - start) / steps


def faulted_decode(model: torch.nn.Module, ids: torch.Tensor, steps: int, spec: str) -> tuple[float, dict]:
    with inject(model, spec) as faults, generation_rows(model, [tuple(row) for row in ids.tolist()], faults.next_forward):
        seconds = decode(model, ids, steps)
        part = faults.report.to_dict()["kv_cache"]
    return seconds, part


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter, allow_abbrev=False)
    parser.add_argument("--model-dir", type=Path, default=SMOLLM, help="directory of SmolLM2's GGUF file (../shared/models/...)")
    parser.add_argument("--p", default="1e-9,1e-7,1e-5", help="rates, comma-separated")
    parser.add_argument("--modes", default="write,retention", help="kv_fault modes, comma-separated")
    parser.add_argument("--steps", type=int, default=32, help="decoding steps timed per decode")
    parser.add_argument("--batch", type=int, default=1, help="rows decoded together (copies of the prompt)")
    parser.add_argument("--rounds", type=int, default=7, help="rounds over all configurations (median)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    from transformers import AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(args.model_dir, gguf_file=GGUF, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(args.model_dir, gguf_file=GGUF)
    ids = tokenizer([PROMPT] * args.batch, return_tensors="pt").input_ids
    configs = [(float(p), mode) for mode in args.modes.split(",") for p in args.p.split(",")]
    ratios: dict[tuple[float, str], list[float]] = {config: [] for config in configs}
    faulted: dict[tuple[float, str], list[float]] = {config: [] for config in configs}
    parts: dict[tuple[float, str], dict] = {}
    clean_times: list[float] = []
    decode(model, ids, 4)  # warm-up
    for round_index in range(args.rounds):
        order = configs[round_index % len(configs) :] + configs[: round_index % len(configs)]
        before = decode(model, ids, args.steps)
        clean_times.append(before)
        for config in order:
            p, mode = config
            seconds, parts[config] = faulted_decode(model, ids, args.steps, f"p={p},site=kv_cache,kv_fault={mode},seed={round_index}")
            after = decode(model, ids, args.steps)
            clean_times.append(after)
            ratios[config].append(seconds / ((before + after) / 2))
            faulted[config].append(seconds)
            before = after
    clean_ms = 1e3 * statistics.median(clean_times)
    print(
        f"SmolLM2-135M fp32, batch {args.batch}, prompt {ids.shape[1]} tokens, {args.steps} steps, {args.threads} thread(s), "
        f"{args.rounds} rounds; clean decoding {clean_ms:.2f} ms/step (CPU time)"
    )
    print("| kv_fault | p | faulted ms/step | ratio | overhead | entries written/step | faults/step |")
    print("|---|---|---|---|---|---|---|")
    for config in configs:
        p, mode = config
        part = parts[config]
        written = sum(row["written"] for row in part["entries"].values()) / (args.steps + 1)
        hits = part["totals"]["hit_elements"] / (args.steps + 1)
        ratio = statistics.median(ratios[config])
        print(
            f"| {mode} | {p:g} | {1e3 * statistics.median(faulted[config]):.2f} | {ratio:.3f} | {100 * (ratio - 1):+.1f}% | "
            f"{written:,.0f} | {hits:.3g} |"
        )


if __name__ == "__main__":
    main()
