"""Runner iteration vs bare bi-level step, side by side: ``python experiments/bench.py train [--data-root DIR]``.

For each preset (``synthetic_seg``, and ``bdl_roadscene_seg`` when ``--data-root`` points at RoadScene) at its
own crop, batch and nets, one process times

* the loader: ``Streams.next()`` alone (decode, crop, collate, copy to the device) → pairs/s, and per worker;
* the bare step: ``BilevelStep.step`` on batches already on the device;
* the runner: ``experiments.engine.train`` for the same number of iterations (data + step + logging).

The ratio runner/bare is the data path's overhead (target: ≤ 1.1 on a GPU; on the 2-core CPU the data part
≤ 10 % of an iteration). Warm-up iterations are excluded (``train.warmup_iters=0``): bi-level steps only.
"""

from __future__ import annotations

import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import torch

from bilevel.registry import UnknownNameError
from experiments.cli import ArgumentParser, device_name, positive_int, resolve_device
from experiments.config import ConfigError, apply_overrides
from experiments.data import DataError
from experiments.engine import train
from experiments.experiment import Experiment, build
from experiments.logging_utils import MetricsCSV, Tracker
from experiments.presets import get_preset

__all__ = ["experiment", "main", "measure"]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def experiment(preset: str, iters: int, device: str, data_root: str | None = None,
               overrides: Sequence[str] = ()) -> Experiment:
    """``preset`` built for timing: ``iters`` bi-level iterations, no warm-up, evaluation, images or checkpoints
    (``overrides``: further ``key=value`` settings)."""
    cfg = get_preset(preset)
    settings = [f"train.iters={2 * iters + 1}", "train.warmup_iters=0", "eval.enabled=False",
                "eval.val_every=0", "log.image_every=0", "log.progress=False", "train.ckpt_every=0",
                f"train.device={device!r}", "log.wandb='disabled'"]
    if data_root is not None:
        settings.append(f"data.root={data_root!r}")
    return build(apply_overrides(cfg, [*settings, *overrides]))


def measure(exp: Experiment, iters: int) -> dict[str, float]:
    """Times (seconds per iteration) of the loader, the bare step and the runner of a built experiment."""
    dev = exp.device
    pairs = sum(exp.streams.batch_sizes.values())     # pairs drawn per iteration by every stream

    start = time.perf_counter()
    batches = [exp.streams.next() for _ in range(iters + 1)]
    _sync(dev)
    loader = (time.perf_counter() - start) / (iters + 1)

    exp.train_mode()
    exp.step.step(batches[0])                 # first call: allocations, autotuning
    _sync(dev)
    start = time.perf_counter()
    for b in batches[1:]:
        torch.manual_seed(0)
        exp.step.step(b)
    _sync(dev)
    bare = (time.perf_counter() - start) / iters

    with tempfile.TemporaryDirectory() as tmp:
        run_dir = Path(tmp)
        tracker = Tracker("disabled", run_dir, {}, exp.cfg.log.project, "bench")
        _sync(dev)
        start = time.perf_counter()
        train(exp, iters + 1, run_dir, MetricsCSV(run_dir / "metrics.csv"), tracker, progress=False)
        _sync(dev)
        runner = (time.perf_counter() - start) / iters
    workers = max(exp.streams.workers.values())
    return {"loader_s": loader, "bare_s": bare, "runner_s": runner, "pairs": pairs,
            "pairs_per_s": pairs / loader, "pairs_per_s_per_worker": pairs / loader / max(1, workers),
            "workers": workers, "cached_mib": exp.streams.cached_bytes / 2**20}


def main(argv: list[str] | None = None) -> list[dict]:
    p = ArgumentParser(prog="experiments/bench.py train", description=__doc__.split("\n\n")[0])
    p.add_argument("--data-root", help="RoadScene folder: also time bdl_roadscene_seg at its preset size")
    p.add_argument("--iters", type=positive_int, default=4, help="timed iterations per preset (synthetic_seg)")
    p.add_argument("--roadscene-iters", type=positive_int, default=1, help="timed iterations of bdl_roadscene_seg")
    p.add_argument("--device", type=device_name, default="auto")
    args = p.parse_args(argv)
    jobs = [("synthetic_seg", args.iters, None)]
    if args.data_root:
        jobs.append(("bdl_roadscene_seg", args.roadscene_iters, args.data_root))
    device = resolve_device(args.device, what="--device").type
    try:   # every preset built, and its data checked, before anything is timed
        built = [(preset, iters, experiment(preset, iters, args.device, root)) for preset, iters, root in jobs]
    except (ConfigError, DataError, UnknownNameError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        raise SystemExit(2) from None
    rows = []
    print("| preset | device | bare step ms | runner iteration ms | runner / bare | data share | "
          "loader pairs/s | per worker |")
    print("|---|---|---:|---:|---:|---:|---:|---:|")
    for preset, iters, exp in built:
        r = measure(exp, iters)
        share = max(0.0, r["runner_s"] - r["bare_s"]) / r["runner_s"]
        print(f"| {preset} | {device} | {1e3 * r['bare_s']:.1f} | {1e3 * r['runner_s']:.1f} | "
              f"{r['runner_s'] / r['bare_s']:.2f} | {100 * share:.0f} % | {r['pairs_per_s']:.1f} | "
              f"{r['pairs_per_s_per_worker']:.1f} ({r['workers']} workers) |", flush=True)
        rows.append({"preset": preset, "device": device, **r})
    return rows
