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
import pickle
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

from experiments.logging_utils import output_guard

__all__ = [
    "FORMAT",
    "INFERENCE_KEYS",
    "CheckpointError",
    "load_checkpoint",
    "load_weights",
    "rng_state",
    "save_checkpoint",
    "set_rng_state",
    "strip_checkpoint",
]

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
        OutputError: the folder is read-only or full (``torch.save``'s ``RuntimeError`` included); an
            existing checkpoint is left untouched and no temporary file remains.
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


class CheckpointError(ValueError):
    """A checkpoint file that cannot be used: not a file, empty, truncated, corrupt, unsafe to load, another
    format, or weights that do not fit the net. The message names the file and what is wrong."""


_ZIP_MAGIC = b"PK\x03\x04"     # torch.save's format since PyTorch 1.6
_PICKLE_PROTO = 0x80            # first byte of a pickle (protocol >= 2): the legacy torch.save format


def _unreadable(path: Path, err: Exception) -> CheckpointError:
    """Our explanation of a failed ``torch.load``; PyTorch's own text suggests unsafe loading, so it is
    never passed on."""
    if isinstance(err, pickle.UnpicklingError):
        why = ("holds pickled Python objects (custom classes or functions) that a safe weights-only load "
               "refuses; checkpoints of this toolkit hold only tensors, numbers, strings and containers")
    else:    # it starts like torch.save's archive, so the rest is damaged
        why = (f"is truncated or corrupt (a damaged archive, {type(err).__name__}; the save was interrupted "
               "or the copy is partial)")
    return CheckpointError(f"checkpoint {path} {why}")


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load a checkpoint with ``weights_only=True`` and check its format.

    Raises:
        FileNotFoundError: no such file.
        CheckpointError: a folder, an empty, truncated, corrupt or pickle-based file, not a checkpoint of
            this toolkit, or a newer format (a ``ValueError``).
    """
    path = Path(path)
    if path.is_dir():
        raise CheckpointError(f"checkpoint {path} is a folder, not a checkpoint file")
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    try:
        with open(path, "rb") as fh:
            head = fh.read(4)
    except OSError as err:
        raise CheckpointError(f"checkpoint {path} cannot be opened ({err.strerror or err})") from err
    if not head:
        raise CheckpointError(f"checkpoint {path} is empty (0 bytes; the save was interrupted or the file truncated)")
    if head != _ZIP_MAGIC:
        kind = ("a pickle-based file (the legacy torch.save format or a plain pickle), which a safe weights-only "
                "load cannot read" if head[0] == _PICKLE_PROTO else "not a PyTorch checkpoint (unrecognised content)")
        raise CheckpointError(f"checkpoint {path} is {kind}")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as err:  # noqa: BLE001 - whatever torch raises on a bad file, the user gets one clear line
        raise _unreadable(path, err) from None
    if not isinstance(ckpt, dict) or "format" not in ckpt or "model" not in ckpt:
        raise CheckpointError(f"{path} is not a checkpoint of this toolkit (expected keys format, model, ...)")
    if int(ckpt["format"]) > FORMAT:
        raise CheckpointError(f"{path} has checkpoint format {ckpt['format']}; this version reads <= {FORMAT}")
    return ckpt


def load_weights(module: torch.nn.Module, state: dict[str, Any], what: str) -> None:
    """``module.load_state_dict(state, strict=True)``, but a mismatch names ``what`` (the net and the file)
    and the first missing, unexpected and wrongly shaped keys instead of PyTorch's full dump.

    Raises:
        CheckpointError: the weights do not fit (another net, or changed ``net.kwargs``).
    """
    own = module.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    shapes = [f"{k} {tuple(state[k].shape)} vs {tuple(own[k].shape)}" for k in own
              if k in state and hasattr(state[k], "shape") and tuple(state[k].shape) != tuple(own[k].shape)]
    problems = [f"{label} {', '.join(keys[:3])}{' …' if len(keys) > 3 else ''} ({len(keys)} in all)"
                for label, keys in (("missing keys", missing), ("unexpected keys", unexpected),
                                    ("shape mismatches", shapes)) if keys]
    if problems:
        raise CheckpointError(f"{what}: the weights do not fit the net: {'; '.join(problems)}")
    module.load_state_dict(state, strict=True)


def strip_checkpoint(ckpt: dict[str, Any]) -> dict[str, Any]:
    """The inference-only part: ``format``, ``config``, ``net``, ``model`` (contracts.md)."""
    missing = [k for k in INFERENCE_KEYS if k not in ckpt]
    if missing:
        raise CheckpointError(f"checkpoint lacks {missing}; cannot strip it to an inference checkpoint")
    return {k: ckpt[k] for k in INFERENCE_KEYS}
