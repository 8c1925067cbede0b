"""SSIM-type window metrics as Z. Liu's fusion-metric code and MEFB compute them: Qc, Qy, the edge-dependent
Qw, and Ma et al.'s MEF-SSIM in the form of MEFB's ``mef_ms_ssim``.

Window statistics are float64 moments E[xy] − E[x]E[y] of Gaussian (or box) windows. Where a window is
exactly flat, its variances and covariances are set to exactly 0: MATLAB's moments there are pure round-off
(≈ 1e-12), which Qc and Qy divide by constants of 2e-16, so values on flat regions are not reproducible
bit for bit by any implementation; we use the exact statistics.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from fusion.metrics._utils import box_filter_valid, channel_mean, filter64, gaussian_1d, window_filter
from fusion.metrics.profiles import matlab_rgb2gray, per_source, prepare
from fusion.metrics.registry import register_metric

__all__ = ["mef_ssim_mefb", "qc", "qw_edge", "qy", "ssim_maps"]

MATLAB_EPS = 2.220446049250313e-16
YANG_C = 2e-16


def _flat(x: Tensor, size: int) -> Tensor:
    """True for 'valid' size×size windows whose values are all equal."""
    return F.max_pool2d(x, size, stride=1) == -F.max_pool2d(-x, size, stride=1)


Stats = tuple[Tensor, Tensor, Tensor]


def window_stats(x: Tensor, size: int, sigma: float, *, local_roundoff: bool = True) -> Stats:
    """Windowed mean and variance of (B, C, H, W) x (Gaussian window, 'valid') and its exactly flat windows,
    where the variance is exactly 0. ``local_roundoff`` as in :func:`ssim_maps`."""
    x = x.to(torch.float64)
    filt = window_filter if local_roundoff else filter64
    mx, xx = filt(torch.cat([x, x * x], 1), gaussian_1d(size, sigma, device=x.device)).chunk(2, 1)
    flat = _flat(x, size)
    return mx, torch.where(flat, torch.zeros_like(mx), xx - mx * mx), flat


def ssim_maps(
    x: Tensor, y: Tensor, size: int, sigma: float, c1: float, c2: float, *, local_roundoff: bool = True,
    stats_x: Stats | None = None, stats_y: Stats | None = None,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Wang's SSIM map of broadcastable (B, C, H, W) x, y with a Gaussian window, 'valid' (``filter2``).

    Returns (ssim map, σ_x², σ_y², σ_xy), each with its own batch; exactly flat windows get zero
    (co)variances. ``local_roundoff`` filters by direct convolution, whose round-off is local to each window
    as in MATLAB's ``filter2`` (needed where tiny constants make the map ill-conditioned, e.g. C = 2e-16);
    otherwise by FFT (faster, round-off ~1e-16 of the image-wide scale). ``stats_x``/``stats_y``: their
    :func:`window_stats`, when already known (a source's, shared by every fused image).
    """
    x, y = x.to(torch.float64), y.to(torch.float64)
    mx, vx, fx = stats_x if stats_x is not None else window_stats(x, size, sigma, local_roundoff=local_roundoff)
    my, vy, fy = stats_y if stats_y is not None else window_stats(y, size, sigma, local_roundoff=local_roundoff)
    filt = window_filter if local_roundoff else filter64
    xy = filt(x * y, gaussian_1d(size, sigma, device=x.device))
    vxy = torch.where(fx | fy, torch.zeros_like(xy), xy - mx * my)
    s = ((2 * mx * my + c1) * (2 * vxy + c2)) / ((mx * mx + my * my + c1) * (vx + vy + c2))
    return s, vx, vy, vxy


def _mean_finite(x: Tensor) -> Tensor:
    """Mean over the last two dims ignoring NaN (MATLAB ``mean2(A(~isnan(A)))``)."""
    ok = ~torch.isnan(x)
    return torch.where(ok, x, torch.zeros_like(x)).sum(dim=(-2, -1)) / ok.sum(dim=(-2, -1))


def _yang(x: Tensor, y: Tensor, stats_x: Stats | None = None) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Liu's ``ssim_yang``: Gaussian 7/1.5, 'valid', C1 = C2 = 2e-16."""
    return ssim_maps(x, y, 7, 1.5, YANG_C, YANG_C, stats_x=stats_x)


def _yang_stats(source: Tensor, x: Tensor, profile: str) -> Stats:
    """:func:`window_stats` of a source for :func:`_yang`, once per shared source."""
    return per_source(source, ("yang", profile, x.shape), lambda: window_stats(x, 7, 1.5))


