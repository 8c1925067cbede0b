"""Learnable constraint networks (critic, segmentation, detection) with their losses and evaluation.

``create_task(name, **kwargs)`` builds one; every task is an ``nn.Module`` whose parameters are the lower-level
variables of the bi-level problem (see ``tasks.base.Task``).
"""

from tasks.base import Task
from tasks.registry import create_task, list_tasks, register_task

__all__ = ["Task", "create_task", "list_tasks", "register_task"]
