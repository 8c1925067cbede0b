#!/usr/bin/env bash
# Call 5: GPU metrics tree cf825f6 vs now alternated (VIF, SSIM, nine: wall and kernel time); inference without
# max-autotune; the runner, defaults vs channels_last, long enough to pass its start-up.
cd "$(dirname "$0")/.."
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl 2>/dev/null
export WANDB_MODE=disabled PYTHONUNBUFFERED=1; R=$PWD; t0=$(date +%s); END=${END:-330}
[ -e ../shared ] || ln -s "$PWD/.gpudata/shared" ../shared 2>/dev/null || true
log=$OUT/call5.md; say() { echo "$*" | tee -a "$log"; }
left() { echo $(( END - ($(date +%s) - t0) )); }
run() { local name=$1 max=$2; shift 2; local l; l=$(left); (( l < max )) && max=$l
  say ""; say "## $name (t=$(( $(date +%s) - t0 ))s, limit ${max}s)"
  if (( max < 12 )); then say "skipped: no time left"; return; fi
  timeout -s INT -k 5 "$max" "$@" 2>&1 | tr "\r" "\n" | tee -a $OUT/raw.log | grep -E "${PAT:-^\||passed|failed|rror}" | tail -${TAILN:-60} | tee -a "$log"; }
say "# call 5, $(date -u +%F) on $(nvidia-smi --query-gpu=name --format=csv,noheader), $(python3 -c 'import torch; print("torch", torch.__version__)')"
export PYTHONPATH=$R:/tmp/site
for i in 1 2; do
  (cd .gpudata/old && PYTHONPATH=$PWD:/tmp/site PAT="." run "metrics, tree cf825f6, round $i" 25 python3 $R/.gpudata/vifprof.py before)
  PAT="." run "metrics, now, round $i" 25 python3 .gpudata/vifprof.py now
done
PAT="^eager|^compiled|^\||ms" run "infer 480x640 B1" 100 python3 experiments/bench.py infer --device cuda --size 480x640 --iters 50 --configs "eager fp32,eager bf16,eager bf16 channels_last,compiled bf16 channels_last,compiled bf16 channels_last reduce-overhead (CUDA graphs)"
D=.gpudata/shared/data; T="--preset recipe_roadscene_seg --data-root $D/roadscene --device cuda --set train.iters=1000 --set train.warmup_iters=0 --set eval.enabled=false"
PAT="it/s|s/it|rror" TAILN=3 run "runner, defaults" 70 python3 experiments/run.py $T --out /tmp/r1
PAT="it/s|s/it|rror" TAILN=3 run "runner, channels_last" 70 python3 experiments/run.py $T --out /tmp/r2 --set train.channels_last=true
say ""; say "## done (t=$(( $(date +%s) - t0 ))s)"