def _check(f: Tensor, need: int, name: str) -> None:
    if min(f.shape[-2:]) < need:
        raise ValueError(f"{name} needs both image sides >= {need} pixels; got {tuple(f.shape[-2:])}")


@register_metric(
    "Qc",
    higher_is_better=True,
    profiles=("reference", "mefb"),
    reference="Cvejic, Loza, Bull & Canagarajah, Int. J. Signal Process. 2(3), 2005 (Z. Liu's metricCvejic)",
)
def qc(fused: Tensor, a: Tensor, b: Tensor, *, profile: str = "reference") -> Tensor:
    """Cvejic's similarity metric: mean of sim = μ·SSIM(A,F) + (1 − μ)·SSIM(B,F), μ = σ_AF/(σ_AF + σ_BF).

    SSIM maps from 7×7 Gaussian (σ = 1.5) 'valid' windows with C1 = C2 = 2e-16; sim = 0 where μ < 0 and 1
    where μ > 1; windows where μ is undefined (0/0) are left out of the mean. ``mefb``: per RGB channel.
    """
    f, xa, xb = prepare(profile, fused, a, b)
    _check(f, 11, "Qc")
    sa, _, _, caf = _yang(xa, f, _yang_stats(a, xa, profile))
    sb, _, _, cbf = _yang(xb, f, _yang_stats(b, xb, profile))
    mu = caf / (caf + cbf)
    sim = mu * sa + (1 - mu) * sb
    sim = torch.where(mu < 0, torch.zeros_like(sim), torch.where(mu > 1, torch.ones_like(sim), sim))
    return channel_mean(_mean_finite(sim))


@register_metric(
    "Qy",
    higher_is_better=True,
    profiles=("reference", "mefb"),
    reference="Yang, Zhang, Wang & Liu, Inf. Fusion 9(2), 2008 (Z. Liu's metricYang)",
)
def qy(fused: Tensor, a: Tensor, b: Tensor, *, profile: str = "reference") -> Tensor:
    """Yang's SSIM-based metric, range ≤ 1.

    Where SSIM(A,B) ≥ 0.75 (redundant regions) the window scores λ·SSIM(A,F) + (1 − λ)·SSIM(B,F) with
    λ = σ_A²/(σ_A² + σ_B²); elsewhere max(SSIM(A,F), SSIM(B,F)). SSIM maps as in Qc (7×7 Gaussian σ = 1.5,
    C1 = C2 = 2e-16, 'valid'); windows where λ is 0/0 are left out of the mean (the code's NaN filter).
    ``mefb``: per RGB channel.
    """
    f, xa, xb = prepare(profile, fused, a, b)
    _check(f, 11, "Qy")
    stats_a, stats_b = _yang_stats(a, xa, profile), _yang_stats(b, xb, profile)
    sab, va, vb, _ = per_source(
        (a, b), ("Qy", profile, xa.shape, xb.shape),
        lambda: ssim_maps(xa, xb, 7, 1.5, YANG_C, YANG_C, stats_x=stats_a, stats_y=stats_b),
    )
    saf = _yang(xa, f, stats_a)[0]
    sbf = _yang(xb, f, stats_b)[0]
    lam = va / (va + vb)
    redundant = sab >= 0.75
    q = torch.where(redundant, lam * saf + (1 - lam) * sbf, torch.maximum(saf, sbf))
    q = torch.where(torch.isnan(lam), lam, q)  # NaN·0 stays NaN in the reference code
    return channel_mean(_mean_finite(q))


def _prewitt_magnitude(x: Tensor) -> Tensor:
    """√(Gx² + Gy²) with ``filter2([1 0 −1; 1 0 −1; 1 0 −1])`` and its transpose, zero padding, 'same'."""
    p = F.pad(x, (1, 1, 1, 1))
    cols = p[..., :-2, :] + p[..., 1:-1, :] + p[..., 2:, :]
    gx = cols[..., :, :-2] - cols[..., :, 2:]
    rows = p[..., :, :-2] + p[..., :, 1:-1] + p[..., :, 2:]
    gy = rows[..., :-2, :] - rows[..., 2:, :]
    return torch.sqrt(gx * gx + gy * gy)


