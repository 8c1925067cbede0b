"""Everything a run trains and evaluates: data streams, the fusion net, the constraint tasks, their optimisers
and the bi-level step, built from a resolved :class:`RunConfig` by :func:`build`.

The fusion net's whole output reaches the step (:class:`bilevel.UpperOutput`): the fused image the constraints
see and the net's auxiliary losses (mixture-of-experts balance terms), weighted as the fusion loss weighs them.
"""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from bilevel import BilevelStep, Constraint, UpperOutput
from bilevel.aggregate import create_aggregator, list_aggregators
from bilevel.estimators import check_hypergrad_options, list_hypergrads
from bilevel.registry import UnknownNameError
from experiments.checkpoint import FORMAT, load_checkpoint, load_weights, rng_state, set_rng_state
from experiments.cli import native_bf16, resolve_device
from experiments.config import ConfigError, RunConfig, to_dict
from experiments.data import (
    GROUP_KEY,
    TASK_KEY,
    DataSpec,
    Streams,
    check_held_out,
    check_labels,
    component_names,
    component_specs,
    create_split,
    data_spec,
    dataset_task,
    is_generated,
    stream_seed,
    with_dataset_defaults,
)
from experiments.distributed import broadcast_modules
from experiments.evaluate import check_run_sizes
from experiments.fuse import fuse_batch
from experiments.optim import make_optimizer, make_scheduler
from fusion.colour import luminance, to_image
from fusion.data import FusionDataset, list_datasets
from fusion.losses import create_fusion_loss, list_fusion_losses, saliency_map
from fusion.nets.registry import create_fusion_net, fused_output, list_fusion_nets
from tasks.base import eval_mode
from tasks.critic import CriticTask
from tasks.det import DetTask
from tasks.registry import create_task, list_tasks
from tasks.seg import SegTask

logger = logging.getLogger(__name__)

__all__ = ["Experiment", "build", "check_names", "resolve_device", "task_loss_name"]

# Batch keys each kind of constraint needs, read from its class without building it.
_NEEDS = {"critic": CriticTask.needs, "seg": SegTask.needs, "det": DetTask.needs}


def check_names(cfg: RunConfig) -> None:
    """Fail before any work when a registry name or an estimator/aggregator option is unknown."""
    checks = [("fusion net", "net.name", cfg.net.name, list_fusion_nets()),
              ("fusion loss", "loss.name", cfg.loss.name, list_fusion_losses()),
              ("hypergradient", "bilevel.hypergrad", cfg.bilevel.hypergrad, list_hypergrads()),
              ("aggregator", "bilevel.aggregate", cfg.bilevel.aggregate, list_aggregators()),
              *(("dataset", "data.name", name, list_datasets()) for name in component_names(cfg.data.name))]
    for k in cfg.constraints:
        tcfg = getattr(cfg.tasks, k)
        checks.append(("task", f"tasks.{k}.name", tcfg.name or k, list_tasks()))
        if tcfg.data is not None:
            checks.append(("dataset", f"tasks.{k}.data", tcfg.data, list_datasets()))
    for what, key, value, valid in checks:
        if value not in valid:
            raise ConfigError(f"{UnknownNameError(what, value, valid)} ({key})")
    try:
        check_hypergrad_options(cfg.bilevel.hypergrad, cfg.bilevel.estimator_options(),
                                provided=cfg.bilevel.filled_by_step())
        create_aggregator(cfg.bilevel.aggregate, **aggregator_options(cfg, len(cfg.constraints)))
    except (TypeError, ValueError) as err:
        raise ConfigError(f"bilevel.{cfg.bilevel.hypergrad}/{cfg.bilevel.aggregate}: {err}") from None


def aggregator_options(cfg: RunConfig, n_constraints: int) -> dict[str, Any]:
    """The aggregator's options; an unset ``seed`` is the run seed, unset ``fixed`` weights are all ones."""
    options = cfg.bilevel.aggregator_options()
    if "seed" in cfg.bilevel.option_names(cfg.bilevel.aggregate):
        options.setdefault("seed", cfg.train.seed)
    if cfg.bilevel.aggregate == "fixed" and not options.get("weights"):
        options["weights"] = [1.0] * (n_constraints + int(cfg.bilevel.fusion_row))
    return options


