"""Numbers for docs/nan_correction.md: exact NaN/Inf/huge expectations under iid bit flips.

Two models of GPT-2 size, analysed with `lm_eval_faults.core.analysis.exact` from their stored words:
SmolLM2-135M-Instruct (real trained weights, dequantized from its Q4_1 GGUF) and a GPT-2-small
config (GPT2Config defaults, 124M) whose weights are normal draws with SmolLM2's per-component
standard deviation, LayerNorm weights resampled from SmolLM2's norm weights. Each in float32,
float16 and bfloat16, at p = 1e-9, 1e-7, 1e-5, with two "huge" thresholds: max/2 (the default)
and |x| >= 1024. Prints markdown tables; runs in a few minutes on two CPU cores.

    python scripts/nan_correction_numbers.py [--smollm DIR]
"""

from __future__ import annotations

import argparse
import math
import os
import time
from collections import defaultdict
from pathlib import Path

import torch
import transformers
from lm_eval_faults.core.analysis.exact import Expectation, expect, site_risk, word_stats
from lm_eval_faults.core.sites.targets import all_param_sites
from lm_eval_faults.core.spec import FaultSpec

PS = (1e-9, 1e-7, 1e-5)
DTYPES = (torch.float32, torch.float16, torch.bfloat16)
THRESHOLDS = {"max/2": None, ">=1024": math.nextafter(1024.0, 0.0)}
STUDY_N = 1.3e8
REPO = Path(__file__).resolve().parents[1]
DEFAULT_SMOLLM = REPO.parent / "shared" / "models" / "smollm2-135m-instruct"


def shown(path: Path) -> str:
    """The path relative to the repository root where possible (no machine paths in printed records)."""
    try:
        return os.path.relpath(path.resolve(), REPO)
    except ValueError:
        return str(path)


def load_smollm(directory: str) -> torch.nn.Module:
    return transformers.AutoModelForCausalLM.from_pretrained(directory, gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf", dtype=torch.float32)


def component_values(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    groups: dict[str, list[torch.Tensor]] = defaultdict(list)
    for site in all_param_sites(model):
        groups[site.component.split("+")[0]].append(site.param.detach().flatten())
    return {name: torch.cat(values) for name, values in groups.items()}


def gpt2_like(reference: dict[str, torch.Tensor], seed: int = 0) -> torch.nn.Module:
    """GPT-2 small with weights shaped like a trained model's: see the module docstring."""
    model = transformers.GPT2LMHeadModel(transformers.GPT2Config()).eval()
    generator = torch.Generator().manual_seed(seed)
    norm_weights = reference["norm"]
    with torch.no_grad():
        for site in all_param_sites(model):
            component = site.component.split("+")[0]
            if component == "norm" and site.name.endswith("weight"):
                index = torch.randint(len(norm_weights), site.param.shape, generator=generator)
                site.param.copy_(norm_weights[index])
            else:
                std = float(reference[component if component in reference else "mlp"].std())
                site.param.copy_(torch.randn(site.param.shape, generator=generator) * std)
    return model


def analyse(model: torch.nn.Module) -> dict[tuple[str, str, float], Expectation]:
    """(dtype, threshold label, p) -> whole-model expectation, one data pass per dtype and threshold."""
    results = {}
    for dtype in DTYPES:
        converted = model.to(dtype)
        for label, threshold in THRESHOLDS.items():
            totals = {p: Expectation() for p in PS}
            for site in all_param_sites(converted):
                risk, words = site_risk(site, FaultSpec(p=PS[0]), threshold)
                stats = word_stats(words, risk)
                for p in PS:
                    totals[p].add(expect(stats, risk, FaultSpec(p=p)))
            for p in PS:
                results[(str(dtype).removeprefix("torch."), label, p)] = totals[p]
    model.to(torch.float32)
    return results


def describe_values(name: str, values: dict[str, torch.Tensor]) -> None:
    everything = torch.cat(list(values.values()))
    size = everything.abs()
    print(
        f"\n{name}: {everything.numel():,} parameters; |x| >= 2: {int((size >= 2).sum()):,}, "
        f"[1,2): {int(((size >= 1) & (size < 2)).sum()):,}, [0.5,1): {int(((size >= 0.5) & (size < 1)).sum()):,}, "
        f"zero: {int((everything == 0).sum()):,}, largest |x| {float(size.max()):.3g}"
    )
    for component, tensor in values.items():
        print(
            f"  {component}: n={tensor.numel():,} std={float(tensor.std()):.4f} [1,2): {int(((tensor.abs() >= 1) & (tensor.abs() < 2)).sum()):,}"
        )


def print_table(name: str, results: dict[tuple[str, str, float], Expectation]) -> None:
    print(f"\n### {name}\n")
    print("| dtype | p | E[NaN] | E[Inf] | P(>=1 NaN/Inf) | E[huge > max/2] | E[huge >= 1024] | huge share (max/2) | huge share (>=1024) |")
    print("|---|---|---|---|---|---|---|---|---|")
    for dtype in DTYPES:
        key = str(dtype).removeprefix("torch.")
        for p in PS:
            default, large = results[(key, "max/2", p)], results[(key, ">=1024", p)]
            print(
                f"| {key} | {p:.0e} | {default.nan:.3g} | {default.inf:.3g} | {default.p_any_nonfinite:.3g} | "
                f"{default.huge:.3g} | {large.huge:.3g} | {default.huge_share:.2f} | {large.huge_share:.3f} |"
            )


def print_study() -> None:
    print("\n### The study's formula, P(param -> NaN) = p(1-p)^7(1-2^-23), n = 1.3e8\n")
    print("| p | per parameter | E[NaN] = n x that | P(>=1 NaN) |")
    print("|---|---|---|---|")
    for p in PS:
        per = p * (1 - p) ** 7 * (1 - 2.0**-23)
        print(f"| {p:.0e} | {per:.3g} | {STUDY_N * per:.3g} | {-math.expm1(STUDY_N * math.log1p(-per)):.3g} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--smollm",
        default=str(DEFAULT_SMOLLM),
        help="model directory (default: ../shared/models/smollm2-135m-instruct beside the repository)",
    )
    args = parser.parse_args()
    start = time.time()
    print(f"SmolLM2 from {shown(Path(args.smollm))}")
    smollm = load_smollm(args.smollm)
    reference = component_values(smollm)
    describe_values("SmolLM2-135M-Instruct (float32 from Q4_1)", reference)
    gpt2 = gpt2_like(reference)
    describe_values("GPT-2 small, weights drawn like SmolLM2's", component_values(gpt2))
    print_study()
    print_table("SmolLM2-135M-Instruct, real trained weights", analyse(smollm))
    print_table("GPT-2 small (124M), normal weights with SmolLM2's per-component std", analyse(gpt2))
    print(f"\n(computed in {time.time() - start:.0f} s)")


if __name__ == "__main__":
    main()
