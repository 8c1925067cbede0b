"""The run's data: which dataset each constraint reads, its splits, and the named streams of training batches.

Every stream is a deterministic loader whose batch for iteration t depends only on (run seed, stream, rank, t),
so ``--resume`` continues exactly as an uninterrupted run would and DDP ranks draw disjoint, reproducible data.
Constraints that read the same data with the same batch size share one stream (one batch, one fusion forward).
"""

from __future__ import annotations

import math
import os
import zlib
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from experiments.config import RunConfig
from fusion.data import FusionDataset, collate_pairs, create_dataset, make_loader

__all__ = ["ENV_DATA_ROOT", "DataError", "DataSpec", "HoldoutSubset", "Streams", "check_held_out", "check_labels",
           "create_split",
           "data_root_from_env", "data_spec", "epochs_to_iters", "holdout_indices", "is_generated", "size_batches",
           "step_seed", "stream_seed", "to_device"]

ENV_DATA_ROOT = "FUSION_DATA_ROOT"
# Batch keys a constraint may need → the dataset attribute that says it has them, and how to name them.
_LABEL_ATTR = {"mask": "has_masks", "boxes": "has_boxes", "labels": "has_boxes"}
_LABEL_WORDS = {"mask": "segmentation masks", "boxes": "bounding boxes", "labels": "box labels"}


class DataError(ValueError):
    """The data cannot serve the requested task (missing labels, missing root, bad split)."""


def stream_seed(seed: int, key: str, rank: int) -> int:
    """Seed of one stream on one rank: unrelated streams, unrelated ranks, stable across versions."""
    return int(np.random.SeedSequence([seed, zlib.crc32(key.encode()), rank]).generate_state(1, np.uint32)[0])


def step_seed(seed: int, step: int) -> int:
    """Seed of the global torch generator at iteration ``step`` (identical on every DDP rank)."""
    return int(np.random.SeedSequence([seed, 0x57E9, step]).generate_state(1, np.uint32)[0])


@dataclass(frozen=True)
class DataSpec:
    """Where one constraint's (or the run's) data comes from."""

    name: str
    root: str | None
    kwargs: tuple[tuple[str, Any], ...]

    @property
    def key(self) -> str:
        """Identity of the data (and the seed material of its streams)."""
        return f"{self.name}|{self.root}|{self.kwargs}"


def is_generated(name: str) -> bool:
    """Datasets rendered on the fly need no root and are drawn at their training size (no crop)."""
    return name == "synthetic"


def data_spec(cfg: RunConfig, constraint: str | None) -> DataSpec:
    """The data of ``constraint`` (None: the run's own data, which the fusion loss reads)."""
    if constraint is None or getattr(cfg.tasks, constraint).data is None:
        extra = dict(cfg.data.kwargs)
        if constraint is not None:
            extra.update(getattr(cfg.tasks, constraint).data_kwargs)
        return DataSpec(cfg.data.name, cfg.data.root, tuple(sorted(extra.items())))
    t = getattr(cfg.tasks, constraint)
    return DataSpec(t.data, t.data_root, tuple(sorted(t.data_kwargs.items())))


