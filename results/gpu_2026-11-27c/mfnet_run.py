"""bdl_mfnet_seg through run.py on CUDA (its deterministic mode, cuda_graphs on by the preset) on a generated
MFNet-layout fixture: 14 iterations (upper steps at 10), evaluation on 4 test images."""
import tempfile, time, warnings
from pathlib import Path
from experiments import run
from tests.test_presets import write_mfnet

tmp = Path(tempfile.mkdtemp())
root = write_mfnet(tmp / "mfnet")
t0 = time.time()
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    result = run.main(["--preset", "bdl_mfnet_seg", "--data-root", str(root), "--iters", "14", "--out", str(tmp / "runs"),
                       "--wandb", "disabled", "--device", "cuda", "--set", "log.progress=False", "--set", "eval.max_images=4"])
step = result.experiment.step
print(f"steps {result.steps}, graphs captured {len(step._graphs)}, cuda_graphs still on {step.cuda_graphs}, "
      f"deterministic preset {result.experiment.cfg.train.deterministic}, {time.time() - t0:.0f} s")
print("cuda_graphs warnings:", [str(w.message)[:200] for w in caught if "cuda_graphs" in str(w.message)])
print({k: round(v, 4) for k, v in result.metrics.items() if k.startswith("eval/m")})