@dataclass
class Experiment:
    """Built nets, optimisers, the step and the data of one run (see :func:`build`)."""

    cfg: RunConfig
    device: torch.device
    net: nn.Module
    loss_fn: nn.Module
    tasks: dict[str, nn.Module]
    upper_optim: torch.optim.Optimizer
    upper_sched: Any
    lower_optims: dict[str, torch.optim.Optimizer]
    lower_scheds: dict[str, Any]
    streams: Streams
    test_sets: dict[str, FusionDataset]       # "run" / constraint → test dataset
    val_set: FusionDataset | None             # the run's UL split, for validation
    specs: dict[str, DataSpec]                # "run" / constraint → its data
    step: BilevelStep | None = None
    world: int = 1
    rank: int = 0
    nonfinite_total: int = 0
    best_val: float = math.inf
    untrained: tuple[str, ...] = ()   # constraints whose weights an inference-only checkpoint did not hold
    task_losses: dict[str, nn.Module] = field(default_factory=dict)   # fusion task → its loss (loss_fn: primary's)
    amp_dtype: torch.dtype | None = None      # what training autocasts to (:func:`training_amp`)

    # -- the maps every level shares
    def forward(self, net: nn.Module, batch: Mapping[str, Any]) -> UpperOutput:
        """Fusion net → image in the visible's mode, plus its weighted auxiliary losses. Unclamped while
        training so the fusion loss and the constraints get gradients everywhere.

        A net with per-task routers (TC-MoA) uses the router of the batch's fusion task. A group batch
        (multi-task data) is fused member by member; the step takes one tensor per stream, so its value is the
        members' images flattened and concatenated in member order (:meth:`fusion_loss` splits it again), and
        its aux losses are named ``<component>/<name>``."""
        if GROUP_KEY in batch:
            outs = {c: self.forward(net, b) for c, b in batch[GROUP_KEY].items()}
            return UpperOutput(torch.cat([o.value.reshape(-1) for o in outs.values()]),
                               {f"{c}/{k}": v for c, o in outs.items() for k, v in o.aux.items()})
        raw, aux = fused_output(net(batch["ir"], batch["vis"], **self.net_inputs(net, batch), **self.route(batch)))
        return UpperOutput(to_image(raw, self.net.out_space, batch["vis"], clamp=False),
                           self.loss_for(batch).weigh_aux(aux))

    def route(self, batch: Mapping[str, Any]) -> dict[str, str]:
        """``{"task": <the batch's fusion task>}`` for a net with per-task routers, else nothing. A batch
        without a task (evaluation, validation) uses the net's default router: the primary data's task."""
        return {"task": batch[TASK_KEY]} if TASK_KEY in batch and hasattr(self.net, "select_task") else {}

    def loss_for(self, batch: Mapping[str, Any]) -> nn.Module:
        """The fusion loss of the batch's task (:func:`task_loss_name`); ``loss_fn`` for a batch without one."""
        return self.task_losses.get(batch.get(TASK_KEY), self.loss_fn)

    def fusion_loss(self, z: Tensor, batch: Mapping[str, Any]) -> dict[str, Tensor]:
        """The fusion loss on the fused image (its luminance for one-channel nets: ``to_image`` inverts YCbCr
        exactly and is unclamped here, so this equals the loss on the raw net output).

        On a group batch: Σ_c w_c · loss_c over its members, w_c = ``loss.task_weights`` of the member's task
        (default 1), each member's loss that of its task; parts ``<component>/<part>``."""
        if GROUP_KEY in batch:
            return self._group_loss(z, batch[GROUP_KEY])
        loss_fn = self.loss_for(batch)
        fused = (luminance(z) if self.net.out_space in ("y", "grey") else z).float()
        mask = self.saliency(batch, fused) if loss_fn.uses_mask else None
        return loss_fn(fused, batch["ir"], batch["vis"], mask)

    def _group_loss(self, z: Tensor, members: Mapping[str, Mapping[str, Any]]) -> dict[str, Tensor]:
        """:meth:`fusion_loss` of a group: ``z`` is :meth:`forward`'s flat concatenation of images shaped like
        the members' visible images."""
        parts = torch.split(z, [b["vis"].numel() for b in members.values()])
        out: dict[str, Tensor] = {}
        total: Tensor | None = None
        for (c, b), flat in zip(members.items(), parts):
            member = self.fusion_loss(flat.view(b["vis"].shape), b)
            weighted = float(self.cfg.loss.task_weights.get(b[TASK_KEY], 1.0)) * member["loss"]
            total = weighted if total is None else total + weighted
            out.update({f"{c}/{k}": v for k, v in member.items()})
        return {"loss": total, **out}

    def saliency(self, batch: Mapping[str, Any], like: Tensor, *, labels: bool = True) -> Tensor:
        """The batch's saliency map (``fusion.losses.saliency_map``): the one map the fusion loss, the critic's
        "real" sample and a net with ``attention="input"`` get. A critic's options choose the source, so its
        target and the loss agree bit for bit; the loss's ``mask_fallback`` says whether the IR fallback may
        stand in. ``labels=False`` forces that label-free fallback."""
        critic = next((t for t in self.tasks.values() if isinstance(t, CriticTask)), None)
        options = dict(critic.saliency_options) if critic is not None else {}
        if not labels:
            options["source"] = "ir"
        return saliency_map(batch, like, **options, fallback=self.loss_for(batch).mask_fallback)

    def net_inputs(self, net: nn.Module, batch: Mapping[str, Any], *, labels: bool = True) -> dict[str, Tensor]:
        """Extra forward arguments of the fusion net: MoE-Fusion built with ``attention="input"`` gets the
        batch's saliency map as its foreground (the ground-truth box mask on data with boxes, which is what the
        published local experts separate); other nets get none."""
        if getattr(net, "attention_mode", None) != "input":
            return {}
        return {"attention": self.saliency(batch, batch["ir"], labels=labels)}

    def fuse(self, batch: Mapping[str, Any]) -> Tensor:
        """The clamped fused image in float32, net in eval mode (evaluation, validation, panels). A net with
        ``attention="input"`` gets the label-free IR map here, so no test label reaches the fused image."""
        with eval_mode(self.net):
            return fuse_batch(self.net, batch["ir"], batch["vis"], **self.net_inputs(self.net, batch, labels=False))

    def autocast(self) -> contextlib.AbstractContextManager:
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.amp_dtype)

    def train_mode(self) -> None:
        self.net.train()
        for t in self.tasks.values():
            t.train()

    def lrs(self) -> dict[str, float]:
        out = {"lr/upper": float(self.upper_optim.param_groups[0]["lr"])}
        out.update({f"lr/{k}": float(o.param_groups[0]["lr"]) for k, o in self.lower_optims.items()})
        return out

    # -- checkpoints
    def state_dict(self, step: int) -> dict[str, Any]:
        """A full checkpoint (plain types only, so ``weights_only=True`` loads it)."""
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

    def load_state_dict(self, ckpt: Mapping[str, Any], *, weights_only: bool = False, source: str = "checkpoint"
                        ) -> int:
        """Restore a checkpoint strictly; returns the iteration to continue from. A mismatch names the net,
        ``source`` and the first mismatched keys."""
        load_weights(self.net, ckpt["model"], f"{self.cfg.net.name} fusion net from {source}")
        lower = ckpt.get("lower", {})
        for k, task in self.tasks.items():
            if k in lower:
                load_weights(task, lower[k]["model"], f"{k} constraint from {source}")
            elif not weights_only:
                raise ValueError(f"checkpoint has no state for constraint {k!r} (it holds {sorted(lower)})")
        self.untrained = tuple(k for k in self.tasks if k not in lower)
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


