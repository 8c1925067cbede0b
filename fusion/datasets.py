"""Datasets for infrared/visible (and multi-exposure / multi-focus) fusion, one class per public layout.

Every dataset returns samples in the format of contracts.md: a dict with ``name``, ``ir`` (1, H, W), ``vis``
(C, H, W), and where the layout has labels ``mask`` (H, W) int64 (ignore index 255) or ``boxes`` (N, 4) xyxy
absolute pixels + ``labels`` (N,) int64. Layouts follow ../shared/docs/datasets.md; because several of them
could not be checked against a real copy, every subfolder name, split file, extension and class list can be
overridden by keyword, and a layout that is not found raises an error listing everything that was tried.

Training augmentation is deterministic: ``dataset[(index, aug_seed)]`` draws its crop/flip from
``torch.Generator().manual_seed(aug_seed)``, and :class:`StepSampler` derives the (index, aug_seed) pairs of
step ``t`` from ``(seed, t)`` alone, so a resumed run sees exactly the batches an uninterrupted run would.

Example:
    >>> ds = create_dataset("msrs_person8", "../shared/data/msrs_person8")   # doctest: +SKIP
    >>> loader = make_loader(ds, batch_size=4, seed=0, crop=256, num_steps=100)  # doctest: +SKIP
"""

from __future__ import annotations

import copy
import operator
import os
import warnings
import xml.etree.ElementTree as ET
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from fusion.image_io import (
    IMAGE_EXTENSIONS,
    ImagePairError,
    align_pair,
    list_images,
    match_pairs,
    read_image,
    read_mask,
    read_pair,
    to_single_channel,
)

__all__ = [
    "MSRS_CLASSES",
    "M3FD_CLASSES",
    "LLVIP_CLASSES",
    "FMB_CLASSES",
    "IGNORE_INDEX",
    "FusionDataset",
    "FolderPairs",
    "PairsAB",
    "RoadScene",
    "TNO",
    "VIFB",
    "MSRS",
    "MFNet",
    "FMB",
    "M3FD",
    "LLVIP",
    "RandomCropFlip",
    "Resize",
    "Compose",
    "StepSampler",
    "collate_pairs",
    "make_loader",
    "register_dataset",
    "create_dataset",
    "list_datasets",
]

IGNORE_INDEX = 255
MSRS_CLASSES = ("unlabelled", "car", "person", "bike", "curve", "car_stop", "guardrail", "color_cone", "bump")
M3FD_CLASSES = ("People", "Car", "Bus", "Motorcycle", "Lamp", "Truck")
LLVIP_CLASSES = ("person",)
# [unverified] SegMiF's FMB classes as commonly listed; override with class_names=... if your copy differs.
FMB_CLASSES = ("unlabelled", "Road", "Sidewalk", "Building", "Lamp", "Sign", "Vegetation", "Sky", "Person", "Car",
               "Truck", "Bus", "Motorcycle", "Bicycle", "Pole")

Transform = Callable[[dict[str, Any], "torch.Generator | None"], dict[str, Any]]


# ------------------------------------------------------------------------------------------- transforms
def _pair(size: int | Sequence[int], what: str) -> tuple[int, int]:
    if isinstance(size, int):
        size = (size, size)
    size = tuple(int(s) for s in size)
    if len(size) != 2 or min(size) <= 0:
        raise ValueError(f"{what} must be a positive int or (H, W), got {size}")
    return size  # type: ignore[return-value]


def _image_keys(sample: Mapping[str, Any]) -> list[str]:
    return [k for k in ("ir", "vis") if k in sample]


class Resize:
    """Resize images (bilinear, antialiased), masks (nearest) and boxes (scaled) to ``size`` = (H, W)."""

    def __init__(self, size: int | Sequence[int]) -> None:
        self.size = _pair(size, "Resize size")

    def __repr__(self) -> str:
        return f"Resize(size={self.size})"

    def __call__(self, sample: dict[str, Any], generator: torch.Generator | None = None) -> dict[str, Any]:
        out = dict(sample)
        height, width = sample["ir"].shape[-2:]
        if (height, width) == self.size:
            return out
        for key in _image_keys(sample):
            out[key] = F.interpolate(sample[key][None], size=self.size, mode="bilinear", align_corners=False,
                                     antialias=True)[0].clamp_(0.0, 1.0)
        if "mask" in sample:
            out["mask"] = F.interpolate(sample["mask"][None, None].float(), size=self.size,
                                        mode="nearest-exact")[0, 0].long()
        if "boxes" in sample:
            scale = torch.tensor([self.size[1] / width, self.size[0] / height] * 2, dtype=torch.float32)
            out["boxes"] = sample["boxes"] * scale
        return out


