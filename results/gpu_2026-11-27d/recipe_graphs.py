"""recipe_roadscene_seg's bare bi-level step (gn, gradnorm_softmax, an upper step every iteration, 192 px,
batch 16, bf16) with and without train.cuda_graphs, NCHW and channels_last: ms per iteration, graphs held,
warnings. Usage: python recipe_graphs.py ROADSCENE_DIR DEVICE ITERS [KEY=VALUE ...]"""
import statistics
import sys
import time
import warnings

import torch

from experiments.bench_train import experiment

root, device, iters, extra = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4:]
for layout in (False, True):
    for graphs_on in (False, True):
        exp = experiment("recipe_roadscene_seg", iters + 3, device, root,
                         [f"train.cuda_graphs={graphs_on}", f"train.channels_last={layout}", *extra])
        batches = [exp.streams.next() for _ in range(iters + 3)]
        exp.train_mode()
        times, losses = [], []
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            for i, b in enumerate(batches):
                torch.manual_seed(i)
                if device == "cuda":
                    torch.cuda.synchronize()
                t0 = time.perf_counter()
                d = exp.step.step(b)
                if device == "cuda":
                    torch.cuda.synchronize()
                times.append(time.perf_counter() - t0)
                losses.append(round(d.get("loss/upper/seg", float("nan")), 4))
        ours = [str(w.message)[:300] for w in caught if "cuda_graphs" in str(w.message)]
        s = exp.step
        print(f"channels_last={layout} cuda_graphs={graphs_on}: median {1e3 * statistics.median(times[3:]):.1f} ms/iter "
              f"over {iters} (first three {', '.join(f'{1e3 * t:.0f}' for t in times[:3])} ms); estimator graphs "
              f"{len(s._estimator_graphs.captured)}; peak {torch.cuda.max_memory_allocated() / 2**30 if device == 'cuda' else 0:.2f} GiB; "
              f"seg UL losses {losses}; warnings {ours}", flush=True)
        del exp, s
        if device == "cuda":
            torch.cuda.empty_cache(); torch.cuda.reset_peak_memory_stats()
