"""Train, evaluate and log a bi-level fusion model: the command a researcher types first.

    python experiments/run.py --task seg                 # CPU default: synthetic RGB-T scenes, minutes
    python experiments/run.py --preset bdl_m3fd_det --data-root /data/M3FD
    python experiments/run.py --task det --hypergrad cg --set bilevel.cg.iters=5 --smoke
    torchrun --nproc_per_node=2 experiments/run.py --task seg      # DDP (gloo on CPU, nccl on GPU)

For every iteration t: a fusion-loss warm-up step while t < ``train.warmup_iters`` (the lower levels already
train on the detached fused image), afterwards one bi-level step (lower-level steps for each constraint, then
per-constraint hypergradients, aggregation and one upper step every ``bilevel.ul_every`` iterations; the fusion
loss is an extra upper row). ``--task`` picks the constraints: seg = critic + segmentation, det = critic +
detection, critic, fusion (no constraint: single-level training), all = critic + seg + det.

The entry point only (parser, config, ``main``); the parts live in experiments/ (docs/runner.md).
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import inspect
import logging
import shutil
import sys
import typing
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from bilevel.registry import UnknownNameError
from experiments.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from experiments.cli import ArgumentParser, huge_pages_for_tensors, retain_freed_memory
from experiments.config import (
    TASK_CHOICES,
    ConfigError,
    RunConfig,
    apply_dict,
    apply_overrides,
    load_yaml,
    to_dict,
    to_yaml,
)
from experiments.data import (
    DataError,
    create_split,
    data_root_from_env,
    data_spec,
    epochs_to_iters,
    with_dataset_defaults,
)
from experiments.distributed import all_reduce_mean, init_distributed, shutdown
from experiments.engine import NonFiniteError, RunInterrupted, train
from experiments.evaluate import evaluate_run
from experiments.experiment import Experiment, build, check_names, resolve_device
from experiments.logging_utils import (
    MetricsCSV,
    OutputError,
    Tracker,
    make_run_dir,
    output_guard,
    resolve_wandb_mode,
    write_env,
)
from experiments.presets import default_preset, get_preset, list_presets, smoke

__all__ = ["DataError", "NonFiniteError", "RunInterrupted", "RunResult", "check_kwargs", "check_resume_changes",
           "cli", "get_args_parser", "main", "resolve_config"]


def get_args_parser() -> argparse.ArgumentParser:
    """The command-line interface (returns the parser; does not parse)."""
    p = ArgumentParser(
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
    p.add_argument("--data", help="dataset name of the run (the fusion loss's and, by default, every constraint's)")
    p.add_argument("--data-root", help="dataset folder (default: $FUSION_DATA_ROOT)")
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
            raise ConfigError(f"--preset {args.preset} cannot apply with --resume: the checkpoint's config is "
                              "the base of a resumed or evaluated run; drop --preset")
        cfg = apply_dict(RunConfig(), dict(resume_config))
    else:
        try:
            cfg = get_preset(args.preset or default_preset(args.task or "seg"))
        except UnknownNameError as err:
            raise ConfigError(f"{err} (--preset)") from None
    if args.config:
        cfg = load_yaml(args.config, cfg)
    if args.smoke:
        cfg = smoke(cfg)
    flags: list[str] = []

    def put(key: str, value: Any) -> None:
        if value is not None:
            flags.append(f"{key}={value!r}")

    if args.task is not None:
        put("task", args.task)
        if not args.preset and resume_config is None:
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
    root = data_root_from_env(cfg.data.root, cfg.data.name)
    return with_dataset_defaults(dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, root=root)))


# What a resumed run may change: where data and outputs live, how it logs and evaluates, and how long it runs.
# Everything else would be overwritten by the optimiser/scheduler states or change the run's meaning.
RESUMABLE = ("train.iters", "train.epochs", "train.device", "train.threads", "train.ckpt_every",
             "train.max_nonfinite", "train.deterministic", "train.channels_last", "train.cudnn_benchmark",
             "train.cuda_graphs",
             "data.root", "data.num_workers", "data.fill_workers", "data.cache_gb", "eval.", "log.",
             "tasks.critic.data_root", "tasks.seg.data_root", "tasks.det.data_root")


# What --eval-only may not change: the models the checkpoint holds (a different net would not load, and a
# constraint the checkpoint has no weights for would be evaluated untrained). Data, evaluation, logging may.
EVAL_ONLY_FIXED = ("task", "net.name", "net.kwargs", *(f"tasks.{k}.{f}" for k in ("critic", "seg", "det")
                                                       for f in ("name", "kwargs")))
_FLAGS = {"task": "--task", "net.name": "--fusion-net"}


def check_resume_changes(saved: RunConfig, cfg: RunConfig, *, eval_only: bool = False) -> None:
    """Refuse flags or ``--set`` values that contradict the checkpoint of a continued run (never ignore them);
    with ``eval_only``, those that change the checkpoint's models (:data:`EVAL_ONLY_FIXED`)."""

    def flat(d: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
        out = {}
        for k, v in d.items():
            out.update(flat(v, f"{prefix}{k}.") if isinstance(v, dict) and v and k != "kwargs"
                       else {f"{prefix}{k}": v})
        return out

    old, new = flat(to_dict(saved)), flat(to_dict(cfg))
    if eval_only:
        fixed = [k for k in EVAL_ONLY_FIXED if old.get(k) != new.get(k)]
        if fixed:
            k = fixed[0]
            given = f"{_FLAGS[k]} {new.get(k)!r}" if k in _FLAGS else f"--set {k}={new.get(k)!r} (or --config)"
            raise ConfigError(f"--eval-only evaluates the checkpoint's models, but {given} contradicts it "
                              f"(checkpoint: {k}={old.get(k)!r}); drop it, or train a new run")
        return
    changed = [k for k in new if old.get(k) != new[k] and not k.startswith(RESUMABLE)]
    if changed:
        shown = ", ".join(f"{k}={new[k]!r} (checkpoint: {old.get(k)!r})" for k in changed[:4])
        raise ConfigError(f"--resume continues the checkpoint's run, but {shown}"
                          f"{' …' if len(changed) > 4 else ''} differ from it. Only {', '.join(RESUMABLE)} may "
                          "change on resume; start a new run from its weights instead: --set net.init=PATH")


def _keywords(target: Callable[..., Any]) -> tuple[set[str], bool]:
    """The keyword names ``target`` takes, and whether it also takes ``**kwargs``."""
    params = inspect.signature(target).parameters.values()
    return ({p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)},
            any(p.kind is p.VAR_KEYWORD for p in params))


