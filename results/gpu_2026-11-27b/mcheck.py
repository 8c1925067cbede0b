"""GPU metrics: (1) CPU vs CUDA on real VIFB pairs at native sizes, every reference metric; (2) where the nine's
GPU time goes (torch.profiler, 16 pairs of 480x640, cddfuse profile as in bench.py metrics)."""
import sys, time, numpy as np, torch
from pathlib import Path
from PIL import Image
from fusion.metrics import compute_metrics, list_metrics
from fusion.metrics import _utils
from experiments.bench_metrics import STANDARD_NINE, load_pairs
import os; dev = torch.device(os.environ.get("DEV", "cuda"))
print("fast_float64_matmul:", getattr(_utils, "fast_float64_matmul", lambda d: "n/a")(dev), torch.cuda.get_device_capability() if dev.type == "cuda" else "")
root = Path(".gpudata/shared/data/vifb")
names = sorted(p.stem for p in (root / "ir").glob("*.jpg"))[:: int(os.environ.get("EVERY", 5))]
grey = lambda p: torch.from_numpy(np.asarray(Image.open(p).convert("L"), dtype=np.float64) / 255.0)[None, None]
metrics = [n for n in list_metrics("reference") if n != "MEF_SSIM"]
worst = {n: (0.0, "") for n in metrics}
for s in names:
    f, a, b = grey(root / "fused" / "ADF" / f"{s}.jpg"), grey(root / "ir" / f"{s}.jpg"), grey(root / "vi" / f"{s}.jpg")
    use = [n for n in metrics if not (n == "MS_SSIM" and min(f.shape[-2:]) <= 160)]
    cpu = compute_metrics(f, a, b, use)
    gpu = compute_metrics(f.to(dev), a.to(dev), b.to(dev), use)
    for n in use:
        r = abs(gpu[n].item() - cpu[n].item()) / max(abs(cpu[n].item()), 1e-12)
        if r >= worst[n][0]:
            worst[n] = (r, f"{s} {tuple(f.shape[-2:])} cpu {cpu[n].item():.6f} gpu {gpu[n].item():.6f}")
print(f"CPU vs CUDA, reference profile, {len(names)} VIFB pairs (ADF fused): largest relative difference per metric")
for n, (r, where) in worst.items():
    print(f"  {n:<10} {r:.1e}  {where}")
if len(sys.argv) > 1:
    from torch.profiler import ProfilerActivity, profile
    fu, ir, vi, _ = load_pairs(16, (480, 640))
    t = lambda x: torch.from_numpy(x / 255.0)[:, None].to(dev)
    tf, ta, tb = t(fu), t(ir), t(vi)
    for _ in range(2):
        compute_metrics(tf, ta, tb, list(STANDARD_NINE), profile="cddfuse")
    (torch.cuda.synchronize() if dev.type == "cuda" else None)
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        compute_metrics(tf, ta, tb, list(STANDARD_NINE), profile="cddfuse"); (torch.cuda.synchronize() if dev.type == "cuda" else None)
    print(prof.key_averages().table(sort_by="self_device_time_total", row_limit=14, max_name_column_width=70))
