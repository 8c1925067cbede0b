#!/usr/bin/env bash
# Call 10: CUDA-graph tests through the runner at preset sizes (synthetic_seg, bdl_mfnet_seg and bdl_m3fd_det on
# generated fixtures); K row VJPs through BDL's net, sequential vs vmap-batched (is_grads_batched).
cd "$(dirname "$0")/.."
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl 2>/dev/null
export WANDB_MODE=disabled PYTHONUNBUFFERED=1; R=$PWD; t0=$(date +%s); END=${END:-260}
[ -e ../shared ] || ln -s "$PWD/.gpudata/shared" ../shared 2>/dev/null || true
log=$OUT/call10.md; say() { echo "$*" | tee -a "$log"; }
left() { echo $(( END - ($(date +%s) - t0) )); }
run() { local name=$1 max=$2; shift 2; local l; l=$(left); (( l < max )) && max=$l
  say ""; say "## $name (t=$(( $(date +%s) - t0 ))s, limit ${max}s)"
  if (( max < 12 )); then say "skipped: no time left"; return; fi
  timeout -s INT -k 5 "$max" "$@" 2>&1 | tr "\r" "\n" | tee -a $OUT/raw.log | grep -E "${PAT:-^\||passed|failed|rror}" | tail -${TAILN:-60} | tee -a "$log"; }
say "# call 10, $(date -u +%F) on $(nvidia-smi --query-gpu=name --format=csv,noheader), $(python3 -c 'import torch; print("torch", torch.__version__)')"
export PYTHONPATH=$R:/tmp/site
PAT="passed|failed|rror|Warning: cuda|assert" run "CUDA tests" 150 python3 -m pytest -q -n 8 -k "cuda or graph" -p no:cacheprovider tests
PAT="." run "row VJPs 256 B8 K=3 NCHW" 45 python3 .gpudata/vjprows.py 256 8 3
PAT="." run "row VJPs 256 B8 K=3 channels_last" 45 python3 .gpudata/vjprows.py 256 8 3 cl
say ""; say "## done (t=$(( $(date +%s) - t0 ))s)"