class RandomCropFlip:
    """Random crop + horizontal/vertical flips applied identically to both sources, the mask and the boxes.

    Boxes are shifted, clipped to the crop and dropped (with their labels) when less than ``min_visibility``
    of their area survives, so a detector never trains on a sliver of an object.

    Args:
        crop: output (H, W) or int; ``None`` keeps the full image (flips only). An image smaller than the crop
            raises an error: resize first (:class:`Resize`) or choose a smaller crop.
        hflip, vflip: flip with probability 0.5 each.
        min_visibility: fraction of a box's area that must remain inside the crop.
    """

    def __init__(self, crop: int | Sequence[int] | None, hflip: bool = True, vflip: bool = False,
                 min_visibility: float = 0.5) -> None:
        self.crop = None if crop is None else _pair(crop, "crop")
        self.hflip, self.vflip, self.min_visibility = hflip, vflip, float(min_visibility)

    def __repr__(self) -> str:
        return (f"RandomCropFlip(crop={self.crop}, hflip={self.hflip}, vflip={self.vflip}, "
                f"min_visibility={self.min_visibility})")

    def __call__(self, sample: dict[str, Any], generator: torch.Generator | None = None) -> dict[str, Any]:
        out = dict(sample)
        height, width = sample["ir"].shape[-2:]
        ch, cw = self.crop if self.crop is not None else (height, width)
        if ch > height or cw > width:
            raise ValueError(
                f"sample {sample.get('name')!r} is {width}x{height} (WxH), smaller than the crop {cw}x{ch}; "
                "add a Resize or use a smaller crop")
        # Draw all random numbers up front in a fixed order so the result depends only on the generator.
        top = int(torch.randint(0, height - ch + 1, (1,), generator=generator))
        left = int(torch.randint(0, width - cw + 1, (1,), generator=generator))
        flips = torch.rand(2, generator=generator)
        do_h, do_v = self.hflip and bool(flips[0] < 0.5), self.vflip and bool(flips[1] < 0.5)
        dims = [d for d, on in ((-1, do_h), (-2, do_v)) if on]

        def apply(x: Tensor) -> Tensor:
            x = x[..., top:top + ch, left:left + cw]
            return (x.flip(dims) if dims else x).contiguous()

        for key in _image_keys(sample) + (["mask"] if "mask" in sample else []):
            out[key] = apply(sample[key])
        if "boxes" in sample:
            boxes = sample["boxes"].reshape(-1, 4).float()
            area = (boxes[:, 2] - boxes[:, 0]).clamp(min=0) * (boxes[:, 3] - boxes[:, 1]).clamp(min=0)
            shifted = boxes - torch.tensor([left, top, left, top], dtype=torch.float32)
            clipped = torch.stack([shifted[:, 0].clamp(0, cw), shifted[:, 1].clamp(0, ch),
                                   shifted[:, 2].clamp(0, cw), shifted[:, 3].clamp(0, ch)], dim=1)
            kept_area = (clipped[:, 2] - clipped[:, 0]) * (clipped[:, 3] - clipped[:, 1])
            keep = (kept_area > 0) & (kept_area >= self.min_visibility * area)
            clipped = clipped[keep]
            if do_h:
                clipped = torch.stack([cw - clipped[:, 2], clipped[:, 1], cw - clipped[:, 0], clipped[:, 3]], 1)
            if do_v:
                clipped = torch.stack([clipped[:, 0], ch - clipped[:, 3], clipped[:, 2], ch - clipped[:, 1]], 1)
            out["boxes"] = clipped.reshape(-1, 4)
            out["labels"] = sample["labels"][keep]
        return out


class Compose:
    """Apply transforms in order, all drawing from the same generator."""

    def __init__(self, transforms: Sequence[Transform]) -> None:
        self.transforms = list(transforms)

    def __repr__(self) -> str:
        return f"Compose({self.transforms})"

    def __call__(self, sample: dict[str, Any], generator: torch.Generator | None = None) -> dict[str, Any]:
        for transform in self.transforms:
            sample = transform(sample, generator)
        return sample


