"""Fusion-net registry: a decorator on factory functions and one ``create_fusion_net`` factory (timm style).

Every factory returns a ``nn.Module`` whose ``forward(ir, vis, **kw)`` gives either the raw fused tensor or a
dict ``{"fused": tensor, "aux_losses": {name: scalar}, ...}`` (see :func:`fused_output`), and which declares
``out_space`` in {"y", "grey", "rgb"} for :func:`fusion.colour.to_image`.

Each registered factory (through :func:`build_net`) records the *resolved* constructor arguments of the net
(every argument of the net class, defaults included) in ``net.config``, and ``create_fusion_net`` records the
registered name in ``net.name``, so a checkpoint holding ``{"name": net.name, "kwargs": net.config}`` rebuilds
the same architecture with ``create_fusion_net(name, **kwargs)`` even if a variant's defaults change later.
"""

from __future__ import annotations

import fnmatch
import inspect
import warnings
from collections.abc import Callable
from typing import Any

from torch import Tensor, nn

from bilevel.registry import lookup

__all__ = ["build_net", "create_fusion_net", "fused_output", "list_fusion_nets", "register_fusion_net"]

_REGISTRY: dict[str, Callable[..., nn.Module]] = {}


def register_fusion_net(fn: Callable[..., nn.Module] | None = None, *, name: str | None = None):
    """Register a factory function under ``name`` (default: the function's name).

    Usable as ``@register_fusion_net`` or ``@register_fusion_net(name="x")``. Re-registering a name warns and
    replaces the old factory, so user code can override a built-in net deliberately.
    """

    def decorator(factory: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        key = name or factory.__name__
        if key in _REGISTRY:
            warnings.warn(f"fusion net {key!r} is already registered; overwriting it", stacklevel=2)
        _REGISTRY[key] = factory
        return factory

    return decorator(fn) if fn is not None else decorator


def list_fusion_nets(pattern: str | None = None) -> list[str]:
    """Sorted registered names, optionally filtered by an ``fnmatch`` pattern such as ``"*_tiny"``."""
    names = sorted(_REGISTRY)
    return [n for n in names if fnmatch.fnmatch(n, pattern)] if pattern else names


def create_fusion_net(name: str, **kwargs: Any) -> nn.Module:
    """Build a registered fusion net.

    ``None`` kwargs are dropped so unset CLI options leave the net's defaults alone.

    Raises:
        bilevel.registry.UnknownNameError: unknown ``name`` (a ``KeyError`` and a ``ValueError``); the message
            lists the registered ones.
    """
    factory = lookup(_REGISTRY, "fusion net", name)
    net = factory(**{k: v for k, v in kwargs.items() if v is not None})
    net.name = name
    return net


def build_net(cls: type[nn.Module], defaults: dict[str, Any], kwargs: dict[str, Any]) -> nn.Module:
    """Instantiate ``cls`` with ``defaults`` overridden by ``kwargs`` and store the full signature in
    ``.config``.

    Used by the variant factories. Storing every argument (not just the given ones) makes a checkpoint
    independent of the variant's defaults.
    """
    bound = inspect.signature(cls).bind(**{**defaults, **kwargs})
    bound.apply_defaults()
    config = dict(bound.arguments)
    net = cls(**config)
    net.config = config
    return net


def fused_output(out: Tensor | dict) -> tuple[Tensor, dict[str, Tensor]]:
    """Normalise a net output to ``(raw, aux_losses)``.

    Args:
        out: a tensor, or a dict with key ``"fused"`` and optionally ``"aux_losses"``.

    Returns:
        The raw fused tensor and a (possibly empty) dict of auxiliary scalar losses, already weighted by the
        net's own coefficients so a trainer can add them as they are.
    """
    if isinstance(out, Tensor):
        return out, {}
    if isinstance(out, dict) and "fused" in out:
        return out["fused"], dict(out.get("aux_losses", {}))
    raise TypeError(f"a fusion net must return a tensor or a dict with key 'fused', got {type(out).__name__}")
