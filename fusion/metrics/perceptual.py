"""Human-visual-system metrics: Qcb (Chen & Blum) and Qcv (Chen & Varshney).

Both filter images with a contrast-sensitivity function in the frequency domain. The CSF is real and
depends on |frequency| only, so the product with a real image's spectrum stays Hermitian and we can use
``rfft2``/``irfft2`` (the MATLAB code's ``real(ifft2(...))`` up to 1e-14). The spectrum of the fused image
is computed once and reused for both sources, and source spectra are computed once per pair.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from fusion.metrics._utils import block_reduce_sum, channel_mean, normalise_255, sobel
from fusion.metrics.profiles import per_source, prepare
from fusion.metrics.registry import register_metric

__all__ = ["qcb", "qcv"]


def _radial_grid(h: int, w: int, scale: float, device) -> Tensor:
    """|f| on the rfft2 grid, with MATLAB ``freqspace`` frequencies multiplied by size/``scale``.

    ``freqspace`` gives k·2/n for DFT index k; times n/scale this is 2k/scale, independent of the size.
    """
    ky = torch.fft.fftfreq(h, d=1.0 / h, dtype=torch.float64, device=device) * (2.0 / scale)
    kx = torch.fft.rfftfreq(w, d=1.0 / w, dtype=torch.float64, device=device) * (2.0 / scale)
    return torch.sqrt(ky[:, None] ** 2 + kx[None, :] ** 2)


def _csf_filter(spectrum: Tensor, csf: Tensor, size: tuple[int, int]) -> Tensor:
    return torch.fft.irfft2(spectrum * csf, s=size)


def _fft_length(n: int) -> int:
    """The smallest 2·3·5-smooth length ≥ n: the FFT's fast sizes (a prime factor such as 17 or 19 costs up
    to 1.5× the time)."""
    while True:
        m = n
        for p in (2, 3, 5):
            while m % p == 0:
                m //= p
        if m == 1:
            return n
        n += 1


def _gaussian_spectra(h: int, w: int, device) -> tuple[Tensor, Tensor, tuple[int, int]]:
    """rfft2 of the two unnormalised 31×31 Gaussians (σ = 2, 4) on a zero-padded grid.

    Padding by ≥ 15 pixels turns the circular FFT convolution into filter2's zero-padded 'same' one; any
    larger grid gives the same result, so the grid takes the next fast FFT length.
    """
    size = (_fft_length(h + 15), _fft_length(w + 15))
    t = torch.arange(-15, 16, dtype=torch.float64, device=device)
    iy = torch.remainder(t, size[0]).long()
    ix = torch.remainder(t, size[1]).long()
    spectra = []
    for sigma in (2.0, 4.0):
        g = torch.exp(-(t[:, None] ** 2 + t[None, :] ** 2) / (2 * sigma * sigma)) / (2 * math.pi * sigma * sigma)
        k = torch.zeros(size, dtype=torch.float64, device=device)
        k[iy[:, None], ix[None, :]] = g
        spectra.append(torch.fft.rfft2(k))
    return spectra[0], spectra[1], size


def _local_contrast(x: Tensor, g1: Tensor, g2: Tensor, size: tuple[int, int]) -> Tensor:
    """|G_σ=2 ∗ x / G_σ=4 ∗ x − 1| (filter2 'same', zero padding) through one zero-padded FFT."""
    h, w = x.shape[-2:]
    spec = torch.fft.rfft2(x, s=size)
    c1 = torch.fft.irfft2(spec * g1, s=size)[..., :h, :w]
    c2 = torch.fft.irfft2(spec * g2, s=size)[..., :h, :w]
    return c1.div_(c2).sub_(1).abs_()


@register_metric(
    "Qcb",
    higher_is_better=True,
    profiles=("reference", "vifb", "mefb"),
    reference="Chen & Blum, Image Vis. Comput. 27(10), 2009 (Z. Liu's metricChenBlum, as in VIFB)",
)
def qcb(fused: Tensor, a: Tensor, b: Tensor, *, profile: str = "reference") -> Tensor:
    """Chen–Blum perceptual contrast preservation.

    Each image is min–max normalised to round(0–255); filtered by the DoG CSF
    S(r) = exp(−(r/15.3870)²) − 0.7622·exp(−(r/1.3456)²) on the ``freqspace`` grid × (size/30); local
    contrast C = |G₂ ∗ I / G₄ ∗ I − 1| (31×31 Gaussians σ = 2, 4); masked contrast C′ = C³/(C² + 1e-4)
    (k = h = 1, p = 3, q = 2, Z = 1e-4); Q_XF = min(C′_X/C′_F, C′_F/C′_X); saliency
    λ_X = C′_X²/(C′_A² + C′_B²); Qcb = mean(λ_A Q_AF + λ_B Q_BF). ``vifb``/``mefb``: per RGB channel,
    averaged.
    """
    f, xa, xb = prepare(profile, fused, a, b)
    h, w = f.shape[-2:]
    r = _radial_grid(h, w, 30.0, f.device)
    csf = torch.exp(-((r / 15.3870) ** 2)) - 0.7622 * torch.exp(-((r / 1.3456) ** 2))

    g1, g2, size = _gaussian_spectra(h, w, f.device)

    def masked(x: Tensor) -> Tensor:
        c = _local_contrast(_csf_filter(torch.fft.rfft2(normalise_255(x)), csf, (h, w)), g1, g2, size)
        c2 = c * c
        return c.mul_(c2).div_(c2.add_(1e-4))  # C³/(C² + Z), in place (the same operations)

    cf = masked(f)
    ca = per_source(a, ("Qcb", profile, xa.shape), lambda: masked(xa))
    cb = per_source(b, ("Qcb", profile, xb.shape), lambda: masked(xb))

    def preservation(cx: Tensor) -> Tensor:
        """min(C′_X/C′_F, C′_F/C′_X): the smaller over the larger (NaN where both are 0, as the ratios)."""
        return torch.minimum(cx, cf).div_(torch.maximum(cx, cf))

    ca2, cb2 = ca * ca, cb * cb
    sal = ca2 + cb2
    q = torch.mul(ca2 / sal, preservation(ca))  # λ_A Q_AF, with the batch of every input
    q.add_((cb2 / sal) * preservation(cb))
    return channel_mean(q.mean(dim=(-2, -1)))


def _qcv_source(x: Tensor, csf: Tensor, block: int) -> tuple[Tensor, Tensor]:
    """A source's block saliency Σ g^5 (Sobel magnitude g) and its CSF-filtered image."""
    nx = normalise_255(x)
    gx, gy = sobel(nx)
    lam = block_reduce_sum((gx * gx + gy * gy) ** 2.5, block)
    return lam, _csf_filter(torch.fft.rfft2(nx), csf, tuple(nx.shape[-2:]))


