"""Train, evaluate and log a bi-level fusion model: the command a researcher types first.

    python experiments/run.py --task seg                 # CPU default: synthetic RGB-T scenes, minutes
    python experiments/run.py --preset bdl_m3fd_det --data-root /data/M3FD
    python experiments/run.py --task det --hypergrad cg --set bilevel.cg.iters=5 --smoke
    torchrun --nproc_per_node=2 experiments/run.py --task seg      # DDP (gloo on CPU, nccl on GPU)

One linear loop (method.md §1): for every iteration t, a fusion-loss **warm-up** step while
t < ``train.warmup_iters`` (the lower levels already train on the detached fused image), afterwards one
:class:`bilevel.step.BilevelStep` (LL steps for each constraint, then per-constraint hypergradients,
aggregation and one upper step every ``bilevel.ul_every`` iterations; the fusion loss is an extra
standalone upper row). ``--task`` picks the constraints: seg = critic + segmentation, det = critic +
detection, critic, fusion (no constraint: single-level training), all = critic + seg + det.

Reproducibility: every data stream is a :class:`fusion.datasets.StepSampler` whose batch for step t depends
only on (seed, stream, rank, t), and the global torch generator is re-seeded from (seed, t) at the start of
each iteration, so ``--resume`` continues exactly as an uninterrupted run would (bitwise on CPU), and DDP
ranks draw identical random aggregation weights. Outputs, checkpoint format and logged keys follow
contracts.md (``outputs/<preset-or-task>/<YYYYmmdd-HHMMSS>-s<seed>/``).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import logging
import math
import os
import shutil
import signal
import sys
import time
import zlib
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # `python experiments/run.py` from a checkout without `pip install -e .`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np
import torch
from torch import Tensor, nn

from experiments.checkpoint import FORMAT, load_checkpoint, rng_state, save_checkpoint, set_rng_state
from experiments.config import (
    TASK_CHOICES,
    ConfigError,
    OptimConfig,
    RunConfig,
    apply_dict,
    apply_overrides,
    load_yaml,
    to_dict,
    to_yaml,
)
from experiments.logging_utils import MetricsCSV, OutputError, Tracker, image_panel, make_run_dir, \
    output_guard, resolve_wandb_mode, write_env
from experiments.presets import default_preset, get_preset, list_presets, smoke

__all__ = ["get_args_parser", "resolve_config", "main", "cli", "Experiment", "RunResult", "DataError",
           "NonFiniteError", "RunInterrupted", "build", "train", "evaluate"]

log = logging.getLogger("experiments.run")

ENV_DATA_ROOT = "FUSION_DATA_ROOT"
NEEDS_TO_ATTR = {"mask": "has_masks", "boxes": "has_boxes", "labels": "has_boxes"}
LABEL_WORDS = {"mask": "segmentation masks", "boxes": "bounding boxes", "labels": "box labels"}


class DataError(ValueError):
    """The data cannot serve the requested task (missing labels, missing root, bad split)."""


class NonFiniteError(RuntimeError):
    """Too many iterations had a NaN/Inf loss or gradient; the last good state was saved."""


class RunInterrupted(KeyboardInterrupt):
    """Ctrl-C / SIGTERM: the state after the last completed iteration was saved to ``checkpoint``."""

    def __init__(self, checkpoint: Path | None, step: int):
        super().__init__(f"interrupted after iteration {step}")
        self.checkpoint, self.step = checkpoint, step


# ============================================================================================ CLI / config
def get_args_parser() -> argparse.ArgumentParser:
    """The command-line interface (returns the parser; does not parse)."""
    p = argparse.ArgumentParser(
        prog="experiments/run.py", description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=f"presets: {', '.join(list_presets())}. Any config key: --set section.key=value "
               "(--print-config shows them all).")
    p.add_argument("--task", choices=TASK_CHOICES, help="constraints to train (default: seg)")
    p.add_argument("--preset", help="named preset (default: synthetic_<task>)")
    p.add_argument("--fusion-net", help="fusion net: bdl | moe_fusion | tc_moa (+ _tiny)")
    p.add_argument("--hypergrad", help="none | gn | fd | unrolled | cg | neumann | bdl_code")
    p.add_argument("--aggregate", help="sum | mean | fixed | bdl_released | rlw | gradnorm_softmax | dwa | uw | "
                                       "mgda | pcgrad | cagrad")
    p.add_argument("--data", help="dataset name of the run (fusion_/critic data); see fusion.datasets")
    p.add_argument("--data-root", help=f"dataset folder (default: ${ENV_DATA_ROOT})")
    p.add_argument("--device", help="auto | cpu | cuda | cuda:N")
    p.add_argument("--amp", choices=("bf16", "none"), help="bf16 autocast (GPU) or none")
    p.add_argument("--epochs", type=float, help="train length in epochs of the run's training split")
    p.add_argument("--iters", type=int, help="train length in iterations (warm-up included)")
    p.add_argument("--batch", type=int, help="lower- and upper-level batch size")
    p.add_argument("--crop", type=int, help="training crop (synthetic: scene size) in px")
    p.add_argument("--seed", type=int)
    p.add_argument("--out", help="output root (default: outputs)")
    p.add_argument("--wandb", choices=("online", "offline", "disabled"),
                   help="default: $WANDB_MODE, else online with an API key, else offline")
    p.add_argument("--smoke", action="store_true", help="tiny nets, 32 px synthetic scenes, 3 iterations (tests)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="strict config override, repeatable (e.g. --set bilevel.cg.iters=5)")
    p.add_argument("--config", help="YAML file of config values (the flags above override it)")
    p.add_argument("--resume", help="checkpoint to continue from (its config is the base)")
    p.add_argument("--eval-only", action="store_true", help="evaluate the --resume checkpoint, no training")
    p.add_argument("--deterministic", action="store_true", help="deterministic kernels (slower on GPU)")
    p.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    return p


def resolve_config(args: argparse.Namespace, resume_config: Mapping[str, Any] | None = None) -> RunConfig:
    """Preset (or the resumed run's config) → ``--config`` → ``--smoke`` → flags → ``--set``.

    Raises:
        ConfigError: unknown preset/key, bad value.
    """
    if resume_config is not None:
        if args.preset:
            log.warning("--preset %s ignored: --resume continues the checkpoint's config", args.preset)
        cfg = apply_dict(RunConfig(), dict(resume_config))
    else:
        cfg = get_preset(args.preset or default_preset(args.task or "seg"))
    if args.config:
        cfg = load_yaml(args.config, cfg)
    if args.smoke:
        cfg = smoke(cfg)
    flags: list[str] = []

    def put(key: str, value: Any) -> None:
        if value is not None:
            flags.append(f"{key}={value!r}")

    if args.task is not None and resume_config is None:
        put("task", args.task)
        if not args.preset:
            put("name", args.task)
    if args.fusion_net is not None and args.fusion_net != cfg.net.name:
        flags.append("net.kwargs={}")      # the preset's kwargs belong to the preset's net
        put("net.name", args.fusion_net)
    put("bilevel.hypergrad", args.hypergrad)
    put("bilevel.aggregate", args.aggregate)
    put("data.name", args.data)
    put("data.root", args.data_root)
    put("train.device", args.device)
    if args.amp is not None:
        flags.append("train.amp=None" if args.amp == "none" else "train.amp='bf16'")
    put("train.epochs", args.epochs)
    put("train.iters", args.iters)
    if args.batch is not None:
        put("train.batch", args.batch)
        put("train.ul_batch", args.batch)
    put("data.crop", args.crop)
    put("train.seed", args.seed)
    put("log.out", args.out)
    put("log.wandb", args.wandb)
    if args.deterministic:
        flags.append("train.deterministic=True")
    cfg = apply_overrides(cfg, flags)
    cfg = apply_overrides(cfg, args.overrides)
    if cfg.data.root is None and cfg.data.name != "synthetic" and os.environ.get(ENV_DATA_ROOT):
        cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, root=os.environ[ENV_DATA_ROOT]))
    return cfg


def check_names(cfg: RunConfig) -> None:
    """Fail before any work when a registry name is unknown (the message lists the valid names)."""
    from bilevel.aggregate import list_aggregators
    from bilevel.estimators import list_hypergrads
    from fusion.datasets import list_datasets
    from fusion.losses import list_fusion_losses
    from fusion.nets.registry import list_fusion_nets
    from tasks.registry import list_tasks

    checks = [("fusion net", "net.name", cfg.net.name, list_fusion_nets()),
              ("fusion loss", "loss.name", cfg.loss.name, list_fusion_losses()),
              ("hypergradient", "bilevel.hypergrad", cfg.bilevel.hypergrad, list_hypergrads()),
              ("aggregator", "bilevel.aggregate", cfg.bilevel.aggregate, list_aggregators()),
              ("dataset", "data.name", cfg.data.name, list_datasets())]
    for k in cfg.constraints:
        tcfg = getattr(cfg.tasks, k)
        checks.append(("task", f"tasks.{k}.name", tcfg.name or k, list_tasks()))
        if tcfg.data is not None:
            checks.append(("dataset", f"tasks.{k}.data", tcfg.data, list_datasets()))
    for what, key, value, valid in checks:
        if value not in valid:
            raise ConfigError(f"unknown {what} {value!r} ({key}); valid names: {', '.join(valid)}")


# ================================================================================================= data
def _stream_seed(seed: int, key: str, rank: int) -> int:
    return int(np.random.SeedSequence([seed, zlib.crc32(key.encode()), rank]).generate_state(1, np.uint32)[0])


def step_seed(seed: int, step: int) -> int:
    """Seed of the global torch generator at iteration ``step`` (identical on every DDP rank)."""
    return int(np.random.SeedSequence([seed, 0x57E9, step]).generate_state(1, np.uint32)[0])


def _holdout_subset(base, role: str, every: int):
    from fusion.datasets import FusionDataset

    class HoldoutSubset(FusionDataset):
        """Fixed split of a dataset without splits: sorted position i → test if i % N == 0, ul if
        i % N == N // 2, train otherwise."""

        def __init__(self, base, indices: list[int], role: str):
            super().__init__(None)
            self.base, self.indices, self.role = base, indices, role
            for attr in ("class_names", "det_class_names", "has_masks", "has_boxes", "ignore_index"):
                setattr(self, attr, getattr(base, attr))

        def __len__(self) -> int:
            return len(self.indices)

        def load(self, index: int) -> dict[str, Any]:
            return self.base.load(self.indices[index])

        def __getitem__(self, item):
            if isinstance(item, tuple):
                return self.base[(self.indices[int(item[0])], item[1])]
            return self.base[self.indices[int(item)]]

        def with_transform(self, transform):
            return HoldoutSubset(self.base.with_transform(transform), self.indices, self.role)

        def __repr__(self) -> str:
            return f"HoldoutSubset({self.base!r}, role={self.role!r}, every={every}, n={len(self)})"

    indices = holdout_indices(len(base), role, every)
    if not indices:
        raise DataError(f"data.holdout={every} leaves no {role} images out of {len(base)}")
    return HoldoutSubset(base, indices, role)


def holdout_indices(n: int, role: str, every: int) -> list[int]:
    """Sorted positions of ``role`` ∈ {train, ul, test} under ``data.holdout=every`` (a fixed split, so that
    evaluation scripts can rebuild the test set of a run without its config)."""
    pick = {"test": lambda i: i % every == 0, "ul": lambda i: i % every == every // 2}
    if role in pick:
        return [i for i in range(n) if pick[role](i)]
    return [i for i in range(n) if not (pick["test"](i) or pick["ul"](i))]


@dataclass(frozen=True)
class DataSpec:
    """Where one constraint's (or the run's) data comes from."""

    name: str
    root: str | None
    kwargs: tuple[tuple[str, Any], ...]

    @property
    def key(self) -> str:
        return f"{self.name}|{self.root}|{self.kwargs}"


def _spec(cfg: RunConfig, constraint: str | None) -> DataSpec:
    if constraint is None or getattr(cfg.tasks, constraint).data is None:
        extra = dict(cfg.data.kwargs)
        if constraint is not None:
            extra.update(getattr(cfg.tasks, constraint).data_kwargs)
        return DataSpec(cfg.data.name, cfg.data.root, tuple(sorted(extra.items())))
    t = getattr(cfg.tasks, constraint)
    return DataSpec(t.data, t.data_root, tuple(sorted(t.data_kwargs.items())))


def create_split(cfg: RunConfig, spec: DataSpec, role: str):
    """The dataset for ``role`` ∈ {train, ul, test} of ``spec``."""
    from fusion.datasets import create_dataset

    d = cfg.data
    kwargs = dict(spec.kwargs)
    split = {"train": d.train_split, "ul": d.ul_split, "test": d.test_split}[role]
    if spec.name == "synthetic":
        scene = max(d.scene or d.crop, d.crop)
        size = scene if role != "test" else (d.test_size or scene)
        # Per-constraint data may size its own roles (``tasks.seg.data_kwargs={"length": 2048, "test_length": 64}``).
        lengths = {"train": kwargs.pop("length", d.length), "ul": kwargs.pop("ul_length", d.ul_length),
                   "test": kwargs.pop("test_length", d.test_length)}
        kwargs = {"size": size, **({"length": lengths[role]} if lengths[role] else {}), **kwargs}
        return create_dataset("synthetic", None, split=split, **kwargs)
    if spec.root is None:
        raise DataError(f"dataset {spec.name!r} needs a folder: pass --data-root PATH (or set ${ENV_DATA_ROOT}; "
                        "for a per-constraint dataset --set tasks.<k>.data_root=PATH)")
    if not Path(spec.root).exists():
        raise DataError(f"data root {spec.root} does not exist (dataset {spec.name!r})")
    try:
        if d.holdout:
            return _holdout_subset(create_dataset(spec.name, spec.root, split="all", **kwargs), role, d.holdout)
        return create_dataset(spec.name, spec.root, split=split, **kwargs)
    except (OSError, ValueError) as err:
        raise DataError(f"cannot load the {role} split of dataset {spec.name!r} from {spec.root}: {err}") from err


def check_labels(task_name: str, needs: Sequence[str], dataset, spec: DataSpec) -> None:
    """Raise a :class:`DataError` when ``dataset`` lacks labels the task needs."""
    missing = sorted({k for k in needs if k in NEEDS_TO_ATTR and not getattr(dataset, NEEDS_TO_ATTR[k], False)})
    if missing:
        words = " and ".join(dict.fromkeys(LABEL_WORDS[k] for k in missing))
        raise DataError(
            f"constraint {task_name!r} needs {words}, but dataset {spec.name!r} has none. Use a labelled dataset "
            f"for the run (e.g. --data synthetic), or give this constraint its own data: "
            f"--set tasks.{task_name}.data=synthetic (or a labelled dataset with tasks.{task_name}.data_root)")


def to_device(batch: Mapping[str, Any], device: torch.device) -> dict[str, Any]:
    """Move a collated batch's tensors (and lists of tensors: boxes, labels) to ``device``."""
    out = dict(batch)
    for key, value in batch.items():
        if isinstance(value, Tensor):
            out[key] = value.to(device, non_blocking=True)
        elif isinstance(value, (list, tuple)) and value and isinstance(value[0], Tensor):
            out[key] = [v.to(device, non_blocking=True) for v in value]
    return out


class Streams:
    """Endless, resumable training batches: one StepSampler loader per (data, split, batch size)."""

    def __init__(self, cfg: RunConfig, rank: int, start_step: int, device: torch.device):
        self.cfg, self.rank, self.start, self.device = cfg, rank, start_step, device
        self.datasets: dict[str, Any] = {}
        self.loaders: dict[str, Iterator] = {}
        self.sizes: dict[str, int] = {}

    def add(self, spec: DataSpec, role: str, batch_size: int, dataset) -> str:
        from fusion.datasets import make_loader

        key = f"{spec.key}|{role}|{batch_size}"
        if key not in self.loaders:
            d = self.cfg.data
            crop = None if spec.name == "synthetic" and (d.scene or 0) <= d.crop else d.crop
            loader = make_loader(dataset, batch_size, seed=_stream_seed(self.cfg.train.seed, key, self.rank),
                                 num_workers=self.cfg.data.num_workers, crop=crop, hflip=True,
                                 start_step=self.start)
            self.datasets[key], self.loaders[key], self.sizes[key] = dataset, iter(loader), len(dataset)
        return key

    def next(self) -> dict[str, dict[str, Any]]:
        """One batch of every stream, moved to the device (the same object for constraints sharing a stream)."""
        return {k: to_device(next(it), self.device) for k, it in self.loaders.items()}


# ============================================================================================ optimisers
def make_optimizer(params, ocfg: OptimConfig) -> torch.optim.Optimizer:
    """Adam / AdamW / SGD from an :class:`OptimConfig` (unknown names are rejected by the config)."""
    params = [p for p in params if p.requires_grad]
    if ocfg.name == "sgd":
        return torch.optim.SGD(params, lr=ocfg.lr, momentum=ocfg.momentum, weight_decay=ocfg.weight_decay)
    cls = torch.optim.Adam if ocfg.name == "adam" else torch.optim.AdamW
    return cls(params, lr=ocfg.lr, betas=tuple(ocfg.betas), weight_decay=ocfg.weight_decay)


@dataclass(frozen=True)
class LRFactor:
    """Picklable LR multiplier: linear warm-up, then constant / cosine to 0 / step decay."""

    schedule: str
    total: int
    warmup: int
    milestones: tuple[int, ...]
    gamma: float

    def __call__(self, step: int) -> float:
        factor = min(1.0, (step + 1) / self.warmup) if self.warmup > 0 else 1.0
        if self.schedule == "cosine":
            span = max(1, self.total - self.warmup)
            progress = min(1.0, max(0, step - self.warmup) / span)
            factor *= 0.5 * (1.0 + math.cos(math.pi * progress))
        elif self.schedule == "step":
            factor *= self.gamma ** sum(step >= m for m in self.milestones)
        return factor


def make_scheduler(opt: torch.optim.Optimizer, ocfg: OptimConfig, total: int):
    return torch.optim.lr_scheduler.LambdaLR(opt, LRFactor(ocfg.schedule, total, ocfg.warmup_steps,
                                                           tuple(ocfg.milestones), ocfg.gamma))


# ============================================================================================ experiment
@dataclass
class Experiment:
    """Everything a run trains and evaluates, built by :func:`build`."""

    cfg: RunConfig
    device: torch.device
    net: nn.Module
    loss_fn: nn.Module
    tasks: dict[str, nn.Module]
    upper_optim: torch.optim.Optimizer
    upper_sched: Any
    lower_optims: dict[str, torch.optim.Optimizer]
    lower_scheds: dict[str, Any]
    step: Any                                         # bilevel.step.BilevelStep
    streams: Streams
    stream_of: dict[tuple[str, str], str]             # (constraint or "run", role) → stream key
    test_sets: dict[str, Any]                         # "run" / constraint → test dataset
    val_set: Any                                      # the run's UL split, for validate()
    specs: dict[str, DataSpec]
    reduce: Any = None
    world: int = 1
    rank: int = 0
    nonfinite_total: int = 0
    best_val: float = math.inf

    # -- the two maps every level shares
    def forward(self, net: nn.Module, batch: Mapping[str, Any]) -> Tensor:
        """Fusion net → image in the visible's mode. Unclamped while training so the fusion loss and the
        constraints get gradients everywhere (clamped at evaluation)."""
        from fusion.colour import to_image
        from fusion.nets.registry import fused_output

        raw, _ = fused_output(net(batch["ir"], batch["vis"]))
        return to_image(raw, self.net.out_space, batch["vis"], clamp=False)

    def fusion_loss(self, z: Tensor, batch: Mapping[str, Any], aux: Mapping[str, Tensor] | None = None) -> dict:
        """The fusion loss on the fused image (its luminance for one-channel nets, which equals the raw net
        output exactly because ``to_image`` inverts YCbCr exactly and is unclamped here)."""
        from fusion.colour import luminance

        fused = luminance(z) if self.net.out_space in ("y", "grey") else z
        return self.loss_fn(fused.float(), batch["ir"], batch["vis"], aux_losses=aux)

    def autocast(self):
        if self.cfg.train.amp != "bf16":
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=torch.bfloat16)

    def _reduce_grads(self, params: Sequence[Tensor]) -> None:
        if self.reduce is None:
            return
        grads = [p.grad for p in params if p.grad is not None]
        if grads:
            flat = self.reduce(torch.cat([g.reshape(-1) for g in grads]))
            i = 0
            for g in grads:
                g.copy_(flat[i:i + g.numel()].view_as(g))
                i += g.numel()

    # -- one iteration
    def warmup_step(self, batches: Mapping[str, Any]) -> dict[str, float]:
        """Fusion-loss step on the run's training batch; the constraints take their LL steps on the detached
        fused image so they are trained when the bi-level phase starts. Nothing is updated on NaN/Inf."""
        from fusion.colour import to_image
        from fusion.nets.registry import fused_output

        diag = {"upper_step": 1.0, "nonfinite": 0.0}
        run_batch = batches[self.stream_of[("run", "train")]]
        with self.autocast():
            raw, aux = fused_output(self.net(run_batch["ir"], run_batch["vis"]))
            z = to_image(raw, self.net.out_space, run_batch["vis"], clamp=False)
        fusion = self.fusion_loss(z, run_batch, aux)["loss"]
        fused = {id(run_batch): z.detach().float()}
        losses = {"fusion": fusion}
        for k, task in self.tasks.items():
            b = batches[self.stream_of[(k, "train")]]
            if id(b) not in fused:
                with torch.no_grad(), self.autocast():
                    fused[id(b)] = self.forward(self.net, b).float()
        lower_losses = {}
        for k, task in self.tasks.items():
            self.lower_optims[k].zero_grad(set_to_none=True)
            b = batches[self.stream_of[(k, "train")]]
            with self.autocast():
                lower_losses[k] = task.lower_loss(fused[id(b)], b)["loss"].float()
        values = {**{f"loss/lower/{k}": v for k, v in lower_losses.items()}, "loss/upper/fusion": fusion}
        diag.update({k: float(v.detach()) for k, v in values.items()})
        if not all(math.isfinite(v) for v in diag.values()):
            diag.update(nonfinite=1.0, upper_step=0.0)
            return diag
        for k, task in self.tasks.items():
            lower_losses[k].backward()
            self._reduce_grads(list(task.parameters()))
            self.lower_optims[k].step()
            self.lower_scheds[k].step()
            lower_steps = getattr(self.cfg.tasks, k).lower_steps
            b = batches[self.stream_of[(k, "train")]]
            for _ in range(lower_steps - 1):
                self.lower_optims[k].zero_grad(set_to_none=True)
                with self.autocast():
                    loss = task.lower_loss(fused[id(b)], b)["loss"].float()
                if not torch.isfinite(loss):
                    break
                loss.backward()
                self._reduce_grads(list(task.parameters()))
                self.lower_optims[k].step()
                self.lower_scheds[k].step()
        self.upper_optim.zero_grad(set_to_none=True)
        fusion.backward()
        params = [p for p in self.net.parameters() if p.grad is not None]
        self._reduce_grads(params)
        if self.cfg.bilevel.grad_clip is not None:
            torch.nn.utils.clip_grad_norm_(params, self.cfg.bilevel.grad_clip)
        self.upper_optim.step()
        self.upper_sched.step()
        return diag

    def bilevel_step(self, batches: Mapping[str, Any]) -> dict[str, float]:
        ll = {k: batches[self.stream_of[(k, "train")]] for k in self.tasks}
        ul = {k: batches[self.stream_of[(k, "ul")]] for k in self.tasks}
        upper = batches[self.stream_of[("run", "train")]] if self.cfg.bilevel.fusion_row else None
        return self.step.step(ll, ul, upper)

    def lrs(self) -> dict[str, float]:
        out = {"lr/upper": float(self.upper_optim.param_groups[0]["lr"])}
        out.update({f"lr/{k}": float(o.param_groups[0]["lr"]) for k, o in self.lower_optims.items()})
        return out

    # -- checkpoints
    def checkpoint(self, step: int) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "config": to_dict(self.cfg),
            "net": {"name": self.net.name, "kwargs": dict(getattr(self.net, "config", {}))},
            "model": self.net.state_dict(),
            "lower": {k: {"model": t.state_dict(), "optim": self.lower_optims[k].state_dict(),
                          "sched": self.lower_scheds[k].state_dict()} for k, t in self.tasks.items()},
            "upper_optim": self.upper_optim.state_dict(),
            "upper_sched": self.upper_sched.state_dict(),
            "aggregator_state": self.step.state_dict() if self.step is not None else {},
            "step": int(step),
            "rng": rng_state(),
            "extra": {"nonfinite_total": self.nonfinite_total,
                      "best_val": None if math.isinf(self.best_val) else self.best_val},
        }

    def load(self, ckpt: Mapping[str, Any], *, weights_only: bool = False) -> int:
        """Restore a checkpoint strictly; returns the iteration to continue from."""
        self.net.load_state_dict(ckpt["model"], strict=True)
        lower = ckpt.get("lower", {})
        for k, task in self.tasks.items():
            if k in lower:
                task.load_state_dict(lower[k]["model"], strict=True)
            elif not weights_only:
                raise ValueError(f"checkpoint has no state for constraint {k!r} (it holds {sorted(lower)})")
        if weights_only:
            return int(ckpt.get("step", 0))
        for k in self.tasks:
            self.lower_optims[k].load_state_dict(lower[k]["optim"])
            self.lower_scheds[k].load_state_dict(lower[k]["sched"])
        self.upper_optim.load_state_dict(ckpt["upper_optim"])
        self.upper_sched.load_state_dict(ckpt["upper_sched"])
        if self.step is not None and ckpt.get("aggregator_state"):
            self.step.load_state_dict(ckpt["aggregator_state"])
        extra = ckpt.get("extra", {})
        self.nonfinite_total = int(extra.get("nonfinite_total", 0))
        self.best_val = math.inf if extra.get("best_val") is None else float(extra["best_val"])
        set_rng_state(ckpt["rng"])
        return int(ckpt["step"])


