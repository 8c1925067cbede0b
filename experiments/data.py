"""The run's data: which dataset each constraint reads, its splits, and the named streams of training batches.

Every stream is a deterministic loader whose batch for iteration t depends only on (run seed, stream, rank, t),
so ``--resume`` continues exactly as an uninterrupted run would and DDP ranks draw disjoint, reproducible data.
Constraints that read the same data with the same batch size share one stream (one batch, one fusion forward).

Multi-task data. ``data.name = "vifb+mef+mff"`` names several datasets (components), typically one per fusion
task, for a general-fusion net (TC-MoA). Each component has its own stream; the run's upper-level batch is a
*group* of one batch of each component (:meth:`Streams.add_group`). Component c reads ``<data.root>/<c>``
(``data.root`` is then a parent folder) and its keyword arguments from ``data.kwargs[c]`` (a dict, whose
``"root"`` key replaces the folder). The first component is the run's primary data: its test split is the one
evaluated, its UL split validates, and constraints without their own data read it.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import zlib
from collections.abc import Iterator, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from experiments.config import RunConfig
from fusion.data import (
    CacheFiller,
    FusionDataset,
    InMemory,
    collate_pairs,
    create_dataset,
    list_datasets,
    make_loader,
)
from fusion.data.registry import dataset_attribute
from fusion.image_io import image_size

__all__ = [
    "ENV_DATA_ROOT",
    "GROUP_KEY",
    "MAX_UPSCALE",
    "TASK_KEY",
    "DataError",
    "DataSpec",
    "HoldoutSubset",
    "Streams",
    "check_crop",
    "check_held_out",
    "check_labels",
    "component_names",
    "component_specs",
    "create_split",
    "data_root_from_env",
    "data_spec",
    "dataset_task",
    "epochs_to_iters",
    "holdout_indices",
    "image_sizes",
    "is_generated",
    "size_batches",
    "step_seed",
    "stream_seed",
    "to_device",
    "with_dataset_defaults",
    "worker_count",
]

log = logging.getLogger(__name__)

ENV_DATA_ROOT = "FUSION_DATA_ROOT"
TASK_KEY = "fusion_task"      # batch key: the fusion task of the stream's dataset ("vif", "mef", "mff")
GROUP_KEY = "fusion_group"    # batch key of a group: component name → that component's batch
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


def component_names(name: str) -> list[str]:
    """The datasets of a ``data.name``: ``"vifb+mef+mff"`` → three, a plain name → itself."""
    names = [n.strip() for n in name.split("+")]
    if not all(names) or len(set(names)) != len(names):
        raise DataError(f"data.name={name!r}: expected distinct dataset names joined by '+', e.g. vifb+mef+mff")
    return names


def component_specs(cfg: RunConfig) -> list[DataSpec]:
    """The run's data, one spec per component (one for a plain ``data.name``); see the module docstring."""
    names = component_names(cfg.data.name)
    if len(names) == 1:
        return [DataSpec(cfg.data.name, cfg.data.root, tuple(sorted(cfg.data.kwargs.items())))]
    stray = sorted(k for k in cfg.data.kwargs if k not in names)
    if stray:
        raise DataError(f"data.kwargs of the multi-task data {cfg.data.name!r} must be keyed by component "
                        f"({', '.join(names)}), e.g. data.kwargs.mef={{'size_policy': 'resize'}}; got {stray}")
    specs = []
    for name in names:
        kwargs = dict(cfg.data.kwargs.get(name, {}))
        root = kwargs.pop("root", None)
        if root is None and cfg.data.root is not None and not is_generated(name):
            root = str(Path(cfg.data.root) / name)
        specs.append(DataSpec(name, root, tuple(sorted(kwargs.items()))))
    return specs


def data_spec(cfg: RunConfig, constraint: str | None) -> DataSpec:
    """The data of ``constraint`` (None: the run's own (primary) data, which the fusion loss reads)."""
    if constraint is None or getattr(cfg.tasks, constraint).data is None:
        primary = component_specs(cfg)[0]
        extra = dict(primary.kwargs)
        if constraint is not None:
            extra.update(getattr(cfg.tasks, constraint).data_kwargs)
        return DataSpec(primary.name, primary.root, tuple(sorted(extra.items())))
    t = getattr(cfg.tasks, constraint)
    return DataSpec(t.data, t.data_root, tuple(sorted(t.data_kwargs.items())))


def dataset_task(name: str) -> str:
    """The fusion task ("vif", "mef", "mff") that dataset ``name`` declares (``FusionDataset.fusion_task``)."""
    return dataset_attribute(name, "fusion_task")


