"""The dataset registry: names -> dataset classes or factories ``(root, split, **kwargs) -> FusionDataset``.

This module imports no dataset module; the built-in layouts register themselves when ``fusion.data`` imports
them, and user code registers its own datasets the same way::

    @register_dataset("my_set")
    class MySet(FusionDataset): ...
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

from bilevel.registry import lookup
from fusion.data.base import FusionDataset

__all__ = ["create_dataset", "dataset_attribute", "list_datasets", "register_dataset"]

DatasetFactory = Callable[..., FusionDataset]
_REGISTRY: dict[str, DatasetFactory] = {}


def register_dataset(name: str) -> Callable[[DatasetFactory], DatasetFactory]:
    """Decorator recording a dataset class or factory under ``name``.

    Raises:
        ValueError: ``name`` is already registered; a silent replacement would change what an existing config
            loads, so a new dataset needs a new name.
    """

    def decorator(factory: DatasetFactory) -> DatasetFactory:
        if name in _REGISTRY:
            raise ValueError(f"dataset {name!r} is already registered ({_REGISTRY[name]!r}); pick a new name")
        _REGISTRY[name] = factory
        return factory

    return decorator


def list_datasets() -> list[str]:
    """Sorted names accepted by :func:`create_dataset`."""
    return sorted(_REGISTRY)


def create_dataset(name: str, root: str | os.PathLike | None = None, split: str | None = "train",
                   **kwargs: Any) -> FusionDataset:
    """Build a registered dataset. ``None``-valued kwargs are dropped so CLI defaults keep dataset defaults.

    Raises:
        bilevel.registry.UnknownNameError: unknown name (the message lists the valid ones).
    """
    factory = lookup(_REGISTRY, "dataset", name)
    kwargs = {k: v for k, v in kwargs.items() if v is not None}
    return factory(root, split, **kwargs)


def dataset_attribute(name: str, attr: str) -> Any:
    """A class attribute of the registered dataset ``name`` (e.g. ``fusion_task``, ``default_holdout``), read
    without building it. A factory function answers :class:`FusionDataset`'s default unless it carries the
    attribute itself.

    Raises:
        bilevel.registry.UnknownNameError: unknown name.
    """
    factory = lookup(_REGISTRY, "dataset", name)
    return getattr(factory, attr, getattr(FusionDataset, attr))
