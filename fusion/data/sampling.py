"""Deterministic sampling and batching: the step sampler, the collate functions and the training loader.

Training augmentation is deterministic: ``dataset[(index, aug_seed)]`` draws its crop/flip from
``torch.Generator().manual_seed(aug_seed)``, and :class:`StepSampler` derives the (index, aug_seed) pairs of
step ``t`` from ``(seed, t)`` alone, so a resumed run sees exactly the batches an uninterrupted run would.

Training batches have one size (``make_loader(crop=...)``) and use :func:`collate_pairs`; evaluation keeps
every image whole, so mixed sizes are batched with :func:`pad_collate` and cut back with :func:`unpad`.

Example:
    >>> ds = create_dataset("msrs_person8", "data/msrs_person8")   # doctest: +SKIP
    >>> loader = make_loader(ds, batch_size=4, seed=0, crop=256, num_steps=100)  # doctest: +SKIP
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import DataLoader

from fusion.data.base import FusionDataset
from fusion.data.labels import IGNORE_INDEX
from fusion.data.transforms import Compose, RandomCropFlip, Resize, Transform

__all__ = ["StepSampler", "collate_pairs", "make_loader", "pad_collate", "unpad"]


def _mix(*values: int) -> int:
    """A well-mixed 63-bit seed from integers (SeedSequence hashing, so nearby inputs give unrelated seeds)."""
    state = np.random.SeedSequence([int(v) & 0xFFFFFFFFFFFFFFFF for v in values]).generate_state(2, np.uint32)
    return int((int(state[0]) << 31) ^ int(state[1]))


class StepSampler:
    """Batch sampler whose batch for step ``t`` depends only on ``(seed, t)``.

    Step t covers positions ``t·B … t·B + B − 1`` of an endless stream of epochs; epoch ``e`` is a permutation
    of ``range(n)`` seeded by ``(seed, e)`` (or the identity with ``shuffle=False``), so every sample is seen
    once per epoch, and each element carries an ``aug_seed`` derived from ``(seed, t, j)`` for the dataset's
    random crop/flip. Resuming with ``start_step=t`` reproduces the uninterrupted run from step t on.

    Use with ``DataLoader(dataset, batch_sampler=StepSampler(...))``.

    Args:
        n: dataset length.
        batch_size: samples per step.
        seed: run seed.
        start_step: first step to yield.
        shuffle: permute each epoch.
        num_steps: total number of steps (iteration stops at step ``num_steps``); None = endless.
    """

    def __init__(self, n: int, batch_size: int, seed: int = 0, start_step: int = 0, shuffle: bool = True,
                 num_steps: int | None = None) -> None:
        if n <= 0 or batch_size <= 0:
            raise ValueError(f"StepSampler needs n > 0 and batch_size > 0, got n={n}, batch_size={batch_size}")
        if start_step < 0 or (num_steps is not None and num_steps < 0):
            raise ValueError(f"StepSampler: bad start_step={start_step} / num_steps={num_steps}")
        self.n, self.batch_size, self.seed = int(n), int(batch_size), int(seed)
        self.start_step, self.shuffle, self.num_steps = int(start_step), shuffle, num_steps
        self._perm_cache: tuple[int, np.ndarray] | None = None

    def _epoch_order(self, epoch: int) -> np.ndarray:
        if not self.shuffle:
            return np.arange(self.n)
        if self._perm_cache is None or self._perm_cache[0] != epoch:
            rng = np.random.Generator(np.random.PCG64(_mix(self.seed, 0x5EED, epoch)))
            self._perm_cache = (epoch, rng.permutation(self.n))
        return self._perm_cache[1]

    def batch(self, step: int) -> list[tuple[int, int]]:
        """The ``(index, aug_seed)`` list of step ``step``."""
        positions = step * self.batch_size + np.arange(self.batch_size)
        aug = np.random.SeedSequence([self.seed, 0xA06, step]).generate_state(self.batch_size, np.uint32)
        out = []
        for j, pos in enumerate(positions):
            epoch, offset = divmod(int(pos), self.n)
            out.append((int(self._epoch_order(epoch)[offset]), int(aug[j])))
        return out

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        step = self.start_step
        while self.num_steps is None or step < self.num_steps:
            yield self.batch(step)
            step += 1

    def __len__(self) -> int:
        if self.num_steps is None:
            raise TypeError("an endless StepSampler has no length; pass num_steps")
        return max(0, self.num_steps - self.start_step)


def collate_pairs(samples: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Batch samples: ``name`` list, stacked ``ir``/``vis``/``mask``, ``boxes``/``labels`` as lists.

    Raises:
        ValueError: samples of different sizes or channel counts (with the fix in the message), or a key
            present in only some samples.
    """
    if not samples:
        raise ValueError("collate_pairs got an empty batch")
    batch: dict[str, Any] = {"name": [s["name"] for s in samples]}
    for key in ("ir", "vis", "mask"):
        present = [key in s for s in samples]
        if not any(present):
            continue
        if not all(present):
            raise ValueError(f"collate_pairs: key {key!r} is missing from some samples of {batch['name']}")
        shapes = [tuple(s[key].shape) for s in samples]
        if len(set(shapes)) > 1:
            odd = next(i for i, sh in enumerate(shapes) if sh != shapes[0])
            hint = ("use vis_mode='rgb' (or 'grey') so all samples have the same channels"
                    if shapes[0][-2:] == shapes[odd][-2:] else
                    "crop or resize to a common size (make_loader(crop=...), RandomCropFlip, Resize), or for "
                    "evaluation batch with pad_collate")
            raise ValueError(f"collate_pairs: cannot stack {key!r}: {batch['name'][0]} has shape {shapes[0]} but "
                             f"{batch['name'][odd]} has {shapes[odd]}; {hint}")
        batch[key] = torch.stack([s[key] for s in samples])
    for key in ("boxes", "labels"):
        if any(key in s for s in samples):
            if not all(key in s for s in samples):
                raise ValueError(f"collate_pairs: key {key!r} is missing from some samples of {batch['name']}")
            batch[key] = [s[key] for s in samples]
    return batch