def with_dataset_defaults(cfg: RunConfig) -> RunConfig:
    """``cfg`` with ``data.holdout`` filled from the datasets' declared ``default_holdout`` (MEF, MFF: 10) when
    the config sets none and every component read from files declares the same default; so the resolved
    config records the held-out split. Otherwise ``cfg`` unchanged (a dataset without splits is then refused
    by :func:`check_held_out`)."""
    if cfg.data.holdout:
        return cfg
    # unknown names are left to check_names, which reports them as config errors
    files = [n for n in component_names(cfg.data.name) if not is_generated(n) and n in list_datasets()]
    defaults = {dataset_attribute(n, "default_holdout") for n in files}
    if len(defaults) != 1 or not next(iter(defaults)):
        return cfg
    every = defaults.pop()
    log.info("data %r has no splits: holding out every %d-th pair (the datasets' default; recorded as "
             "data.holdout=%d)", cfg.data.name, every, every)
    return dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, holdout=every))


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
        self.describe_as(base)

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
        try:
            return create_dataset(spec.name, spec.root, split=split, **kwargs)
        except (OSError, ValueError) as err:
            if role != "ul" or split == d.train_split:
                raise
            # MSRS, FMB and LLVIP ship train and test only: the upper level then draws its own stream of
            # training pairs (as BDL's released code does), said once instead of failing.
            dataset = create_dataset(spec.name, spec.root, split=d.train_split, **kwargs)
            log.warning("dataset %r at %s has no %r split (%s); the upper level draws from %r instead (set "
                        "data.ul_split, or data.holdout to hold pairs out)", spec.name, spec.root, split,
                        str(err).split(";")[0], d.train_split)
            return dataset
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


MAX_UPSCALE = 4.0   # a crop that needs a bigger upscale of some image trains on blur: refused before training


def image_files(dataset: FusionDataset) -> list[Path] | None:
    """The infrared file of every sample, in order (None for datasets without files, e.g. rendered scenes)."""
    if isinstance(dataset, InMemory):
        dataset = dataset.base
    base, indices = ((dataset.base, dataset.indices) if isinstance(dataset, HoldoutSubset)
                     else (dataset, range(len(dataset))))
    records = getattr(base, "records", None)
    return None if records is None else [records[i].ir for i in indices]


def image_sizes(dataset: FusionDataset) -> list[tuple[int, int]] | None:
    """(H, W) of every sample from the image headers (None for datasets without files)."""
    files = image_files(dataset)
    return None if files is None else [image_size(f) for f in files]


def check_crop(dataset: FusionDataset, crop: int, name: str) -> None:
    """Before training: say how many images of a stream are smaller than the crop (they are upscaled to cover
    it), and refuse a crop that would upscale some image more than :data:`MAX_UPSCALE` times."""
    sizes = image_sizes(dataset)
    if not sizes:
        return
    small = [(i, h, w) for i, (h, w) in enumerate(sizes) if h < crop or w < crop]
    if not small:
        return
    i, h, w = min(small, key=lambda s: min(s[1], s[2]))
    factor = crop / min(h, w)
    if factor > MAX_UPSCALE:
        raise DataError(f"data.crop={crop}: image {dataset.load(i)['name']!r} of stream {name} is {w}x{h} (WxH) and would be "
                        f"upscaled {factor:.1f}x (more than {MAX_UPSCALE:g}x) to cover the crop; lower --crop "
                        "or leave such small images out")
    log.warning("stream %s: %d of %d images are smaller than the %d px crop (smallest %dx%d, WxH); they are "
                "upscaled up to %.2fx to cover it (docs/data.md §7)", name, len(small), len(sizes), crop, w, h,
                factor)


def _spare_cores() -> int:
    """One process per core the main process does not use, at most 8 (at least 1)."""
    return min(8, max(1, (os.cpu_count() or 2) - 1))


def worker_count(requested: int | None, in_memory: bool) -> int:
    """Loader worker processes: ``data.num_workers`` when set; otherwise none for a dataset held in memory
    (a crop is a slice, cheaper than handing a batch between processes) and one per spare core, at most 8,
    for one read from disk."""
    if requested is not None:
        return requested
    return 0 if in_memory else _spare_cores()


def fill_worker_count(requested: int | None, device: torch.device) -> int:
    """Processes that load the in-memory streams ahead of the loader (:class:`fusion.data.CacheFiller`):
    ``data.fill_workers`` when set; otherwise one per spare core, at most 8, on a GPU, and none on a CPU,
    whose cores the step itself keeps busy (there the loader thread's loads cost no step time)."""
    if requested is not None:
        return requested
    return _spare_cores() if device.type == "cuda" else 0


