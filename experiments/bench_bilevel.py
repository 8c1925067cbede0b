"""Bi-level step benchmark: ``python experiments/bench.py bilevel [--size 64 --batch 2 --iters 5 ...]``.

Times, side by side in one run on whatever device is present, BDL's DRDB fusion net with two constraints
(the pixel critic and a U-Net/ResNet-18 segmenter, ``encoder_weights=None``):

* ``joint``: a single-level step — one fusion forward, critic loss on the detached image plus the generator
  and segmentation losses on the image, one backward over everything, one step of each optimiser;
* ``bilevel`` with ``gn`` on the image path (the fast path): an iteration with an upper update
  (``ul_every=1``) and a lower-only iteration; the BDL-schedule average is (9·lower-only + 1·full)/10;
  ``gn_lower_graphs``: the lower-only iteration replayed as CUDA graphs (``train.cuda_graphs``; eager on a
  CPU), and the schedule's average with it (with ``gn_graphs``' full iteration when that runs too);
  aggregation ``gradnorm_softmax`` (it reads the K parameter-space rows: one VJP per row), and ``gn_onevjp``
  with ``bdl_released`` weights, which ignore the rows (one VJP of the weighted sum); ``gn_reuse`` as
  ``gn_onevjp`` with ∇f taken from the LL step (``reuse_lower_grads``: one constraint pass less, a different
  estimate);
* ``gn`` on the parameter path (exact rows, one pass per constraint: the "naive" implementation);
* ``unrolled`` K = 1 and K = 3 on the image path;
* ``*_graphs``: the same with ``train.cuda_graphs``, which on a GPU replays each constraint's estimator from a
  CUDA graph (from the third iteration on; the default ``--warmup`` covers that);
* ``floor_joint``, ``floor_gn``, ``floor_onevjp``: the fusion-net passes of ``joint``, ``gn`` and ``gn_onevjp``
  alone (a forward with a graph of each batch the configuration fuses, then one backward over all of them
  per parameter-space row it forms, with fixed random cotangents; no constraint pass, no update): the part of
  each configuration's time that no scheduling of the constraint work can remove.

Every configuration clips the upper gradient to norm 1. Per configuration it counts, per iteration, the
lower-level optimiser updates, the upper updates and the fusion-net forwards (hooks), and reports the median
time (configurations timed round-robin, so load drift hits all alike), its ratio to ``joint`` and, on CUDA,
the peak memory.
Synthetic RGB-T scenes (``fusion.data.SyntheticScenes``) supply the inputs and the masks; the LL and UL batches differ.
"""

from __future__ import annotations

import argparse
import copy
import platform
import statistics
import sys
import time
from collections.abc import Callable

import torch

from bilevel import BilevelStep, Constraint
from experiments.cli import (
    ArgumentParser,
    device_name,
    image_size,
    non_negative_int,
    positive_int,
    resolve_device,
)
from fusion.colour import to_image
from fusion.data import collate_pairs, create_dataset
from fusion.nets import create_fusion_net
from tasks.registry import create_task

# Clip the upper gradient in every configuration: second-order terms through batch-norm layers that see very
# few values (a ResNet-18 stage at 2×2 pixels × batch 2) can be huge at benchmark sizes.
GRAD_CLIP = 1.0

