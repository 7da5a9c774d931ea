#!/usr/bin/env bash
# Bisect SmolLM2-135M-Instruct (../shared/models, GGUF -> float32) on faults_facts at p=1e-7, all
# weights, to its culprit faults, for several seeds; then tabulate and plot what the culprits share.
# Usage: scripts/run_smollm2_bisections.sh [SEEDS...]   (default: 0 1 2 3 4)
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 OMP_NUM_THREADS=1
out=docs/bisection
mkdir -p "$out"
for seed in "${@:-0 1 2 3 4}"; do
  for s in $seed; do
    lm-eval-faults bisect ../shared/models/smollm2-135m-instruct \
      --model_args gguf_file=SmolLM2-135M-Instruct.Q4_1.gguf,dtype=float32 --tasks faults_facts \
      --fault_args "p=1e-7,seed=$s" --device cpu --batch_size 32 \
      --json "$out/smollm2_p1e-7_seed$s.json" --save_map "$out/smollm2_p1e-7_seed${s}_culprits.npz"
  done
done
python scripts/culprit_stats.py "$out"
