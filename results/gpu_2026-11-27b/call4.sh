#!/usr/bin/env bash
# Call 4 (2026-11-27, third session): CUDA tests; GPU metrics A/B (banded float64 filters vs the tree before) with a
# CPU-vs-CUDA check on VIFB pairs and a profile; every bilevel configuration at 256 px and 480x640 (checkpointing),
# default vs channels_last side by side; inference; the runner default vs channels_last.
cd "$(dirname "$0")/.."
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl 2>/dev/null
export WANDB_MODE=disabled PYTHONUNBUFFERED=1; R=$PWD; t0=$(date +%s); END=${END:-500}
[ -e ../shared ] || ln -s "$PWD/.gpudata/shared" ../shared 2>/dev/null || true
log=$OUT/call4.md; say() { echo "$*" | tee -a "$log"; }
left() { echo $(( END - ($(date +%s) - t0) )); }
run() { local name=$1 max=$2; shift 2; local l; l=$(left); (( l < max )) && max=$l
  say ""; say "## $name (t=$(( $(date +%s) - t0 ))s, limit ${max}s)"
  if (( max < 12 )); then say "skipped: no time left"; return; fi
  timeout -s INT -k 5 "$max" "$@" 2>&1 | tr "\r" "\n" | tee -a $OUT/raw.log | grep -E "${PAT:-^\||passed|failed|rror}" | tail -${TAILN:-60} | tee -a "$log"; }
say "# call 4, $(date -u +%F) on $(nvidia-smi --query-gpu=name --format=csv,noheader), $(python3 -c 'import torch; print("torch", torch.__version__)')"
export PYTHONPATH=$R:/tmp/site
PAT="passed|failed|rror" run "CUDA tests" 70 python3 -m pytest -q -n 8 -k cuda -p no:cacheprovider tests
PAT="." run "metrics: CPU vs CUDA on VIFB pairs, profile of the nine" 40 python3 .gpudata/mcheck.py profile
M="--device cuda --pairs 16 --baseline-pairs 1 --repeats 3"
(cd .gpudata/old && PYTHONPATH=$PWD:/tmp/site PAT="." run "metrics, tree cf825f6 (before)" 35 python3 experiments/bench.py metrics $M)
PAT="." run "metrics, now (banded float64 filters)" 35 python3 experiments/bench.py metrics $M
B="--size 256 --batch 8 --amp bf16 --device cuda --iters 6 --warmup 2"
run "bilevel 256 B8, all configs, defaults" 45 python3 experiments/bench.py bilevel $B
run "bilevel 256 B8, all configs, channels_last" 45 python3 experiments/bench.py bilevel $B --channels-last
C="--size 480x640 --batch 8 --amp bf16 --device cuda --iters 4 --warmup 1 --grad-checkpointing --configs joint,gn,gn_lower,gn_reuse"
run "480x640 B8, checkpointing, defaults" 40 python3 experiments/bench.py bilevel $C
run "480x640 B8, checkpointing, channels_last" 40 python3 experiments/bench.py bilevel $C --channels-last
PAT="." run "infer 480x640 B1" 60 python3 experiments/bench.py infer --device cuda --size 480x640 --iters 50
D=.gpudata/shared/data; T="--preset recipe_roadscene_seg --data-root $D/roadscene --device cuda --set train.iters=160 --set train.warmup_iters=0 --set eval.enabled=false"
PAT="it/s|s/it|rror" TAILN=2 run "runner, defaults" 35 python3 experiments/run.py $T --out /tmp/r1
PAT="it/s|s/it|rror" TAILN=2 run "runner, channels_last" 35 python3 experiments/run.py $T --out /tmp/r2 --set train.channels_last=true
say ""; say "## done (t=$(( $(date +%s) - t0 ))s)"