CONFIGS: dict[str, tuple[str, str, dict]] = {
    "joint": ("joint (single-level)", "joint", {}),
    "gn": ("bi-level gn, image path, with UL update", "bilevel", {"hypergrad": "gn", "ul_every": 1}),
    "gn_lower": ("bi-level gn, lower-only iteration", "bilevel", {"hypergrad": "gn", "ul_every": 10**9}),
    "gn_lower_graphs": (
        "bi-level gn, lower-only iteration, CUDA graphs",
        "bilevel",
        {"hypergrad": "gn", "ul_every": 10**9, "cuda_graphs": True},
    ),
    "gn_onevjp": (
        "bi-level gn, image path, bdl_released weights (one VJP, no rows), with UL",
        "bilevel",
        {"hypergrad": "gn", "aggregate": "bdl_released"},
    ),
    "gn_reuse": (
        "bi-level gn, image path, bdl_released weights, ∇f from the LL step (reuse_lower_grads), with UL",
        "bilevel",
        {"hypergrad": "gn", "aggregate": "bdl_released", "reuse_lower_grads": True},
    ),
    "gn_param": (
        "bi-level gn, param path (per-constraint passes), with UL",
        "bilevel",
        {"hypergrad": "gn", "path": "param"},
    ),
    "gn_graphs": (
        "bi-level gn, image path, with UL update, CUDA graphs",
        "bilevel",
        {"hypergrad": "gn", "ul_every": 1, "cuda_graphs": True},
    ),
    "gn_reuse_graphs": (
        "bi-level gn, bdl_released weights, reuse_lower_grads, with UL, CUDA graphs",
        "bilevel",
        {"hypergrad": "gn", "aggregate": "bdl_released", "reuse_lower_grads": True, "cuda_graphs": True},
    ),
    "floor_joint": ("fusion-net passes of joint alone: forward, one backward", "floor", {"streams": ("ll",)}),
    "floor_gn": (
        "fusion-net passes of gn alone: LL and UL forwards, one backward over both per row (K = 2)",
        "floor",
        {"streams": ("ll", "ul"), "per_row": True},
    ),
    "floor_onevjp": (
        "fusion-net passes of gn_onevjp alone: LL and UL forwards, one backward over both",
        "floor",
        {"streams": ("ll", "ul")},
    ),
    "unrolled1": (
        "bi-level unrolled K=1, image path, with UL",
        "bilevel",
        {"hypergrad": "unrolled", "hypergrad_options": {"steps": 1}},
    ),
    "unrolled3": (
        "bi-level unrolled K=3, image path, with UL",
        "bilevel",
        {"hypergrad": "unrolled", "hypergrad_options": {"steps": 3}},
    ),
    "unrolled1_graphs": (
        "bi-level unrolled K=1, image path, with UL, CUDA graphs",
        "bilevel",
        {"hypergrad": "unrolled", "hypergrad_options": {"steps": 1}, "cuda_graphs": True},
    ),
    "unrolled3_graphs": (
        "bi-level unrolled K=3, image path, with UL, CUDA graphs",
        "bilevel",
        {"hypergrad": "unrolled", "hypergrad_options": {"steps": 3}, "cuda_graphs": True},
    ),
}


