"""Run directories, provenance, the scalar CSV and the wandb wrapper.

Nothing in a run depends on wandb: every scalar goes to ``metrics.csv`` first, and wandb (when enabled)
receives the same dict. wandb never blocks a run: without an API key the default mode is ``offline``
(files under ``<run>/wandb/``), an explicit ``WANDB_MODE`` is respected, and a failing ``wandb.init`` falls
back to no tracking with a warning. Only ``online`` touches the network (see :class:`Tracker`).
"""

from __future__ import annotations

import csv
import datetime as _dt
import errno
import importlib
import json
import logging
import math
import netrc
import os
import platform
import subprocess
import sys
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

__all__ = [
    "MetricsCSV",
    "OutputError",
    "Tracker",
    "check_writable",
    "image_panel",
    "make_run_dir",
    "output_guard",
    "resolve_wandb_mode",
    "write_env",
]

log = logging.getLogger(__name__)


class OutputError(RuntimeError):
    """The output directory cannot be written (read-only, full, or not a directory)."""


def _explain_oserror(err: OSError, path: Path | str) -> OutputError:
    if err.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        why = "is not writable (read-only or no permission); choose another folder with --out"
    elif err.errno == errno.ENOSPC or err.errno == errno.EDQUOT:
        why = "is full (no space left on the device); free space or choose another folder with --out"
    elif err.errno == errno.ENOTDIR:
        why = "is not a directory (a file is in the way); choose another folder with --out"
    else:
        why = f"cannot be written ({err.strerror or err})"
    return OutputError(f"output path {path} {why}")


# torch.save reports write failures as RuntimeError without an errno; these texts tell which one it was.
_FULL_TEXTS = ("no space left", "disk quota", "file write failed")
_READ_ONLY_TEXTS = ("read-only", "permission denied", "cannot be opened", "operation not permitted")


def _explain_runtime_error(err: RuntimeError, path: Path | str) -> OutputError:
    text = str(err).lower()
    if any(t in text for t in _FULL_TEXTS):
        code = errno.ENOSPC
    elif any(t in text for t in _READ_ONLY_TEXTS):
        code = errno.EACCES
    else:
        return OutputError(f"output path {path} cannot be written ({str(err).splitlines()[0] if str(err) else err!r})")
    return _explain_oserror(OSError(code, os.strerror(code)), path)


class output_guard:
    """Turn every write failure under ``path`` into one clear :class:`OutputError`.

    Wrap only code that writes: OS errors (read-only, full, a file in the way) and the ``RuntimeError`` that
    ``torch.save`` raises for the same causes both become an ``OutputError`` naming ``path``; a missing
    input (``FileNotFoundError``) passes through.
    """

    def __init__(self, path: Path | str):
        self.path = path

    def __enter__(self) -> None:
        return None

    def __exit__(self, exc_type, exc, tb) -> bool:
        if exc is None or isinstance(exc, OutputError):
            return False
        if isinstance(exc, OSError) and not isinstance(exc, FileNotFoundError):
            raise _explain_oserror(exc, self.path) from exc
        if isinstance(exc, RuntimeError):
            raise _explain_runtime_error(exc, self.path) from exc
        return False


def check_writable(folder: str | Path) -> Path:
    """Check, before any work, that ``folder`` can be created (or is) a writable directory; create nothing.

    The nearest existing ancestor must be a directory in which a file can be created (probed with an
    anonymous temporary file, so the check also holds for root on a read-only file system).

    Returns:
        ``folder`` as a :class:`Path`.

    Raises:
        OutputError: ``folder`` or an ancestor is a file, or the location is read-only or full.
    """
    folder = Path(folder)
    existing = folder
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        blocker = "is a file, not a folder" if existing == folder else f"is inside the file {existing}"
        raise OutputError(f"output path {folder} {blocker}; choose another folder with --out")
    with output_guard(folder), tempfile.TemporaryFile(dir=existing):
        pass
    return folder


def make_run_dir(out: str | Path, name: str, seed: int, now: _dt.datetime | None = None) -> Path:
    """Create ``<out>/<name>/<YYYYmmdd-HHMMSS>-s<seed>/`` and return it; never reuse an existing folder.

    A folder that already exists (two runs started in the same second) gets a ``-1``, ``-2``, ... suffix.

    Raises:
        OutputError: the location is read-only, full, or blocked by a file.
    """
    stamp = (now or _dt.datetime.now()).strftime("%Y%m%d-%H%M%S")
    parent = Path(out) / name
    try:
        parent.mkdir(parents=True, exist_ok=True)
        base = f"{stamp}-s{seed}"
        for i in range(10_000):
            path = parent / (base if i == 0 else f"{base}-{i}")
            try:
                path.mkdir()
            except FileExistsError:
                continue
            for sub in ("eval", "plots", "checkpoints"):
                (path / sub).mkdir()
            return path
    except OSError as err:
        raise _explain_oserror(err, parent) from err
    raise OutputError(f"could not create a fresh run folder under {parent}")  # pragma: no cover