def qw_edge(f: Tensor, xa: Tensor, xb: Tensor, sources: tuple[Tensor, Tensor]) -> Tensor:
    """MEFB's "Qw": Piella's weighted index Qw computed on edge images only, per (B, C).

    Edge images: the 3×3 Prewitt magnitude. On them, with Wang's SSIM (Gaussian 11/1.5, K = (0.01, 0.03),
    L = 255, 'valid'): σ_A², σ_B² (both + 0.5 where their sum is 0), λ = σ_A²/(σ_A² + σ_B²),
    c = max(σ_A², σ_B²)/Σ max(σ_A², σ_B²), Qw = Σ c·(λ·SSIM(F′,A′) + (1 − λ)·SSIM(F′,B′)).
    ``sources`` are the ``mefb`` profile's input tensors behind ``xa``, ``xb`` (:func:`per_source`).
    """
    c1, c2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2

    def edge_terms(x: Tensor) -> tuple[Tensor, Stats]:
        e = _prewitt_magnitude(x)
        return e, window_stats(e, 11, 1.5, local_roundoff=False)

    (ea, stats_a), (eb, stats_b) = (per_source(src, ("Qw", "mefb", x.shape), lambda x=x: edge_terms(x))
                                    for src, x in zip(sources, (xa, xb)))

    def weights() -> tuple[Tensor, Tensor]:
        va, vb = stats_a[1], stats_b[1]
        both_zero = (va + vb) == 0
        va, vb = va + 0.5 * both_zero, vb + 0.5 * both_zero
        return va / (va + vb), torch.maximum(va, vb)

    lam, cw = per_source(sources, ("Qw", "mefb", xa.shape, xb.shape), weights)
    ef = _prewitt_magnitude(f)
    stats_f = window_stats(ef, 11, 1.5, local_roundoff=False)
    sa = ssim_maps(ef, ea, 11, 1.5, c1, c2, local_roundoff=False, stats_x=stats_f, stats_y=stats_a)[0]
    sb = ssim_maps(ef, eb, 11, 1.5, c1, c2, local_roundoff=False, stats_x=stats_f, stats_y=stats_b)[0]
    cw, local = torch.broadcast_tensors(cw, lam * sa + (1 - lam) * sb)
    return (cw * local).sum(dim=(-2, -1)) / cw.sum(dim=(-2, -1))


def _mef_source_terms(x1: Tensor, x2: Tensor, gauss: Tensor) -> tuple[Tensor, ...]:
    """The fused-independent part of one MEF-SSIM scale (Ma et al. 2015 with the adaptive exponent, 11×11
    windows): the sources, their flat windows, the weights a_k, the scale s and σ_x̂².

    Closed form of the patch algorithm: x̂ = s·Σ_k a_k (x_k − μ_k) with a_k = w_k/ed_k and s = max_k ed_k /
    ||Σ_k a_k (x_k − μ_k)||, so its Gaussian-weighted variance and covariance with F follow from the window
    (co)variances of the sources. The bound σ_x̂² ≤ max(g)·||x̂||² holds exactly and is imposed to keep
    round-off bounded where ||Σ a_k (x_k − μ_k)|| is ~0.
    """
    n = 11
    nn = float(n * n)
    flat1, flat2 = _flat(x1, n), _flat(x2, n)
    zero = torch.zeros_like(flat1, dtype=torch.float64)

    def box(t: Tensor) -> Tensor:
        return box_filter_valid(t, n)

    m1, m2 = box(x1), box(x2)
    v1 = torch.where(flat1, zero, box(x1 * x1) - m1 * m1).clamp(min=0)
    v2 = torch.where(flat2, zero, box(x2 * x2) - m2 * m2).clamp(min=0)
    c12 = torch.where(flat1 | flat2, zero, box(x1 * x2) - m1 * m2)
    ed1 = torch.sqrt(nn * v1) + 0.001
    ed2 = torch.sqrt(nn * v2) + 0.001
    num = torch.sqrt((nn * (v1 + v2 + 2 * c12)).clamp(min=0))
    den = torch.sqrt(nn * v1) + torch.sqrt(nn * v2)
    r = (num + MATLAB_EPS) / (den + MATLAB_EPS)
    r = torch.where(r > 1, torch.full_like(r, 1 - MATLAB_EPS), r).clamp(min=MATLAB_EPS)
    p = torch.tan(math.pi / 2 * r).clamp(max=10)
    w1 = (ed1 / n) ** p + MATLAB_EPS
    w2 = (ed2 / n) ** p + MATLAB_EPS
    a1, a2 = w1 / (w1 + w2) / ed1, w2 / (w1 + w2) / ed2
    rnorm = torch.sqrt((nn * (a1 * a1 * v1 + a2 * a2 * v2 + 2 * a1 * a2 * c12)).clamp(min=0))
    max_ed = torch.maximum(ed1, ed2)
    scale = torch.where(rnorm > 0, max_ed / torch.where(rnorm > 0, rnorm, torch.ones_like(rnorm)), zero)

    def gfilt(t: Tensor) -> Tensor:
        return filter64(t, gauss)

    g1, g2 = gfilt(x1), gfilt(x2)
    g11 = torch.where(flat1, zero, gfilt(x1 * x1) - g1 * g1)
    g22 = torch.where(flat2, zero, gfilt(x2 * x2) - g2 * g2)
    g12 = torch.where(flat1 | flat2, zero, gfilt(x1 * x2) - g1 * g2)
    gmax = float(gauss.max() ** 2)
    var_r = (scale * scale * (a1 * a1 * g11 + a2 * a2 * g22 + 2 * a1 * a2 * g12)).clamp(min=0)
    var_r = torch.minimum(var_r, gmax * max_ed * max_ed)
    return x1, x2, flat1, flat2, a1, a2, scale, var_r, g1, g2