def _accepted(factory: Callable[..., Any], forwards_to: Callable[..., Any] | None) -> set[str] | None:
    """Keywords ``factory`` accepts, following its ``**kwargs`` to ``forwards_to``; None: any keyword."""
    names, open_ = _keywords(factory)
    if open_ and forwards_to is not None:
        more, open_ = _keywords(forwards_to)
        names |= more
    return None if open_ else names


def check_kwargs(cfg: RunConfig) -> None:
    """Unknown keys of ``net.kwargs``, ``loss.kwargs`` and ``tasks.<k>.kwargs`` (of the run's constraints) fail
    before any work, with the closest valid key, instead of as a ``TypeError`` once data and nets are built.

    A net factory's ``**kwargs`` go to the class it returns (``fusion.nets.registry.build_net``), a loss
    preset's to ``FusionLoss``; the keys a task forwards elsewhere (the segmenter's ``**model_kwargs`` go to
    the smp model) cannot be checked here.
    """
    from fusion.losses import _LOSSES, FusionLoss
    from fusion.nets.registry import _REGISTRY as NETS
    from tasks.registry import _TASKS

    factory = NETS[cfg.net.name]
    returned = typing.get_type_hints(factory).get("return")
    loss = _LOSSES[cfg.loss.name]
    checks = [("net.kwargs", f"fusion net {cfg.net.name!r}", cfg.net.kwargs,
               _accepted(factory, returned if isinstance(returned, type) else None)),
              ("loss.kwargs", f"fusion loss {cfg.loss.name!r}", cfg.loss.kwargs,
               _accepted(loss, FusionLoss if issubclass(loss, FusionLoss) else None))]
    for k in cfg.constraints:
        tcfg = getattr(cfg.tasks, k)
        checks.append((f"tasks.{k}.kwargs", f"task {tcfg.name or k!r}", tcfg.kwargs,
                       _accepted(_TASKS[tcfg.name or k], None)))
    for key, owner, given, valid in checks:
        unknown = [name for name in given if valid is not None and name not in valid]
        if unknown:
            close = difflib.get_close_matches(unknown[0], sorted(valid), n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ConfigError(f"{key}: unknown key {unknown[0]!r} for {owner}{hint}; valid keys: "
                              f"{', '.join(sorted(valid))}")


@dataclass
class RunResult:
    """What :func:`main` returns (the CLI only prints the run directory)."""

    run_dir: Path | None
    metrics: dict[str, float] = field(default_factory=dict)
    steps: int = 0
    experiment: Experiment | None = None


def _copy_history(ckpt_path: Path, run_dir: Path, step: int) -> None:
    """A resumed run starts with the previous run's metrics.csv rows up to the checkpoint step and its best.pt."""
    old = ckpt_path.resolve().parent.parent / "metrics.csv"
    if old.is_file():
        shutil.copyfile(old, run_dir / "metrics.csv")
        MetricsCSV(run_dir / "metrics.csv").truncate_after(step)
    best = ckpt_path.resolve().parent / "best.pt"       # the best so far stays best until beaten
    if best.is_file() and best.resolve() != ckpt_path.resolve():
        with output_guard(run_dir):
            (run_dir / "checkpoints").mkdir(parents=True, exist_ok=True)
            shutil.copyfile(best, run_dir / "checkpoints" / "best.pt")


def _open_run_dir(cfg: RunConfig, args: argparse.Namespace, exp: Experiment, start: int):
    """Rank 0's run directory with config.yaml, env.json, metrics.csv and the tracker."""
    run_dir = make_run_dir(cfg.log.out, cfg.name, cfg.train.seed)
    print(f"run directory: {run_dir}\n--- resolved config ---\n{to_yaml(cfg)}---", flush=True)
    with output_guard(run_dir):
        (run_dir / "config.yaml").write_text(to_yaml(cfg), encoding="utf-8")
    write_env(run_dir, {"resumed_from": str(Path(args.resume).resolve()) if args.resume else None,
                        "start_step": start, "world_size": exp.world, "device": str(exp.device)})
    if args.resume and not args.eval_only:
        _copy_history(Path(args.resume), run_dir, start)
    tracker = Tracker(resolve_wandb_mode(cfg.log.wandb), run_dir, to_dict(cfg), cfg.log.project,
                      f"{cfg.name}/{run_dir.name}")
    return run_dir, MetricsCSV(run_dir / "metrics.csv"), tracker


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
    if ckpt is not None:
        check_resume_changes(apply_dict(RunConfig(), dict(ckpt["config"])), cfg, eval_only=args.eval_only)
    if args.print_config:
        print(to_yaml(cfg), end="")
        return RunResult(run_dir=None)
    check_names(cfg)
    check_kwargs(cfg)
    rank, world, local_rank = init_distributed(lambda r: resolve_device(cfg.train.device, r).type)
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    if cfg.train.deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
    torch.backends.cudnn.benchmark = cfg.train.cudnn_benchmark
    if cfg.train.epochs is not None and not args.eval_only:
        n_train = len(create_split(cfg, data_spec(cfg, None), "train"))
        cfg = dataclasses.replace(cfg, train=dataclasses.replace(
            cfg.train, iters=epochs_to_iters(cfg.train.epochs, n_train, cfg.train.batch)))
    start = int(ckpt["step"]) if ckpt is not None and not args.eval_only else 0
    exp = build(cfg, rank=rank, world=world, local_rank=local_rank, start_step=start,
                reduce=all_reduce_mean(world), load_init=ckpt is None)
    if ckpt is not None:
        exp.load_state_dict(ckpt, weights_only=args.eval_only or "upper_optim" not in ckpt, source=args.resume)

    run_dir = csv = tracker = None
    if rank == 0:
        run_dir, csv, tracker = _open_run_dir(cfg, args, exp, start)
    try:
        steps = start
        if not args.eval_only:
            steps = train(exp, start, run_dir, csv, tracker)
            if rank == 0:
                save_checkpoint(run_dir / "checkpoints" / "last.pt", exp.state_dict(steps))
                if not (run_dir / "checkpoints" / "best.pt").exists():
                    shutil.copyfile(run_dir / "checkpoints" / "last.pt", run_dir / "checkpoints" / "best.pt")
        metrics: dict[str, float] = {}
        if rank == 0 and cfg.eval.enabled:
            metrics = evaluate_run(exp, run_dir)
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
        shutdown(world)


def cli(argv: Sequence[str] | None = None) -> int:
    """Entry point: clear one-line messages and exit codes (2 config/data, 3 non-finite, 130 interrupted)."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        main(argv)
    except RunInterrupted as err:
        where = f"; resume with: python experiments/run.py --resume {err.checkpoint}" if err.checkpoint else ""
        print(f"interrupted after iteration {err.step}{where}", file=sys.stderr)
        return 130
    except (ConfigError, DataError, CheckpointError, OutputError, UnknownNameError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except NonFiniteError as err:
        print(f"error: {err}", file=sys.stderr)
        return 3
    return 0


if __name__ == "__main__":
    retain_freed_memory()
    huge_pages_for_tensors()
    sys.exit(cli())
