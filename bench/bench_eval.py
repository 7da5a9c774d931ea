"""Eval time and peak memory of `faulty_hf` (p=0 and p=1e-5) against lm-eval's own `hf`.

    python bench/bench_eval.py [--repeats 3] [--model DIR] [--tasks faults_demo] [--storages "int4,group_size=32;q4_1"]

Each configuration is one whole `lm_eval` process; the three run in turn (A B C A B C ...) so
machine drift hits all alike, and each process's peak RSS comes from the kernel (`wait4`).
Prints medians and the ratios to `hf`. `--storages` adds `faulty_hf` at p=0 under each storage
(";"-separated `storage=` values with their keys): the model computes with the decoded stored
form, so this is the cost of encoding it once and holding its fields beside the float weights. Default model: SmolLM2-135M-Instruct from ../shared/models
(converted once from GGUF to safetensors in a temporary directory), else the embedded demo model.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

SMOLLM = Path(__file__).resolve().parents[2] / "shared" / "models" / "smollm2-135m-instruct"
GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def prepare_model(model: str | None, workdir: Path) -> str:
    if model:
        return model
    if (SMOLLM / GGUF).is_file():
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        target = workdir / "smollm2"
        # A GGUF-loaded model refuses save_pretrained; copy its dequantized weights into a plain one.
        loaded = AutoModelForCausalLM.from_pretrained(SMOLLM, gguf_file=GGUF, dtype=torch.float32)
        plain = AutoModelForCausalLM.from_config(loaded.config, dtype=torch.float32)
        plain.load_state_dict(loaded.state_dict())
        if hasattr(plain.config, "quantization_config"):
            del plain.config.quantization_config  # the GGUF loading options, meaningless now
        plain.save_pretrained(target)
        AutoTokenizer.from_pretrained(SMOLLM, gguf_file=GGUF).save_pretrained(target)
        return str(target)
    from lm_eval_faults.harness.package_data import demo_model_dir

    return str(demo_model_dir())


def run_once(command: list[str]) -> tuple[float, float]:
    """Wall seconds and peak RSS (MiB) of one whole process."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    start = time.perf_counter()
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    _, status, usage = os.wait4(process.pid, 0)
    wall = time.perf_counter() - start
    if os.waitstatus_to_exitcode(status) != 0:
        raise RuntimeError(f"failed: {' '.join(command)}")
    return wall, usage.ru_maxrss / 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--model", default=None)
    parser.add_argument("--tasks", default="faults_demo")
    parser.add_argument("--batch_size", default="16")
    parser.add_argument("--storages", default="", help='e.g. "int4,group_size=32;q4_1": faulty_hf at p=0 under each')
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as workdir:
        model = prepare_model(args.model, Path(workdir))
        base = ["lm_eval", "--tasks", args.tasks, "--device", "cpu", "--batch_size", args.batch_size]
        configs = {
            "hf": [*base, "--model", "hf", "--model_args", f"pretrained={model}"],
            "faulty_hf p=0": [*base, "--model", "faulty_hf", "--model_args", f"pretrained={model},p=0"],
            "faulty_hf p=1e-5": [*base, "--model", "faulty_hf", "--model_args", f"pretrained={model},p=1e-5"],
        }
        for storage in filter(None, (item.strip() for item in args.storages.split(";"))):
            configs[f"storage={storage} p=0"] = [*base, "--model", "faulty_hf", "--model_args", f"pretrained={model},p=0,storage={storage}"]
        print(f"model: {model}; tasks: {args.tasks}; {args.repeats} runs each, interleaved")
        samples: dict[str, list[tuple[float, float]]] = {name: [] for name in configs}
        for _ in range(args.repeats):
            for name, command in configs.items():
                samples[name].append(run_once(command))
    reference_wall = statistics.median(w for w, _ in samples["hf"])
    reference_rss = statistics.median(r for _, r in samples["hf"])
    width = max(20, *(len(name) + 2 for name in samples))
    print(f"{'config':<{width}}{'wall s (median)':>16}{'peak RSS MiB':>14}{'wall / hf':>11}{'RSS / hf':>10}")
    for name, runs in samples.items():
        wall = statistics.median(w for w, _ in runs)
        rss = statistics.median(r for _, r in runs)
        print(f"{name:<{width}}{wall:>16.2f}{rss:>14.0f}{wall / reference_wall:>11.3f}{rss / reference_rss:>10.3f}")


if __name__ == "__main__":
    main()
