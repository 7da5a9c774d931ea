#!/usr/bin/env bash
# A real pretrained model on a task it knows: SmolLM2-135M-Instruct (../shared/models, GGUF ->
# float32) on faults_facts (clean acc 1.0). Component and layer-group sweeps; reports under docs/sweeps/.
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 OMP_NUM_THREADS=1
SHARED=../shared  # relative to the repository root, so sweep.json records no machine path
SMOL="pretrained=$SHARED/models/smollm2-135m-instruct,gguf_file=SmolLM2-135M-Instruct.Q4_1.gguf,dtype=float32"
common=(--model_args "$SMOL" --tasks faults_facts --device cpu --batch_size 32 --no_progress)
lm-eval-faults sweep "${common[@]}" --faults bitflip,value --targets embedding,attention,mlp,norm,lm_head \
    --p 1e-8:1e-1 --seeds 2 --run_dir docs/sweeps/smollm2_facts_components
lm-eval-faults sweep "${common[@]}" --faults bitflip --layers groups:4 --p 1e-8:1e-3 --seeds 1 \
    --run_dir docs/sweeps/smollm2_facts_layer_groups
