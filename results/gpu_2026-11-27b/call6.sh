#!/usr/bin/env bash
# Call 6: CUDA tests; CPU vs CUDA on VIFB pairs; GPU metrics tree cf825f6 vs now alternated (bands built by one
# strided copy, box filters banded too); where the GPU time of joint / gn / lower-only / unrolled K=1 goes.
cd "$(dirname "$0")/.."
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl 2>/dev/null
export WANDB_MODE=disabled PYTHONUNBUFFERED=1; R=$PWD; t0=$(date +%s); END=${END:-195}
[ -e ../shared ] || ln -s "$PWD/.gpudata/shared" ../shared 2>/dev/null || true
log=$OUT/call6.md; say() { echo "$*" | tee -a "$log"; }
left() { echo $(( END - ($(date +%s) - t0) )); }
run() { local name=$1 max=$2; shift 2; local l; l=$(left); (( l < max )) && max=$l
  say ""; say "## $name (t=$(( $(date +%s) - t0 ))s, limit ${max}s)"
  if (( max < 12 )); then say "skipped: no time left"; return; fi
  timeout -s INT -k 5 "$max" "$@" 2>&1 | tr "\r" "\n" | tee -a $OUT/raw.log | grep -E "${PAT:-^\||passed|failed|rror}" | tail -${TAILN:-60} | tee -a "$log"; }
say "# call 6, $(date -u +%F) on $(nvidia-smi --query-gpu=name --format=csv,noheader), $(python3 -c 'import torch; print("torch", torch.__version__)')"
export PYTHONPATH=$R:/tmp/site
PAT="passed|failed|rror" run "CUDA tests" 45 python3 -m pytest -q -n 8 -k "cuda or banded" -p no:cacheprovider tests
PAT="." run "metrics: CPU vs CUDA on VIFB pairs" 25 python3 .gpudata/mcheck.py
for i in 1 2; do
  (cd .gpudata/old && PYTHONPATH=$PWD:/tmp/site PAT="^before" run "metrics, tree cf825f6, round $i" 16 python3 $R/.gpudata/vifprof.py before)
  PAT="^now" run "metrics, now, round $i" 16 python3 .gpudata/vifprof.py now
done
PAT="." TAILN=200 run "bilevel 256 B8 profile" 70 python3 experiments/bench.py bilevel --size 256 --batch 8 --amp bf16 --device cuda --iters 3 --warmup 2 --configs joint,gn,gn_lower,unrolled1 --profile 1
say ""; say "## done (t=$(( $(date +%s) - t0 ))s)"