@register_metric(
    "Qcv",
    higher_is_better=False,
    profiles=("reference", "vifb", "mefb"),
    reference="Chen & Varshney, Inf. Fusion 8(2), 2007 (Z. Liu's metricChen, as in VIFB)",
)
def qcv(fused: Tensor, a: Tensor, b: Tensor, *, profile: str = "reference") -> Tensor:
    """Chen–Varshney regional perceptual distortion, lower is better.

    Images min–max normalised to round(0–255). Saliency λ_X of each 16×16 block = Σ g_X^5 with g the
    Sobel magnitude (filter2 'same'); D_X = block mean (zero-padded partial blocks divide by 256) of the
    squared Mannos–Sakrison-filtered difference X − F, CSF 2.6(0.0192 + 0.144r)·exp(−(0.144r)^1.1) on
    the ``freqspace`` grid × (size/8); Qcv = Σ(λ_A D_A + λ_B D_B)/Σ(λ_A + λ_B). ``vifb``/``mefb``: per RGB
    channel.
    """
    f, xa, xb = prepare(profile, fused, a, b)
    h, w = f.shape[-2:]
    block = 16
    r = _radial_grid(h, w, 8.0, f.device)
    csf = 2.6 * (0.0192 + 0.144 * r) * torch.exp(-((0.144 * r) ** 1.1))
    # The filter is linear: filter(X) − filter(F), with F's filtered once for both sources and X's once per
    # pair (the sources broadcast over the fused batch), halves the inverse FFTs of filter(X − F).
    csf_f = _csf_filter(torch.fft.rfft2(normalise_255(f)), csf, (h, w))
    num = den = 0.0
    for source, x in ((a, xa), (b, xb)):
        lam, csf_x = per_source(source, ("Qcv", profile, x.shape), lambda x=x: _qcv_source(x, csf, block))
        diff = csf_x - csf_f
        dist = block_reduce_sum(diff * diff, block) / (block * block)
        num = num + (lam * dist).sum(dim=(-2, -1))
        den = den + lam.sum(dim=(-2, -1))
    return channel_mean(num / den)
