#!/usr/bin/env bash
# Call 14: CUDA graphs for the hypergradient estimators (gn, unrolled): the CUDA tests, bench bilevel at 256 px
# B8 bf16 (NCHW and channels_last) with and without graphs, the recipe preset's bare step with and without.
cd "$(dirname "$0")/.."
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl 2>/dev/null
export WANDB_MODE=disabled PYTHONUNBUFFERED=1; R=$PWD; t0=$(date +%s); END=${END:-480}
[ -e ../shared ] || ln -s "$PWD/.gpudata/shared" ../shared 2>/dev/null || true
log=$OUT/call14.md; say() { echo "$*" | tee -a "$log"; }
left() { echo $(( END - ($(date +%s) - t0) )); }
run() { local name=$1 max=$2; shift 2; local l; l=$(left); (( l < max )) && max=$l
  say ""; say "## $name (t=$(( $(date +%s) - t0 ))s, limit ${max}s)"
  if (( max < 12 )); then say "skipped: no time left"; return; fi
  timeout -s INT -k 5 "$max" "$@" 2>&1 | tr "\r" "\n" | tee -a $OUT/raw.log | grep -E "${PAT:-^\||passed|failed|rror}" | tail -${TAILN:-60} | tee -a "$log"; }
say "# call 14, $(date -u +%F) on $(nvidia-smi --query-gpu=name --format=csv,noheader), $(python3 -c 'import torch; print("torch", torch.__version__)')"
export PYTHONPATH=$R:/tmp/site
PAT="passed|failed|rror|Warning: cuda|assert|^E " run "CUDA tests" 90 python3 -m pytest -q -n 8 -k "cuda or graph" -p no:cacheprovider tests
C=joint,gn,gn_lower,gn_lower_graphs,gn_graphs,gn_reuse,gn_reuse_graphs,unrolled1,unrolled1_graphs,unrolled3,unrolled3_graphs
run "bilevel 256 B8 bf16 NCHW" 100 python3 experiments/bench.py bilevel --size 256 --batch 8 --amp bf16 --device cuda --iters 8 --configs $C
run "bilevel 256 B8 bf16 channels_last" 100 python3 experiments/bench.py bilevel --size 256 --batch 8 --amp bf16 --device cuda --iters 8 --configs $C --channels-last
PAT="cuda_graphs=|rror" run "recipe_roadscene_seg bare step, 192 px B16 bf16" 120 python3 .gpudata/recipe_graphs.py .gpudata/shared/data/roadscene cuda 10
PAT="time total|### profile|^\|" run "bilevel 256 B8 profile gn with graphs" 60 python3 experiments/bench.py bilevel --size 256 --batch 8 --amp bf16 --device cuda --iters 3 --configs joint,gn,gn_lower,gn_graphs --channels-last --profile 1
say ""; say "## done (t=$(( $(date +%s) - t0 ))s)"
