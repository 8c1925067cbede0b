"""What every command shares on its command line: bad arguments are one ``error:`` line and exit code 2.

argparse prints its usage and then ``prog: error: message``; the toolkit's rule (README, reliability) is a single
line that starts with ``error:`` and names the flag, before any work. The argument types below refuse bad
numbers the same way, at parse time. :func:`retain_freed_memory` and :func:`huge_pages_for_tensors` are the
process settings that the training and benchmark commands make at start-up.
"""

from __future__ import annotations

import argparse
import ctypes
import ctypes.util
import os
import sys
from typing import NoReturn

import torch

from experiments.config import ConfigError

__all__ = [
    "ArgumentParser",
    "device_name",
    "huge_pages_for_tensors",
    "image_size",
    "native_bf16",
    "non_negative_int",
    "positive_int",
    "resolve_device",
    "retain_freed_memory",
]


class ArgumentParser(argparse.ArgumentParser):
    """argparse with the toolkit's error line: ``error: <prog>: <message>``, exit 2, no usage block."""

    def error(self, message: str) -> NoReturn:
        print(f"error: {self.prog}: {message}", file=sys.stderr)
        raise SystemExit(2)


def _integer(text: str, low: int) -> int:
    value = int(text) if text.lstrip("-").isdigit() else None
    if value is None or value < low:
        raise argparse.ArgumentTypeError(f"expected an integer >= {low}, got {text!r}")
    return value


def positive_int(text: str) -> int:
    return _integer(text, 1)


def non_negative_int(text: str) -> int:
    return _integer(text, 0)


def image_size(text: str) -> tuple[int, int]:
    """``H`` or ``HxW``, positive integers."""
    h, _, w = text.lower().partition("x")
    try:
        return positive_int(h), positive_int(w or h)
    except argparse.ArgumentTypeError:
        raise argparse.ArgumentTypeError(f"expected H or HxW with positive integers, got {text!r}") from None


def resolve_device(name: str, local_rank: int = 0, *, what: str = "train.device") -> torch.device:
    """``auto`` → CUDA when available; ``cuda`` → this rank's GPU. An unknown device or a GPU this machine
    lacks is a ConfigError naming ``what`` (the key or flag), before anything is built."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(f"cuda:{local_rank}" if name == "cuda" else name)
    except RuntimeError:
        raise ConfigError(f"{what}={name!r} is not a device; use cpu, cuda, cuda:N or auto") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"{what}={name!r} but CUDA is not available; use --device cpu")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ConfigError(f"{what}={name!r} but this machine has {torch.cuda.device_count()} GPU(s)")
    return device


def native_bf16(device: torch.device) -> bool:
    """Whether ``device`` computes bf16 convolutions and matrix products in hardware-backed kernels: GPUs with
    bf16 (Ampere and newer), and CPUs where oneDNN has bf16 kernels (AVX-512 and newer). On other CPUs (AVX2
    only) PyTorch falls back to scalar bf16 loops, 7-46x slower than float32 (BENCHMARKS.md)."""
    if device.type == "cuda":
        with torch.cuda.device(device):   # the device asked about, not the current one
            return torch.cuda.is_bf16_supported(including_emulation=False)
    if device.type == "cpu":
        return torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()
    return True


def device_name(text: str) -> str:
    """Argument type of ``--device``: checked as :func:`resolve_device` checks it, kept as written."""
    try:
        resolve_device(text, what="--device")
    except ConfigError as err:
        raise argparse.ArgumentTypeError(str(err)) from None
    return text


_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3   # glibc's mallopt parameters (malloc.h)


def retain_freed_memory(mmap_threshold: int = 32 << 20, trim_threshold: int = 256 << 20) -> bool:
    """Let glibc keep freed blocks for reuse instead of returning them to the OS at once (process-wide, so
    only the commands' entry points call it). Returns whether the setting took effect.

    Why: glibc's defaults hand a freed multi-megabyte tensor's pages back to the kernel, so the next one of
    that size page-faults all of them again. A CPU bi-level iteration allocates several parameter-sized
    gradients (57 MB each for a U-Net/ResNet-18): about 10 % of its time on the 2-core machine of
    BENCHMARKS.md. Blocks up to ``mmap_threshold`` (32 MiB, the ceiling of glibc's own adaptive threshold)
    then come from the heap, and up to ``trim_threshold`` of free heap is kept. Nothing changes where a
    ``MALLOC_*`` variable or ``GLIBC_TUNABLES`` is set (the user's own choice), or without glibc (macOS,
    Windows, musl).
    """
    if "GLIBC_TUNABLES" in os.environ or any(k.startswith("MALLOC_") for k in os.environ):
        return False
    try:
        mallopt = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    return bool(mallopt(_M_MMAP_THRESHOLD, mmap_threshold)) and bool(mallopt(_M_TRIM_THRESHOLD, trim_threshold))


def huge_pages_for_tensors() -> bool:
    """Ask PyTorch to back CPU tensors of 2 MB and more with transparent huge pages (``THP_MEM_ALLOC_ENABLE``,
    read at the process's first large allocation, so entry points call this before building anything).
    Returns whether the variable is now set by this call.

    Why: blocks above glibc's 32 MiB ceiling (a batch of 16 × 64 channels × 192² is 151 MB) are mmapped and
    returned to the kernel when freed, and each reuse faults them in again page by page. On the 2-core machine
    of BENCHMARKS.md that was 358 s of system time in a 449 s float32 run of ``bdl_roadscene_seg`` (warm-up,
    upper step, evaluation; 332 s with huge pages); 2 MB pages take 512 times fewer faults. A value the user
    set is left alone; where the kernel offers no huge pages, PyTorch's allocator only aligns the blocks.
    """
    if "THP_MEM_ALLOC_ENABLE" in os.environ:
        return False
    os.environ["THP_MEM_ALLOC_ENABLE"] = "1"
    return True