def task_loss_name(loss: str, task: str) -> str:
    """The fusion loss preset for data of fusion task ``task``: TC-MoA's presets follow the task (the paper trains
    each task with its own loss: ``tc_moa_vif``, ``tc_moa_mef``, ``tc_moa_mff``); any other preset serves every
    task as given."""
    return f"tc_moa_{task}" if loss.startswith("tc_moa_") else loss


def _task_kwargs(cfg: RunConfig, k: str, dataset: FusionDataset, spec: DataSpec) -> dict[str, Any]:
    """The constraint's kwargs, completed from its data (class names, ignore index, detector input size)."""
    kwargs = dict(getattr(cfg.tasks, k).kwargs)
    if k == "seg" and dataset.class_names is not None:
        kwargs.setdefault("class_names", list(dataset.class_names))
        kwargs.setdefault("ignore_index", int(dataset.ignore_index))
    if k == "det":
        if dataset.det_class_names is not None:
            kwargs.setdefault("class_names", list(dataset.det_class_names))
        if is_generated(spec.name):   # no internal rescaling of the square scenes
            kwargs.setdefault("min_size", cfg.data.crop)
            kwargs.setdefault("max_size", cfg.data.crop)
    return kwargs


@contextlib.contextmanager
def _configured(key: str):
    """A constructor refusing a configured value (ValueError, TypeError, KeyError) becomes a ConfigError that
    names the config key, so the command exits 2 with one line instead of a traceback."""
    try:
        yield
    except ConfigError:
        raise
    except (TypeError, ValueError, KeyError) as err:
        text = err.args[0] if isinstance(err, KeyError) and err.args else err
        raise ConfigError(f"{key}: {text}") from err


