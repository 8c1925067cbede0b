"""Batched numerical building blocks shared by the metric families.

Every helper works on float64 tensors shaped (B, C, H, W) on any device. Sources may carry a batch of 1
while the fused tensor carries B methods: helpers that combine images rely on broadcasting, so the work
on a source is done once per pair rather than once per method.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

FORCE_FLOAT64 = os.environ.get("FUSION_METRICS_FLOAT64", "0") not in ("", "0", "false", "False")
"""Set ``FUSION_METRICS_FLOAT64=1`` to run the windowed moments in float64 on CPU too (slower).

By default, on CPU, the Gaussian window moments of SSIM (L = 255 profiles) and MS-SSIM, and the per-pixel
terms of Qabf, run in float32 on centred data (PyTorch's float64 depthwise convolution is ~6× slower);
the final averages are taken in float64. This is used only where the stabilising constants dwarf float32
round-off (C2 = 58.5 for SSIM); VIF, Piella's indices and the cddfuse SSIM (C2 = 3.6e-3) always use
float64. On CUDA everything stays float64. The golden VIFB test runs with the default.
"""


def window_dtype(device: torch.device) -> torch.dtype:
    """Working dtype of the windowed-moment filters on ``device`` (see :data:`FORCE_FLOAT64`)."""
    return torch.float32 if device.type == "cpu" and not FORCE_FLOAT64 else torch.float64


def window_filter(x: Tensor, k1d: Tensor, mode: str = "valid") -> Tensor:
    """Separable filtering with ``k1d ⊗ k1d`` as one depthwise convolution per direction.

    Keeps the dtype of ``x`` (the caller picks it with :func:`window_dtype`); ``mode`` is ``"valid"`` or
    zero-padded ``"same"``. On CPU the images are laid out channels-last, where PyTorch's depthwise
    kernels vectorise over the B·C images (about 2× faster than NCHW).
    """
    b, c, h, w = x.shape
    n = k1d.numel()
    k = k1d.to(x)
    groups = b * c
    pad = n // 2 if mode == "same" else 0
    y = x.reshape(1, groups, h, w)
    if x.device.type == "cpu":
        y = y.contiguous(memory_format=torch.channels_last)
    y = F.conv2d(y, k.view(1, 1, n, 1).expand(groups, 1, n, 1), groups=groups, padding=(pad, 0))
    y = F.conv2d(y, k.view(1, 1, 1, n).expand(groups, 1, 1, n), groups=groups, padding=(0, pad))
    return y.reshape(b, c, y.shape[-2], y.shape[-1])


@functools.cache
def fast_float64_matmul(device: torch.device) -> bool:
    """Whether ``device`` multiplies float64 matrices on tensor cores (data-centre GPUs of compute capability
    8.0, 9.x and 10.x: A100, H100/H200, B200).

    Only there does a banded product, which spends ``W`` multiply-adds per output where shift-and-add spends
    the ``n`` taps, beat the bandwidth-bound shift-and-add; on other GPUs float64 runs at 1/64 of float32.
    """
    if device.type != "cuda":
        return False
    major, minor = torch.cuda.get_device_capability(device)
    return (major, minor) == (8, 0) or major in (9, 10)


def _band(k: Tensor, n_in: int, n_out: int, step: int) -> Tensor:
    """(n_in, n_out) matrix whose column j holds the taps ``k`` from row j·step on. Two kernels: entry
    (i + j·step, j) of the row-major buffer sits at i·n_out + j·(step·n_out + 1), one strided view."""
    n = k.numel()
    band = torch.zeros(n_in * n_out, dtype=k.dtype, device=k.device)
    band.as_strided((n, n_out), (n_out, step * n_out + 1)).copy_(k[:, None].expand(n, n_out))
    return band.view(n_in, n_out)


def banded_filter(x: Tensor, k1d: Tensor, step: int = 1) -> Tensor:
    """:func:`separable_filter` as two matrix products with banded matrices: ``Bₕᵀ · x · B_w``.

    Each output sums the same ``n × n`` products as the shift-and-add (the other entries are exact zeros),
    so round-off stays local to each window — but a non-finite pixel spreads along its row and column.
    Used for float64 on the GPUs of :func:`fast_float64_matmul`, where it runs on float64 tensor cores.
    """
    h, w = x.shape[-2:]
    n = k1d.numel()
    ho, wo = (h - n) // step + 1, (w - n) // step + 1
    k = k1d.to(x)
    return _band(k, h, ho, step).mT @ (x @ _band(k, w, wo, step))


def filter64(x: Tensor, k1d: Tensor, mode: str = "valid") -> Tensor:
    """Float64 filtering with ``k1d ⊗ k1d`` through :func:`fft_filter_valid`; ``mode`` "valid" or zero-padded "same".

    On CPU this is ~10× faster than PyTorch's float64 depthwise convolution; round-off ~1e-16 of the data
    scale, so callers that need exact zeros of flat windows must set them explicitly.
    """
    if mode == "same":
        p = k1d.numel() // 2
        x = F.pad(x, (p, p, p, p))
    return fft_filter_valid(k1d, tuple(x.shape[-2:]), x.device)(x)


def separable_filter(x: Tensor, k1d: Tensor, step: int = 1) -> Tensor:
    """'valid' correlation of (…, H, W) images with ``k1d ⊗ k1d`` by shift-and-add, in the dtype of ``x``.

    Keeps every ``step``-th output row and column (``step=2``: filter-and-decimate computes only the kept
    outputs). Round-off is local to each window, as in MATLAB's ``filter2`` (FFT round-off scales with the
    whole image). On CPU it filters one plane at a time so that each stays in cache: in float64 this is
    ~3× faster than both the FFT and PyTorch's depthwise convolution. With ``step > 1`` the vertically
    filtered plane is first split into its ``step`` column phases, so that every horizontal tap adds a
    contiguous run instead of a strided one (the same sums in the same order; a 17-tap 480×640 plane
    1.2–1.3× faster on CPU, planes of ~100 px about even).
    Float64 on the GPUs of :func:`fast_float64_matmul` goes through :func:`banded_filter`.
    """
    if x.dtype == torch.float64 and fast_float64_matmul(x.device):
        return banded_filter(x, k1d, step)
    taps = k1d.tolist()
    n = len(taps)
    h, w = x.shape[-2:]
    ho, wo = (h - n) // step + 1, (w - n) // step + 1
    span_h = step * (ho - 1) + 1
    planes = x.reshape(-1, h, w)
    out = torch.empty(planes.shape[0], ho, wo, dtype=x.dtype, device=x.device)
    pairs = zip(out.unbind(0), planes.unbind(0)) if x.device.type == "cpu" else [(out, planes)]
    cols = None
    for dst, src in pairs:
        cols = torch.mul(src[..., 0:span_h:step, :], taps[0], out=cols)
        for i in range(1, n):
            cols.add_(src[..., i : i + span_h : step, :], alpha=taps[i])
        # tap i reads column j·step + i, i.e. column j + i // step of phase i % step
        phases = [cols] if step == 1 else [cols[..., p::step].contiguous() for p in range(step)]
        torch.mul(phases[0][..., 0:wo], taps[0], out=dst)
        for i in range(1, n):
            first = i // step
            dst.add_(phases[i % step][..., first : first + wo], alpha=taps[i])
    return out.reshape(*x.shape[:-2], ho, wo)


def box_filter_valid(x: Tensor, n: int) -> Tensor:
    """n×n moving average, 'valid', returned in float64: window sums by :func:`window_sums`, then ÷ n².

    The sums run in float64, or in float32 when ``x`` is float32: the caller's promise that every partial
    sum is exact there (multiples of 1/4 below 2²² in magnitude, e.g. products of centred uint8 levels over
    windows up to 16×16). On integer-valued data (the uint8 profiles) the sums are exact either way, so the
    result is the same to the bit and flat windows give exactly zero variances; float32 halves the memory
    traffic of the shift-and-add passes.
    """
    if x.dtype != torch.float32:
        x = x.to(torch.float64)
    return window_sums(window_sums(x, n, -2), n, -1).to(torch.float64).div_(n * n)


def window_sums(x: Tensor, n: int, dim: int) -> Tensor:
    """Sums of ``n`` consecutive entries along ``dim`` ('valid'), by doubling: about log2(n) + popcount(n)
    passes over the image instead of n (for n = 7: 4 instead of 7). The sum order differs from a running
    sum only in round-off; on integer-valued data every order is exact.
    """
    length = x.shape[dim] - n + 1
    spans = [x]  # spans[k]: sums of 2**k consecutive entries
    while 2 ** len(spans) <= n:
        half = 2 ** (len(spans) - 1)
        prev = spans[-1]
        spans.append(prev.narrow(dim, 0, prev.shape[dim] - half) + prev.narrow(dim, half, prev.shape[dim] - half))
    parts, start = [], 0
    for k in reversed(range(len(spans))):
        if n & (1 << k):
            parts.append(spans[k].narrow(dim, start, length))
            start += 1 << k
    if len(parts) == 1:  # a fresh tensor even for n = 1, which callers may modify in place
        return parts[0].clone(memory_format=torch.contiguous_format)
    out = parts[0] + parts[1]
    for part in parts[2:]:
        out.add_(part)
    return out


def fft_filter_valid(k1d: Tensor, size: tuple[int, int], device: torch.device) -> Callable[[Tensor], Tensor]:
    """'valid' correlation with ``k1d ⊗ k1d`` on (…, H, W) float64 images through rfft2/irfft2.

    Returns a filter for images of ``size``; the kernel spectrum is computed once. Placing the kernel at
    the origin makes the circular correlation equal to the linear one on the valid region (no wrap-around
    there). Faster than PyTorch's float64 depthwise convolution for the 17-tap VIF windows; round-off
    ~1e-16 of the data scale.
    """
    h, w = size
    n = k1d.numel()
    k1 = k1d.to(device=device, dtype=torch.float64)
    k = torch.zeros(h, w, dtype=torch.float64, device=device)
    k[:n, :n] = k1[:, None] * k1[None, :]
    kspec = torch.conj(torch.fft.rfft2(k))

    def apply(x: Tensor) -> Tensor:
        return torch.fft.irfft2(torch.fft.rfft2(x.to(torch.float64)) * kspec, s=(h, w))[..., : h - n + 1, : w - n + 1]

    return apply


def sobel(x: Tensor, pad_mode: str = "zeros") -> tuple[Tensor, Tensor]:
    """'same' correlation with SOBEL_X = [1 0 −1; 2 0 −2; 1 0 −1] and SOBEL_Y = [1 2 1; 0 0 0; −1 −2 −1].

    Computed with separable slices in the input dtype (exact on integer data). ``pad_mode``: ``"zeros"``
    (filter2/conv2), ``"replicate"`` (imfilter 'replicate') or ``"reflect"``.
    """
    if pad_mode == "zeros":
        p = F.pad(x, (1, 1, 1, 1))
    else:
        b, c, h, w = x.shape
        p = F.pad(x.reshape(b * c, 1, h, w), (1, 1, 1, 1), mode=pad_mode).reshape(b, c, h + 2, w + 2)
    sv = p[..., :-2, :] + 2 * p[..., 1:-1, :] + p[..., 2:, :]
    sx = sv[..., :, :-2] - sv[..., :, 2:]
    sh = p[..., :, :-2] + 2 * p[..., :, 1:-1] + p[..., :, 2:]
    sy = sh[..., :-2, :] - sh[..., 2:, :]
    return sx, sy


def round_half_away(x: Tensor) -> Tensor:
    """MATLAB ``round`` / ``int16()`` rounding: halves go away from zero (torch.round goes to even)."""
    return torch.sign(x) * torch.floor(x.abs() + 0.5)


def gaussian_1d(size: int, sigma: float, *, device=None, dtype=torch.float64) -> Tensor:
    """Normalised 1-D Gaussian whose outer product is MATLAB ``fspecial('gaussian', size, sigma)``."""
    x = torch.arange(size, dtype=dtype, device=device) - (size - 1) / 2
    g = torch.exp(-(x * x) / (2 * sigma * sigma))
    return g / g.sum()


def histogram(idx: Tensor, bins: int) -> Tensor:
    """Counts per leading (B, C) slice of integer indices in [0, bins); returns (B, C, bins) float64.

    Args:
        idx: (B, C, N) integer bin indices (int32 is 2–4× faster than int64 on the CPU here).
        bins: number of bins.
    """
    b, c, _ = idx.shape
    if b * c * bins > torch.iinfo(torch.int32).max:
        idx = idx.to(torch.int64)
    if b * c > 1:
        idx = idx + torch.arange(b * c, device=idx.device, dtype=idx.dtype).reshape(b, c, 1) * bins
    counts = torch.bincount(idx.reshape(-1), minlength=b * c * bins)
    return counts.reshape(b, c, bins).to(torch.float64)


def joint_histogram(idx_x: Tensor, idx_y: Tensor, bins: int) -> Tensor:
    """Joint counts (B, C, bins, bins) of broadcastable (B, C, N) index tensors (x → rows, y → columns)."""
    idx_x, idx_y = torch.broadcast_tensors(idx_x, idx_y)
    return histogram(torch.add(idx_y, idx_x, alpha=bins), bins * bins).reshape(*idx_x.shape[:2], bins, bins)


def entropy_from_counts(counts: Tensor, dims: tuple[int, ...] = (-1,), log=torch.log2) -> Tensor:
    """Shannon entropy of histograms along ``dims`` (empty bins contribute 0)."""
    p = counts / counts.sum(dim=dims, keepdim=True)
    terms = torch.where(p > 0, -p * log(torch.where(p > 0, p, torch.ones_like(p))), torch.zeros_like(p))
    return terms.sum(dim=dims)


def quantise_levels(x: Tensor, levels: int = 256) -> Tensor:
    """Integer (int32) bin index of 0–255 data (nearest level, halves up, clamped): the uint8 conversion.

    The integer conversion truncates, which is the floor here (the values are ≥ 0.5); an explicit ``floor``
    was a slow extra pass over the image on the CPU.
    """
    return x.clamp(0, levels - 1).add_(0.5).to(torch.int32)


def minmax_normalise(x: Tensor) -> Tensor:
    """Per (B, C) channel (x − min)/(max − min), in that operation order (MATLAB); constant channels → 0."""
    flat = x.flatten(-2)
    mn = flat.amin(-1)[..., None, None]
    mx = flat.amax(-1)[..., None, None]
    rng = mx - mn
    return torch.where(rng > 0, (x - mn) / torch.where(rng > 0, rng, torch.ones_like(rng)), torch.zeros_like(x))


def normalise_255(x: Tensor) -> Tensor:
    """Min–max normalise each channel to round(0–255) (Liu's ``normalize1``; an all-zero channel stays).

    A constant non-zero channel has no range; like the reference code it yields NaN.
    """
    flat = x.flatten(-2)
    mn = flat.amin(-1)[..., None, None]
    mx = flat.amax(-1)[..., None, None]
    out = torch.floor((x - mn) / (mx - mn) * 255 + 0.5)  # MATLAB round; values ≥ 0
    keep = (mx == 0) & (mn == 0)
    return torch.where(keep, x, out)


def block_reduce_sum(x: Tensor, block: int) -> Tensor:
    """Sum over non-overlapping block×block tiles, zero-padding partial tiles (MATLAB ``blkproc``)."""
    b, c, h, w = x.shape
    ph, pw = (-h) % block, (-w) % block
    if ph or pw:
        x = F.pad(x, (0, pw, 0, ph))
    hh, ww = x.shape[-2] // block, x.shape[-1] // block
    return x.reshape(b, c, hh, block, ww, block).sum(dim=(3, 5))


def channel_mean(values: Tensor) -> Tensor:
    """(B, C) per-channel values → (B,) mean (VIFB averages the RGB channels; grey is C = 1)."""
    return values.mean(dim=1)


def correlation(x: Tensor, y: Tensor) -> Tensor:
    """Pearson correlation per (B, C) channel of broadcastable images."""
    x, y = torch.broadcast_tensors(x, y)
    xc = x - x.mean(dim=(-2, -1), keepdim=True)
    yc = y - y.mean(dim=(-2, -1), keepdim=True)
    num = (xc * yc).sum(dim=(-2, -1))
    den = torch.sqrt((xc * xc).sum(dim=(-2, -1)) * (yc * yc).sum(dim=(-2, -1)))
    return num / den