# --------------------------------------------------------------------------------------------- base class
class FusionDataset(Dataset):
    """Base class: indexing by ``int`` or ``(index, aug_seed)``, the transform, and the label attributes.

    Subclasses implement ``__len__`` and ``load(index) -> sample``.

    Attributes:
        class_names: segmentation class names (index = mask value), or None.
        det_class_names: detection class names (index = label), or None.
        has_masks, has_boxes: whether samples carry ``mask`` / ``boxes`` + ``labels``.
        ignore_index: mask value to ignore (255).
    """

    class_names: tuple[str, ...] | None = None
    det_class_names: tuple[str, ...] | None = None
    has_masks: bool = False
    has_boxes: bool = False
    ignore_index: int = IGNORE_INDEX

    def __init__(self, transform: Transform | None = None) -> None:
        self.transform = transform

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


# ------------------------------------------------------------------------------------------ label reading
def _value_lut(mapping: Mapping[int, int] | None) -> Tensor | None:
    if not mapping:
        return None
    lut = torch.arange(65536, dtype=torch.int64)
    for src, dst in mapping.items():
        lut[int(src)] = int(dst)
    return lut


def _check_mask(mask: Tensor, num_classes: int | None, path: Path, ignore_index: int) -> None:
    if num_classes is None:
        return
    bad = (mask >= num_classes) & (mask != ignore_index) | (mask < 0)
    if bool(bad.any()):
        values = sorted(set(torch.unique(mask[bad]).tolist()))[:10]
        raise ImagePairError(
            f"label image {path} has values {values} outside 0..{num_classes - 1} (ignore {ignore_index}); "
            "pass mask_values={stored: class} to map them or class_names=... to enlarge the class list")


def read_voc(path: Path, class_names: Sequence[str], *, ignore_unknown: bool = False,
             skip_difficult: bool = False) -> tuple[Tensor, Tensor]:
    """Boxes (N, 4) xyxy float32 as stored in a VOC XML file, and labels (N,) int64 (class names matched
    case-insensitively). VOC coordinates are used as stored (no 1-based shift)."""
    lookup = {name.lower(): i for i, name in enumerate(class_names)}
    try:
        root = ET.parse(path).getroot()
    except (ET.ParseError, OSError) as err:
        raise ImagePairError(f"cannot parse annotation {path}: {err}") from err
    boxes, labels = [], []
    for obj in root.iter("object"):
        name = (obj.findtext("name") or "").strip()
        if skip_difficult and (obj.findtext("difficult") or "0").strip() == "1":
            continue
        if name.lower() not in lookup:
            if ignore_unknown:
                continue
            raise ImagePairError(f"unknown class {name!r} in {path}; known: {list(class_names)} "
                                 "(pass det_class_names=... or ignore_unknown=True)")
        box = obj.find("bndbox")
        try:
            coords = [float(box.findtext(k)) for k in ("xmin", "ymin", "xmax", "ymax")]  # type: ignore[union-attr]
        except (AttributeError, TypeError, ValueError) as err:
            raise ImagePairError(f"malformed bndbox for {name!r} in {path}") from err
        boxes.append(coords)
        labels.append(lookup[name.lower()])
    return (torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4), torch.tensor(labels, dtype=torch.int64))


def _clip_boxes(boxes: Tensor, labels: Tensor, height: int, width: int) -> tuple[Tensor, Tensor]:
    boxes = torch.stack([boxes[:, 0].clamp(0, width), boxes[:, 1].clamp(0, height),
                         boxes[:, 2].clamp(0, width), boxes[:, 3].clamp(0, height)], dim=1)
    keep = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
    return boxes[keep], labels[keep]


def _read_split_file(path: Path) -> list[str]:
    names = []
    for line in path.read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            names.append(Path(line.split()[0]).stem if Path(line).suffix.lower() in IMAGE_EXTENSIONS
                         else line.split()[0])
    if not names:
        raise ImagePairError(f"split file {path} lists no images")
    return names


@dataclass(frozen=True)
class Record:
    """One sample's files."""

    name: str
    ir: Path
    vis: Path
    mask: Path | None = None
    ann: Path | None = None


