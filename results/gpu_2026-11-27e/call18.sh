#!/usr/bin/env bash
# Call 18: the recommended preset through run.py with NCHW nets (as it ships) and with train.channels_last, back to
# back on one machine; the runner vs bare step once the synthetic scenes are cached (--iters 130 > one epoch).
cd "$(dirname "$0")/.."
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl 2>/dev/null
export PYTHONPATH=$PWD:/tmp/site WANDB_MODE=disabled PYTHONUNBUFFERED=1
log=$OUT/call18.md; D=.gpudata/shared/data; t0=$(date +%s)
say() { echo "$*" | tee -a "$log"; }
say "# call 18, $(date -u +%F) on $(nvidia-smi --query-gpu=name --format=csv,noheader)"
rate() {  # iterations and seconds between the first progress line past iteration 620 and the last one
  tr '\r' '\n' < $1 | grep -E "^train: .* [0-9]+/3000 \[" | sed -E 's/.* ([0-9]+)\/3000 \[([0-9]+):([0-9]+).*/\1 \2 \3/' |
    awk '$1>=620 {s=$2*60+$3; if(!a){a=$1;sa=s} b=$1;sb=s} END {if (sb>sa) printf "iterations %d -> %d in %d s: %.2f it/s\n", a, b, sb-sa, (b-a)/(sb-sa)}'
}
for v in nchw channels_last; do
  extra=(); [ $v = channels_last ] && extra=(--set train.channels_last=true)
  say ""; say "## recipe_roadscene_seg, $v, 150 s (t=$(( $(date +%s) - t0 ))s)"
  timeout -s INT 150 python3 experiments/run.py --preset recipe_roadscene_seg --data-root $D/roadscene --device cuda --out /tmp/r_$v "${extra[@]}" > /tmp/r_$v.log 2>&1
  rate /tmp/r_$v.log | tee -a "$log"
  tr '\r' '\n' < /tmp/r_$v.log | grep -E "rror|Traceback|graph" | head -5 | tee -a "$log"
  tr '\r' '\n' < /tmp/r_$v.log | grep -E "it/s" | awk 'NR%25==0' > $OUT/rate_$v.txt
done
say ""; say "## runner vs bare, 130 iterations (t=$(( $(date +%s) - t0 ))s)"
timeout 55 python3 experiments/bench.py train --device cuda --iters 130 2>&1 | tail -3 | tee -a "$log"
say ""; say "## done (t=$(( $(date +%s) - t0 ))s)"
