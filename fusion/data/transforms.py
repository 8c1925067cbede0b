"""Sample transforms ``(sample, generator) -> sample``, applied alike to both sources, the mask and boxes.

Every random number comes from the ``generator`` argument, so a transform's output is a function of the sample
and the generator's seed alone (see :class:`fusion.data.sampling.StepSampler`).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["Compose", "RandomCropFlip", "Resize", "Transform"]

Transform = Callable[[dict[str, Any], "torch.Generator | None"], dict[str, Any]]


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

    Images smaller than the crop: real datasets mix sizes (RoadScene has 416x191 pairs), and a run must not
    die on the one small image it meets after hours of training. Such a sample is first upscaled with
    :class:`Resize` (images bilinear, mask nearest-neighbour, boxes scaled) by the smallest factor that makes
    it cover the crop, ``max(crop_h / H, crop_w / W)``, keeping its aspect ratio (for a square crop its short
    side then equals the crop), and is then cropped as usual. The first such upscale of each transform
    instance (each DataLoader worker holds its own copy) emits one ``UserWarning``. The random draws are the
    same, in the same order, as for an image that was big enough, so those keep their crops exactly.

    Args:
        crop: output (H, W) or int; ``None`` keeps the full image (flips only).
        hflip, vflip: flip with probability 0.5 each.
        min_visibility: fraction of a box's area that must remain inside the crop.
    """

    def __init__(self, crop: int | Sequence[int] | None, hflip: bool = True, vflip: bool = False,
                 min_visibility: float = 0.5) -> None:
        self.crop = None if crop is None else _pair(crop, "crop")
        self.hflip, self.vflip, self.min_visibility = hflip, vflip, float(min_visibility)
        self._warned = False

    def __repr__(self) -> str:
        return (f"RandomCropFlip(crop={self.crop}, hflip={self.hflip}, vflip={self.vflip}, "
                f"min_visibility={self.min_visibility})")

    def _cover(self, sample: dict[str, Any], ch: int, cw: int) -> dict[str, Any]:
        """``sample`` upscaled (aspect kept) just enough to contain a ``ch`` x ``cw`` crop."""
        height, width = sample["ir"].shape[-2:]
        scale = max(ch / height, cw / width)
        size = (max(ch, round(height * scale)), max(cw, round(width * scale)))
        if not self._warned:
            self._warned = True
            warnings.warn(
                f"{self!r}: sample {sample.get('name')!r} is {width}x{height} (WxH), smaller than the crop "
                f"{cw}x{ch}; upscaling it (and any later small one) to {size[1]}x{size[0]} before cropping",
                UserWarning, stacklevel=3)
        return Resize(size)(sample)

    def __call__(self, sample: dict[str, Any], generator: torch.Generator | None = None) -> dict[str, Any]:
        height, width = sample["ir"].shape[-2:]
        ch, cw = self.crop if self.crop is not None else (height, width)
        if ch > height or cw > width:
            sample = self._cover(sample, ch, cw)
            height, width = sample["ir"].shape[-2:]
        out = dict(sample)
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