# ---------------------------------------------------------------------------------------- folder layouts
class FolderPairs(FusionDataset):
    """Generic layout: ``root/<ir_dir>/*`` and ``root/<vis_dir>/*`` paired by file stem, with an optional
    label folder (segmentation masks) or annotation folder (VOC XML boxes) and optional split list.

    Subclasses only change ``LAYOUTS`` (candidate folder names, tried in order; ``{split}`` is replaced by the
    split) and the default class lists. Keyword arguments override any folder of every candidate.

    Args:
        root: dataset root.
        split: split name; a layout without a ``{split}`` folder or split file ignores it. ``None`` or "all"
            means every image.
        ir_dir, vis_dir, mask_dir, ann_dir: folder names relative to ``root`` (may contain ``{split}``).
        split_file: text file (relative to ``root``) listing the stems of the split, one per line.
        labels: None = use label folders when they exist, True = require them, False = ignore them.
        class_names / det_class_names: override the segmentation / detection class lists.
        mask_values: map stored mask values to classes, e.g. ``{255: 2}`` (unlisted values are kept).
        extensions: accepted image extensions (case-insensitive).
        size_policy: "error" | "resize" | "crop" for IR/visible size mismatches (see ``fusion.image_io``).
        vis_mode: "keep" | "grey" | "rgb" for the visible channels.
        ignore_unknown: skip VOC objects whose class is not in ``det_class_names`` instead of raising.
        transform: callable ``(sample, generator) -> sample`` (e.g. :class:`RandomCropFlip`).
    """

    LAYOUTS: tuple[dict[str, str], ...] = ({"ir": "{split}/ir", "vis": "{split}/vi"}, {"ir": "ir", "vis": "vi"})
    CLASS_NAMES: tuple[str, ...] | None = None
    DET_CLASS_NAMES: tuple[str, ...] | None = None
    MASK_VALUES: Mapping[int, int] | None = None

    def __init__(self, root: str | os.PathLike, split: str | None = "train", *, ir_dir: str | None = None,
                 vis_dir: str | None = None, mask_dir: str | None = None, ann_dir: str | None = None,
                 split_file: str | None = None, labels: bool | None = None,
                 class_names: Sequence[str] | None = None, det_class_names: Sequence[str] | None = None,
                 mask_values: Mapping[int, int] | None = None, extensions: Sequence[str] = IMAGE_EXTENSIONS,
                 size_policy: str = "error", vis_mode: str = "keep", ignore_unknown: bool = False,
                 transform: Transform | None = None) -> None:
        super().__init__(transform)
        self.root = Path(root)
        self.split = None if split in (None, "all") else split
        self.size_policy, self.vis_mode, self.ignore_unknown = size_policy, vis_mode, ignore_unknown
        self.extensions = tuple(extensions)
        overrides = {k: v for k, v in (("ir", ir_dir), ("vis", vis_dir), ("mask", mask_dir), ("ann", ann_dir),
                                       ("split_file", split_file)) if v is not None}
        layout = self._resolve_layout(overrides)
        self.layout = layout
        cls_names = class_names if class_names is not None else self.CLASS_NAMES
        det_names = det_class_names if det_class_names is not None else self.DET_CLASS_NAMES
        mask_dir_path = self._label_dir(layout, "mask", labels)
        ann_dir_path = self._label_dir(layout, "ann", labels)
        self.has_masks, self.has_boxes = mask_dir_path is not None, ann_dir_path is not None
        if labels and not (self.has_masks or self.has_boxes):
            raise ValueError(f"{type(self).__name__}: labels=True but the layout names no label folder; "
                             "pass mask_dir=... or ann_dir=...")
        self.class_names = tuple(cls_names) if cls_names is not None and self.has_masks else None
        self.det_class_names = tuple(det_names) if det_names is not None else None
        if self.has_boxes and self.det_class_names is None:
            raise ValueError(f"{type(self).__name__}: annotation folder {ann_dir_path} needs det_class_names")
        if not self.has_boxes:
            self.det_class_names = None
        self._lut = _value_lut(mask_values if mask_values is not None else self.MASK_VALUES)
        self.records = self._index(layout, mask_dir_path, ann_dir_path)

    # -- layout resolution
    def _format(self, template: str) -> str | None:
        if "{split}" in template:
            return None if self.split is None else template.format(split=self.split)
        return template

    def _resolve_layout(self, overrides: Mapping[str, str]) -> dict[str, Any]:
        tried = []
        for candidate in self.LAYOUTS:
            candidate = {**candidate, **overrides}
            ir, vis = self._format(candidate["ir"]), self._format(candidate["vis"])
            if ir is None or vis is None:
                continue
            tried.append(f"{self.root / ir} + {self.root / vis}")
            if (self.root / ir).is_dir() and (self.root / vis).is_dir():
                return {**candidate, "ir": ir, "vis": vis}
        raise ImagePairError(
            f"{type(self).__name__}: no known layout under {self.root} (split={self.split!r}); looked for: "
            + "; ".join(tried) + ". Override with ir_dir=/vis_dir= (folders relative to root).")

    def _label_dir(self, layout: Mapping[str, Any], key: str, labels: bool | None) -> Path | None:
        if labels is False or key not in layout:
            return None
        rel = self._format(layout[key])
        path = None if rel is None else self.root / rel
        if path is not None and path.is_dir():
            return path
        if labels:
            what = "mask_dir" if key == "mask" else "ann_dir"
            raise ImagePairError(f"{type(self).__name__}: label folder {path or layout[key]} not found "
                                 f"(pass {what}=... or labels=False)")
        return None

    def _split_names(self, layout: Mapping[str, Any]) -> list[str] | None:
        if "split_file" not in layout or self.split is None:
            return None
        candidates = layout["split_file"]
        candidates = [candidates] if isinstance(candidates, str) else list(candidates)
        paths = [self.root / c.format(split=self.split) for c in candidates]
        for path in paths:
            if path.is_file():
                return _read_split_file(path)
        if any("{split}" in layout[k] for k in ("ir", "vis")):
            return None  # the split is already a folder
        raise ImagePairError(
            f"{type(self).__name__}: split {self.split!r} needs a split list; looked for "
            + ", ".join(str(p) for p in paths) + " (pass split_file=... or split='all' for every image)")

    # -- indexing
    def _pairs(self, layout: Mapping[str, Any]) -> list[tuple[str, Path, Path]]:
        return match_pairs(self.root / layout["ir"], self.root / layout["vis"], extensions=self.extensions)

    def _index(self, layout: Mapping[str, Any], mask_dir: Path | None, ann_dir: Path | None) -> list[Record]:
        pairs = self._pairs(layout)
        wanted = self._split_names(layout)
        if wanted is not None:
            by_stem = {stem: (stem, ir, vis) for stem, ir, vis in pairs}
            missing = [n for n in wanted if n not in by_stem]
            if missing:
                raise ImagePairError(
                    f"{type(self).__name__}: {len(missing)} name(s) of split {self.split!r} have no image pair in "
                    f"{self.root / layout['ir']} / {self.root / layout['vis']}, e.g. {missing[:3]}")
            pairs = [by_stem[n] for n in wanted]
        masks = {p.stem: p for p in list_images(mask_dir, extensions=self.extensions)} if mask_dir else {}
        anns = {p.stem: p for p in ann_dir.glob("*.xml")} if ann_dir else {}
        records = []
        for stem, ir, vis in pairs:
            if mask_dir is not None and stem not in masks:
                raise ImagePairError(f"missing label for {ir}: no file with stem {stem!r} in {mask_dir}")
            if ann_dir is not None and stem not in anns:
                raise ImagePairError(f"missing annotation for {ir}: no {stem}.xml in {ann_dir}")
            records.append(Record(stem, ir, vis, masks.get(stem), anns.get(stem)))
        if not records:
            raise ImagePairError(f"{type(self).__name__}: no images for split {self.split!r} under {self.root}")
        return records

    def __len__(self) -> int:
        return len(self.records)

    def _read_sources(self, record: Record) -> tuple[Tensor, Tensor]:
        return read_pair(record.ir, record.vis, size_policy=self.size_policy, vis_mode=self.vis_mode)

    def load(self, index: int) -> dict[str, Any]:
        record = self.records[index]
        ir, vis = self._read_sources(record)
        sample: dict[str, Any] = {"name": record.name, "ir": ir, "vis": vis}
        height, width = ir.shape[-2:]
        if record.mask is not None:
            mask = read_mask(record.mask)
            if self._lut is not None:
                mask = self._lut[mask]
            if tuple(mask.shape) != (height, width):
                raise ImagePairError(
                    f"label {record.mask} is {mask.shape[1]}x{mask.shape[0]} (WxH) but the image pair "
                    f"{record.ir} / {record.vis} is {width}x{height}")
            _check_mask(mask, len(self.class_names) if self.class_names else None, record.mask, self.ignore_index)
            sample["mask"] = mask
        if record.ann is not None:
            boxes, labels = read_voc(record.ann, self.det_class_names or (), ignore_unknown=self.ignore_unknown)
            sample["boxes"], sample["labels"] = _clip_boxes(boxes, labels, height, width)
        return sample

    def __repr__(self) -> str:
        return f"{type(self).__name__}(root={str(self.root)!r}, split={self.split!r}, n={len(self)})"


