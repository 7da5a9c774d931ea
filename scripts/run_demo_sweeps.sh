#!/usr/bin/env bash
# Reproduce the committed sweep reports under docs/sweeps/ (the study's Figures 5-12, on the demo model).
# Rerunning resumes; delete a run directory to start it afresh.
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 OMP_NUM_THREADS=1
common=(--tasks faults_demo --device cpu --batch_size 64 --p 1e-7:1e-1 --seeds 3 --no_progress)
lm-eval-faults sweep "${common[@]}" --faults value,bitflip --targets embedding,attention,mlp,norm,lm_head \
    --run_dir docs/sweeps/demo_components
lm-eval-faults sweep "${common[@]}" --faults value,bitflip --layers groups:1 \
    --run_dir docs/sweeps/demo_layer_groups
