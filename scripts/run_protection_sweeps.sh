#!/usr/bin/env bash
# What protection buys (issue 13): every scheme on the same fault maps, tolerated p against storage
# overhead. SmolLM2-135M-Instruct (../shared/models, GGUF -> float32) on faults_facts (clean acc 1.0)
# under bit flips and value errors on all weights, and the demo model on faults_demo.
# Reports and Pareto charts under docs/protection/.
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 OMP_NUM_THREADS=1
SHARED=../shared  # relative to the repository root, so sweep.json records no machine path
SMOL="pretrained=$SHARED/models/smollm2-135m-instruct,gguf_file=SmolLM2-135M-Instruct.Q4_1.gguf,dtype=float32"
BIT_SCHEMES="none;clamp=weights;clamp=activations;protect=norm+lm_head+embedding;protect_bits=exponent_msb;protect_bits=exponent_msb,clamp=weights;ecc=parity;protect_bits=exponent;protect_bits=sign+exponent;ecc=secded;ecc=secded,ecc_policy=keep"
VALUE_SCHEMES="none;clamp=weights;protect=norm+lm_head+embedding;protect_bits=exponent_msb;ecc=parity;protect_bits=sign+exponent;ecc=secded"
smol=(--model_args "$SMOL" --tasks faults_facts --device cpu --batch_size 32 --no_progress)
lm-eval-faults sweep "${smol[@]}" --faults bitflip --protections "$BIT_SCHEMES" --p 1e-9:1e-3:13 --seeds 2 \
    --run_dir docs/protection/smollm2_facts_bitflip
lm-eval-faults sweep --tasks faults_demo --device cpu --batch_size 32 --no_progress --faults bitflip --protections "$BIT_SCHEMES" \
    --p 1e-7:1e-2:11 --seeds 2 --run_dir docs/protection/demo_bitflip
lm-eval-faults sweep "${smol[@]}" --faults value --protections "$VALUE_SCHEMES" --p 1e-7:1e-1:13 --seeds 2 \
    --run_dir docs/protection/smollm2_facts_value