def _device(cfg: RunConfig, local_rank: int) -> torch.device:
    name = cfg.train.device
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ConfigError(f"train.device={cfg.train.device!r} but CUDA is not available; use --device cpu")
        if name == "cuda":
            name = f"cuda:{local_rank}"
    return torch.device(name)


def _task_kwargs(cfg: RunConfig, k: str, dataset) -> dict[str, Any]:
    tcfg = getattr(cfg.tasks, k)
    kwargs = dict(tcfg.kwargs)
    if k == "seg" and dataset.class_names is not None:
        kwargs.setdefault("class_names", list(dataset.class_names))
        kwargs.setdefault("ignore_index", int(dataset.ignore_index))
    if k == "det":
        if dataset.det_class_names is not None:
            kwargs.setdefault("class_names", list(dataset.det_class_names))
        if _spec(cfg, k).name == "synthetic":   # no internal rescaling of the square scenes
            kwargs.setdefault("min_size", cfg.data.crop)
            kwargs.setdefault("max_size", cfg.data.crop)
    return kwargs


def build(cfg: RunConfig, *, rank: int = 0, world: int = 1, local_rank: int = 0, start_step: int = 0,
          reduce=None) -> Experiment:
    """Datasets (labels checked first), fusion net, loss, constraint tasks, optimisers and the bi-level step."""
    from bilevel.step import BilevelStep, Constraint
    from fusion.losses import create_fusion_loss
    from fusion.nets.registry import create_fusion_net
    from tasks.registry import create_task

    check_names(cfg)
    device = _device(cfg, local_rank)

    # ---- data first: a task whose data lacks labels fails here, before any net is built
    specs = {"run": _spec(cfg, None), **{k: _spec(cfg, k) for k in cfg.constraints}}
    cache: dict[tuple[str, str], Any] = {}

    def dataset(spec: DataSpec, role: str):
        if (spec.key, role) not in cache:
            cache[(spec.key, role)] = create_split(cfg, spec, role)
        return cache[(spec.key, role)]

    train_sets = {name: dataset(spec, "train") for name, spec in specs.items()}
    for k in cfg.constraints:
        check_labels(k, _needs(k), train_sets[k], specs[k])

    streams = Streams(cfg, rank, start_step, device)
    stream_of: dict[tuple[str, str], str] = {}
    stream_of[("run", "train")] = streams.add(specs["run"], "train", cfg.train.batch, train_sets["run"])
    for k in cfg.constraints:
        tcfg = getattr(cfg.tasks, k)
        stream_of[(k, "train")] = streams.add(specs[k], "train", tcfg.batch or cfg.train.batch, train_sets[k])
        stream_of[(k, "ul")] = streams.add(specs[k], "ul", tcfg.ul_batch or cfg.train.ul_batch,
                                           dataset(specs[k], "ul"))
    test_sets = {name: dataset(spec, "test") for name, spec in specs.items()}
    val_set = dataset(specs["run"], "ul") if cfg.eval.val_every else None

    # ---- nets
    # Initial weights depend on the seed only (not on what the data code drew), identical on every rank.
    torch.manual_seed(cfg.train.seed)
    net = create_fusion_net(cfg.net.name, **cfg.net.kwargs).to(device)
    if cfg.net.init:
        init = load_checkpoint(cfg.net.init)
        if init["net"]["name"] != cfg.net.name:
            raise ConfigError(f"net.init {cfg.net.init} holds a {init['net']['name']!r} net, not {cfg.net.name!r}")
        net.load_state_dict(init["model"], strict=True)
    loss_fn = create_fusion_loss(cfg.loss.name, **cfg.loss.kwargs).to(device)
    tasks = {}
    for k in cfg.constraints:
        torch.manual_seed(_stream_seed(cfg.train.seed, f"init/{k}", 0))
        tasks[k] = create_task(getattr(cfg.tasks, k).name or k, **_task_kwargs(cfg, k, train_sets[k])).to(device)
    if reduce is not None:   # identical start on every rank, whatever the local RNG did
        import torch.distributed as dist

        for module in (net, *tasks.values()):
            for t in list(module.parameters()) + list(module.buffers()):
                dist.broadcast(t.data, 0)

    total = cfg.train.iters
    upper_optim = make_optimizer(net.parameters(), cfg.train.upper_optim)
    upper_sched = make_scheduler(upper_optim, cfg.train.upper_optim, total)
    lower_optims = {k: make_optimizer(t.parameters(), getattr(cfg.tasks, k).optim) for k, t in tasks.items()}
    lower_scheds = {k: make_scheduler(o, getattr(cfg.tasks, k).optim, total * getattr(cfg.tasks, k).lower_steps)
                    for k, o in lower_optims.items()}

    exp = Experiment(cfg=cfg, device=device, net=net, loss_fn=loss_fn, tasks=tasks, upper_optim=upper_optim,
                     upper_sched=upper_sched, lower_optims=lower_optims, lower_scheds=lower_scheds, step=None,
                     streams=streams, stream_of=stream_of, test_sets=test_sets, val_set=val_set, specs=specs,
                     reduce=reduce,
                     world=world, rank=rank)
    constraints = [
        Constraint(name=k, module=t, optimizer=lower_optims[k],
                   lower_loss=(lambda z, b, t=t: t.lower_loss(z, b)["loss"]),
                   upper_loss=(lambda z, b, t=t: t.upper_loss(z, b)["loss"]),
                   scheduler=lower_scheds[k], lower_steps=getattr(cfg.tasks, k).lower_steps)
        for k, t in tasks.items()]
    agg_options = cfg.bilevel.aggregator_options()
    if cfg.bilevel.aggregate in ("rlw", "pcgrad"):
        agg_options.setdefault("seed", cfg.train.seed)
    if cfg.bilevel.aggregate == "fixed" and not agg_options.get("weights"):
        agg_options["weights"] = [1.0] * (len(constraints) + int(cfg.bilevel.fusion_row))
    exp.step = BilevelStep(
        net, upper_optim, exp.forward, constraints,
        upper_loss=(lambda z, b: exp.fusion_loss(z, b)["loss"]) if cfg.bilevel.fusion_row else None,
        hypergrad=cfg.bilevel.hypergrad, hypergrad_options=cfg.bilevel.estimator_options(),
        aggregate=cfg.bilevel.aggregate, aggregate_options=agg_options, ul_every=cfg.bilevel.ul_every,
        path=cfg.bilevel.path, amp_dtype=torch.bfloat16 if cfg.train.amp == "bf16" else None,
        grad_clip=cfg.bilevel.grad_clip, reduce=reduce, upper_scheduler=upper_sched)
    return exp


