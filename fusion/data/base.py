"""The dataset base class and the per-sample file record shared by the folder layouts.

A sample is a dict with ``name``, ``ir`` (1, H, W) and ``vis`` (C, H, W) float32 in [0, 1], and where the
dataset has labels ``mask`` (H, W) int64 (ignore index 255) or ``boxes`` (N, 4) xyxy absolute pixels +
``labels`` (N,) int64 (see ``docs/data.md``).
"""

from __future__ import annotations

import copy
import operator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Dataset

from fusion.data.labels import IGNORE_INDEX
from fusion.data.transforms import Transform

__all__ = ["FusionDataset", "Record"]


class FusionDataset(Dataset):
    """Base class: indexing by ``int`` or ``(index, aug_seed)``, the transform, and the label attributes.

    Subclasses implement ``__len__`` and ``load(index) -> sample``. ``dataset[(index, aug_seed)]`` runs the
    transform with ``torch.Generator().manual_seed(aug_seed)``, so augmentation is reproducible per sample.

    Attributes:
        class_names: segmentation class names (index = mask value), or None.
        det_class_names: detection class names (index = label), or None.
        has_masks, has_boxes: whether samples carry ``mask`` / ``boxes`` + ``labels``.
        ignore_index: mask value to ignore (255).
        fusion_task: what kind of fusion the pairs are for: "vif" (infrared/visible, the default), "mef"
            (multi-exposure) or "mff" (multi-focus). The runner picks a general-fusion net's router and the
            task's loss from it (TC-MoA: ``docs/methods.md``).
        default_holdout: ``data.holdout`` the runner uses when the config sets none (0 = none). A dataset
            without splits declares one so that its test pairs are never training pairs.
    """

    class_names: tuple[str, ...] | None = None
    det_class_names: tuple[str, ...] | None = None
    has_masks: bool = False
    has_boxes: bool = False
    ignore_index: int = IGNORE_INDEX
    fusion_task: str = "vif"
    default_holdout: int = 0
    DESCRIPTION = ("class_names", "det_class_names", "has_masks", "has_boxes", "ignore_index", "fusion_task",
                   "default_holdout")

    def __init__(self, transform: Transform | None = None) -> None:
        self.transform = transform

    def describe_as(self, base: FusionDataset) -> None:
        """Take ``base``'s :attr:`DESCRIPTION` (labels, classes, fusion task): for datasets that wrap another
        (subsets, caches), so that they answer every question about the data as ``base`` does."""
        for attr in self.DESCRIPTION:
            setattr(self, attr, getattr(base, attr))

    def __len__(self) -> int:
        raise NotImplementedError

    def load(self, index: int) -> dict[str, Any]:
        """The untransformed sample ``index``."""
        raise NotImplementedError

    def __getitem__(self, item: int | tuple[int, int]) -> dict[str, Any]:
        if isinstance(item, tuple):
            index, aug_seed = item
            generator: torch.Generator | None = torch.Generator().manual_seed(int(aug_seed))
        else:
            index, generator = item, None
        index = operator.index(index)
        if index < 0:
            index += len(self)
        if not 0 <= index < len(self):
            raise IndexError(f"index {index} out of range for {type(self).__name__} of length {len(self)}")
        sample = self.load(index)
        return self.transform(sample, generator) if self.transform is not None else sample

    def with_transform(self, transform: Transform | None) -> FusionDataset:
        """A shallow copy using ``transform`` (the file index is shared, nothing is re-scanned)."""
        clone = copy.copy(self)
        clone.transform = transform
        return clone


@dataclass(frozen=True)
class Record:
    """One sample's files."""

    name: str
    ir: Path
    vis: Path
    mask: Path | None = None
    ann: Path | None = None
