#!/usr/bin/env bash
# Call 15: the CUDA tests after the runner test's fix; recipe_roadscene_seg (train.cuda_graphs now on) trained
# through run.py on RoadScene for TRAIN_S seconds, then fused on VIFB and ranked (as gpu-check.sh does).
cd "$(dirname "$0")/.."
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl 2>/dev/null
export WANDB_MODE=disabled PYTHONUNBUFFERED=1; R=$PWD; t0=$(date +%s); END=${END:-420}
[ -e ../shared ] || ln -s "$PWD/.gpudata/shared" ../shared 2>/dev/null || true
D=.gpudata/shared/data; log=$OUT/call15.md; say() { echo "$*" | tee -a "$log"; }
left() { echo $(( END - ($(date +%s) - t0) )); }
run() { local name=$1 max=$2; shift 2; local l; l=$(left); (( l < max )) && max=$l
  say ""; say "## $name (t=$(( $(date +%s) - t0 ))s, limit ${max}s)"
  if (( max < 12 )); then say "skipped: no time left"; return; fi
  timeout -s INT -k 5 "$max" "$@" 2>&1 | tr "\r" "\n" | tee -a $OUT/raw.log | grep -E "${PAT:-^\||passed|failed|rror}" | tail -${TAILN:-60} | tee -a "$log"; }
say "# call 15, $(date -u +%F) on $(nvidia-smi --query-gpu=name --format=csv,noheader), $(python3 -c 'import torch; print("torch", torch.__version__)')"
export PYTHONPATH=$R:/tmp/site
PAT="passed|failed|rror|Warning: cuda|assert|^E " run "CUDA tests" 90 python3 -m pytest -q -n 8 -k "cuda or graph" -p no:cacheprovider tests
P=recipe_roadscene_seg
PAT="it/s|s/it|rror|cuda_graphs|interrupted|results:" TAILN=8 run "train $P for ${TRAIN_S:-200}s" ${TRAIN_S:-200} python3 experiments/run.py --preset $P --data-root $D/roadscene --device cuda --out /tmp/gc
ck=$(ls -t /tmp/gc/*/*/checkpoints/last.pt 2>/dev/null | head -1); say "checkpoint: $ck"
if [ -n "$ck" ]; then
  TAILN=2 run "fuse VIFB" 40 python3 experiments/fuse.py --checkpoint "$ck" --ir $D/vifb/ir --vi $D/vifb/vi --out /tmp/gc_fused --device cuda
  args=("$P=/tmp/gc_fused"); for m in $D/vifb/fused/*/; do args+=("$(basename "$m")=$m"); done
  TAILN=3 run "evaluate VIFB" 120 python3 experiments/evaluate.py --ir $D/vifb/ir --vi $D/vifb/vi --fused "${args[@]}" --profile reference --out /tmp/gc_eval --device cuda
  PAT="rank|^\| *$P" TAILN=6 run "rank" 30 python3 experiments/tables.py /tmp/gc_eval --rank "$P"
fi
say ""; say "## done (t=$(( $(date +%s) - t0 ))s)"