class RoadScene(FolderPairs):
    """RoadScene: original ``cropinfrared/`` + ``crop_LR_visible/``, or the shared copy's ``ir/`` + ``vi/``."""

    LAYOUTS = ({"ir": "cropinfrared", "vis": "crop_LR_visible"}, {"ir": "ir", "vis": "vi"})


class TNO(FolderPairs):
    """TNO as commonly redistributed: ``ir/`` + ``vi/`` (or ``vis/``) with matching names."""

    LAYOUTS = ({"ir": "ir", "vis": "vi"}, {"ir": "ir", "vis": "vis"}, {"ir": "IR", "vis": "VI"})


class VIFB(FolderPairs):
    """VIFB: original ``input/IR`` + ``input/VI``, or the shared copy's ``ir/`` + ``vi/``."""

    LAYOUTS = ({"ir": "input/IR", "vis": "input/VI"}, {"ir": "ir", "vis": "vi"})


class MSRS(FolderPairs):
    """MSRS: ``<split>/{ir,vi,Segmentation_labels}`` [labels folder unverified], or the SeAFusion copy
    ``{Infrared,Visible,Label}/`` with ``split/<split>.txt``. Masks hold 0..8 (``MSRS_CLASSES``)."""

    LAYOUTS = (
        {"ir": "{split}/ir", "vis": "{split}/vi", "mask": "{split}/Segmentation_labels"},
        {"ir": "Infrared", "vis": "Visible", "mask": "Label",
         "split_file": ("split/{split}.txt", "{split}.txt")},
    )
    CLASS_NAMES = MSRS_CLASSES


