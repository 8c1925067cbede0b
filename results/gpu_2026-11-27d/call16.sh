#!/usr/bin/env bash
# Call 16: call 14's bench rows on an H100 (the kind the issue names): 256 px B8 bf16, NCHW and channels_last,
# every configuration with and without train.cuda_graphs.
cd "$(dirname "$0")/.."
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl 2>/dev/null
export WANDB_MODE=disabled PYTHONUNBUFFERED=1; R=$PWD; t0=$(date +%s); END=${END:-200}
log=$OUT/call16.md; say() { echo "$*" | tee -a "$log"; }
left() { echo $(( END - ($(date +%s) - t0) )); }
run() { local name=$1 max=$2; shift 2; local l; l=$(left); (( l < max )) && max=$l
  say ""; say "## $name (t=$(( $(date +%s) - t0 ))s, limit ${max}s)"
  if (( max < 12 )); then say "skipped: no time left"; return; fi
  timeout -s INT -k 5 "$max" "$@" 2>&1 | tr "\r" "\n" | tee -a $OUT/raw.log | grep -E "${PAT:-^\||passed|failed|rror}" | tail -${TAILN:-60} | tee -a "$log"; }
say "# call 16, $(date -u +%F) on $(nvidia-smi --query-gpu=name --format=csv,noheader), $(python3 -c 'import torch; print("torch", torch.__version__)')"
export PYTHONPATH=$R:/tmp/site
C=joint,gn,gn_lower,gn_lower_graphs,gn_graphs,gn_reuse,gn_reuse_graphs,unrolled1,unrolled1_graphs,unrolled3,unrolled3_graphs
run "bilevel 256 B8 bf16 NCHW" 80 python3 experiments/bench.py bilevel --size 256 --batch 8 --amp bf16 --device cuda --iters 8 --configs $C
run "bilevel 256 B8 bf16 channels_last" 80 python3 experiments/bench.py bilevel --size 256 --batch 8 --amp bf16 --device cuda --iters 8 --configs $C --channels-last
say ""; say "## done (t=$(( $(date +%s) - t0 ))s)"
