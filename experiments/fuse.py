"""Fuse a folder of infrared/visible pairs with a trained checkpoint.

    python experiments/fuse.py --checkpoint outputs/seg/<run>/checkpoints/best.pt \\
        --ir $DATA/vifb/ir --vi $DATA/vifb/vi --out fused/ours

Pairs are matched by file stem (``fusion.image_io.match_pairs``). The net sees the IR image and the visible
image as stored; a luminance output gets its colour back from the visible image (``fusion.colour.to_image``,
exact BT.601 inverse, clamped to [0, 1]) and is saved as an 8-bit PNG ``<out>/<stem>.png`` (no hidden
rescaling). Only new files are written: an output that already exists is an error before anything is fused,
unless ``--skip-existing`` is given, which fuses only the missing outputs. Each image is written to a
temporary name and renamed into place, so an interrupted run (a crash, Ctrl-C, a bad pair in the middle
of the folder) never leaves a half-written PNG: rerun the same command with ``--skip-existing`` to finish.
Everything is checked before the first image is fused: the pairs, the checkpoint (it must load into its
net), the ``--out`` folder (writable, not an input folder), the ``--strip`` path and every image header (an
image over ``fusion.image_io.MAX_PIXELS`` pixels is an error naming it; the nets pad, so any small size
works). ``--stretch-16bit`` stretches each 16-bit image's min-max to [0, 1] (raw sensor counts; see
``fusion.image_io.read_image``). Bad input: exit code 2 and one line ``error: ...`` on stderr. Any checkpoint of ``experiments/run.py`` works, full or stripped
(``--strip`` writes a stripped copy). Score the results with ``experiments/evaluate.py``.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import torch

from experiments.checkpoint import (
    CheckpointError,
    load_checkpoint,
    load_weights,
    save_checkpoint,
    strip_checkpoint,
)
from experiments.cli import ArgumentParser, device_name, resolve_device
from experiments.logging_utils import OutputError, check_writable, output_guard
from fusion.colour import to_image
from fusion.image_io import image_size
from fusion.nets.registry import fused_output

__all__ = ["COMPILE_MODES", "Fuser", "fuse_batch", "fuse_pair", "load_fusion_net", "main", "net_inputs",
           "set_intensity_bias"]


def load_fusion_net(path: str | Path, device: str | torch.device = "cpu") -> torch.nn.Module:
    """Rebuild the fusion net of a checkpoint (``create_fusion_net(net.name, **net.kwargs)``), load strictly.

    Raises:
        CheckpointError: unreadable file, no ``net`` entry, or weights that do not fit the net.
    """
    from fusion.nets.registry import create_fusion_net

    ckpt = load_checkpoint(path, map_location="cpu")
    spec = ckpt.get("net")
    if not isinstance(spec, dict) or not isinstance(spec.get("name"), str) or not isinstance(spec.get("kwargs"), dict):
        raise CheckpointError(f"checkpoint {path} has no valid 'net' entry ({{'name': str, 'kwargs': dict}})")
    try:
        net = create_fusion_net(spec["name"], **spec["kwargs"])
    except TypeError as err:    # kwargs the net does not take
        raise CheckpointError(f"checkpoint {path}: net {spec['name']!r} cannot be built from its kwargs ({err})") from None
    load_weights(net, ckpt["model"], f"checkpoint {path} (net {spec['name']!r})")
    return net.to(device).eval()


def net_inputs(net: torch.nn.Module, ir: torch.Tensor) -> dict[str, torch.Tensor]:
    """Extra forward arguments a net needs at inference: MoE-Fusion built with ``attention="input"`` gets the
    label-free IR saliency map (``fusion.losses.saliency_map`` with ``source="ir"``), as the runner's
    evaluation gives it."""
    if getattr(net, "attention_mode", None) != "input":
        return {}
    from fusion.losses import saliency_map

    return {"attention": saliency_map({"ir": ir}, ir, source="ir")}


@torch.no_grad()
def fuse_batch(net: torch.nn.Module, ir: torch.Tensor, vis: torch.Tensor, **net_kwargs: torch.Tensor
               ) -> torch.Tensor:
    """(B,1,H,W) IR + (B,C,H,W) visible in [0, 1] → fused (B,C,H,W) in [0, 1] (float32) in the visible
    image's mode: what a user of the trained net gets, in whatever mode (train/eval) ``net`` is in.
    ``net_kwargs`` go to the forward (default: :func:`net_inputs`)."""
    raw, _ = fused_output(net(ir, vis, **(net_kwargs or net_inputs(net, ir))))
    return to_image(raw.float(), net.out_space, vis)


def fuse_pair(net: torch.nn.Module, ir: torch.Tensor, vis: torch.Tensor) -> torch.Tensor:
    """(1,H,W) IR + (C,H,W) visible in [0, 1] → fused (C,H,W) in [0, 1] in the visible image's mode."""
    device = next(net.parameters()).device
    return fuse_batch(net, ir[None].to(device), vis[None].to(device))[0].cpu()