class Streams:
    """Endless, resumable training batches, one named stream per (data, role, batch size).

    Names read like ``synthetic/train/b8``; the step caches the fusion net's forward by these names, so
    constraints on one stream share one forward. Every batch carries its dataset's fusion task under
    :data:`TASK_KEY`; a group (:meth:`add_group`) is a batch ``{GROUP_KEY: {component: batch}}`` of its
    members' batches of the same iteration.

    Feeding the device: each stream keeps its samples in memory after their first load (decoded or rendered
    once) while it fits the ``data.cache_gb`` budget (:class:`fusion.data.InMemory`), on a GPU worker processes
    load those samples ahead of their first use (:class:`fusion.data.CacheFiller`, ``data.fill_workers``),
    batches are pinned when the device is a GPU, and :meth:`next` returns the batches prepared in a background
    thread during the previous iteration while it starts preparing the next ones, so the step never waits on
    data. None of this changes a batch: each is still a function of (seed, stream, rank, iteration).
    """

    def __init__(self, cfg: RunConfig, rank: int, start_step: int, device: torch.device):
        self.cfg, self.rank, self.start, self.device = cfg, rank, start_step, device
        self.datasets: dict[str, FusionDataset] = {}
        self.batch_sizes: dict[str, int] = {}
        self.loaders: dict[str, Iterator] = {}
        self.tasks: dict[str, str] = {}      # stream name → fusion task of its dataset
        self.groups: dict[str, dict[str, str]] = {}   # group name → component → member stream
        self.workers: dict[str, int] = {}
        self.cached_bytes = 0
        self._names: dict[str, str] = {}     # identity key → stream name
        self._pool: ThreadPoolExecutor | None = None
        self._pending: Future | None = None
        self._filler: CacheFiller | None = None

    def _in_memory(self, dataset: FusionDataset, name: str) -> FusionDataset:
        """``dataset`` kept in memory (:class:`InMemory`) when it fits what is left of the ``data.cache_gb``
        budget, estimated from its first sample as stored."""
        budget = self.cfg.data.cache_gb * 2**30 - self.cached_bytes
        if self.cfg.data.cache_gb <= 0 or len(dataset) == 0:
            return dataset
        cached = InMemory(dataset)
        cached.load(0)
        estimate = cached.nbytes * len(dataset)
        if estimate > budget:
            log.info("stream %s: %d pairs need about %.1f GiB decoded, over what is left of data.cache_gb=%g; "
                     "reading them from disk with loader workers", name, len(dataset), estimate / 2**30,
                     self.cfg.data.cache_gb)
            return dataset
        self.cached_bytes += estimate
        log.info("stream %s: %d pairs kept in memory after their first load (about %.0f MiB)", name, len(cached),
                 estimate / 2**20)
        return cached

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
        dataset = self._in_memory(dataset, name)
        if crop is not None:
            check_crop(dataset, crop, name)
        workers = worker_count(d.num_workers, isinstance(dataset, InMemory))
        loader = make_loader(dataset, batch_size, seed=stream_seed(self.cfg.train.seed, key, self.rank),
                             num_workers=workers, crop=crop, hflip=True, start_step=self.start,
                             pin_memory=self.device.type == "cuda")
        self._names[key], self.loaders[name], self.datasets[name] = name, iter(loader), dataset
        self.batch_sizes[name], self.workers[name] = batch_size, workers
        self.tasks[name] = dataset_task(spec.name)
        return name

    def add_group(self, members: Mapping[str, str]) -> str:
        """Register a group of streams (component name → stream name, from :meth:`add`); returns its name.

        Its batch holds one batch of each member, the very batches of the members' own streams, so a group
        is as deterministic and resumable as they are.
        """
        name = "+".join(members)
        if name in self.loaders or name in self.groups:
            raise ValueError(f"stream name {name!r} is taken")
        unknown = [s for s in members.values() if s not in self.loaders]
        if unknown:
            raise KeyError(f"group {name!r}: no stream(s) {unknown}; add them first")
        self.groups[name] = dict(members)
        return name

    def _fetch(self) -> dict[str, dict[str, Any]]:
        batches = {name: {**to_device(next(it), self.device), TASK_KEY: self.tasks[name]}
                   for name, it in self.loaders.items()}
        for name, members in self.groups.items():
            batches[name] = {GROUP_KEY: {c: batches[s] for c, s in members.items()}}
        return batches

    def next(self) -> dict[str, dict[str, Any]]:
        """One batch of every stream, on the device, keyed by stream name (the next ones are being prepared)."""
        if self._pool is None:
            self._start_filling()    # forks its workers: before the loader thread starts
            self._pool = ThreadPoolExecutor(1, thread_name_prefix="streams")
            self._pending = self._pool.submit(self._fetch)
        batches = self._pending.result()
        self._pending = self._pool.submit(self._fetch)
        return batches

    def _start_filling(self) -> None:
        caches = list({id(d): d for d in self.datasets.values() if isinstance(d, InMemory)}.values())
        workers = fill_worker_count(self.cfg.data.fill_workers, self.device)
        if caches and workers:
            self._filler = CacheFiller(caches, workers)

    def close(self) -> None:
        """Stop the background thread (after the batch it is preparing) and the cache filler."""
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = self._pending = None
        if self._filler is not None:
            self._filler.stop()
            self._filler = None


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