def training_amp(amp: str | None, device: torch.device) -> torch.dtype | None:
    """The autocast dtype of training: ``train.amp``, except where the device would only emulate it.

    The bf16 presets are sized for GPUs; on a CPU without oneDNN's bf16 kernels (AVX2 only) every bf16
    convolution and matrix product runs in a scalar loop, 7-46x slower than float32, so such a run trains
    in float32 and says so once. Activations then take twice the memory of bf16.
    """
    if amp != "bf16":
        return None
    if not native_bf16(device):
        where = "this CPU" if device.type == "cpu" else f"device {device}"
        logger.warning("train.amp='bf16': %s has no native bf16 (bf16 would run 7-46x slower than float32 "
                       "there); training in float32, with twice bf16's activation memory (nets with "
                       "net.kwargs.grad_checkpointing can trade it for recomputation)", where)
        return None
    return torch.bfloat16


def build(cfg: RunConfig, *, rank: int = 0, world: int = 1, local_rank: int = 0, start_step: int = 0,
          reduce: Callable[[Tensor], Tensor] | None = None, load_init: bool = True) -> Experiment:
    """Datasets (labels checked first), fusion net, loss, constraint tasks, optimisers and the bi-level step.

    ``load_init=False`` skips ``net.init`` (a resumed or evaluated checkpoint brings its own weights; the
    warm-start path is provenance, not needed to rebuild the net).

    Multi-task data (``data.name="vifb+mef+mff"``): the upper stream is a group of one stream per component
    (``experiments.data``), each component's fusion task brings its own loss (:func:`task_loss_name`) and
    router, and the net's default router is the primary (first) component's task.
    """
    check_names(cfg)
    cfg = with_dataset_defaults(cfg)
    device = resolve_device(cfg.train.device, local_rank)

    # ---- data first: a task whose data lacks labels fails here, before any net is built
    specs = {"run": data_spec(cfg, None), **{k: data_spec(cfg, k) for k in cfg.constraints}}
    cache: dict[tuple[str, str], FusionDataset] = {}

    def dataset(spec: DataSpec, role: str) -> FusionDataset:
        if (spec.key, role) not in cache:
            cache[(spec.key, role)] = create_split(cfg, spec, role)
        return cache[(spec.key, role)]

    train_sets = {name: dataset(spec, "train") for name, spec in specs.items()}
    for k in cfg.constraints:
        check_labels(k, _NEEDS[k], train_sets[k], specs[k])

    streams = Streams(cfg, rank, start_step, device)
    upper_stream = streams.add(specs["run"], "train", cfg.train.batch, train_sets["run"])
    components = component_specs(cfg)
    if len(components) > 1:   # one batch of every component per iteration
        members = {components[0].name: upper_stream}
        for c in components[1:]:
            members[c.name] = streams.add(c, "train", cfg.train.batch, dataset(c, "train"))
            check_held_out(dataset(c, "train"), dataset(c, "test"), c, cfg.data.holdout)
        upper_stream = streams.add_group(members)
    ll_streams, ul_streams = {}, {}
    for k in cfg.constraints:
        tcfg = getattr(cfg.tasks, k)
        ll_streams[k] = streams.add(specs[k], "train", tcfg.batch or cfg.train.batch, train_sets[k])
        ul_streams[k] = streams.add(specs[k], "ul", tcfg.ul_batch or cfg.train.ul_batch, dataset(specs[k], "ul"))
    test_sets = {name: dataset(spec, "test") for name, spec in specs.items()}
    for name, spec in specs.items():
        check_held_out(train_sets[name], test_sets[name], spec, cfg.data.holdout)
    check_run_sizes(cfg, test_sets["run"])
    val_set = dataset(specs["run"], "ul") if cfg.eval.val_every else None

    # ---- nets: initial weights depend on the seed only (not on what the data code drew), identical on every rank
    torch.manual_seed(cfg.train.seed)
    with _configured("net.kwargs"):
        net = create_fusion_net(cfg.net.name, **cfg.net.kwargs)
    net = net.to(device)
    fusion_tasks = sorted(set(streams.tasks.values()))
    primary_task = dataset_task(specs["run"].name)
    if hasattr(net, "select_task"):    # per-task routers (TC-MoA): every stream's task needs one
        missing = [t for t in fusion_tasks if t not in net.tasks]
        if missing:
            raise ConfigError(f"the data's fusion task(s) {missing} have no router in {cfg.net.name!r} (routers: "
                              f"{list(net.tasks)}); set net.kwargs.tasks to include them")
        if "task" not in cfg.net.kwargs:
            net.select_task(primary_task)
    if cfg.net.init and load_init:
        init = load_checkpoint(cfg.net.init)
        if init["net"]["name"] != cfg.net.name:
            raise ConfigError(f"net.init {cfg.net.init} holds a {init['net']['name']!r} net, not {cfg.net.name!r}")
        load_weights(net, init["model"], f"{cfg.net.name} net from net.init {cfg.net.init}")
    task_losses = {}
    for t in dict.fromkeys([primary_task, *fusion_tasks]):
        name = task_loss_name(cfg.loss.name, t)
        with _configured("loss.kwargs"):
            task_losses[t] = create_fusion_loss(name, **(cfg.loss.kwargs if name == cfg.loss.name else {}))
        task_losses[t] = task_losses[t].to(device)
    loss_fn = task_losses[primary_task]
    tasks = {}
    for k in cfg.constraints:
        torch.manual_seed(stream_seed(cfg.train.seed, f"init/{k}", 0))
        with _configured(f"tasks.{k}.kwargs"):   # also a keyword the wrapped model (e.g. smp's) does not take
            tasks[k] = create_task(getattr(cfg.tasks, k).name or k, **_task_kwargs(cfg, k, train_sets[k], specs[k]))
        tasks[k] = tasks[k].to(device)
    if cfg.train.channels_last:
        for module in (net, *tasks.values()):
            module.to(memory_format=torch.channels_last)
    broadcast_modules([net, *tasks.values()], world)

    total = cfg.train.iters
    upper_optim = make_optimizer(net.parameters(), cfg.train.upper_optim)
    upper_sched = make_scheduler(upper_optim, cfg.train.upper_optim, total)
    lower_optims = {k: make_optimizer(t.parameters(), getattr(cfg.tasks, k).optim) for k, t in tasks.items()}
    lower_scheds = {k: make_scheduler(o, getattr(cfg.tasks, k).optim, total * getattr(cfg.tasks, k).lower_steps)
                    for k, o in lower_optims.items()}

    exp = Experiment(cfg=cfg, device=device, net=net, loss_fn=loss_fn, tasks=tasks, upper_optim=upper_optim,
                     upper_sched=upper_sched, lower_optims=lower_optims, lower_scheds=lower_scheds,
                     streams=streams, test_sets=test_sets, val_set=val_set, specs=specs, world=world, rank=rank,
                     task_losses=task_losses, amp_dtype=training_amp(cfg.train.amp, device))
    constraints = [
        Constraint(name=k, module=t, optimizer=lower_optims[k],
                   lower_loss=(lambda z, b, t=t: t.lower_loss(z, b)["loss"]),
                   upper_loss=(lambda z, b, t=t: t.upper_loss(z, b)["loss"]),
                   scheduler=lower_scheds[k], lower_steps=getattr(cfg.tasks, k).lower_steps,
                   ll_stream=ll_streams[k], ul_stream=ul_streams[k])
        for k, t in tasks.items()]
    exp.step = BilevelStep(
        net, upper_optim, exp.forward, constraints,
        upper_loss=(lambda z, b: exp.fusion_loss(z, b)["loss"]) if cfg.bilevel.fusion_row else None,
        upper_stream=upper_stream,
        hypergrad=cfg.bilevel.hypergrad, hypergrad_options=cfg.bilevel.estimator_options(),
        aggregate=cfg.bilevel.aggregate, aggregate_options=aggregator_options(cfg, len(constraints)),
        ul_every=cfg.bilevel.ul_every, path=cfg.bilevel.path, row_stats=cfg.bilevel.row_stats,
        reuse_lower_grads=cfg.bilevel.reuse_lower_grads,
        cuda_graphs=cfg.train.cuda_graphs,
        amp_dtype=exp.amp_dtype,
        grad_clip=cfg.bilevel.grad_clip, reduce=reduce, upper_scheduler=upper_sched)
    return exp