def _git_sha(repo: Path) -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=repo, capture_output=True, text=True, timeout=5,
                             check=False)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


def _git_dirty(repo: Path) -> bool | None:
    try:
        out = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=repo,
                             capture_output=True, text=True, timeout=5, check=False)
    except (OSError, subprocess.SubprocessError):
        return None
    return bool(out.stdout.strip()) if out.returncode == 0 else None


def _version(module: str) -> str | None:
    try:
        from importlib.metadata import version

        return version(module)
    except Exception:  # noqa: BLE001 - a missing package is simply reported as None
        return None


def write_env(run_dir: Path, extra: Mapping[str, Any] | None = None) -> dict:
    """Write ``env.json``: git SHA, Python/torch/CUDA and key package versions, host, command line."""
    repo = Path(__file__).resolve().parents[1]
    env = {
        "git_sha": _git_sha(repo),
        "git_dirty": _git_dirty(repo),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "cuda_available": torch.cuda.is_available(),
        "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "torch_threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "platform": platform.platform(),
        "packages": {p: _version(p) for p in ("numpy", "torchvision", "segmentation-models-pytorch", "timm",
                                              "higher", "wandb", "pycocotools", "mmdet")},
        "argv": sys.argv,
        "started": _dt.datetime.now().isoformat(timespec="seconds"),
    }
    env.update(extra or {})
    with output_guard(run_dir):
        (run_dir / "env.json").write_text(json.dumps(env, indent=2) + "\n", encoding="utf-8")
    return env


class MetricsCSV:
    """Append-only wide CSV of every logged scalar: one row per ``log`` call, one column per key.

    Columns are ``step`` then the keys in order of first appearance. A key that appears later rewrites the
    file once with the wider header (earlier rows get empty cells), so the file is always valid CSV.
    """

    def __init__(self, path: Path):
        self.path = Path(path)
        self.columns: list[str] = ["step"]
        self.rows: list[dict[str, Any]] = []
        if self.path.exists():       # continue a file copied from a resumed run
            with open(self.path, newline="", encoding="utf-8") as fh:
                reader = csv.DictReader(fh)
                self.columns = list(reader.fieldnames or ["step"])
                self.rows = list(reader)

    def log(self, step: int, scalars: Mapping[str, float]) -> None:
        row = {"step": step, **{k: _plain(v) for k, v in scalars.items()}}
        new = [k for k in row if k not in self.columns]
        self.rows.append(row)
        with output_guard(self.path.parent):
            if new or not self.path.exists():
                self.columns.extend(new)
                self._rewrite()
            else:
                with open(self.path, "a", newline="", encoding="utf-8") as fh:
                    csv.DictWriter(fh, self.columns).writerow(row)

    def _rewrite(self) -> None:
        tmp = self.path.with_suffix(".csv.tmp")
        with open(tmp, "w", newline="", encoding="utf-8") as fh:
            writer = csv.DictWriter(fh, self.columns)
            writer.writeheader()
            writer.writerows(self.rows)
        os.replace(tmp, self.path)

    def truncate_after(self, step: int) -> None:
        """Drop rows logged after ``step`` (a resumed run repeats them)."""
        self.rows = [r for r in self.rows if int(float(r["step"])) <= step]
        with output_guard(self.path.parent):
            self._rewrite()


def _plain(v: Any) -> Any:
    if isinstance(v, torch.Tensor):
        v = v.detach().float().item()
    if isinstance(v, (np.floating, np.integer)):
        v = v.item()
    return v


def _wandb_key_configured() -> bool:
    if os.environ.get("WANDB_API_KEY"):
        return True
    try:
        return netrc.netrc().authenticators("api.wandb.ai") is not None
    except (OSError, netrc.NetrcParseError):
        return False


def resolve_wandb_mode(requested: str | None) -> str:
    """The wandb mode to use: the flag, else ``WANDB_MODE``, else online with an API key, else offline."""
    if requested:
        return requested
    env = os.environ.get("WANDB_MODE", "").strip().lower()
    if env in ("online", "offline", "disabled"):
        return env
    if env in ("dryrun",):
        return "offline"
    return "online" if _wandb_key_configured() else "offline"