def holdout_indices(n: int, role: str, every: int) -> list[int]:
    """Sorted positions of ``role`` ∈ {train, ul, test} under ``data.holdout=every``.

    Position i is test if i % every == 0, ul if i % every == every // 2, train otherwise: a fixed split, so that
    evaluation scripts can rebuild the test set of a run without its config.
    """
    pick = {"test": lambda i: i % every == 0, "ul": lambda i: i % every == every // 2}
    if role in pick:
        return [i for i in range(n) if pick[role](i)]
    return [i for i in range(n) if not (pick["test"](i) or pick["ul"](i))]


class HoldoutSubset(FusionDataset):
    """The ``role`` part of a dataset without splits under :func:`holdout_indices`."""

    def __init__(self, base: FusionDataset, indices: Sequence[int], role: str, every: int):
        super().__init__(None)
        self.base, self.indices, self.role, self.every = base, list(indices), role, every
        for attr in ("class_names", "det_class_names", "has_masks", "has_boxes", "ignore_index"):
            setattr(self, attr, getattr(base, attr))

    def __len__(self) -> int:
        return len(self.indices)

    def load(self, index: int) -> dict[str, Any]:
        return self.base.load(self.indices[index])

    def __getitem__(self, item):
        if isinstance(item, tuple):
            return self.base[(self.indices[int(item[0])], item[1])]
        return self.base[self.indices[int(item)]]

    def with_transform(self, transform) -> HoldoutSubset:
        return HoldoutSubset(self.base.with_transform(transform), self.indices, self.role, self.every)

    def __repr__(self) -> str:
        return f"HoldoutSubset({self.base!r}, role={self.role!r}, every={self.every}, n={len(self)})"


def create_split(cfg: RunConfig, spec: DataSpec, role: str) -> FusionDataset:
    """The dataset for ``role`` ∈ {train, ul, test} of ``spec``."""
    d = cfg.data
    kwargs = dict(spec.kwargs)
    split = {"train": d.train_split, "ul": d.ul_split, "test": d.test_split}[role]
    if is_generated(spec.name):
        scene = max(d.scene or d.crop, d.crop)
        size = scene if role != "test" else (d.test_size or scene)
        # Per-constraint data may size its own roles (``tasks.seg.data_kwargs={"length": 2048, "test_length": 64}``).
        lengths = {"train": kwargs.pop("length", d.length), "ul": kwargs.pop("ul_length", d.ul_length),
                   "test": kwargs.pop("test_length", d.test_length)}
        kwargs = {"size": size, **({"length": lengths[role]} if lengths[role] else {}), **kwargs}
        return create_dataset(spec.name, None, split=split, **kwargs)
    if spec.root is None:
        raise DataError(f"dataset {spec.name!r} needs a folder: pass --data-root PATH (or set ${ENV_DATA_ROOT}; "
                        "for a per-constraint dataset --set tasks.<k>.data_root=PATH)")
    if not Path(spec.root).exists():
        raise DataError(f"data root {spec.root} does not exist (dataset {spec.name!r})")
    try:
        if d.holdout:
            base = create_dataset(spec.name, spec.root, split="all", **kwargs)
            indices = holdout_indices(len(base), role, d.holdout)
            if not indices:
                raise DataError(f"data.holdout={d.holdout} leaves no {role} images out of {len(base)}")
            return HoldoutSubset(base, indices, role, d.holdout)
        return create_dataset(spec.name, spec.root, split=split, **kwargs)
    except DataError:
        raise
    except (OSError, ValueError) as err:
        raise DataError(f"cannot load the {role} split of dataset {spec.name!r} from {spec.root}: {err}") from err


def check_labels(constraint: str, needs: Sequence[str], dataset: FusionDataset, spec: DataSpec) -> None:
    """Raise a :class:`DataError` when ``dataset`` lacks labels the constraint needs."""
    missing = sorted({k for k in needs if k in _LABEL_ATTR and not getattr(dataset, _LABEL_ATTR[k], False)})
    if missing:
        words = " and ".join(dict.fromkeys(_LABEL_WORDS[k] for k in missing))
        raise DataError(
            f"constraint {constraint!r} needs {words}, but dataset {spec.name!r} has none. Use a labelled dataset "
            f"for the run (e.g. --data synthetic), or give this constraint its own data: "
            f"--set tasks.{constraint}.data=synthetic (or a labelled dataset with tasks.{constraint}.data_root)")


def check_held_out(train: FusionDataset, test: FusionDataset, spec: DataSpec, holdout: int) -> None:
    """Refuse a test split that shares pairs with the training split (a dataset without splits returns all
    its pairs for every split name): the run would silently evaluate on its training images."""
    names = [{r.name for r in getattr(ds, "records", ())} for ds in (train, test)]
    shared = names[0] & names[1]
    if shared and not holdout:
        raise DataError(
            f"dataset {spec.name!r} at {spec.root} has no separate test split: its train and test splits share "
            f"{len(shared)} of {len(names[1])} pairs, so the run would evaluate on training images. Hold pairs out "
            "with --set data.holdout=10 (every 10th pair → test), or give a root with split folders or lists")


def to_device(batch: Mapping[str, Any], device: torch.device) -> dict[str, Any]:
    """Move a collated batch's tensors (and lists of tensors: boxes, labels) to ``device``."""
    out = dict(batch)
    for key, value in batch.items():
        if isinstance(value, Tensor):
            out[key] = value.to(device, non_blocking=True)
        elif isinstance(value, (list, tuple)) and value and isinstance(value[0], Tensor):
            out[key] = [v.to(device, non_blocking=True) for v in value]
    return out


class Streams:
    """Endless, resumable training batches, one named stream per (data, role, batch size).

    Names read like ``synthetic/train/b8``; the step caches the fusion net's forward by these names, so
    constraints on one stream share one forward.
    """

    def __init__(self, cfg: RunConfig, rank: int, start_step: int, device: torch.device):
        self.cfg, self.rank, self.start, self.device = cfg, rank, start_step, device
        self.datasets: dict[str, FusionDataset] = {}
        self.batch_sizes: dict[str, int] = {}
        self.loaders: dict[str, Iterator] = {}
        self._names: dict[str, str] = {}     # identity key → stream name

    def add(self, spec: DataSpec, role: str, batch_size: int, dataset: FusionDataset) -> str:
        """Register (or find) the stream of ``spec``'s ``role`` split at ``batch_size``; returns its name."""
        key = f"{spec.key}|{role}|{batch_size}"
        if key in self._names:
            return self._names[key]
        name = f"{spec.name}/{role}/b{batch_size}"
        if name in self.loaders:     # the same dataset name with other roots or kwargs
            name = f"{name}#{sum(n.startswith(name) for n in self.loaders) + 1}"
        d = self.cfg.data
        crop = None if is_generated(spec.name) and (d.scene or 0) <= d.crop else d.crop
        loader = make_loader(dataset, batch_size, seed=stream_seed(self.cfg.train.seed, key, self.rank),
                             num_workers=d.num_workers, crop=crop, hflip=True, start_step=self.start)
        self._names[key], self.loaders[name], self.datasets[name] = name, iter(loader), dataset
        self.batch_sizes[name] = batch_size
        return name

    def next(self) -> dict[str, dict[str, Any]]:
        """One batch of every stream, moved to the device, keyed by stream name."""
        return {name: to_device(next(it), self.device) for name, it in self.loaders.items()}


def size_batches(dataset: FusionDataset, n: int, batch_size: int, *, fixed_aug: bool = False
                 ) -> Iterator[dict[str, Any]]:
    """Batches of the first ``n`` samples, each batch of one image size (evaluation of mixed sizes).

    Samples are read once, in order, and grouped by shape, so a dataset of mixed sizes batches at any
    ``batch_size`` without padding; with one size throughout the batches are the plain consecutive ones.
    ``fixed_aug`` gives sample j the augmentation seed j (a fixed crop, for validation).
    """
    pending: dict[tuple, list[Mapping[str, Any]]] = {}
    for j in range(n):
        sample = dataset[(j, j)] if fixed_aug else dataset[j]
        shape = tuple(tuple(sample[k].shape) for k in ("ir", "vis", "mask") if k in sample)
        group = pending.setdefault(shape, [])
        group.append(sample)
        if len(group) == batch_size:
            yield collate_pairs(pending.pop(shape))
    for group in pending.values():
        yield collate_pairs(group)


def epochs_to_iters(epochs: float, n_train: int, batch: int) -> int:
    """Iterations that cover ``epochs`` passes over ``n_train`` training pairs."""
    return max(1, math.ceil(epochs * n_train / batch))


def data_root_from_env(cfg_root: str | None, name: str) -> str | None:
    """``$FUSION_DATA_ROOT`` fills a missing root of a dataset that needs one."""
    if cfg_root is None and not is_generated(name) and os.environ.get(ENV_DATA_ROOT):
        return os.environ[ENV_DATA_ROOT]
    return cfg_root
