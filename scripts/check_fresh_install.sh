#!/usr/bin/env bash
# The README's main command, verbatim, in a fresh clone with a fresh venv and NO extras: a green
# test run (whose venv installs the test extras) once hid a missing runtime dependency.
set -euo pipefail
repo="$(cd "$(dirname "$0")/.." && pwd)"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
git clone -q "$repo" "$work/clone"
cd "$work/clone"
command="$(grep -m1 '^python3 -m venv .venv && . .venv/bin/activate && pip install torch==2.13.0 && pip install -e \. && ' README.md)"
echo "fresh-install check: $command" >&2
output="$(env -u VIRTUAL_ENV bash -c "$command" 2>&1)" || { echo "$output" | tail -40; exit 1; }
echo "$output" | grep -E '^\|faults_demo' || { echo "$output" | tail -40; echo "fresh-install check: no result table" >&2; exit 1; }
echo "fresh-install check: passed" >&2