def _needs(k: str) -> frozenset[str]:
    """Batch keys a constraint needs, read from its class without building it."""
    from tasks.critic import CriticTask
    from tasks.det import DetTask
    from tasks.seg import SegTask

    return {"critic": CriticTask, "seg": SegTask, "det": DetTask}[k].needs


# ============================================================================================== training
_STOP = {"requested": False}


def _request_stop(signum, frame) -> None:  # noqa: ARG001
    if _STOP["requested"]:      # a second Ctrl-C stops at once
        raise KeyboardInterrupt
    _STOP["requested"] = True
    print(f"\n{signal.Signals(signum).name}: finishing the current iteration, saving a checkpoint "
          "(press Ctrl-C again to abort without saving)", file=sys.stderr, flush=True)


def _after_step(step: int) -> None:
    """Called after every completed iteration (a seam for tests that simulate an interruption)."""


def _any(flag: bool, exp: Experiment) -> bool:
    if exp.world == 1:
        return flag
    import torch.distributed as dist

    t = torch.tensor([float(flag)])
    dist.all_reduce(t)
    return bool(t.item() > 0)


class _Averager:
    """Means of the scalars since the last log (``nonfinite`` and ``upper_step`` are summed)."""

    SUMMED = ("nonfinite", "upper_step")

    def __init__(self):
        self.sums: dict[str, float] = {}
        self.counts: dict[str, int] = {}

    def add(self, values: Mapping[str, float]) -> None:
        for k, v in values.items():
            if isinstance(v, (int, float)) and (math.isfinite(v) or k in self.SUMMED):
                self.sums[k] = self.sums.get(k, 0.0) + float(v)
                self.counts[k] = self.counts.get(k, 0) + 1

    def pop(self) -> dict[str, float]:
        out = {k: (s if k in self.SUMMED else s / self.counts[k]) for k, s in self.sums.items()}
        self.sums, self.counts = {}, {}
        return out


