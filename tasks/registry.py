"""Task registry: ``create_task(name, **kwargs)``, ``list_tasks()``, ``register_task(name, factory)``.

A plain name → factory dict (smp style): no import-time registration tricks, and an unknown name fails with the
list of valid ones. The ``*_tiny`` entries are CPU-fast configurations for tests and ``--smoke`` runs, registered
next to the real ones like timm's test models; any of their defaults can still be overridden by keyword.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from functools import partial
from typing import Any

from bilevel.registry import lookup
from tasks.base import Task
from tasks.critic import CriticTask
from tasks.det import DetTask
from tasks.seg import SegTask

__all__ = ["TINY_CONFIGS", "create_task", "list_tasks", "register_task"]

#: Small configurations (CPU tests, smoke runs): ~0.4 M-parameter U-Net, ResNet-18 FCOS with a 64-channel FPN
#: and one conv per head branch at 128 px, and a 16-wide pixel critic (BDL's own has only 8,704 parameters).
TINY_CONFIGS: dict[str, dict[str, Any]] = {
    "critic": {"arch": "pixel", "ndf": 16},
    "seg": {"arch": "Unet", "encoder_name": "tu-resnet10t", "encoder_depth": 3, "decoder_channels": (32, 16, 8)},
    "det": {"model": "fcos_resnet18_fpn", "min_size": 128, "max_size": 128, "fpn_channels": 64, "head_convs": 1},
}

_TASKS: dict[str, Callable[..., Task]] = {
    "critic": CriticTask,
    "seg": SegTask,
    "det": DetTask,
    **{f"{name}_tiny": partial(cls, **TINY_CONFIGS[name])
       for name, cls in (("critic", CriticTask), ("seg", SegTask), ("det", DetTask))},
}


def register_task(name: str, factory: Callable[..., Task]) -> Callable[..., Task]:
    """Adds a task factory (a :class:`~tasks.base.Task` subclass or a function returning one) under ``name``.

    Overwriting an existing name warns, since a silently replaced task would change experiments' meaning.
    """
    if name in _TASKS:
        warnings.warn(f"task {name!r} is already registered; overwriting it", stacklevel=2)
    _TASKS[name] = factory
    return factory


def list_tasks() -> list[str]:
    """Registered task names, sorted."""
    return sorted(_TASKS)


def create_task(name: str, **kwargs: Any) -> Task:
    """Builds the task ``name``; keyword arguments set to ``None`` are dropped so that the task's defaults apply.

    Raises:
        bilevel.registry.UnknownNameError: unknown ``name``; the message lists the registered tasks.

    Example:
        >>> task = create_task("critic")          # BDL's pixel critic, WGAN, saliency target
        >>> sum(p.numel() for p in task.parameters())
        8704
    """
    factory = lookup(_TASKS, "task", name)
    return factory(**{k: v for k, v in kwargs.items() if v is not None})
