#!/usr/bin/env bash
# Call 17: the prepared GPU check (TRAIN_S=170) after the CPU-only sessions (bf16 fallback, huge pages), plus the
# CUDA side of native_bf16 / training_amp and the runner's warnings.
cd "$(dirname "$0")/.."
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl 2>/dev/null
export PYTHONPATH=$PWD:/tmp/site WANDB_MODE=disabled PYTHONUNBUFFERED=1
log=$OUT/call17.md
echo "# call 17, $(date -u +%F)" | tee -a $log
python3 - <<'PY' 2>&1 | tee -a $log
import warnings, torch
from experiments.cli import native_bf16
from experiments.experiment import training_amp
dev = torch.device("cuda")
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    amp = training_amp("bf16", dev)
print(f"{torch.cuda.get_device_name()}: native_bf16={native_bf16(dev)} training_amp('bf16')={amp} warnings={[str(w.message) for w in caught]}")
PY
TRAIN_S=170 timeout -s INT -k 10 530 bash .gpudata/gpu-check.sh
cp $OUT/gpu-check.md $OUT/gpu-check-copy.md 2>/dev/null
echo "## runner warnings" | tee -a $log
tr '\r' '\n' < /tmp/gc.log | grep -iE "warn|bf16|float32|graph" | sort | uniq -c | head -20 | tee -a $log
tr '\r' '\n' < /tmp/gc.log | grep -E "it/s" | awk 'NR%40==0' | tail -25 > $OUT/train_rate.txt
tail -30 /tmp/gc_eval.log > $OUT/eval_tail.txt 2>/dev/null