@torch.no_grad()
def validate(exp: Experiment) -> float:
    """Mean fusion loss on the first ``eval.val_batches`` batches of the run's held-out UL split."""
    from fusion.datasets import collate_pairs

    ds = exp.val_set
    d = exp.cfg.data
    if exp.specs["run"].name != "synthetic" or (d.scene or 0) > d.crop:   # fixed training-size crops
        from fusion.datasets import RandomCropFlip

        ds = ds.with_transform(RandomCropFlip(exp.cfg.data.crop, hflip=False))
    bs = exp.cfg.train.ul_batch
    was = exp.net.training
    exp.net.eval()
    total, n = 0.0, 0
    for i in range(min(exp.cfg.eval.val_batches, math.ceil(len(ds) / bs))):
        idx = range(i * bs, min(len(ds), (i + 1) * bs))
        batch = to_device(collate_pairs([ds[(j, j)] for j in idx]), exp.device)
        with exp.autocast():
            z = exp.forward(exp.net, batch)
        total += float(exp.fusion_loss(z.float(), batch)["loss"]) * len(idx)
        n += len(idx)
    exp.net.train(was)
    value = total / max(n, 1)
    if exp.reduce is not None:
        value = float(exp.reduce(torch.tensor([value], dtype=torch.float64)).item())
    return value


