"""VIF alone and the nine together on 16 VIFB pairs (480x640) on CUDA: wall ms/pair (median of 15 calls) and GPU kernel
ms/pair (profiler), for whichever tree PYTHONPATH points at."""
import statistics, sys, time, torch
from torch.profiler import ProfilerActivity, profile
from fusion.metrics import compute_metrics
from experiments.bench_metrics import STANDARD_NINE, load_pairs
import os; dev = torch.device(os.environ.get("DEV", "cuda")); R = int(os.environ.get("REPS", 15))
fu, ir, vi, _ = load_pairs(16, (480, 640)) if dev.type == "cuda" else load_pairs(2, (96, 128))
t = lambda x: torch.from_numpy(x / 255.0)[:, None].to(dev)
tf, ta, tb = t(fu), t(ir), t(vi)
row = [sys.argv[1]]
for names in (["VIF"], ["SSIM"], list(STANDARD_NINE)):
    run = lambda: compute_metrics(tf, ta, tb, names, profile="cddfuse")
    for _ in range(3):
        run()
    (torch.cuda.synchronize() if dev.type == "cuda" else None)
    times = []
    for _ in range(R):
        s = time.perf_counter(); run(); (torch.cuda.synchronize() if dev.type == "cuda" else None); times.append(time.perf_counter() - s)
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        run(); (torch.cuda.synchronize() if dev.type == "cuda" else None)
    gpu = sum(e.self_device_time_total for e in prof.key_averages()) / 1e3
    row.append(f"{'+'.join(names) if len(names) < 9 else 'nine'}: wall {statistics.median(times) * 1e3 / 16:.3f} "
               f"(min {min(times) * 1e3 / 16:.3f}), GPU {gpu / 16:.3f} ms/pair")
print(" | ".join(row))