def pad_collate(samples: Sequence[Mapping[str, Any]], mask_fill: int = IGNORE_INDEX) -> dict[str, Any]:
    """:func:`collate_pairs` for samples of different sizes (evaluation at any batch size).

    Each ``ir``/``vis`` is padded at the bottom and right to the largest height and width of the batch by
    replicating its border (no artificial edges for the fusion net to react to), each ``mask`` with
    ``mask_fill`` (the ignore index, so padded pixels count in no loss or metric); boxes keep their
    coordinates because the padding never shifts the image. The batch also holds ``size``: each sample's
    original ``(H, W)``, for :func:`unpad`.

    Raises:
        ValueError: as :func:`collate_pairs` (different channel counts, keys missing from some samples).
    """
    if not samples:
        raise ValueError("pad_collate got an empty batch")
    sizes = [tuple(int(v) for v in s["ir"].shape[-2:]) for s in samples]
    height, width = max(h for h, _ in sizes), max(w for _, w in sizes)
    padded = []
    for sample, (h, w) in zip(samples, sizes, strict=True):
        out = dict(sample)
        if (h, w) != (height, width):
            pad = (0, width - w, 0, height - h)
            for key in ("ir", "vis"):
                if key in sample:
                    out[key] = F.pad(sample[key][None], pad, mode="replicate")[0]
            if "mask" in sample:
                out["mask"] = F.pad(sample["mask"], pad, value=mask_fill)
        padded.append(out)
    batch = collate_pairs(padded)
    batch["size"] = sizes
    return batch


def unpad(t: Tensor, sizes: Sequence[tuple[int, int]]) -> list[Tensor]:
    """Cut a padded batch ``t`` (B, ..., H, W) back to each sample's ``(H, W)`` from ``batch["size"]``."""
    if len(t) != len(sizes):
        raise ValueError(f"unpad: batch of {len(t)} but {len(sizes)} sizes")
    return [x[..., :h, :w] for x, (h, w) in zip(t, sizes, strict=True)]


def make_loader(dataset: FusionDataset, batch_size: int, seed: int = 0, *, num_workers: int = 0,
                crop: int | Sequence[int] | None = None, hflip: bool = True, vflip: bool = False,
                resize: int | Sequence[int] | None = None, start_step: int = 0, num_steps: int | None = None,
                shuffle: bool = True, pin_memory: bool = False) -> DataLoader:
    """A deterministic training loader: :class:`StepSampler` batches, optional Resize + RandomCropFlip, and
    :func:`collate_pairs`. Without ``crop``/``resize`` the dataset's own transform is kept. An image smaller
    than ``crop`` is upscaled to cover it first (see :class:`RandomCropFlip`), so any crop size trains.

    Workers only decode files; all randomness comes from the sampler, so the batches are identical for any
    ``num_workers``.
    """
    if crop is not None or resize is not None:
        steps: list[Transform] = [Resize(resize)] if resize is not None else []
        if crop is not None or hflip or vflip:
            steps.append(RandomCropFlip(crop, hflip=hflip, vflip=vflip))
        dataset = dataset.with_transform(steps[0] if len(steps) == 1 else Compose(steps))
    sampler = StepSampler(len(dataset), batch_size, seed, start_step=start_step, shuffle=shuffle,
                          num_steps=num_steps)
    return DataLoader(dataset, batch_sampler=sampler, num_workers=num_workers, collate_fn=collate_pairs,
                      pin_memory=pin_memory, persistent_workers=num_workers > 0)