@torch.no_grad()
def panel(exp: Experiment) -> np.ndarray:
    """IR | visible | fused | label | prediction for the first test image (seg mask or det boxes)."""
    from fusion.colour import to_image
    from fusion.datasets import collate_pairs
    from fusion.nets.registry import fused_output
    from tasks.base import eval_mode

    key = "seg" if "seg" in exp.tasks else "det" if "det" in exp.tasks else "run"
    batch = to_device(collate_pairs([exp.test_sets[key][0]]), exp.device)
    with eval_mode(exp.net):
        raw, _ = fused_output(exp.net(batch["ir"], batch["vis"]))
    fused = to_image(raw.float(), exp.net.out_space, batch["vis"])
    kw: dict[str, Any] = {}
    if key == "seg":
        with eval_mode(exp.tasks["seg"]):
            kw = {"mask": batch["mask"][0], "pred_mask": exp.tasks["seg"](fused).argmax(1)[0]}
    elif key == "det":
        with eval_mode(exp.tasks["det"]):
            det = exp.tasks["det"](fused)[0]
        keep = det["scores"] > 0.3
        kw = {"boxes": det["boxes"][keep], "labels": det["labels"][keep]}
    return image_panel(batch["ir"][0], batch["vis"][0], fused[0], **kw)


def train(exp: Experiment, start_step: int, run_dir: Path | None, csv: MetricsCSV | None, tracker: Tracker | None,
          progress: bool = True) -> int:
    """The training loop; returns the number of completed iterations."""
    from tqdm import tqdm

    cfg = exp.cfg
    iters = cfg.train.iters
    is_main = exp.rank == 0
    avg = _Averager()
    t_last = time.perf_counter()
    pairs = 0
    bar = tqdm(total=iters, initial=start_step, desc="train", unit="it", dynamic_ncols=True, leave=True,
               disable=not (progress and is_main and cfg.log.progress))
    step = start_step
    old = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    in_main_thread = _in_main_thread()
    if in_main_thread:
        _STOP["requested"] = False
        for s in old:
            signal.signal(s, _request_stop)
    try:
        while step < iters:
            torch.manual_seed(step_seed(cfg.train.seed, step))
            batches = exp.streams.next()
            exp.net.train()
            for t in exp.tasks.values():
                t.train()
            diag = exp.warmup_step(batches) if step < cfg.train.warmup_iters else exp.bilevel_step(batches)
            step += 1
            pairs += cfg.train.batch * exp.world
            if diag.get("nonfinite"):
                exp.nonfinite_total += 1
                log.warning("iteration %d: non-finite loss or gradient, step skipped (%d/%d allowed)",
                            step, exp.nonfinite_total, cfg.train.max_nonfinite)
            diag["train/nonfinite_total"] = float(exp.nonfinite_total)
            avg.add({**diag, **exp.lrs()})
            bar.update(1)
            if step % cfg.log.log_every == 0 or step == iters:
                now = time.perf_counter()
                scalars = avg.pop()
                scalars["throughput/pairs_per_s"] = pairs / max(now - t_last, 1e-9)
                t_last, pairs = now, 0
                if is_main:
                    csv.log(step, scalars)
                    tracker.log(scalars, step)
                    bar.set_postfix({k.split("/")[-2][0] + ":" + k.split("/")[-1]: f"{v:.3g}"
                                     for k, v in scalars.items() if k.startswith("loss/")}, refresh=False)
            if cfg.eval.val_every and step % cfg.eval.val_every == 0:
                value = validate(exp)
                if is_main:
                    csv.log(step, {"loss/val/fusion": value})
                    tracker.log({"loss/val/fusion": value}, step)
                    if value < exp.best_val:
                        exp.best_val = value
                        save_checkpoint(run_dir / "checkpoints" / "best.pt", exp.checkpoint(step))
            if is_main and cfg.log.image_every and step % cfg.log.image_every == 0:
                image = panel(exp)
                with output_guard(run_dir):
                    from PIL import Image

                    (run_dir / "plots" / "panels").mkdir(exist_ok=True)
                    Image.fromarray(image).save(run_dir / "plots" / "panels" / f"step_{step:07d}.png")
                tracker.log_image("panel", image, step, caption="IR | visible | fused | label | prediction")
            if is_main and cfg.train.ckpt_every and step % cfg.train.ckpt_every == 0:
                save_checkpoint(run_dir / "checkpoints" / "last.pt", exp.checkpoint(step))
            if _any(exp.nonfinite_total >= cfg.train.max_nonfinite > 0, exp):
                path = _save_last(exp, run_dir, step)
                raise NonFiniteError(
                    f"stopped after {exp.nonfinite_total} non-finite iterations (train.max_nonfinite="
                    f"{cfg.train.max_nonfinite}); the last good state is in {path}. Lower the learning rates, "
                    "set bilevel.grad_clip, or check the data.")
            _after_step(step)
            if _any(_STOP["requested"], exp):
                path = _save_last(exp, run_dir, step)
                raise RunInterrupted(path, step)
    finally:
        bar.close()
        if in_main_thread:
            for s, handler in old.items():
                signal.signal(s, handler)
    return step


