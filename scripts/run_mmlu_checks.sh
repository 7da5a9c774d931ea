#!/usr/bin/env bash
# The study's MMLU tasks on local data (../shared/data/mmlu): both protocols at p=0 and two p values,
# on the demo model and on SmolLM2-135M-Instruct (../shared/models), plus the MMLU component sweeps
# whose reports are committed under docs/sweeps/. Rerunning resumes the sweeps.
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 OMP_NUM_THREADS=1
SHARED=../shared  # relative to the repository root, so sweep.json records no machine path
export MMLU_DIR=$SHARED/data/mmlu
SMOL="pretrained=$SHARED/models/smollm2-135m-instruct,gguf_file=SmolLM2-135M-Instruct.Q4_1.gguf,dtype=float32"
out=docs/mmlu_checks
mkdir -p "$out"

for model in demo smollm2; do
  args=$([ "$model" = demo ] && echo "" || echo "$SMOL,")
  limit=$([ "$model" = demo ] && echo "" || echo "--limit 50")  # 50 per subject on the real model: CPU time
  for p in 0 1e-7 1e-5; do
    for protocol in mc gen; do
      lm_eval --model faulty_hf --model_args "${args}p=$p,fault=value" --tasks "mmlu_faults_$protocol" \
        --device cpu --batch_size 16 $limit 2>&1 | grep -E "^\|" \
        | tee "$out/${model}_${protocol}_p$p.md"
    done
  done
done

common=(--device cpu --batch_size 16 --faults value --targets embedding,attention,mlp,norm,lm_head --no_progress)
lm-eval-faults sweep "${common[@]}" --tasks mmlu_faults_mc --p 1e-7:1e-1 --seeds 2 --run_dir docs/sweeps/demo_mmlu_components
lm-eval-faults sweep "${common[@]}" --model_args "$SMOL" --tasks mmlu_faults_mc --limit 40 --p 1e-7:1e-1:4 --seeds 1 --run_dir docs/sweeps/smollm2_mmlu_components