def get_args_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser("bench bilevel", description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", type=image_size, default=(64, 64), help="H or HxW (GPU targets: 256, 480x640)")
    parser.add_argument("--batch", type=positive_int, default=2, help="LL and UL batch size (GPU target: 8)")
    parser.add_argument("--iters", type=positive_int, default=5, help="timed iterations per configuration")
    parser.add_argument("--warmup", type=non_negative_int, default=3,
                        help="untimed iterations per configuration (CUDA graphs capture at the third)")
    parser.add_argument("--device", type=device_name, default="auto", help="cpu / cuda / auto (default: cuda if available)")
    parser.add_argument(
        "--amp", choices=("none", "bf16"), default="none", help="autocast dtype (GPU target: bf16)"
    )
    parser.add_argument("--net", default="bdl", help="fusion net (bdl_tiny for a quick smoke run)")
    parser.add_argument("--seg-encoder", default="resnet18")
    parser.add_argument("--threads", type=positive_int, default=None, help="torch CPU threads")
    parser.add_argument("--tiny", action="store_true", help="bdl_tiny + critic_tiny + seg_tiny (smoke test)")
    parser.add_argument("--grad-checkpointing", action="store_true",
                        help="recompute the fusion net's blocks in the backward pass (memory for time)")
    parser.add_argument("--polyphase", choices=("auto", "on", "off"), default="auto",
                        help="the BDL net's dense blocks on 2x2 polyphase components (net.kwargs.polyphase; auto: "
                             "on the CPU only)")
    parser.add_argument("--channels-last", action="store_true",
                        help="NHWC nets (train.channels_last): no layout transposes around cuDNN's convolutions")
    parser.add_argument("--cudnn-benchmark", action="store_true",
                        help="cuDNN times its algorithms per shape (train.cudnn_benchmark)")
    parser.add_argument("--profile", type=non_negative_int, default=0, metavar="N",
                        help="after timing, profile N iterations of each configuration (torch.profiler) and print "
                             "its most expensive kernels (CUDA) or operators (CPU)")
    parser.add_argument(
        "--configs", default=None,
        help=f"comma-separated subset of {', '.join(CONFIGS)} (default: all; on a CPU all but the *_graphs "
             "ones, which run eagerly there)"
    )
    return parser


def _batch(size: tuple[int, int], n: int, seed: int, device: torch.device) -> dict:
    data = create_dataset("synthetic", root=None, split="train", size=size, length=n, seed=seed)
    batch = collate_pairs([data[i] for i in range(n)])
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def _fused(net: torch.nn.Module, batch: dict) -> torch.Tensor:
    return to_image(net(batch["ir"], batch["vis"]), net.out_space, batch["vis"])


class Counter:
    """Counts fusion-net forwards and optimiser steps through hooks."""

    def __init__(
        self, net: torch.nn.Module, lower: list[torch.optim.Optimizer], upper: torch.optim.Optimizer
    ):
        self.forwards = self.lower = self.upper = 0
        net.register_forward_hook(lambda *_: self._add("forwards"))
        for opt in lower:
            opt.register_step_post_hook(lambda *_: self._add("lower"))
        upper.register_step_post_hook(lambda *_: self._add("upper"))

    def _add(self, what: str) -> None:
        setattr(self, what, getattr(self, what) + 1)

    def reset(self) -> None:
        self.forwards = self.lower = self.upper = 0


def build(args, device: torch.device, template: dict) -> dict:
    """Fresh copies of the nets (same initial weights for every configuration) and their optimisers."""
    net, critic, seg = (copy.deepcopy(template[k]) for k in ("net", "critic", "seg"))
    opts = {
        "net": torch.optim.SGD(net.parameters(), lr=1e-4),
        "critic": torch.optim.SGD(critic.parameters(), lr=2e-4, momentum=0.9),
        "seg": torch.optim.SGD(seg.parameters(), lr=2e-4, momentum=0.9),
    }
    counter = Counter(net, [opts["critic"], opts["seg"]], opts["net"])
    constraints = [
        Constraint(k, m, opts[k], m.lower_loss, m.upper_loss, ll_stream="ll", ul_stream="ul")
        for k, m in (("critic", critic), ("seg", seg))
    ]
    return {
        "net": net,
        "critic": critic,
        "seg": seg,
        "opts": opts,
        "counter": counter,
        "constraints": constraints,
    }


def joint_step(parts: dict, amp_dtype, ll: dict, ul: dict) -> Callable[[], None]:
    """The single-level baseline: one forward, one backward over x and y, one step of every optimiser."""
    net, critic, seg, opts = parts["net"], parts["critic"], parts["seg"], parts["opts"]
    device_type = next(net.parameters()).device.type

    def run() -> None:
        for opt in opts.values():
            opt.zero_grad(set_to_none=True)
        with torch.autocast(device_type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
            z = _fused(net, ll).float()
            loss = critic.lower_loss(z.detach(), ll)["loss"] + critic.upper_loss(z, ll)["loss"]
            loss = loss + seg.upper_loss(z, ll)["loss"]
        loss.backward()
        torch.nn.utils.clip_grad_norm_(net.parameters(), GRAD_CLIP)
        for opt in opts.values():
            opt.step()

    return run


def bilevel_step(parts: dict, amp_dtype, ll: dict, ul: dict, **kw) -> Callable[[], None]:
    step = BilevelStep(
        parts["net"],
        parts["opts"]["net"],
        _fused,
        parts["constraints"],
        amp_dtype=amp_dtype,
        grad_clip=GRAD_CLIP,
        **{"aggregate": "gradnorm_softmax", **kw},
    )
    batches = {"ll": ll, "ul": ul}  # both constraints read the same two streams: one forward each

    def run() -> None:
        diag = step.step(batches)
        if diag["nonfinite"]:
            raise RuntimeError(f"non-finite step in the benchmark: {diag}")

    return run


def fusion_passes(parts: dict, amp_dtype, batches: list[dict], rows: int = 1) -> Callable[[], None]:
    """Only the fusion-net work of a configuration: a forward with a graph of each batch, then ``rows``
    vector–Jacobian products over all of them into the net's parameters, as the step forms its rows (one per
    constraint; one in all for a rule that reads no rows). A lower bound on that configuration's time."""
    net = parts["net"]
    params = [p for p in net.parameters() if p.requires_grad]
    device_type = params[0].device.type
    generator = torch.Generator().manual_seed(0)
    cotangents: list[torch.Tensor] = []

    def run() -> None:
        with torch.autocast(device_type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
            fused = [_fused(net, batch) for batch in batches]
        if not cotangents:   # drawn once: every iteration back-propagates the same vectors
            cotangents.extend(torch.randn(z.shape, generator=generator).to(z) for z in fused)
        for i in range(rows):
            torch.autograd.grad(fused, params, cotangents, retain_graph=i < rows - 1)

    return run


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(
    runs: dict[str, tuple[Callable[[], None], Counter]], device: torch.device, warmup: int, iters: int
) -> dict[str, dict]:
    """Round-robin timing: every round runs each configuration once, so load drift hits all of them alike."""
    for _ in range(warmup):
        for run, _ in runs.values():
            run()
    _sync(device)
    times: dict[str, list[float]] = {label: [] for label in runs}
    for _, counter in runs.values():
        counter.reset()
    peaks = {}
    for _ in range(iters):
        for label, (run, _) in runs.items():
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            t0 = time.perf_counter()
            run()
            _sync(device)
            times[label].append(time.perf_counter() - t0)
            if device.type == "cuda":
                peaks[label] = max(peaks.get(label, 0.0), torch.cuda.max_memory_allocated(device) / 2**30)
    return {
        label: {
            "time": statistics.median(times[label]),
            "min": min(times[label]),
            "lower": counter.lower / iters,
            "upper": counter.upper / iters,
            "forwards": counter.forwards / iters,
            "peak_gib": peaks.get(label, float("nan")),
        }
        for label, (_, counter) in runs.items()
    }


def main(argv: list[str] | None = None) -> None:
    parser = get_args_parser()
    args = parser.parse_args(argv)
    device = resolve_device(args.device, what="--device")
    keys = ([k.strip() for k in args.configs.split(",") if k.strip()] if args.configs is not None
            else [k for k in CONFIGS if device.type == "cuda" or not k.endswith("_graphs")])
    if set(keys) - set(CONFIGS) or not {"joint", "gn", "gn_lower"} <= set(keys):
        parser.error(f"--configs needs joint, gn and gn_lower; choose from {', '.join(CONFIGS)}")
    if args.threads:
        torch.set_num_threads(args.threads)
    amp_dtype = torch.bfloat16 if args.amp == "bf16" else None
    torch.manual_seed(0)
    if args.tiny:
        args.net, args.seg_encoder = "bdl_tiny", "tiny"
    net_kwargs = {"grad_checkpointing": True} if args.grad_checkpointing else {}
    if args.polyphase != "auto":
        net_kwargs["polyphase"] = args.polyphase == "on"
    try:
        net = create_fusion_net(args.net, **net_kwargs)
    except TypeError as err:
        parser.error(f"--net {args.net}: {err}")
    template = {
        "net": net,
        "critic": create_task("critic_tiny" if args.tiny else "critic"),
        "seg": create_task("seg_tiny") if args.tiny else create_task("seg", arch="Unet", encoder_name=args.seg_encoder),
    }
    template = {k: v.to(device) for k, v in template.items()}
    if args.channels_last:
        template = {k: v.to(memory_format=torch.channels_last) for k, v in template.items()}
    torch.backends.cudnn.benchmark = args.cudnn_benchmark
    ll = _batch(args.size, args.batch, seed=1, device=device)
    ul = _batch(args.size, args.batch, seed=2, device=device)
    runs = {}
    for label, kind, kw in (CONFIGS[k] for k in keys):
        parts = build(args, device, template)
        if kind == "joint":
            run = joint_step(parts, amp_dtype, ll, ul)
        elif kind == "floor":
            streams = {"ll": ll, "ul": ul}
            rows = len(parts["constraints"]) if kw.get("per_row") else 1
            run = fusion_passes(parts, amp_dtype, [streams[s] for s in kw["streams"]], rows)
        else:
            run = bilevel_step(parts, amp_dtype, ll, ul, **kw)
        runs[label] = (run, parts["counter"])
    try:
        results = measure(runs, device, args.warmup, args.iters)
    except ValueError as err:   # training-mode batch norm needs two values per channel at the deepest level
        if "value per channel" not in str(err):
            raise
        print(f"error: --size {args.size[0]}x{args.size[1]} with --batch {args.batch} is too small for the "
              f"segmenter's batch norm ({err}); use a larger --size or --batch", file=sys.stderr)
        raise SystemExit(2) from None
    joint = results["joint (single-level)"]["time"]
    full = results["bi-level gn, image path, with UL update"]["time"]
    schedules = {"": (results["bi-level gn, lower-only iteration"]["time"], full)}
    if "gn_lower_graphs" in keys:
        lower_graphs = results[CONFIGS["gn_lower_graphs"][0]]["time"]
        if "gn_graphs" in keys:
            schedules[", CUDA graphs"] = (lower_graphs, results[CONFIGS["gn_graphs"][0]]["time"])
        else:
            schedules[", lower-only as CUDA graphs"] = (lower_graphs, full)

    dev = (
        torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else f"CPU ({platform.processor() or 'x86'}, {torch.get_num_threads()} threads)"
    )
    print(
        f"bilevel step benchmark — {dev}, torch {torch.__version__}, net {args.net}, "
        f"seg Unet/{args.seg_encoder}, {args.size[0]}×{args.size[1]}, batch {args.batch}, amp {args.amp}, "
        f"{'channels_last, ' if args.channels_last else ''}{'cudnn.benchmark, ' if args.cudnn_benchmark else ''}"
        f"{'grad checkpointing, ' if args.grad_checkpointing else ''}"
        f"{'' if args.polyphase == 'auto' else f'polyphase {args.polyphase}, '}median of {args.iters} (warm-up {args.warmup})"
    )
    print()
    print(
        "| configuration | median ms / iter | min ms | × joint | LL updates / iter | UL updates / iter "
        "| fusion forwards / iter | peak GiB |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for label, r in results.items():
        peak = "—" if r["peak_gib"] != r["peak_gib"] else f"{r['peak_gib']:.2f}"
        print(
            f"| {label} | {1e3 * r['time']:.1f} | {1e3 * r['min']:.1f} | {r['time'] / joint:.2f} | "
            f"{r['lower']:g} | {r['upper']:g} | {r['forwards']:g} | {peak} |"
        )
    for what, (lower_only, with_upper) in schedules.items():
        bdl_avg = (9 * lower_only + with_upper) / 10
        print(f"| BDL schedule average (9 lower-only + 1 full) / 10{what} | {1e3 * bdl_avg:.1f} | | "
              f"{bdl_avg / joint:.2f} | 2 | 0.1 | | |")
    print()
    print(
        "Unrolled K also runs K differentiable (virtual) inner steps per constraint inside the hypergradient;"
    )
    print("they are not optimiser updates and are not counted above. Forwards replayed in a CUDA graph are not "
          "counted either.")
    if args.profile:
        profile_runs(runs, device, args.profile)


def profile_runs(runs: dict[str, tuple[Callable[[], None], Counter]], device: torch.device, iters: int) -> None:
    """Where each configuration's time goes: the top kernels by GPU time (CUDA) or operators by CPU time."""
    from torch.profiler import ProfilerActivity, profile

    cuda = device.type == "cuda"
    activities = [ProfilerActivity.CPU, *([ProfilerActivity.CUDA] if cuda else [])]
    for label, (run, _) in runs.items():
        with profile(activities=activities) as prof:
            for _ in range(iters):
                run()
            _sync(device)
        print(f"\n### profile of {iters} iteration(s): {label}")
        print(prof.key_averages().table(sort_by="self_device_time_total" if cuda else "self_cpu_time_total",
                                        row_limit=15, max_name_column_width=60))


if __name__ == "__main__":
    main()