def _in_main_thread() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()


def _save_last(exp: Experiment, run_dir: Path | None, step: int) -> Path | None:
    if exp.rank != 0 or run_dir is None:
        return None
    return save_checkpoint(run_dir / "checkpoints" / "last.pt", exp.checkpoint(step))


# ============================================================================================ evaluation
def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return "nan" if math.isnan(v) else f"{v:.4f}"
    return str(v)


def _write_csv(path: Path, header: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
    import csv as _csv

    with output_guard(path.parent), open(path, "w", newline="", encoding="utf-8") as fh:
        writer = _csv.writer(fh)
        writer.writerow(header)
        for row in rows:
            writer.writerow([_fmt(v) if isinstance(v, float) else v for v in row])


@torch.no_grad()
def _fused_test(exp: Experiment, dataset) -> list[tuple[Tensor, dict[str, Any]]]:
    from fusion.colour import to_image
    from fusion.datasets import collate_pairs
    from fusion.nets.registry import fused_output
    from tqdm import tqdm

    n = len(dataset) if exp.cfg.eval.max_images is None else min(len(dataset), exp.cfg.eval.max_images)
    bs = exp.cfg.eval.batch
    out = []
    exp.net.eval()
    for i in tqdm(range(0, n, bs), desc="fuse test", unit="batch", disable=not exp.cfg.log.progress,
                  leave=False):
        batch = to_device(collate_pairs([dataset[j] for j in range(i, min(n, i + bs))]), exp.device)
        raw, _ = fused_output(exp.net(batch["ir"], batch["vis"]))   # fp32 at evaluation
        out.append((to_image(raw.float(), exp.net.out_space, batch["vis"]), batch))
    return out


def evaluate(exp: Experiment, run_dir: Path, method: str | None = None) -> dict[str, float]:
    """Fusion metrics and task metrics on the held-out test split(s); writes ``eval/`` and prints a table.

    Returns:
        ``eval/<metric>`` → value (fusion-metric means, task headline metrics).
    """
    from fusion.metrics.registry import compute_metrics
    from tqdm import tqdm

    cfg = exp.cfg
    method = method or cfg.name
    eval_dir = run_dir / "eval"
    with output_guard(run_dir):
        eval_dir.mkdir(exist_ok=True)
    fused_sets = {"run": _fused_test(exp, exp.test_sets["run"])}
    names = list(cfg.eval.metrics)
    per_image: list[list[Any]] = []
    sums: dict[str, list[float]] = {}
    for fused, batch in tqdm(fused_sets["run"], desc="metrics", unit="batch", disable=not cfg.log.progress,
                             leave=False):
        values = {}
        for name in list(names):
            try:
                values.update(compute_metrics(fused, batch["ir"], batch["vis"], [name], profile=cfg.eval.profile))
            except (ValueError, NotImplementedError) as err:   # e.g. VIF on images < 65 px
                log.warning("metric %s skipped: %s", name, err)
                names.remove(name)
        canon = list(values)
        for i, image in enumerate(batch["name"]):
            row = [float(values[m][i]) for m in canon]
            per_image.append([image, method, *row])
            for m, v in zip(canon, row):
                sums.setdefault(m, []).append(v)
    metric_names = list(sums)
    summary = {m: float(np.mean(v)) for m, v in sums.items()}
    results: dict[str, float] = dict(summary)
    _write_csv(eval_dir / "per_image.csv", ["image", "method", *metric_names], per_image)

    task_results: dict[str, dict[str, float]] = {}
    for k, task in exp.tasks.items():
        key = "run" if exp.specs[k] == exp.specs["run"] else k
        if key not in fused_sets:
            fused_sets[key] = _fused_test(exp, exp.test_sets[k])
        task_results[k] = task.evaluate(iter(fused_sets[key]))
    if "seg" in task_results:
        r = task_results["seg"]
        classes = [c[len("IoU/"):] for c in r if c.startswith("IoU/")]
        _write_csv(eval_dir / "seg_per_class.csv", ["class", "Acc", "IoU"],
                   [[c, r[f"Acc/{c}"], r[f"IoU/{c}"]] for c in classes])
        results.update({k: r[k] for k in ("mIoU", "mAcc", "aAcc") if k in r})
    if "det" in task_results:
        r = task_results["det"]
        classes = [c[len("AP50/"):] for c in r if c.startswith("AP50/")]
        _write_csv(eval_dir / "det_per_class.csv", ["class", "AP50", "coco_AP"],
                   [[c, r[f"AP50/{c}"], r.get(f"coco/AP/{c}", float("nan"))] for c in classes])
        results.update({k: r[k] for k in ("mAP50", "coco/mAP", "coco/AP50", "coco/AP75") if k in r})
    if "critic" in task_results:
        results.update({f"critic/{k}": v for k, v in task_results["critic"].items()})
    headers = ["method", "n_images", *results]
    _write_csv(eval_dir / "summary.csv", headers, [[method, len(per_image), *results.values()]])
    meta = {"profile": cfg.eval.profile, "metrics": metric_names, "split": cfg.data.test_split,
            "n_images": len(per_image), "method": method,
            "seg_convention": "MFNet confusion matrix over all test pixels; mIoU/mAcc = mean over all classes "
                              "(unlabelled included), classes absent from ground truth and prediction left out",
            "det_convention": "VOC AP@0.5 all-point interpolation (mAP50); COCO mAP@[.5:.95] via pycocotools",
            "task_data": {k: exp.specs[k].name for k in exp.tasks}, "run_data": exp.specs["run"].name}
    with output_guard(eval_dir):
        (eval_dir / "meta.json").write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
    print(_table(method, len(per_image), results, cfg))
    return {f"eval/{k}": v for k, v in results.items()}


def _table(method: str, n: int, results: Mapping[str, float], cfg: RunConfig) -> str:
    keys = list(results)
    head = "| method | n | " + " | ".join(keys) + " |"
    rule = "|---|---|" + "---|" * len(keys)
    row = f"| {method} | {n} | " + " | ".join(_fmt(results[k]) for k in keys) + " |"
    return (f"\nEvaluation on the held-out {cfg.data.name} '{cfg.data.test_split}' split "
            f"(fusion metrics: profile '{cfg.eval.profile}'):\n{head}\n{rule}\n{row}\n")


# ================================================================================================== main
@dataclass
class RunResult:
    """What :func:`main` returns (the CLI only prints the run directory)."""

    run_dir: Path | None
    metrics: dict[str, float] = field(default_factory=dict)
    steps: int = 0
    experiment: Experiment | None = None


def _init_distributed(cfg: RunConfig) -> tuple[int, int, int]:
    """(rank, world size, local rank) from torchrun's environment; gloo on CPU, nccl on CUDA."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return 0, 1, 0
    import torch.distributed as dist

    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if _device(cfg, local_rank).type == "cuda" else "gloo")
    return rank, world, local_rank


def _all_reduce_mean(world: int):
    import torch.distributed as dist

    def reduce(t: Tensor) -> Tensor:
        t = t.clone()
        dist.all_reduce(t)
        return t / world

    return reduce


def _copy_history(ckpt_path: Path, run_dir: Path, step: int) -> None:
    """A resumed run starts its metrics.csv with the previous run's rows up to the checkpoint step."""
    old = ckpt_path.resolve().parent.parent / "metrics.csv"
    if old.is_file():
        shutil.copyfile(old, run_dir / "metrics.csv")
        MetricsCSV(run_dir / "metrics.csv").truncate_after(step)


def main(argv: Sequence[str] | None = None) -> RunResult:
    """Parse, build, train, evaluate; raises on errors (:func:`cli` turns them into messages)."""
    args = get_args_parser().parse_args(argv)
    ckpt = load_checkpoint(args.resume) if args.resume else None
    if args.eval_only and ckpt is None:
        raise ConfigError("--eval-only needs a checkpoint: --resume PATH")
    if ckpt is not None and not args.eval_only and "upper_optim" not in ckpt:
        raise ConfigError(f"{args.resume} is an inference-only checkpoint (no optimiser state): evaluate it with "
                          "--eval-only, or start a new run from its weights with --set net.init=PATH")
    cfg = resolve_config(args, ckpt["config"] if ckpt is not None else None)
    if args.print_config:
        print(to_yaml(cfg), end="")
        return RunResult(run_dir=None)
    check_names(cfg)
    rank, world, local_rank = _init_distributed(cfg)
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    if cfg.train.deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False
    if cfg.train.epochs is not None and not args.eval_only:
        cfg = _epochs_to_iters(cfg)
    start = int(ckpt["step"]) if ckpt is not None and not args.eval_only else 0
    exp = build(cfg, rank=rank, world=world, local_rank=local_rank, start_step=start,
                reduce=_all_reduce_mean(world) if world > 1 else None)
    if ckpt is not None:
        exp.load(ckpt, weights_only=args.eval_only or "upper_optim" not in ckpt)

    run_dir = csv = tracker = None
    if rank == 0:
        run_dir = make_run_dir(cfg.log.out, cfg.name, cfg.train.seed)
        print(f"run directory: {run_dir}\n--- resolved config ---\n{to_yaml(cfg)}---", flush=True)
        with output_guard(run_dir):
            (run_dir / "config.yaml").write_text(to_yaml(cfg), encoding="utf-8")
        write_env(run_dir, {"resumed_from": str(Path(args.resume).resolve()) if args.resume else None,
                            "start_step": start, "world_size": world, "device": str(exp.device)})
        if ckpt is not None and not args.eval_only:
            _copy_history(Path(args.resume), run_dir, start)
        csv = MetricsCSV(run_dir / "metrics.csv")
        mode = resolve_wandb_mode(cfg.log.wandb)
        tracker = Tracker(mode, run_dir, to_dict(cfg), cfg.log.project, f"{cfg.name}/{run_dir.name}")
    try:
        steps = start
        if not args.eval_only:
            steps = train(exp, start, run_dir, csv, tracker)
            if rank == 0:
                save_checkpoint(run_dir / "checkpoints" / "last.pt", exp.checkpoint(steps))
                if not (run_dir / "checkpoints" / "best.pt").exists():
                    shutil.copyfile(run_dir / "checkpoints" / "last.pt", run_dir / "checkpoints" / "best.pt")
        metrics: dict[str, float] = {}
        if rank == 0 and cfg.eval.enabled:
            metrics = evaluate(exp, run_dir)
            csv.log(steps, metrics)
            tracker.log(metrics, steps)
            tracker.summary(metrics)
        if rank == 0:
            from experiments.plots import make_plots

            make_plots(run_dir)
            print(f"results: {run_dir}", flush=True)
        return RunResult(run_dir=run_dir, metrics=metrics, steps=steps, experiment=exp)
    finally:
        if tracker is not None:
            tracker.finish()
        if world > 1:
            import torch.distributed as dist

            if dist.is_initialized():
                dist.barrier()
                dist.destroy_process_group()


def _epochs_to_iters(cfg: RunConfig) -> RunConfig:
    n = len(create_split(cfg, _spec(cfg, None), "train"))
    iters = max(1, math.ceil(cfg.train.epochs * n / cfg.train.batch))
    return dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, iters=iters))


def cli(argv: Sequence[str] | None = None) -> int:
    """Entry point: clear one-line messages and exit codes (2 config/data, 3 non-finite, 130 interrupted)."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        main(argv)
    except RunInterrupted as err:
        where = f"; resume with: python experiments/run.py --resume {err.checkpoint}" if err.checkpoint else ""
        print(f"interrupted after iteration {err.step}{where}", file=sys.stderr)
        return 130
    except (ConfigError, DataError, OutputError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except NonFiniteError as err:
        print(f"error: {err}", file=sys.stderr)
        return 3
    return 0


if __name__ == "__main__":
    sys.exit(cli())
