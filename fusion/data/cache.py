"""Decode (or render) each sample of a training set once and keep it in memory.

Real datasets fit in memory as 8-bit pixels (RoadScene's 221 pairs take 0.1 GB, MSRS's 1,444 about 1.8 GB), and
decoding a pair, or rendering a synthetic scene, costs milliseconds that a GPU step does not have.
:class:`InMemory` keeps every sample after its first load (lazily: nothing is decoded up front, so a short run
pays only for what it draws, and the first epoch's decoding happens in the runner's background thread) and
serves it through the usual transform, so crops and flips, and therefore every batch, are identical to those
read from disk. :class:`CacheFiller` loads the rest ahead of use in worker processes, for a GPU whose steps
outpace one thread's decoding or rendering.

Storage is exact: an image whose values are all multiples of 1/255 (any 8-bit file) is kept as ``uint8`` and
restored by the same ``/ 255`` the reader applies; anything else (16-bit files, rendered scenes, resized
pairs) stays ``float32``. Masks with values below 256 are kept as ``uint8``.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from fusion.data.base import FusionDataset

__all__ = ["CacheFiller", "InMemory", "sample_nbytes"]

log = logging.getLogger(__name__)


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

    def missing(self) -> list[int]:
        """Indices of the samples not held yet."""
        return [i for i, s in enumerate(self._samples) if s is None]

    def store(self, index: int, packed: dict[str, Any]) -> None:
        """Keep ``packed`` (``base.load(index)`` as stored, e.g. from a worker process) unless ``index`` is held.

        Its tensors are copied into this process's memory: a tensor received from a worker keeps a shared-memory
        file open, and a cache holds thousands of them.
        """
        if self._samples[index] is None:
            self._samples[index] = {k: _own(v) for k, v in packed.items()}

    @property
    def nbytes(self) -> int:
        """Bytes held so far."""
        return sum(sample_nbytes(s) for s in self._samples if s is not None)

    def __repr__(self) -> str:
        return f"InMemory({self.base!r}, {sum(s is not None for s in self._samples)}/{len(self)} loaded)"


def _own(value: Any) -> Any:
    if isinstance(value, Tensor):
        return value.clone()
    if isinstance(value, (list, tuple)):
        return type(value)(_own(v) for v in value)
    return value


class _PackedLoads(Dataset):
    """``(dataset number, index) → base.load(index)`` as :class:`InMemory` stores it (run in worker processes)."""

    def __init__(self, bases: Sequence[FusionDataset]) -> None:
        self.bases = list(bases)

    def __getitem__(self, key: tuple[int, int]) -> dict[str, Any]:
        d, i = key
        return _pack(self.bases[d].load(i))


class CacheFiller:
    """Loads every sample that some :class:`InMemory` datasets do not hold yet, in ``workers`` processes.

    The runner's loader thread decodes or renders a sample in milliseconds, slower than a GPU consumes them in the
    first epoch: while it rendered the recommended preset's 2,048 synthetic scenes, the first 126 iterations ran
    at 4 it/s on an H200, and at 16 it/s once the scenes were held. The filler loads the samples in index order
    beside that thread, which never waits for it: a sample the loader asks for first is loaded there, as before,
    and since ``load`` is a function of the index it does not matter which of the two stores it. Create it in the
    main thread (its workers are forked, as a DataLoader's are) and :meth:`stop` it when the run ends.
    """

    def __init__(self, caches: Sequence[InMemory], workers: int) -> None:
        if workers < 1:
            raise ValueError(f"CacheFiller needs at least one worker process, got {workers}")
        self._caches = list(caches)
        keys = [(d, i) for d, cache in enumerate(self._caches) for i in cache.missing()]
        self._stop = threading.Event()
        samples = iter(DataLoader(_PackedLoads([c.base for c in self._caches]), batch_size=None, sampler=keys,
                                  num_workers=workers)) if keys else iter(())
        self._thread = threading.Thread(target=self._fill, args=(samples, keys), name="cache-filler", daemon=True)
        self._thread.start()

    def _fill(self, samples, keys: list[tuple[int, int]]) -> None:
        """Store what the workers send; the workers end with the loader (exhausted, or dropped with this thread)."""
        try:
            for packed, (d, i) in zip(samples, keys):
                self._caches[d].store(i, packed)
                if self._stop.is_set():
                    break
        except Exception as err:   # noqa: BLE001 - the loader meets the same sample and reports it properly
            log.info("cache filler stopped (%s); the loader loads the remaining samples itself", err)

    def wait(self, timeout: float | None = None) -> bool:
        """Wait up to ``timeout`` seconds for the filler to finish (or stop); whether it has."""
        self._thread.join(timeout)
        return not self._thread.is_alive()

    def stop(self) -> None:
        """Stop after the sample being received and shut the workers down."""
        self._stop.set()
        self._thread.join()
