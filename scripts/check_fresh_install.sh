#!/usr/bin/env bash
# The README's main command, verbatim, in a fresh clone with a fresh venv and NO extras, then the
# other commands the README shows a plain install running (a two-point sweep, its report, and a
# GGUF `targets` call): a green test run, whose venv installs the test extras, once hid missing
# runtime dependencies (matplotlib for figures, gguf for `gguf_file=`).
set -euo pipefail
repo="$(cd "$(dirname "$0")/.." && pwd)"
shared="${LM_EVAL_FAULTS_SHARED:-$repo/../shared}"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
git clone -q "$repo" "$work/clone"
cd "$work/clone"
fail() { echo "$output" | tail -40; echo "fresh-install check: $1" >&2; exit 1; }

command="$(grep -m1 '^python3 -m venv .venv && . .venv/bin/activate && pip install torch==2.13.0 && pip install -e \. && ' README.md)"
echo "fresh-install check: $command" >&2
output="$(env -u VIRTUAL_ENV bash -c "$command" 2>&1)" || fail "the main command failed"
echo "$output" | grep -E '^\|faults_demo' || fail "no result table"

# The same venv (no extras): a sweep of two faulty points plus its baseline, its report, then targets on the GGUF file.
. .venv/bin/activate
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1
output="$(lm-eval-faults sweep --tasks faults_demo --p 1e-6,1e-5 --limit 8 --batch_size 8 --device cpu --run_dir "$work/run" --no_progress 2>&1)" \
    || fail "the sweep failed"
[ "$(wc -l <"$work/run/results.jsonl")" -eq 3 ] || fail "the sweep wrote $(wc -l <"$work/run/results.jsonl") records, not 3"
[ -f "$work/run/report.md" ] || fail "the sweep wrote no report.md"
rm "$work/run/report.md"
output="$(lm-eval-faults report "$work/run" 2>&1)" || fail "the report failed"
[ -f "$work/run/report.md" ] && ls "$work/run"/figures/*.png >/dev/null || fail "the report wrote no report.md or figures"
gguf_dir="$shared/models/smollm2-135m-instruct"
if [ -f "$gguf_dir/SmolLM2-135M-Instruct.Q4_1.gguf" ]; then
    output="$(lm-eval-faults targets "$gguf_dir" --model_args gguf_file=SmolLM2-135M-Instruct.Q4_1.gguf,target=attention,layers=0-3 2>&1)" \
        || fail "targets on the GGUF file failed"
    echo "$output" | grep -q '^LlamaForCausalLM: 30 decoder layers' || fail "targets printed no taxonomy"
else
    echo "fresh-install check: $gguf_dir holds no GGUF file; set LM_EVAL_FAULTS_SHARED to run the GGUF targets check" >&2
    exit 1
fi
echo "fresh-install check: passed (main command, sweep, report, GGUF targets)" >&2
