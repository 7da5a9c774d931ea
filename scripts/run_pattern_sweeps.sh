#!/usr/bin/env bash
# Codes against the faults memory really has (issue 23): every scheme under iid flips, bursts of
# 2, 4 and 8 bits, and failing 1 KiB rows, on the same fault maps per pattern. SmolLM2-135M-Instruct
# (../shared/models, GGUF -> float32) on faults_facts, and the demo model on faults_demo; one rate
# per decade and one seed: about an hour on 2 CPU cores (the demo's runs take 5 minutes of it).
# Reports and Pareto charts under docs/patterns/; docs/patterns/README.md reads them.
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 OMP_NUM_THREADS=1
SHARED=../shared  # relative to the repository root, so sweep.json records no machine path
SMOL="pretrained=$SHARED/models/smollm2-135m-instruct,gguf_file=SmolLM2-135M-Instruct.Q4_1.gguf,dtype=float32"
SCHEMES="none;protect_bits=exponent_msb;clamp=weights;ecc=parity;ecc=secded;ecc=secded,interleave=8;ecc=chipkill"
RECOMMENDED="protect_bits=exponent_msb,clamp=weights"  # docs/protection's recommendation under iid flips
PATTERNS="iid burst:2 burst:4 burst:8 row:1024"
model="${1:-both}"
for pattern in $PATTERNS; do
    slug="${pattern/:/}"
    for part in main recommended; do
        schemes="$SCHEMES" suffix=""
        [[ "$part" == recommended ]] && schemes="$RECOMMENDED" suffix="_recommended"
        if [[ "$model" != smollm2 ]]; then
            lm-eval-faults sweep --tasks faults_demo --device cpu --batch_size 32 --no_progress --faults bitflip \
                --protections "$schemes" --fault_args "pattern=$pattern" --p 1e-8:1e-2:7 --seeds 1 \
                --run_dir "docs/patterns/demo_$slug$suffix"
        fi
        if [[ "$model" != demo ]]; then
            lm-eval-faults sweep --model_args "$SMOL" --tasks faults_facts --device cpu --batch_size 32 --no_progress \
                --faults bitflip --protections "$schemes" --fault_args "pattern=$pattern" --p 1e-9:1e-3:7 --seeds 1 \
                --run_dir "docs/patterns/smollm2_facts_$slug$suffix"
        fi
    done
done
python scripts/pattern_tables.py --shrink-figures
