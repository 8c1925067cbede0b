"""The training loop: one bi-level step (or warm-up step) per iteration, logging, validation, panels, and
clean stops on Ctrl-C / SIGTERM or too many non-finite iterations.

For every iteration t the global torch generator is re-seeded from (seed, t) and every stream yields its batch
for t, so a resumed run continues exactly as an uninterrupted one (bitwise on CPU).
"""

from __future__ import annotations

import logging
import math
import signal
import sys
import threading
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Self

import numpy as np
import torch

from experiments.checkpoint import save_checkpoint
from experiments.data import size_batches, step_seed, to_device
from experiments.distributed import any_rank
from experiments.experiment import Experiment
from experiments.logging_utils import MetricsCSV, Tracker, image_panel, output_guard
from fusion.data import RandomCropFlip
from tasks.base import eval_mode

__all__ = ["NonFiniteError", "RunInterrupted", "StopRequest", "check_finite", "first_nonfinite", "panel", "train",
           "validate"]

log = logging.getLogger(__name__)


class NonFiniteError(RuntimeError):
    """Too many iterations had a NaN/Inf loss or gradient; the last good state was saved."""


class RunInterrupted(KeyboardInterrupt):
    """Ctrl-C / SIGTERM: the state after the last completed iteration was saved to ``checkpoint``."""

    def __init__(self, checkpoint: Path | None, step: int):
        super().__init__(f"interrupted after iteration {step}")
        self.checkpoint, self.step = checkpoint, step


class StopRequest:
    """Turns SIGINT/SIGTERM into a request the loop honours after the current iteration.

    Used as a context manager around the loop; a second signal aborts at once. Outside the main thread (where
    Python cannot install handlers) it only records :meth:`request` calls.
    """

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self) -> None:
        self.requested = False
        self._old: dict[int, object] = {}

    def request(self, signum: int = signal.SIGINT, frame: object = None) -> None:
        if self.requested:      # a second Ctrl-C stops at once
            raise KeyboardInterrupt
        self.requested = True
        print(f"\n{signal.Signals(signum).name}: finishing the current iteration, saving a checkpoint "
              "(press Ctrl-C again to abort without saving)", file=sys.stderr, flush=True)

    def __enter__(self) -> Self:
        if threading.current_thread() is threading.main_thread():
            self._old = {s: signal.getsignal(s) for s in self.SIGNALS}
            for s in self.SIGNALS:
                signal.signal(s, self.request)
        return self

    def __exit__(self, *exc: object) -> None:
        for s, handler in self._old.items():
            signal.signal(s, handler)
        self._old = {}


def after_step(step: int) -> None:
    """Called after every completed iteration (a seam for tests that simulate an interruption)."""


class _Averager:
    """Means of the scalars since the last log (``nonfinite`` and ``upper_step`` are summed)."""

    SUMMED = ("nonfinite", "upper_step")

    def __init__(self) -> None:
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
    """Mean fusion loss on the first ``eval.val_batches`` batches of the run's held-out UL split, at the
    training crop (so the value is comparable across iterations)."""
    d = exp.cfg.data
    ds = exp.val_set.with_transform(RandomCropFlip(d.crop, hflip=False))
    bs = exp.cfg.train.ul_batch
    total, n = 0.0, 0
    for batch in size_batches(ds, min(len(ds), exp.cfg.eval.val_batches * bs), bs, fixed_aug=True):
        batch = to_device(batch, exp.device)
        with exp.autocast():
            z = exp.fuse(batch)
        total += float(exp.fusion_loss(z.float(), batch)["loss"]) * len(batch["name"])
        n += len(batch["name"])
    value = total / max(n, 1)
    if exp.step is not None and exp.step.reduce is not None:
        value = float(exp.step.reduce(torch.tensor([value], dtype=torch.float64)).item())
    return value


@torch.no_grad()
def panel(exp: Experiment) -> np.ndarray:
    """IR | visible | fused | label | prediction for the first test image (seg mask or det boxes)."""
    key = "seg" if "seg" in exp.tasks else "det" if "det" in exp.tasks else "run"
    batch = to_device(next(size_batches(exp.test_sets[key], 1, 1)), exp.device)
    fused = exp.fuse(batch)
    kw: dict = {}
    if key == "seg":
        with eval_mode(exp.tasks["seg"]):
            kw = {"mask": batch["mask"][0], "pred_mask": exp.tasks["seg"](fused).argmax(1)[0]}
    elif key == "det":
        with eval_mode(exp.tasks["det"]):
            det = exp.tasks["det"](fused)[0]
        keep = det["scores"] > 0.3
        kw = {"boxes": det["boxes"][keep], "labels": det["labels"][keep]}
    return image_panel(batch["ir"][0], batch["vis"][0], fused[0], **kw)