COMPILE_MODES = ("none", "default", "reduce-overhead", "max-autotune")


class Fuser:
    """A trained fusion net prepared for repeated inference (eval mode, no autograd).

    Options, all off by default so the plain path equals :func:`fuse_batch` exactly:

    * ``amp="bf16"``: bfloat16 autocast (the fused image is returned in float32);
    * ``channels_last``: NHWC memory format, which cuDNN's fastest convolution kernels want;
    * ``compile``: a ``torch.compile`` mode; ``"reduce-overhead"`` also captures CUDA graphs, which removes
      the kernel-launch cost that dominates a small net at batch 1. The first input size compiles a graph
      specialised to it (a folder of one camera's images compiles once); a second size makes torch compile
      one shape-generic graph that serves every further size, so a mixed folder compiles twice, not per image.

    Example:
        >>> fuser = Fuser(load_fusion_net("best.pt", "cuda"), amp="bf16", compile="max-autotune")  # doctest: +SKIP
        >>> fused = fuser(ir[None], vis[None])        # moved to the net's device  # doctest: +SKIP
    """

    def __init__(self, net: torch.nn.Module, *, amp: str | None = None, channels_last: bool = False,
                 compile: str = "none", backend: str = "inductor") -> None:
        if amp not in (None, "none", "bf16"):
            raise ValueError(f"amp={amp!r}: expected 'bf16' or None")
        if compile not in COMPILE_MODES:
            raise ValueError(f"compile={compile!r}: expected one of {', '.join(COMPILE_MODES)}")
        self.net = net.eval()
        self.device = next(net.parameters()).device
        self.amp = amp == "bf16"
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format
        if channels_last:
            self.net = self.net.to(memory_format=torch.channels_last)
        self._forward = (self._raw if compile == "none" else
                         torch.compile(self._raw, mode=None if compile == "default" else compile, backend=backend))

    def _raw(self, ir: torch.Tensor, vis: torch.Tensor) -> torch.Tensor:
        extra = net_inputs(self.net, ir)
        with torch.autocast(self.device.type, torch.bfloat16, enabled=self.amp):
            raw, _ = fused_output(self.net(ir, vis, **extra))
        return raw

    @torch.no_grad()
    def __call__(self, ir: torch.Tensor, vis: torch.Tensor) -> torch.Tensor:
        """(B,1,H,W) IR + (B,C,H,W) visible in [0, 1] on the net's device → fused (B,C,H,W) float32 in [0, 1]."""
        ir = ir.to(self.device, memory_format=self.memory_format)
        vis = vis.to(self.device, memory_format=self.memory_format)
        raw = self._forward(ir, vis)
        return to_image(raw.float().contiguous(), self.net.out_space, vis)


def get_args_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(description="Fuse a folder of IR/visible pairs with a trained checkpoint.")
    p.add_argument("--checkpoint", required=True, help="checkpoint of experiments/run.py (full or stripped)")
    p.add_argument("--ir", required=True, help="folder of infrared images")
    p.add_argument("--vi", required=True, help="folder of visible images (same stems)")
    p.add_argument("--out", required=True, help="output folder (created; existing files are never replaced)")
    p.add_argument("--skip-existing", action="store_true",
                   help="fuse only the pairs whose output is missing (finish an interrupted run)")
    p.add_argument("--device", type=device_name, default="cpu", help="cpu | cuda | cuda:N")
    p.add_argument("--amp", choices=("none", "bf16"), default="none", help="bf16 autocast (GPU); default fp32")
    p.add_argument("--channels-last", action="store_true", help="NHWC memory format (faster convolutions on GPUs)")
    p.add_argument("--compile", choices=COMPILE_MODES, default="none",
                   help="torch.compile mode; 'reduce-overhead' adds CUDA graphs (a mixed-size folder compiles twice)")
    p.add_argument("--size-policy", default="error", choices=("error", "resize", "crop"),
                   help="what to do when the two images of a pair differ in size")
    p.add_argument("--stretch-16bit", action="store_true",
                   help="stretch each 16-bit image's min-max to [0, 1] (raw sensor counts) instead of /65535")
    p.add_argument("--strip", help="also write an inference-only copy of the checkpoint to this path")
    p.add_argument("--bias-alpha", type=float,
                   help="TC-MoA only: intensity-bias scale α of the prompts (paper Eq. 8; default: the net's)")
    p.add_argument("--bias-beta", type=float,
                   help="TC-MoA only: intensity-bias shift β of the prompts (paper Eq. 8; default: the net's)")
    return p


