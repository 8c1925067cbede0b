"""The constraint-task interface shared by the critic, segmentation and detection tasks.

In bi-level fusion learning each task k is a lower-level problem: its parameters y_k (the module's parameters)
minimise f_k(z, y_k) on the fused image z, and the fusion net is judged upstairs by F_k(z, y_k). A task therefore
exposes two losses on the same fused batch, an evaluation over a loader, and owns everything between "an image in
[0, 1]" and its network (grey → RGB, input normalisation), so the fusion side never needs to know what a task
expects.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from fusion.colour import as_rgb

__all__ = ["IMAGENET_MEAN", "IMAGENET_STD", "INPUT_NORMS", "Task", "eval_mode", "load_state_dict_file", "normalize_input"]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
INPUT_NORMS = ("imagenet", "instance", "none")


@functools.cache
def _imagenet_constants(device: torch.device, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """Made once per device and dtype: a copy from the host on every call would keep CUDA graphs from
    capturing a step. Normal tensors even when first asked for under ``inference_mode`` (autograd saves
    ``std``)."""
    with torch.inference_mode(False), torch.no_grad():
        return tuple(torch.tensor(v, dtype=dtype, device=device).view(3, 1, 1)
                     for v in (IMAGENET_MEAN, IMAGENET_STD))


def normalize_input(image: Tensor, mode: str) -> Tensor:
    """Per-image input normalisation; never uses statistics across the batch.

    BDL's released code min–max normalised the whole *batch*, which makes one image's input depend on the others
    (and on the batch size). Here every mode is a function of the image alone:

    * ``"imagenet"``: (x − mean)/std with the ImageNet constants that smp/torchvision backbones expect;
    * ``"instance"``: per image and channel, (x − μ)/(σ + 1e−6);
    * ``"none"``: the [0, 1] image as is.
    """
    if mode == "imagenet":
        if image.shape[-3] != 3:
            raise ValueError(f"ImageNet normalisation needs 3 channels, got {image.shape[-3]}")
        mean, std = _imagenet_constants(image.device, image.dtype)
        return (image - mean) / std
    if mode == "instance":
        mu = image.mean(dim=(-2, -1), keepdim=True)
        sigma = image.std(dim=(-2, -1), keepdim=True, unbiased=False)
        return (image - mu) / (sigma + 1e-6)
    if mode == "none":
        return image
    raise ValueError(f"unknown input normalisation {mode!r}; expected one of {INPUT_NORMS}")


class Task(nn.Module):
    """Base class of every constraint task; its parameters are the lower-level variables y_k.

    Subclasses set :attr:`name` and :attr:`needs` and implement :meth:`forward`, :meth:`lower_loss`,
    :meth:`upper_loss` and :meth:`evaluate`.

    Contract:

    * ``fused`` is an image in [0, 1], (B, 3, H, W) or (B, 1, H, W), as produced by ``fusion.colour.to_image``.
    * :meth:`lower_loss` returns ``{"loss": f_k, <components>}``; the caller passes ``fused.detach()``.
    * :meth:`upper_loss` returns ``{"loss": F_k, <components>}``, differentiable w.r.t. ``fused`` and the
      task parameters.
    * :meth:`evaluate` consumes ``(fused, batch)`` pairs and returns plain floats.
    """

    name: str = "task"
    #: batch keys the task reads, so a runner can fail before training starts.
    needs: frozenset[str] = frozenset()

    def __init__(self, input_norm: str = "imagenet") -> None:
        super().__init__()
        if input_norm not in INPUT_NORMS:
            raise ValueError(f"unknown input_norm {input_norm!r}; expected one of {INPUT_NORMS}")
        self.input_norm = input_norm

    def prepare(self, fused: Tensor) -> Tensor:
        """Fused image in [0, 1] → network input: grey repeated to RGB, then per-image normalisation."""
        self.check_fused(fused)
        return normalize_input(as_rgb(fused), self.input_norm)

    def check_fused(self, fused: Tensor) -> None:
        """Raises a ValueError unless ``fused`` is a (B, 1|3, H, W) floating-point tensor."""
        if not isinstance(fused, Tensor) or fused.dim() != 4 or fused.shape[1] not in (1, 3):
            shape = tuple(fused.shape) if isinstance(fused, Tensor) else type(fused).__name__
            raise ValueError(f"task {self.name!r} expects fused images (B, 1 or 3, H, W), got {shape}")
        if not fused.is_floating_point():
            raise ValueError(f"task {self.name!r} expects a floating-point image in [0, 1], got {fused.dtype}")

    def check_batch(self, batch: Mapping[str, Any], fused: Tensor | None = None) -> None:
        """Raises a KeyError naming every key of :attr:`needs` that ``batch`` lacks, and checks batch sizes."""
        if not isinstance(batch, Mapping):
            raise TypeError(f"task {self.name!r} expects the batch as a dict, got {type(batch).__name__}")
        missing = sorted(k for k in self.needs if batch.get(k) is None)
        if missing:
            raise KeyError(f"task {self.name!r} needs batch key(s) {missing}, which the batch lacks "
                           f"(it has {sorted(batch)}); use a dataset that provides them")
        if fused is not None:
            for key in sorted(self.needs):
                value = batch[key]
                if len(value) != fused.shape[0]:
                    raise ValueError(f"batch[{key!r}] holds {len(value)} entries for {fused.shape[0]} fused images")

    def loss(self, fused: Tensor, batch: Mapping[str, Any]) -> dict[str, Tensor]:
        """The task's supervised loss dict (``loss`` = the total) on ``fused``."""
        raise NotImplementedError

    def lower_loss(self, fused: Tensor, batch: Mapping[str, Any]) -> dict[str, Tensor]:
        """Lower-level objective f_k(z, y_k); ``fused`` is expected detached. Supervised tasks train the
        network on the same loss the fusion net is judged by, so the default is :meth:`loss`."""
        return self.loss(fused, batch)

    def upper_loss(self, fused: Tensor, batch: Mapping[str, Any]) -> dict[str, Tensor]:
        """Upper-level objective F_k(z, y_k), differentiable w.r.t. ``fused`` and the parameters (default:
        :meth:`loss`; the critic overrides both levels)."""
        return self.loss(fused, batch)

    def evaluate(self, pairs: Iterable[tuple[Tensor, Mapping[str, Any]]]) -> dict[str, float]:
        """Task metrics over ``(fused, batch)`` pairs."""
        raise NotImplementedError

    def extra_repr(self) -> str:
        return f"input_norm={self.input_norm!r}"


class eval_mode:
    """Context manager: puts a module in eval mode and restores its previous per-submodule modes afterwards."""

    def __init__(self, module: nn.Module) -> None:
        self.module = module
        self.modes: list[tuple[nn.Module, bool]] = []

    def __enter__(self) -> nn.Module:
        self.modes = [(m, m.training) for m in self.module.modules()]
        self.module.eval()
        return self.module

    def __exit__(self, *exc) -> None:
        for m, mode in self.modes:
            m.training = mode


def load_state_dict_file(path: str | Path, task_prefix: str) -> dict[str, Tensor]:
    """Reads a plain state dict (``torch.load(weights_only=True)``) for a task's wrapped network.

    Accepts the network's own state dict, or a whole task's (every key starting with ``task_prefix``, e.g.
    ``"model."``), whose prefix is stripped; the caller then loads it strictly.
    """
    state = torch.load(Path(path), map_location="cpu", weights_only=True)
    if not isinstance(state, Mapping) or not all(isinstance(v, Tensor) for v in state.values()):
        raise ValueError(f"{path} does not hold a plain state dict of tensors")
    if state and all(k.startswith(task_prefix) for k in state):
        state = {k[len(task_prefix):]: v for k, v in state.items()}
    return dict(state)