class Tracker:
    """Thin wandb wrapper: config, scalars, image panels and the final summary.

    The only seam to wandb is ``importlib.import_module("wandb")`` at construction, so a test can put a
    fake module in ``sys.modules["wandb"]`` and assert the calls. With mode ``disabled`` wandb is not
    imported at all. Only rank 0 of a distributed run should construct an active tracker.

    ``wandb.init(mode="offline")`` makes only the run offline: wandb's process-wide settings stay online,
    and its usage telemetry (wandb 0.31) resolves and posts to the wandb server from a background thread,
    at the latest when the process exits. The mode is therefore also set process-wide with
    ``wandb.setup`` before ``wandb.init``, which keeps an offline run off the network.

    Args:
        mode: online | offline | disabled (see :func:`resolve_wandb_mode`).
        run_dir: wandb files go to ``<run_dir>/wandb``.
        config: the resolved run config (plain dict).
        project: wandb project name.
        name: run name shown in the UI.
    """

    def __init__(self, mode: str, run_dir: Path, config: Mapping[str, Any], project: str, name: str):
        self.mode = mode
        self.run = None
        self._wandb = None
        if mode == "disabled":
            return
        try:
            wandb = importlib.import_module("wandb")
            if hasattr(wandb, "setup") and hasattr(wandb, "Settings"):
                wandb.setup(settings=wandb.Settings(mode=mode))
            settings = wandb.Settings(init_timeout=30, silent=True) if hasattr(wandb, "Settings") else None
            kwargs = {"settings": settings} if settings is not None else {}
            self.run = wandb.init(project=project, name=name, dir=str(run_dir), mode=mode,
                                  config=dict(config), **kwargs)
            self._wandb = wandb
        except Exception as err:  # noqa: BLE001 - tracking must never stop a run
            log.warning("wandb disabled: init in mode %r failed (%s); scalars still go to metrics.csv",
                        mode, err)
            self.run = None

    @property
    def active(self) -> bool:
        return self.run is not None

    def log(self, scalars: Mapping[str, float], step: int) -> None:
        if self.active:
            self.run.log({k: _plain(v) for k, v in scalars.items()}, step=step)

    def log_image(self, key: str, image: np.ndarray, step: int, caption: str | None = None) -> None:
        """Log an HxWx3 uint8 panel."""
        if self.active:
            self.run.log({key: self._wandb.Image(image, caption=caption)}, step=step)

    def summary(self, values: Mapping[str, float]) -> None:
        if self.active:
            for k, v in values.items():
                self.run.summary[k] = _plain(v)

    def finish(self) -> None:
        if self.active:
            try:
                self.run.finish()
            except Exception as err:  # noqa: BLE001
                log.warning("wandb finish failed: %s", err)
            self.run = None


# ------------------------------------------------------------------------------------ image panels
_PALETTE = np.array([
    [0, 0, 0], [64, 0, 128], [64, 64, 0], [0, 128, 192], [0, 0, 192],
    [128, 128, 0], [64, 64, 128], [192, 128, 128], [192, 64, 0],
    [0, 192, 0], [192, 0, 192], [0, 192, 192], [255, 128, 0], [128, 0, 255], [255, 255, 0],
], dtype=np.uint8)   # MFNet's class colours first (unlabelled, car, person, bike, curve, ...)


def _to_uint8_rgb(img: torch.Tensor) -> np.ndarray:
    img = img.detach().float().cpu().clamp(0, 1)
    if img.shape[0] == 1:
        img = img.expand(3, *img.shape[1:])
    return (img.permute(1, 2, 0).numpy() * 255.0 + 0.5).astype(np.uint8)


def _mask_rgb(mask: torch.Tensor) -> np.ndarray:
    m = mask.detach().cpu().long().numpy()
    out = _PALETTE[np.clip(m, 0, len(_PALETTE) - 1) % len(_PALETTE)]
    out[m == 255] = 255
    return out


def _draw_boxes(img: np.ndarray, boxes: torch.Tensor, labels: torch.Tensor | None) -> np.ndarray:
    img = img.copy()
    h, w = img.shape[:2]
    for i, box in enumerate(boxes.detach().cpu().round().long().tolist()):
        x0, y0, x1, y1 = (max(0, min(v, lim - 1)) for v, lim in zip(box, (w, h, w, h)))
        colour = _PALETTE[1 + (int(labels[i]) if labels is not None else 0) % (len(_PALETTE) - 1)]
        img[y0, x0:x1 + 1] = colour
        img[y1, x0:x1 + 1] = colour
        img[y0:y1 + 1, x0] = colour
        img[y0:y1 + 1, x1] = colour
    return img


def image_panel(ir: torch.Tensor, vis: torch.Tensor, fused: torch.Tensor, *, mask: torch.Tensor | None = None,
                boxes: torch.Tensor | None = None, labels: torch.Tensor | None = None,
                pred_mask: torch.Tensor | None = None) -> np.ndarray:
    """One sample as ``IR | visible | fused | [label mask] | [prediction]``, an HxWx3 uint8 array.

    Boxes (xyxy pixels) are drawn on a copy of the fused image; masks use MFNet's colours (255 = white).
    """
    tiles = [_to_uint8_rgb(ir), _to_uint8_rgb(vis), _to_uint8_rgb(fused)]
    if mask is not None:
        tiles.append(_mask_rgb(mask))
    if pred_mask is not None:
        tiles.append(_mask_rgb(pred_mask))
    if boxes is not None and len(boxes):
        tiles.append(_draw_boxes(tiles[2], boxes, labels))
    sep = np.full((tiles[0].shape[0], 2, 3), 255, np.uint8)
    out = [tiles[0]]
    for t in tiles[1:]:
        out += [sep, t]
    return np.concatenate(out, axis=1)


def finite(values: Mapping[str, float]) -> bool:
    """True when every value is a finite number."""
    return all(isinstance(v, (int, float)) and math.isfinite(v) for v in values.values())
