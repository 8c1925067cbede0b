"""DDP plumbing for ``torchrun``: process group, rank-mean reduction, agreement across ranks.

The bi-level step takes plain (unwrapped) modules and an all-reduce-mean (``reduce``); this module makes that
callable and the few collectives the runner needs itself. With one process every function is a no-op.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable

import torch
from torch import Tensor, nn

__all__ = ["all_reduce_mean", "any_rank", "broadcast_modules", "init_distributed", "shutdown"]


def init_distributed(device_type: Callable[[int], str]) -> tuple[int, int, int]:
    """(rank, world size, local rank) from torchrun's environment; nccl for CUDA, gloo otherwise.

    ``device_type(local_rank)`` says which device type this rank will train on.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return 0, 1, 0
    import torch.distributed as dist

    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device_type(local_rank) == "cuda" else "gloo")
    return rank, world, local_rank


def all_reduce_mean(world: int) -> Callable[[Tensor], Tensor] | None:
    """The ``reduce`` callable of :class:`bilevel.BilevelStep` (None for a single process)."""
    if world <= 1:
        return None
    import torch.distributed as dist

    def reduce(t: Tensor) -> Tensor:
        t = t.clone()
        dist.all_reduce(t)
        return t / world

    return reduce


def any_rank(flag: bool, world: int) -> bool:
    """True on every rank when ``flag`` is true on any rank (so all ranks stop together)."""
    if world == 1:
        return flag
    import torch.distributed as dist

    t = torch.tensor([float(flag)])
    dist.all_reduce(t)
    return bool(t.item() > 0)


def broadcast_modules(modules: Iterable[nn.Module], world: int) -> None:
    """Rank 0's parameters and buffers on every rank: an identical start whatever the local RNG did."""
    if world <= 1:
        return
    import torch.distributed as dist

    for module in modules:
        for t in list(module.parameters()) + list(module.buffers()):
            dist.broadcast(t.data, 0)


def shutdown(world: int) -> None:
    """Wait for every rank, then tear the process group down."""
    if world <= 1:
        return
    import torch.distributed as dist

    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