def set_intensity_bias(net: torch.nn.Module, alpha: float | None, beta: float | None) -> None:
    """Set TC-MoA's α/β (paper Eq. 8) for inference; other nets have no such control."""
    if alpha is None and beta is None:
        return
    if not hasattr(net, "bias_alpha"):
        raise ValueError(f"--bias-alpha/--bias-beta need a TC-MoA net; this checkpoint holds {net.name!r}")
    if alpha is not None:
        net.bias_alpha = alpha
    if beta is not None:
        net.bias_beta = beta


def _check_out(out: Path, inputs: Sequence[str]) -> None:
    """The output folder must be writable and none of the input folders (fused images would mix with them)."""
    resolved = out.resolve()
    for folder in inputs:
        if Path(folder).resolve() == resolved:
            raise ValueError(f"--out {out} is the input folder {folder}; choose another folder")
    check_writable(out)


def main(argv: Sequence[str] | None = None) -> int:
    from fusion.image_io import ImagePairError, match_pairs, read_pair, save_image

    args = get_args_parser().parse_args(argv)
    done = 0
    try:
        device = resolve_device(args.device, what="--device")
        pairs = match_pairs(args.ir, args.vi)
        out = Path(args.out)
        _check_out(out, (args.ir, args.vi))
        targets = [out / f"{stem}.png" for stem, _, _ in pairs]
        blocked = [t for t in targets if t.exists() and not t.is_file()]
        if blocked:
            raise FileExistsError(f"{blocked[0]} is in the way of an output image (not a file)")
        clash = [t for t in targets if t.exists()]
        if clash and not args.skip_existing:
            raise FileExistsError(f"{len(clash)} output file(s) already exist, e.g. {clash[0]}; fused images "
                                  "are never overwritten: choose a new --out folder, or pass --skip-existing "
                                  "to fuse only the missing ones")
        todo = [(pair, t) for pair, t in zip(pairs, targets) if not t.exists()]
        for (_, ir_path, vi_path), _ in todo:    # every header before the first fusion: no partial folder
            if image_size(ir_path) != image_size(vi_path) and args.size_policy == "error":
                raise ImagePairError(f"{ir_path} is {image_size(ir_path)} (H, W) but {vi_path} is "
                                     f"{image_size(vi_path)}; pass --size-policy resize or crop")
        strip_to = Path(args.strip) if args.strip else None
        if strip_to is not None:
            if strip_to.exists():
                raise FileExistsError(f"{strip_to} exists; choose a new path for --strip")
            check_writable(strip_to.parent)
        net = load_fusion_net(args.checkpoint, device)
        set_intensity_bias(net, args.bias_alpha, args.bias_beta)
        if strip_to is not None:
            save_checkpoint(strip_to, strip_checkpoint(load_checkpoint(args.checkpoint)))
        fuser = Fuser(net, amp=args.amp, channels_last=args.channels_last, compile=args.compile)
        with output_guard(out):
            out.mkdir(parents=True, exist_ok=True)
        start = time.perf_counter()
        for (stem, ir_path, vi_path), target in todo:
            ir, vis = read_pair(ir_path, vi_path, size_policy=args.size_policy, stretch16=args.stretch_16bit)
            fused = fuser(ir[None], vis[None])[0].cpu()
            with output_guard(out):
                save_image(fused, target)     # temporary file + rename: never a half-written PNG
            done += 1
            print(f"{stem}: {tuple(vis.shape[-2:])} -> {target}", flush=True)
    except (ImagePairError, FileExistsError, FileNotFoundError, OutputError, ValueError, KeyError) as err:
        message = str(err.args[0]) if type(err) is KeyError and err.args else str(err)
        finish = (f" ({done} image(s) were written; fix this and rerun with --skip-existing to finish)"
                  if done else "")
        print(f"error: {message}{finish}", file=sys.stderr)
        return 2
    elapsed = time.perf_counter() - start
    skipped = f", {len(pairs) - len(todo)} already there" if len(todo) < len(pairs) else ""
    print(f"fused {len(todo)} pairs into {out}{skipped} ({elapsed / max(len(todo), 1):.2f} s/pair)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
