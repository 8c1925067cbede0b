"""Inference of a fusion net, eager vs compiled side by side: ``python experiments/bench.py infer [--device cuda]``.

Times :class:`experiments.fuse.Fuser` (the path of ``fuse.py`` and of the Python API) on random inputs of one
size, per configuration: eager fp32 (today's default), bf16 autocast, channels_last, ``torch.compile``
(default mode; on CUDA also ``max-autotune`` and ``reduce-overhead``, which adds CUDA graphs). Each
configuration is warmed up first (compilation and autotuning excluded), then timed over ``--iters`` calls
with the device synchronised; the table gives the median ms per call and the ratio to eager fp32.
Target of the performance issue: ≤ 1.0 ms for BDL's net at 480×640, batch 1, bf16, on an H100.
"""

from __future__ import annotations

import statistics
import time

import torch

from experiments.cli import (
    ArgumentParser,
    device_name,
    image_size,
    non_negative_int,
    positive_int,
    resolve_device,
)
from experiments.fuse import Fuser
from fusion.nets import create_fusion_net

__all__ = ["CONFIGS", "main", "measure"]

# name → Fuser options (device types it runs on)
CONFIGS: dict[str, tuple[dict, tuple[str, ...]]] = {
    "eager fp32": ({}, ("cpu", "cuda")),
    "eager channels_last": ({"channels_last": True}, ("cpu", "cuda")),
    "eager bf16": ({"amp": "bf16"}, ("cuda",)),
    "eager bf16 channels_last": ({"amp": "bf16", "channels_last": True}, ("cuda",)),
    "compiled fp32": ({"compile": "default"}, ("cpu", "cuda")),
    "compiled bf16 channels_last": ({"amp": "bf16", "channels_last": True, "compile": "default"}, ("cuda",)),
    "compiled bf16 channels_last max-autotune": (
        {"amp": "bf16", "channels_last": True, "compile": "max-autotune"}, ("cuda",)),
    "compiled bf16 channels_last reduce-overhead (CUDA graphs)": (
        {"amp": "bf16", "channels_last": True, "compile": "reduce-overhead"}, ("cuda",)),
}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(fuser: Fuser, ir: torch.Tensor, vis: torch.Tensor, iters: int, warmup: int) -> float:
    """Median seconds per call of ``fuser(ir, vis)``."""
    for _ in range(warmup):
        fuser(ir, vis)
    times = []
    for _ in range(iters):
        _sync(fuser.device)
        start = time.perf_counter()
        fuser(ir, vis)
        _sync(fuser.device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main(argv: list[str] | None = None) -> list[dict]:
    p = ArgumentParser(prog="experiments/bench.py infer", description=__doc__.split("\n\n")[0])
    p.add_argument("--net", default="bdl", help="registered fusion net (default: bdl)")
    p.add_argument("--size", type=image_size, default=(480, 640), help="HxW (default 480x640)")
    p.add_argument("--batch", type=positive_int, default=1)
    p.add_argument("--device", type=device_name, default="auto", help="auto | cpu | cuda")
    p.add_argument("--iters", type=positive_int, default=30)
    p.add_argument("--warmup", type=non_negative_int, default=3)
    p.add_argument("--threads", type=positive_int, help="CPU threads (torch.set_num_threads)")
    p.add_argument("--configs", help="comma-separated subset of: " + "; ".join(CONFIGS))
    p.add_argument("--polyphase", choices=("auto", "on", "off"), default="auto",
                   help="BDL nets: dense blocks on 2x2 polyphase components (auto: on the CPU only)")
    args = p.parse_args(argv)
    net_kwargs = {} if args.polyphase == "auto" else {"polyphase": args.polyphase == "on"}
    if net_kwargs:
        try:
            create_fusion_net(args.net, **net_kwargs)
        except TypeError:
            p.error(f"--polyphase: net {args.net!r} has no dilated blocks (the bdl nets have)")
    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device, what="--device")
    height, width = args.size
    wanted = [c.strip() for c in args.configs.split(",")] if args.configs else list(CONFIGS)
    unknown = [c for c in wanted if c not in CONFIGS]
    if unknown:
        p.error(f"--configs: unknown configuration(s) {unknown}; choose from: {'; '.join(CONFIGS)}")
    elsewhere = [c for c in wanted if device.type not in CONFIGS[c][1]]
    if args.configs and elsewhere:   # asked for by name: refused, not skipped in silence
        p.error(f"--configs: {elsewhere} run on CUDA only, this run is on {device}")
    wanted = [c for c in wanted if c not in elsewhere]
    g = torch.Generator().manual_seed(0)
    ir = torch.rand(args.batch, 1, height, width, generator=g).to(device)
    vis = torch.rand(args.batch, 3, height, width, generator=g).to(device)
    print(f"{args.net}{'' if args.polyphase == 'auto' else f' (polyphase {args.polyphase})'} at {height}x{width}, "
          f"batch {args.batch}, {device}"
          f"{'' if device.type == 'cuda' else f', {torch.get_num_threads()} thread(s)'}, torch {torch.__version__}")
    print(f"| configuration | median ms / call | × {wanted[0]} |\n|---|---:|---:|")
    rows, base = [], None
    for name in wanted:
        options, _ = CONFIGS[name]
        torch.manual_seed(0)
        net = create_fusion_net(args.net, **net_kwargs).to(device)
        seconds = measure(Fuser(net, **options), ir, vis, args.iters, args.warmup)
        base = base if base is not None else seconds
        print(f"| {name} | {1e3 * seconds:.2f} | {seconds / base:.2f} |", flush=True)
        rows.append({"config": name, "seconds": seconds})
    return rows


if __name__ == "__main__":
    main()
