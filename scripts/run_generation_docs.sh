#!/usr/bin/env bash
# docs/generation/: the RRAM study's experiment on SmolLM2-135M-Instruct (bfloat16), then the same
# view from the harness (faults_facts_gen run clean and faulted by lm_eval, compared by drift), then
# the screenshots in headless Chromium (skipped, saying so, where no Chromium is installed).
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1
SHARED=${LM_EVAL_FAULTS_SHARED:-../shared}
OUT=docs/generation
SMOL="pretrained=$SHARED/models/smollm2-135m-instruct,gguf_file=SmolLM2-135M-Instruct.Q4_1.gguf,dtype=bfloat16"
python scripts/rram_replication.py --out "$OUT"
for run in "clean:p=0" "faulted:p=1e-7,site=activations,act_scope=all"; do
    name=${run%%:*}
    rm -rf "$OUT/harness/$name"
    lm_eval --model faulty_hf --model_args "$SMOL,${run#*:}" --tasks faults_facts_gen --device cpu --batch_size 8 \
        --log_samples --output_path "$OUT/harness/$name"
done
# lm-eval records each task's YAML by its absolute path: recorded here relative to the repository
find "$OUT/harness" -name 'results_*.json' -exec sed -i "s#$(pwd)/##g" {} +
lm-eval-faults drift "$OUT/harness/clean" "$OUT/harness/faulted" --html "$OUT/harness_drift.html" | tee "$OUT/harness_drift.txt"
rm -rf "$OUT/harness_sweep"
lm-eval-faults sweep --model_args "$SMOL" --tasks faults_facts_gen --sites activations,kv_cache --fault_args act_scope=all \
    --p 1e-8:1e-5 --run_dir "$OUT/harness_sweep" --batch_size 40 --device cpu --no_progress
if command -v chromium > /dev/null; then
    python scripts/screenshot_pages.py "$OUT/activations.html" --out "$OUT"
    mv "$OUT/activations.png" "$OUT/side_by_side.png"
    python scripts/screenshot_pages.py --playground --out "$OUT" --playground_args \
        "$SHARED/models/smollm2-135m-instruct --model_args gguf_file=SmolLM2-135M-Instruct.Q4_1.gguf,dtype=bfloat16 --chat"
else
    echo "no chromium: screenshots not taken (apt-get install chromium)" >&2
fi
