"""Label reading: class-name tables, segmentation-mask value maps and checks, VOC XML boxes.

Masks are (H, W) int64 class indices with ``IGNORE_INDEX`` (255) for pixels no loss or metric should count;
boxes are (N, 4) float32 xyxy in absolute pixels with (N,) int64 labels indexing a detection class table.
"""

from __future__ import annotations

import xml.etree.ElementTree as ET
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
from torch import Tensor

from fusion.image_io import ImagePairError

__all__ = [
    "FMB_CLASSES",
    "IGNORE_INDEX",
    "LLVIP_CLASSES",
    "M3FD_CLASSES",
    "MSRS_CLASSES",
    "check_mask",
    "clip_boxes",
    "read_voc",
    "value_lut",
]

IGNORE_INDEX = 255
MSRS_CLASSES = ("unlabelled", "car", "person", "bike", "curve", "car_stop", "guardrail", "color_cone", "bump")
M3FD_CLASSES = ("People", "Car", "Bus", "Motorcycle", "Lamp", "Truck")
LLVIP_CLASSES = ("person",)
# [unverified] SegMiF's FMB classes as commonly listed; override with class_names=... if your copy differs.
FMB_CLASSES = ("unlabelled", "Road", "Sidewalk", "Building", "Lamp", "Sign", "Vegetation", "Sky", "Person", "Car",
               "Truck", "Bus", "Motorcycle", "Bicycle", "Pole")


def value_lut(mapping: Mapping[int, int] | None) -> Tensor | None:
    """A lookup table mapping stored mask values to classes (unlisted values kept), or None for no mapping."""
    if not mapping:
        return None
    lut = torch.arange(65536, dtype=torch.int64)
    for src, dst in mapping.items():
        lut[int(src)] = int(dst)
    return lut


def check_mask(mask: Tensor, num_classes: int | None, path: Path, ignore_index: int) -> None:
    """Raise :class:`ImagePairError` naming ``path`` when ``mask`` holds values outside the class list."""
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


def clip_boxes(boxes: Tensor, labels: Tensor, height: int, width: int) -> tuple[Tensor, Tensor]:
    """Clip xyxy boxes to the image and drop (with their labels) those left with no area."""
    boxes = torch.stack([boxes[:, 0].clamp(0, width), boxes[:, 1].clamp(0, height),
                         boxes[:, 2].clamp(0, width), boxes[:, 3].clamp(0, height)], dim=1)
    keep = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
    return boxes[keep], labels[keep]
