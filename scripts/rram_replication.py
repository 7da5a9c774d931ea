"""The RRAM study's experiment on SmolLM2-135M-Instruct (bfloat16): greedy answers under rising fault rates.

    python scripts/rram_replication.py                 # writes docs/generation/ (resumes from its JSON)

The study faulted every module output of Gemma-7b-it (bfloat16) and watched the answer to "Could you
please explain Quantum Gravity to me?" turn from a few misplaced tokens (about 5e-8) to gibberish
(5e-7). Here: the same prompt and four others, in the chat template, greedy, 48 new tokens, for
p from 1e-9 to 1e-5 on three sites: every module output (`site=activations,act_scope=all`, the
study's), the KV cache (`site=kv_cache`), and the weights. Per (site, p, prompt): the first
divergent token, the failure class, the perplexity ratio, and the scripts of the tokens after the
divergence; against the scripts of the whole vocabulary. Also the study's first check: the clean
greedy text equals plain `generate` (`hf`), and p=0 under `inject` equals it too.

Outputs in --out: results.json (resumable), one side-by-side page per site, figures, and tables.md.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
from collections import Counter
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import torch
from lm_eval_faults.core.spec import to_spec
from lm_eval_faults.study.generation import Generator, PromptResult, compare_prompt
from lm_eval_faults.study.progress import ProgressLine
from lm_eval_faults.study.side_by_side import CLASS_COLOURS, FaultedView, PromptView, side_by_side_page
from lm_eval_faults.study.text_failures import FAILURE_CLASSES
from lm_eval_faults.study.token_scripts import script_shares, token_script
from transformers import AutoModelForCausalLM, AutoTokenizer

ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("LM_EVAL_FAULTS_SHARED") or ROOT.parent / "shared")
MODEL_DIR = SHARED / "models" / "smollm2-135m-instruct"
GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
PROMPTS = [
    "Could you please explain Quantum Gravity to me?",
    "What is the capital of France?",
    "Write a short poem about the sea.",
    "How do I boil an egg?",
    "Name three primary colors.",
]
SITES = {
    "activations": "site=activations,act_scope=all",
    "kv_cache": "site=kv_cache",
    "weights": "site=weights",
}
RATES = [1e-9, 3.16e-9, 1e-8, 3.16e-8, 1e-7, 3.16e-7, 1e-6, 3.16e-6, 1e-5]
STUDY_MARKS = {"misplaced tokens (study)": 5e-8, "gibberish (study)": 5e-7}


def load(dtype: torch.dtype) -> tuple[Any, Any]:
    model = AutoModelForCausalLM.from_pretrained(MODEL_DIR, gguf_file=GGUF, dtype=dtype).eval()
    return model, AutoTokenizer.from_pretrained(MODEL_DIR, gguf_file=GGUF)


def clean_checks(generator: Generator) -> dict[str, bool]:
    """The study's first check: the clean text is plain `generate`'s, and p=0 under inject is too."""
    ids = generator.encode(PROMPTS[0])
    plain = generator.model.generate(
        torch.tensor([ids]),
        attention_mask=torch.ones(1, len(ids), dtype=torch.long),
        max_new_tokens=generator.max_new_tokens,
        do_sample=False,
    )[0, len(ids) :].tolist()
    eos = generator.tokenizer.eos_token_id
    plain = plain[: plain.index(eos)] if eos in plain else plain
    ours, _, _ = generator.generate(ids)
    at_zero, _, _ = generator.generate(ids, to_spec("p=0,site=activations,act_scope=all"))
    return {"clean_equals_hf_generate": ours.tokens == plain, "p0_equals_hf_generate": at_zero.tokens == plain}


def run(generator: Generator, results_path: Path) -> dict[str, Any]:
    data: dict[str, Any] = json.loads(results_path.read_text()) if results_path.exists() else {}
    data.setdefault("checks", clean_checks(generator))
    runs = data.setdefault("runs", {})
    todo = [(site, p) for site in SITES for p in RATES if f"{site}@{p:g}" not in runs]
    with ProgressLine("rram replication", len(todo) * len(PROMPTS), unit="generations") as line:
        for site, p in todo:
            spec = to_spec(f"p={p:g},{SITES[site]},seed=0")
            prompts = [compare_prompt(generator, prompt, [(f"p={p:g}", spec)], progress=lambda: line.advance("")) for prompt in PROMPTS]
            runs[f"{site}@{p:g}"] = [_record(generator, result) for result in prompts]
            results_path.write_text(json.dumps(data, indent=1) + "\n")
    return data


def _record(generator: Generator, result: PromptResult) -> dict[str, Any]:
    item = result.faulted[0]
    start = item.first_divergence
    substituted = [] if start is None else item.generated.tokens[start:]
    return {
        "prompt": result.prompt,
        "clean": result.clean.pieces,
        "clean_tokens": result.clean.tokens,
        "faulted": item.generated.pieces,
        "failure": item.failure,
        "first_divergence": start,
        "clean_gap": item.clean_gap,
        "perplexity_ratio": item.perplexity_ratio,
        "faults": item.faults,
        "substituted_scripts": [token_script(generator.tokenizer.decode([token])) for token in substituted],
    }


def vocabulary_scripts(tokenizer: Any) -> dict[str, float]:
    return script_shares(tokenizer.decode([token]) for token in range(len(tokenizer)))


def pages(data: dict[str, Any], out: Path) -> None:
    for site in SITES:
        views = []
        for number, prompt in enumerate(PROMPTS, 1):
            faulted = []
            for p in RATES:
                record = data["runs"][f"{site}@{p:g}"][number - 1]
                figures = {
                    "diverges at token": "-" if record["first_divergence"] is None else str(record["first_divergence"]),
                    "perplexity ratio": _fmt(record["perplexity_ratio"]),
                    "faults": f"{sum(v for k, v in record['faults'].items() if k.endswith('_hit')):,}",
                }
                divergence = record["first_divergence"]
                faulted.append(FaultedView(f"p={p:g}", record["faulted"], divergence, divergence, record["failure"], figures))
            clean = data["runs"][f"{site}@{RATES[0]:g}"][number - 1]["clean"]
            views.append(PromptView(f"prompt {number}", prompt, clean, faulted))
        title = f"SmolLM2-135M-Instruct (bfloat16), {SITES[site]}: clean and faulted answers, p = 1e-9 to 1e-5"
        (out / f"{site}.html").write_text(side_by_side_page(title, views), encoding="utf-8")


def _fmt(value: float | None) -> str:
    return "-" if value is None else ("inf" if math.isinf(value) else f"{value:.3g}")


def figures(data: dict[str, Any], out: Path) -> None:
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    for site, marker in zip(SITES, "osd", strict=True):
        divergence, ratio = [], []
        for p in RATES:
            records = data["runs"][f"{site}@{p:g}"]
            positions = [r["first_divergence"] if r["first_divergence"] is not None else 48 for r in records]
            divergence.append(statistics.median(positions))
            ratios = [min(r["perplexity_ratio"], 1e8) for r in records]
            ratio.append(statistics.median(ratios))
        axes[0].plot(RATES, divergence, marker=marker, label=site)
        axes[1].plot(RATES, ratio, marker=marker, label=site)
    axes[0].set(xscale="log", xlabel="p (per bit)", ylabel="first divergent token (median of 5 prompts; 48 = none)")
    axes[1].set(xscale="log", yscale="log", xlabel="p (per bit)", ylabel="perplexity ratio to clean (median; capped at 1e8)")
    for ax in axes[:2]:
        for label, value in STUDY_MARKS.items():
            ax.axvline(value, color="grey", linestyle=":" if "misplaced" in label else "--", linewidth=1, label=label)
        ax.legend(fontsize=8)
    width = 0.28
    for offset, site in enumerate(SITES):
        bottoms = [0.0] * len(RATES)
        for failure in FAILURE_CLASSES:
            counts = [sum(r["failure"] == failure for r in data["runs"][f"{site}@{p:g}"]) for p in RATES]
            xs = [i + (offset - 1) * width for i in range(len(RATES))]
            axes[2].bar(xs, counts, width, bottom=bottoms, color=CLASS_COLOURS[failure], label=failure if offset == 0 else None)
            bottoms = [b + c for b, c in zip(bottoms, counts, strict=True)]
    axes[2].set_xticks(range(len(RATES)), [f"{p:.0e}" for p in RATES], rotation=45, fontsize=8)
    axes[2].set(ylabel="prompts (bars: activations, kv_cache, weights)", xlabel="p (per bit)")
    axes[2].legend(fontsize=8)
    fig.suptitle("SmolLM2-135M-Instruct, bfloat16, greedy: when the answer changes and how it fails")
    fig.tight_layout()
    fig.savefig(out / "degradation.png", dpi=110)
    plt.close(fig)


def tables(data: dict[str, Any], vocabulary: dict[str, float], out: Path) -> None:
    lines = [
        "| site | p | " + " | ".join(FAILURE_CLASSES) + " | median first divergence | median perplexity ratio |",
        "|---|---|" + "---|" * (len(FAILURE_CLASSES) + 2),
    ]
    for site in SITES:
        for p in RATES:
            records = data["runs"][f"{site}@{p:g}"]
            counts = Counter(r["failure"] for r in records)
            positions = [r["first_divergence"] for r in records if r["first_divergence"] is not None]
            median = statistics.median(positions) if positions else None
            ratio = statistics.median(r["perplexity_ratio"] for r in records)
            cells = " | ".join(str(counts.get(name, 0)) for name in FAILURE_CLASSES)
            lines.append(f"| {site} | {p:g} | {cells} | {'-' if median is None else f'{median:g}'} | {_fmt(ratio)} |")
    substituted: dict[str, Counter[str]] = {site: Counter() for site in SITES}
    for key, records in data["runs"].items():
        site = key.split("@")[0]
        for record in records:
            substituted[site].update(record["substituted_scripts"])
    scripts = sorted(set(vocabulary) | {s for c in substituted.values() for s in c}, key=lambda s: -vocabulary.get(s, 0))
    lines += [
        "",
        "| script | vocabulary | " + " | ".join(f"after divergence ({site})" for site in SITES) + " |",
        "|---|---|" + "---|" * len(SITES),
    ]
    for script in scripts:
        shares = []
        for site in SITES:
            total = sum(substituted[site].values())
            shares.append(f"{100 * substituted[site][script] / total:.1f}%" if total else "-")
        lines.append(f"| {script} | {100 * vocabulary.get(script, 0):.1f}% | " + " | ".join(shares) + " |")
    totals = {site: sum(counter.values()) for site, counter in substituted.items()}
    lines += [
        "",
        "Tokens after the first divergence, all rates and prompts: " + ", ".join(f"{site} {n:,}" for site, n in totals.items()) + ".",
    ]
    lines += ["", "Clean checks: " + ", ".join(f"{name} = {value}" for name, value in data["checks"].items()) + "."]
    (out / "tables.md").write_text("\n".join(lines) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter, allow_abbrev=False)
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "generation", help="output directory (default docs/generation)")
    parser.add_argument("--threads", type=int, default=2, help="torch threads")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    model, tokenizer = load(torch.bfloat16)
    generator = Generator(model, tokenizer, max_new_tokens=48, chat=True)
    data = run(generator, args.out / "results.json")
    vocabulary = vocabulary_scripts(tokenizer)
    pages(data, args.out)
    figures(data, args.out)
    tables(data, vocabulary, args.out)
    print((args.out / "tables.md").read_text())


if __name__ == "__main__":
    main()