def check_finite(exp: Experiment, step: int) -> None:
    """Raise :class:`NonFiniteError` when a net's weights or running statistics are no longer finite."""
    diverged = first_nonfinite(exp)
    if diverged is not None:
        level = "fusion net" if diverged == "fusion" else f"{diverged!r} constraint"
        key = "train.upper_optim.lr" if diverged == "fusion" else f"tasks.{diverged}.optim.lr"
        raise NonFiniteError(
            f"iteration {step}: the {level} has non-finite weights or running statistics (it diverged); no "
            f"checkpoint of this state is written. Lower {key} or set bilevel.grad_clip, and restart (or resume "
            "from an earlier last.pt).")


def first_nonfinite(exp: Experiment) -> str | None:
    """The first net ("fusion" or a constraint) with a NaN/Inf parameter or buffer (BatchNorm running
    statistics included), else None: losses can stay finite while a diverging level's state does not."""
    for name, module in (("fusion", exp.net), *exp.tasks.items()):
        tensors = [t for t in (*module.parameters(), *module.buffers()) if t.is_floating_point()]
        if tensors and not bool(torch.stack([torch.isfinite(t).all() for t in tensors]).all()):
            return name
    return None


def save_last(exp: Experiment, run_dir: Path | None, step: int) -> Path | None:
    """``checkpoints/last.pt`` on rank 0 (None elsewhere)."""
    if exp.rank != 0 or run_dir is None:
        return None
    return save_checkpoint(run_dir / "checkpoints" / "last.pt", exp.state_dict(step))


def _save_panel(exp: Experiment, run_dir: Path, tracker: Tracker, step: int) -> None:
    from PIL import Image

    image = panel(exp)
    with output_guard(run_dir):
        (run_dir / "plots" / "panels").mkdir(exist_ok=True)
        Image.fromarray(image).save(run_dir / "plots" / "panels" / f"step_{step:07d}.png")
    tracker.log_image("panel", image, step, caption="IR | visible | fused | label | prediction")


def train(exp: Experiment, start_step: int, run_dir: Path | None, csv: MetricsCSV | None,
          tracker: Tracker | None, progress: bool = True) -> int:
    """Iterations ``start_step`` … ``train.iters``; returns the number of completed iterations.

    Raises:
        NonFiniteError: ``train.max_nonfinite`` iterations were skipped (``last.pt`` holds the last good state).
        RunInterrupted: a stop was requested (``last.pt`` holds the state after the last iteration).
    """
    from tqdm import tqdm

    cfg = exp.cfg
    iters = cfg.train.iters
    is_main = exp.rank == 0
    avg = _Averager()
    t_last, pairs = time.perf_counter(), 0
    bar = tqdm(total=iters, initial=start_step, desc="train", unit="it", dynamic_ncols=True, leave=True,
               disable=not (progress and is_main and cfg.log.progress))
    step = start_step
    try:
        with StopRequest() as stop:
            while step < iters:
                torch.manual_seed(step_seed(cfg.train.seed, step))
                batches = exp.streams.next()
                exp.train_mode()
                diag = exp.step.warmup(batches) if step < cfg.train.warmup_iters else exp.step.step(batches)
                step += 1
                pairs += cfg.train.batch * exp.world
                if diag.get("nonfinite"):
                    exp.nonfinite_total += 1
                    log.warning("iteration %d: non-finite loss or gradient, step skipped (%d/%d allowed)",
                                step, exp.nonfinite_total, cfg.train.max_nonfinite)
                # Reading the weights back costs a device sync, so check when anything is logged or saved (a
                # diverged net stays non-finite): never a checkpoint of a diverged state.
                if (step % cfg.log.log_every == 0 or step == iters
                        or any(every and step % every == 0
                               for every in (cfg.eval.val_every, cfg.train.ckpt_every, cfg.log.image_every))):
                    check_finite(exp, step)
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
                            save_checkpoint(run_dir / "checkpoints" / "best.pt", exp.state_dict(step))
                if is_main and cfg.log.image_every and step % cfg.log.image_every == 0:
                    _save_panel(exp, run_dir, tracker, step)
                if is_main and cfg.train.ckpt_every and step % cfg.train.ckpt_every == 0:
                    save_last(exp, run_dir, step)
                if any_rank(exp.nonfinite_total >= cfg.train.max_nonfinite > 0, exp.world):
                    path = save_last(exp, run_dir, step)
                    raise NonFiniteError(
                        f"stopped after {exp.nonfinite_total} non-finite iterations (train.max_nonfinite="
                        f"{cfg.train.max_nonfinite}); the last good state is in {path}. Lower the learning rates, "
                        "set bilevel.grad_clip, or check the data.")
                after_step(step)
                if any_rank(stop.requested, exp.world):
                    check_finite(exp, step)
                    raise RunInterrupted(save_last(exp, run_dir, step), step)
    finally:
        bar.close()
        exp.streams.close()
    return step
