"""Optimisers and learning-rate schedules, one per level and constraint, built from an :class:`OptimConfig`."""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass

import torch

from experiments.config import OptimConfig

__all__ = ["LRFactor", "make_optimizer", "make_scheduler"]


def make_optimizer(params: Iterable[torch.Tensor], ocfg: OptimConfig) -> torch.optim.Optimizer:
    """Adam / AdamW / SGD over the trainable ``params`` (unknown names are rejected by the config)."""
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


def make_scheduler(opt: torch.optim.Optimizer, ocfg: OptimConfig, total: int) -> torch.optim.lr_scheduler.LambdaLR:
    """The schedule of ``ocfg`` over ``total`` optimiser steps."""
    return torch.optim.lr_scheduler.LambdaLR(opt, LRFactor(ocfg.schedule, total, ocfg.warmup_steps,
                                                           tuple(ocfg.milestones), ocfg.gamma))
