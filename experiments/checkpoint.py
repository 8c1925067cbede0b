"""Checkpoints in the contracts.md format: atomic writes, plain types, ``weights_only=True`` loads.

A full checkpoint is a plain dict::

    {"format": 1, "config": {...}, "net": {"name", "kwargs"}, "model": state_dict,
     "lower": {name: {"model", "optim", "sched"}}, "upper_optim": ..., "upper_sched": ...,
     "aggregator_state": ..., "step": int, "rng": {"torch", "cuda", "python", "numpy"}, "extra": {...}}

Every value is a tensor, number, string, bool, None, list, tuple or dict, so ``torch.load(path,
weights_only=True)`` reads it without unpickling code. The file is written to a temporary name in the same
folder and moved into place with ``os.replace``, so a crash mid-write never leaves a truncated checkpoint.
"""

from __future__ import annotations

import os
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

from experiments.logging_utils import output_guard

__all__ = ["FORMAT", "INFERENCE_KEYS", "save_checkpoint", "load_checkpoint", "strip_checkpoint",
           "rng_state", "set_rng_state"]

FORMAT = 1
INFERENCE_KEYS = ("format", "config", "net", "model")


def rng_state() -> dict[str, Any]:
    """The torch, CUDA, Python and NumPy generator states as plain types."""
    py = random.getstate()
    np_state = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "cuda": [s for s in torch.cuda.get_rng_state_all()] if torch.cuda.is_available() else [],
        "python": [py[0], list(py[1]), py[2]],
        "numpy": {"name": str(np_state[0]), "keys": torch.from_numpy(np_state[1].astype(np.int64)),
                  "pos": int(np_state[2]), "has_gauss": int(np_state[3]), "cached_gaussian": float(np_state[4])},
    }


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what :func:`rng_state` returned (CUDA states only when CUDA is present)."""
    torch.set_rng_state(state["torch"])
    if state.get("cuda") and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(list(state["cuda"])[: torch.cuda.device_count()])
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    n = state["numpy"]
    np.random.set_state((n["name"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                         n["cached_gaussian"]))


def save_checkpoint(path: str | Path, ckpt: dict[str, Any]) -> Path:
    """Write ``ckpt`` atomically (temp file + ``os.replace``).

    Raises:
        OutputError: the folder is read-only or full; an existing checkpoint is left untouched.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with output_guard(path.parent):
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            torch.save(ckpt, tmp)
            os.replace(tmp, path)
        finally:
            if tmp.exists():
                tmp.unlink()
    return path


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load a checkpoint with ``weights_only=True`` and check its format.

    Raises:
        FileNotFoundError: no such file.
        ValueError: not a checkpoint of this toolkit, or a newer format.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    ckpt = torch.load(path, map_location=map_location, weights_only=True)
    if not isinstance(ckpt, dict) or "format" not in ckpt or "model" not in ckpt:
        raise ValueError(f"{path} is not a checkpoint of this toolkit (expected keys format, model, ...)")
    if int(ckpt["format"]) > FORMAT:
        raise ValueError(f"{path} has checkpoint format {ckpt['format']}; this version reads <= {FORMAT}")
    return ckpt


def strip_checkpoint(ckpt: dict[str, Any]) -> dict[str, Any]:
    """The inference-only part: ``format``, ``config``, ``net``, ``model`` (contracts.md)."""
    missing = [k for k in INFERENCE_KEYS if k not in ckpt]
    if missing:
        raise ValueError(f"checkpoint lacks {missing}; cannot strip it to an inference checkpoint")
    return {k: ckpt[k] for k in INFERENCE_KEYS}
