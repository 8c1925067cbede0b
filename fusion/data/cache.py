"""Decode (or render) each sample of a training set once and keep it in memory.

Real datasets fit in memory as 8-bit pixels (RoadScene's 221 pairs take 0.1 GB, MSRS's 1,444 about 1.8 GB), and
decoding a pair, or rendering a synthetic scene, costs milliseconds that a GPU step does not have.
:class:`InMemory` keeps every sample after its first load (lazily: nothing is decoded up front, so a short run
pays only for what it draws, and the first epoch's decoding happens in the runner's background thread) and
serves it through the usual transform, so crops and flips, and therefore every batch, are identical to those
read from disk.

Storage is exact: an image whose values are all multiples of 1/255 (any 8-bit file) is kept as ``uint8`` and
restored by the same ``/ 255`` the reader applies; anything else (16-bit files, rendered scenes, resized
pairs) stays ``float32``. Masks with values below 256 are kept as ``uint8``.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from fusion.data.base import FusionDataset

__all__ = ["InMemory", "sample_nbytes"]


def _pack_image(x: Tensor) -> Tensor:
    """``x`` as uint8 when that is lossless (8-bit data), else unchanged."""
    if x.dtype != torch.float32:
        return x
    q = (x * 255).round()
    return q.to(torch.uint8) if torch.equal(q / 255, x) else x


def _pack(sample: dict[str, Any]) -> dict[str, Any]:
    out = dict(sample)
    for key in ("ir", "vis"):
        if key in out:
            out[key] = _pack_image(out[key])
    mask = out.get("mask")
    if mask is not None and mask.numel() and 0 <= int(mask.min()) and int(mask.max()) < 256:
        out["mask"] = mask.to(torch.uint8)
    return out


def _unpack(stored: dict[str, Any]) -> dict[str, Any]:
    out = dict(stored)
    for key in ("ir", "vis"):
        if key in out and out[key].dtype == torch.uint8:
            out[key] = out[key].float() / 255
    if "mask" in out and out["mask"].dtype == torch.uint8:
        out["mask"] = out["mask"].long()
    return out


def sample_nbytes(sample: dict[str, Any]) -> int:
    """Bytes of a sample's tensors (lists of tensors included)."""
    total = 0
    for value in sample.values():
        for t in value if isinstance(value, (list, tuple)) else [value]:
            if isinstance(t, Tensor):
                total += t.numel() * t.element_size()
    return total


class InMemory(FusionDataset):
    """``base`` with every sample kept in memory after its first load; indexing and transforms behave exactly
    as on ``base``.

    Copies made by ``with_transform`` share the memory. Meant for the process that loads (the runner loads in
    one background thread); each DataLoader worker process would fill its own copy.

    Args:
        base: any dataset; its own transform is kept (``with_transform`` replaces it).
    """

    def __init__(self, base: FusionDataset) -> None:
        super().__init__(base.transform)
        self.describe_as(base)
        self.base = base
        self._samples: list[dict[str, Any] | None] = [None] * len(base)

    def __len__(self) -> int:
        return len(self._samples)

    def load(self, index: int) -> dict[str, Any]:
        stored = self._samples[index]
        if stored is None:
            stored = self._samples[index] = _pack(self.base.load(index))
        return _unpack(stored)

    @property
    def nbytes(self) -> int:
        """Bytes held so far."""
        return sum(sample_nbytes(s) for s in self._samples if s is not None)

    def __repr__(self) -> str:
        return f"InMemory({self.base!r}, {sum(s is not None for s in self._samples)}/{len(self)} loaded)"