class FMB(FolderPairs):
    """FMB (SegMiF): ``<split>/{Infrared,Visible,Label}`` [unverified]; class list ``FMB_CLASSES``
    [unverified], configurable with ``class_names=``."""

    LAYOUTS = ({"ir": "{split}/Infrared", "vis": "{split}/Visible", "mask": "{split}/Label"},)
    CLASS_NAMES = FMB_CLASSES


class M3FD(FolderPairs):
    """M3FD (TarDAL): ``Ir/``, ``Vis/``, ``Annotation/*.xml`` (VOC, classes ``M3FD_CLASSES``). Copies with
    ``<split>.txt`` lists select a split; without one pass ``split="all"`` (refusing instead of silently
    training on every image, test images included)."""

    LAYOUTS = ({"ir": "Ir", "vis": "Vis", "ann": "Annotation",
                "split_file": ("{split}.txt", "split/{split}.txt", "splits/{split}.txt")},)
    DET_CLASS_NAMES = M3FD_CLASSES


class LLVIP(FolderPairs):
    """LLVIP: ``infrared/<split>``, ``visible/<split>``, ``Annotations/*.xml`` (VOC, class ``person``)."""

    LAYOUTS = ({"ir": "infrared/{split}", "vis": "visible/{split}", "ann": "Annotations"},)
    DET_CLASS_NAMES = LLVIP_CLASSES


class MFNet(FolderPairs):
    """MFNet: 4-channel PNGs ``images/*.png`` (R, G, B, thermal), ``labels/*.png`` (0..8, ``MSRS_CLASSES``)
    and split lists ``<split>.txt`` (train, val, test, test_day, test_night)."""

    LAYOUTS = ({"ir": "images", "vis": "images", "mask": "labels", "split_file": ("{split}.txt",)},)
    CLASS_NAMES = MSRS_CLASSES

    def _pairs(self, layout: Mapping[str, Any]) -> list[tuple[str, Path, Path]]:
        files = list_images(self.root / layout["ir"], extensions=self.extensions)
        return [(p.stem, p, p) for p in files]

    def _read_sources(self, record: Record) -> tuple[Tensor, Tensor]:
        rgbt = read_image(record.ir, keep_alpha=True)
        if rgbt.shape[0] != 4:
            raise ImagePairError(f"MFNet image {record.ir} has {rgbt.shape[0]} channels; expected 4 (R, G, B, T)")
        vis = rgbt[:3]
        if self.vis_mode == "grey":
            vis = to_single_channel(vis)
        return rgbt[3:].contiguous(), vis.contiguous()


