"""Parameter and FLOP table per fusion net: ``python experiments/bench.py nets [--size H W] [--nets N...]``.

FLOPs are counted with ``torch.utils.flop_counter.FlopCounterMode`` over one eval-mode forward of a batch of
one RGB-T pair at the stated resolution (convolutions, matmuls and attention; element-wise ops are not
counted); MACs = FLOPs / 2. Nets are built and run on the ``meta`` device when they can be (no memory, no
compute), and on ``--device`` otherwise (MoE-Fusion's sparse dispatch needs real routing). MoE nets are
counted as routed (top-k of the experts), so the numbers are per forward, not per expert.
"""

from __future__ import annotations

import argparse
import warnings

import torch
from torch.utils.flop_counter import FlopCounterMode

from experiments.cli import ArgumentParser, device_name, positive_int
from fusion.nets import create_fusion_net, list_fusion_nets

DEFAULT_NETS = ("bdl", "moe_fusion", "tc_moa")


def get_args_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(prog="bench.py nets", description=__doc__.splitlines()[0])
    parser.add_argument(
        "--nets",
        nargs="+",
        default=list(DEFAULT_NETS),
        help=f"registered names (default: {' '.join(DEFAULT_NETS)}); 'all' for every one",
    )
    parser.add_argument(
        "--size",
        nargs=2,
        type=positive_int,
        default=(480, 640),
        metavar=("H", "W"),
        help="input resolution (default 480 640, MSRS/M3FD-like)",
    )
    parser.add_argument("--device", type=device_name, default="cpu", help="device for nets that cannot run on 'meta'")
    return parser


def count(name: str, size: tuple[int, int], device: str) -> dict:
    """Parameters (total/trainable) and forward FLOPs of one net at ``size``."""
    for dev in ("meta", device):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # TC-MoA warns about its random backbone; irrelevant for counting
            with torch.device(dev):
                net = create_fusion_net(name).eval()
        ir, vis = torch.rand(1, 1, *size, device=dev), torch.rand(1, 3, *size, device=dev)
        counter = FlopCounterMode(display=False)
        try:
            with torch.no_grad(), counter:
                net(ir, vis)
        except (NotImplementedError, RuntimeError):
            if dev == "meta":
                continue  # data-dependent ops (e.g. nonzero in sparse dispatch): count on a real device
            raise
        flops = counter.get_total_flops()
        return {
            "net": name,
            "params": sum(p.numel() for p in net.parameters()),
            "trainable": sum(p.numel() for p in net.parameters() if p.requires_grad),
            "gflops": flops / 1e9,
            "gmacs": flops / 2e9,
            "macs_per_px": flops / 2 / (size[0] * size[1]),
            "run_on": dev,
        }
    raise AssertionError("unreachable")


def main(argv: list[str] | None = None) -> list[dict]:
    args = get_args_parser().parse_args(argv)
    names = list_fusion_nets() if args.nets == ["all"] else args.nets
    size = tuple(args.size)
    rows = [count(n, size, args.device) for n in names]
    print(f"Fusion nets at {size[0]}x{size[1]} (batch 1, eval mode; MACs = FLOPs/2)\n")
    print("| net | params | trainable | GFLOPs | GMACs | MACs/pixel | counted on |")
    print("|---|---:|---:|---:|---:|---:|---|")
    for r in rows:
        print(
            f"| {r['net']} | {r['params']:,} | {r['trainable']:,} | {r['gflops']:.2f} | {r['gmacs']:.2f} | "
            f"{r['macs_per_px']:,.0f} | {r['run_on']} |"
        )
    return rows


if __name__ == "__main__":
    main()