def _mef_ssim_level(terms: tuple[Tensor, ...], f: Tensor, gauss: Tensor, c: float) -> Tensor:
    """Mean MEF-SSIM map at one scale from the sources' :func:`_mef_source_terms`, per (B, C): the
    covariance of x̂ with F, bounded by |σ_x̂F| ≤ σ_x̂σ_F (exact, imposed against round-off)."""
    x1, x2, flat1, flat2, a1, a2, scale, var_r, g1, g2 = terms

    def gfilt(t: Tensor) -> Tensor:
        return filter64(t, gauss)

    zero = torch.zeros((), dtype=torch.float64, device=f.device)
    gf = gfilt(f)
    g1f = torch.where(flat1, zero, gfilt(x1 * f) - g1 * gf)
    g2f = torch.where(flat2, zero, gfilt(x2 * f) - g2 * gf)
    gff = (gfilt(f * f) - gf * gf).clamp(min=0)
    cov = scale * (a1 * g1f + a2 * g2f)
    bound = torch.sqrt(var_r * gff)
    cov = torch.maximum(torch.minimum(cov, bound), -bound)
    q = (2 * cov + c) / (var_r + gff + c)
    return q.mean(dim=(-2, -1))


def _halve(x: Tensor) -> Tensor:
    """``imfilter(x, ones(2)/4, 'symmetric', 'same')`` then every other pixel from the first."""
    ph, pw = x.shape[-2] % 2, x.shape[-1] % 2
    if ph or pw:
        b, c, h, w = x.shape
        x = F.pad(x.reshape(b * c, 1, h, w), (0, pw, 0, ph), mode="replicate").reshape(b, c, h + ph, w + pw)
    return F.avg_pool2d(x, 2)


MEF_MS_WEIGHTS = (0.0448, 0.2856, 0.3001)


def mef_ssim_mefb(f: Tensor, xa: Tensor, xb: Tensor, sources: tuple[Tensor, Tensor]) -> Tensor:
    """MEFB's MEF-SSIM: ``mef_ms_ssim`` of the ``rgb2gray`` (uint8-rounded) images, per (B,).

    Ma, Zeng & Wang (IEEE TIP 2015) with the adaptive structure exponent p = tan(πR/2) (R the patch
    consistency ||Σ_k (x_k − μ_k)|| / Σ_k ||x_k − μ_k||, p ≤ 10), contrast ed_k = ||x_k − μ_k|| + 0.001 on
    11×11 box patches, weights (ed_k/11)^p + eps, C = (0.03·255)², Gaussian 11/1.5 SSIM statistics; 3 scales
    (2×2 mean with symmetric border, then every other pixel), Q = Π_l Q_l^β_l with β ∝ (0.0448, 0.2856,
    0.3001). Both image sides must be ≥ 44. ``sources`` are the ``mefb`` profile's input tensors behind
    ``xa``, ``xb`` (:func:`per_source`).
    """
    shapes = (xa.shape, xb.shape)
    f, xa, xb = (matlab_rgb2gray(t).to(torch.float64) for t in (f, xa, xb))
    _check(f, 44, "MEF_SSIM (mefb)")
    gauss = gaussian_1d(11, 1.5, device=f.device)
    weights = torch.tensor(MEF_MS_WEIGHTS, dtype=torch.float64, device=f.device)
    weights = weights / weights.sum()
    c = (0.03 * 255) ** 2

    def source_levels() -> list[tuple[Tensor, ...]]:
        x1, x2 = xa, xb
        levels = []
        for level in range(len(MEF_MS_WEIGHTS)):
            if level:
                x1, x2 = _halve(x1), _halve(x2)
            levels.append(_mef_source_terms(x1, x2, gauss))
        return levels

    score = torch.ones(max(f.shape[0], xa.shape[0], xb.shape[0]), dtype=torch.float64, device=f.device)
    for level, terms in enumerate(per_source(sources, ("MEF_SSIM", "mefb", *shapes), source_levels)):
        if level:
            f = _halve(f)
        score = score * _mef_ssim_level(terms, f, gauss, c)[:, 0] ** weights[level]
    return score
