#!/usr/bin/env bash
# Call 13: bdl_mfnet_seg through run.py on CUDA (deterministic, cuda_graphs from the preset) on a fixture.
cd "$(dirname "$0")/.."
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl 2>/dev/null
export WANDB_MODE=disabled PYTHONUNBUFFERED=1; R=$PWD; t0=$(date +%s); END=${END:-100}
[ -e ../shared ] || ln -s "$PWD/.gpudata/shared" ../shared 2>/dev/null || true
log=$OUT/call13.md; say() { echo "$*" | tee -a "$log"; }
left() { echo $(( END - ($(date +%s) - t0) )); }
run() { local name=$1 max=$2; shift 2; local l; l=$(left); (( l < max )) && max=$l
  say ""; say "## $name (t=$(( $(date +%s) - t0 ))s, limit ${max}s)"
  if (( max < 12 )); then say "skipped: no time left"; return; fi
  timeout -s INT -k 5 "$max" "$@" 2>&1 | tr "\r" "\n" | tee -a $OUT/raw.log | grep -E "${PAT:-^\||passed|failed|rror}" | tail -${TAILN:-60} | tee -a "$log"; }
say "# call 13, $(date -u +%F) on $(nvidia-smi --query-gpu=name --format=csv,noheader), $(python3 -c 'import torch; print("torch", torch.__version__)')"
export PYTHONPATH=$R:/tmp/site
PAT="." run "bdl_mfnet_seg run" 90 python3 .gpudata/mfnet_run.py
say ""; say "## done (t=$(( $(date +%s) - t0 ))s)"