# ------------------------------------------------------------------------------------- A/B pairs (MEF/MFF)
class PairsAB(FusionDataset):
    """Two-source pairs for multi-exposure (MEF) and multi-focus (MFF) fusion.

    Layouts (auto-detected): ``root/A/*`` + ``root/B/*`` matched by stem, or files ``<name>_A.<ext>`` +
    ``<name>_B.<ext>`` either in per-scene subfolders (MEFB/MFIFB: ``<scene>/<scene>_A.JPG``,
    ``<scene>/<scene>_B.jpg``) or flat in ``root``. Suffixes and extensions are compared case-insensitively.

    The samples keep the contract's keys: ``ir`` holds source A and ``vis`` source B. Unlike infrared, source A
    keeps its stored channels by default (``a_mode="keep"``) because MEF/MFF sources are usually colour; pass
    ``a_mode="grey"`` for a one-channel A (luminance) or ``"rgb"``. ``vis_mode`` does the same for B. Mixed
    grey/RGB pairs (some MFF sets) need a common mode to be batched.
    """

    def __init__(self, root: str | os.PathLike, split: str | None = None, *, a_suffix: str = "_A",
                 b_suffix: str = "_B", a_dir: str = "A", b_dir: str = "B", a_mode: str = "keep",
                 vis_mode: str = "keep", size_policy: str = "error", extensions: Sequence[str] = IMAGE_EXTENSIONS,
                 transform: Transform | None = None) -> None:
        super().__init__(transform)
        self.root, self.split = Path(root), split  # these benchmarks have no splits; kept for the registry API
        self.a_mode, self.vis_mode, self.size_policy = a_mode, vis_mode, size_policy
        for mode in (a_mode, vis_mode):
            if mode not in ("keep", "grey", "rgb"):
                raise ValueError(f"unknown mode {mode!r}; expected 'keep', 'grey' or 'rgb'")
        self.extensions = tuple(extensions)
        if not self.root.is_dir():
            raise ImagePairError(f"PairsAB: dataset folder not found: {self.root}")
        if (self.root / a_dir).is_dir() and (self.root / b_dir).is_dir():
            pairs = match_pairs(self.root / a_dir, self.root / b_dir, extensions=self.extensions)
        else:
            pairs = self._suffix_pairs(a_suffix.lower(), b_suffix.lower(), a_dir, b_dir)
        self.records = [Record(stem, a, b) for stem, a, b in pairs]

    def _suffix_pairs(self, a_suffix: str, b_suffix: str, a_dir: str, b_dir: str) -> list[tuple[str, Path, Path]]:
        exts = {e.lower() for e in self.extensions}
        files = [p for p in self.root.iterdir() if p.is_file()]
        for sub in sorted(p for p in self.root.iterdir() if p.is_dir()):
            files.extend(p for p in sub.iterdir() if p.is_file())
        # key: (folder, lower-cased name) -> {"a": path, "b": path}; names compared case-insensitively because
        # MEFB mixes cases within a pair (Farmhouse_A.png / FarmHouse_B.png)
        sources: dict[tuple[Path, str], dict[str, Path]] = {}
        for path in files:
            if path.suffix.lower() not in exts or path.name.startswith("."):
                continue
            for key, suffix in (("a", a_suffix), ("b", b_suffix)):
                if path.stem.lower().endswith(suffix):
                    name = path.stem[: len(path.stem) - len(suffix)]
                    found = sources.setdefault((path.parent, name.lower()), {})
                    if key in found:
                        raise ImagePairError(f"ambiguous source {key.upper()} for {name!r}: {found[key]} and {path}")
                    found[key] = path
        if not sources:
            raise ImagePairError(
                f"PairsAB: no pairs under {self.root}: looked for {a_dir}/ + {b_dir}/ folders and files named "
                f"<name>{a_suffix.upper()}.<ext> / <name>{b_suffix.upper()}.<ext> (extensions {sorted(exts)}) in "
                "the root and its subfolders")
        pairs = []
        for key in sorted(sources, key=lambda k: (k[1], str(k[0]))):
            found = sources[key]
            if "a" not in found or "b" not in found:
                have, lacking = ("a", "b") if "a" in found else ("b", "a")
                suffix = a_suffix if lacking == "a" else b_suffix
                name = found[have].stem[: -len(b_suffix if have == "b" else a_suffix)]
                raise ImagePairError(f"missing partner: {found[have]} has no {name}{suffix.upper()}.<ext> file in "
                                     f"{found[have].parent}")
            name = found["a"].stem[: -len(a_suffix)] if a_suffix else found["a"].stem
            pairs.append((name, found["a"], found["b"]))
        names = [p[0].lower() for p in pairs]
        if len(set(names)) < len(names):  # same name in two folders: keep them apart by folder
            pairs = [(str(a.parent.relative_to(self.root) / n), a, b) for n, a, b in pairs]
        return pairs

    def __len__(self) -> int:
        return len(self.records)

    def load(self, index: int) -> dict[str, Any]:
        record = self.records[index]
        a, b = read_image(record.ir), read_image(record.vis)
        a = {"keep": a, "grey": to_single_channel(a), "rgb": a.expand(3, -1, -1).contiguous()
             if a.shape[0] == 1 else a}[self.a_mode]
        b = {"keep": b, "grey": to_single_channel(b), "rgb": b.expand(3, -1, -1).contiguous()
             if b.shape[0] == 1 else b}[self.vis_mode]
        a, b = align_pair(a, b, self.size_policy, ir_path=record.ir, vis_path=record.vis)
        return {"name": record.name, "ir": a, "vis": b}

    def __repr__(self) -> str:
        return f"PairsAB(root={str(self.root)!r}, n={len(self)})"


