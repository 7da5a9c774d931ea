#!/usr/bin/env bash
# Drift where accuracy can't move: SmolLM2-135M-Instruct on the study's MMLU subjects (local CSVs,
# 40 questions per subject, loglikelihood protocol) sits near chance, so its accuracy says nothing;
# its answers' drift from the clean model (flips, KL) still rises with p. Bit flips on all weights.
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 OMP_NUM_THREADS=1
SHARED=../shared
export MMLU_DIR=$SHARED/data/mmlu
SMOL="pretrained=$SHARED/models/smollm2-135m-instruct,gguf_file=SmolLM2-135M-Instruct.Q4_1.gguf,dtype=float32"
lm-eval-faults sweep --model_args "$SMOL" --tasks mmlu_faults_mc --limit 40 --device cpu --batch_size 16 \
    --faults bitflip --p 1e-10:1e-7 --seeds 2 --no_progress --run_dir docs/sweeps/smollm2_mmlu_drift