# ------------------------------------------------------------------------------------------------ registry
_REGISTRY: dict[str, Callable[..., FusionDataset]] = {}


def register_dataset(name: str) -> Callable[[Callable[..., FusionDataset]], Callable[..., FusionDataset]]:
    """Decorator recording a dataset class or factory under ``name`` (warns when a name is replaced)."""

    def decorator(factory: Callable[..., FusionDataset]) -> Callable[..., FusionDataset]:
        if name in _REGISTRY and _REGISTRY[name] is not factory:
            warnings.warn(f"dataset {name!r} re-registered", stacklevel=2)
        _REGISTRY[name] = factory
        return factory

    return decorator


def _load_builtins() -> None:
    import fusion.synthetic  # noqa: F401  (registers "synthetic"; imported lazily to avoid an import cycle)


def list_datasets() -> list[str]:
    """Sorted names accepted by :func:`create_dataset`."""
    _load_builtins()
    return sorted(_REGISTRY)


def create_dataset(name: str, root: str | os.PathLike | None = None, split: str | None = "train",
                   **kwargs: Any) -> FusionDataset:
    """Build a registered dataset. ``None``-valued kwargs are dropped so CLI defaults keep dataset defaults.

    Raises:
        ValueError: unknown name (the message lists the valid ones).
    """
    _load_builtins()
    if name not in _REGISTRY:
        raise ValueError(f"unknown dataset {name!r}; valid names: {sorted(_REGISTRY)}")
    kwargs = {k: v for k, v in kwargs.items() if v is not None}
    if root is None and name != "synthetic":
        raise ValueError(f"dataset {name!r} needs a root folder")
    return _REGISTRY[name](root, split, **kwargs)


for _name, _cls in (("folder", FolderPairs), ("roadscene", RoadScene), ("tno", TNO), ("vifb", VIFB),
                    ("msrs", MSRS), ("mfnet", MFNet), ("fmb", FMB), ("m3fd", M3FD), ("llvip", LLVIP),
                    ("pairs_ab", PairsAB), ("mef", PairsAB), ("mff", PairsAB)):
    register_dataset(_name)(_cls)


@register_dataset("msrs_person8")
def msrs_person8(root: str | os.PathLike, split: str | None = "train", **kwargs: Any) -> FolderPairs:
    """The 8 MSRS pairs in ../shared/data/msrs_person8: ``ir/``, ``vi/``, binary person masks ``mask/``
    (0/255) mapped to MSRS classes (255 → 2 "person")."""
    kwargs = {"mask_dir": "mask", "mask_values": {255: 2}, "class_names": MSRS_CLASSES, **kwargs}
    return FolderPairs(root, split, **kwargs)


# ------------------------------------------------------------------------------------- sampling/batching
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
                    "crop or resize to a common size (make_loader(crop=...), RandomCropFlip, Resize) or use "
                    "batch_size=1")
            raise ValueError(f"collate_pairs: cannot stack {key!r}: {batch['name'][0]} has shape {shapes[0]} but "
                             f"{batch['name'][odd]} has {shapes[odd]}; {hint}")
        batch[key] = torch.stack([s[key] for s in samples])
    for key in ("boxes", "labels"):
        if any(key in s for s in samples):
            if not all(key in s for s in samples):
                raise ValueError(f"collate_pairs: key {key!r} is missing from some samples of {batch['name']}")
            batch[key] = [s[key] for s in samples]
    return batch


def make_loader(dataset: FusionDataset, batch_size: int, seed: int = 0, *, num_workers: int = 0,
                crop: int | Sequence[int] | None = None, hflip: bool = True, vflip: bool = False,
                resize: int | Sequence[int] | None = None, start_step: int = 0, num_steps: int | None = None,
                shuffle: bool = True, pin_memory: bool = False) -> DataLoader:
    """A deterministic training loader: :class:`StepSampler` batches, optional Resize + RandomCropFlip, and
    :func:`collate_pairs`. Without ``crop``/``resize`` the dataset's own transform is kept.

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
