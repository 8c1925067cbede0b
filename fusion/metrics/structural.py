"""Structural and perceptual metrics: SSIM, MS-SSIM, VIF, VIFF, Piella's Q0 / Qw / Qe, MEF-SSIM."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from fusion.metrics._utils import (
    box_filter_valid,
    channel_mean,
    gaussian_1d,
    separable_filter,
    sobel,
    window_dtype,
    window_filter,
)
from fusion.metrics.profiles import per_source, prepare
from fusion.metrics.registry import register_metric
from fusion.metrics.windowed import mef_ssim_mefb, qw_edge

__all__ = ["mef_ssim", "ms_ssim", "q0", "qe", "qw", "ssim", "vif", "viff"]

MS_SSIM_WEIGHTS = (0.0448, 0.2856, 0.3001, 0.2363, 0.1333)


CENTRE = 127.5
"""Data are centred on 127.5 before the windowed products: variances and covariances are shift invariant,
and centring keeps float32 accumulation (CPU fast path) accurate to ~1e-7 of the window variance scale."""


def _centred(x: Tensor, dtype: torch.dtype | None = None) -> Tensor:
    return (x - CENTRE).to(dtype or window_dtype(x.device))


def _mean64(x: Tensor) -> Tensor:
    return x.to(torch.float64).mean(dim=(-2, -1))


Filter = Callable[[Tensor], Tensor]


def _gaussian(size: int, sigma: float, device: torch.device, dtype: torch.dtype) -> Filter:
    win = gaussian_1d(size, sigma, device=device, dtype=dtype)
    return lambda t: window_filter(t, win)


def _local_terms(xc: Tensor, filt: Filter, cov_norm: float) -> tuple[Tensor, Tensor]:
    """Windowed mean and variance (× ``cov_norm``) of centred data ('valid' filtering)."""
    mean = filt(xc)
    return mean, filt(xc * xc).sub_(mean * mean).mul_(cov_norm)


def _ssim_maps(
    xc: Tensor, fc: Tensor, filt: Filter, c1: float, c2: float, cov_norm: float = 1.0, terms_x=None, terms_f=None
) -> tuple[Tensor, Tensor]:
    """SSIM and contrast-structure maps of broadcastable centred x (source) and f (fused).

    ``terms_x``/``terms_f`` are their :func:`_local_terms` when already known, and are left untouched. The
    rest is built in place on fresh filter outputs (same operations and values as the textbook formulas):
    on CPU fresh full-size temporaries cost more than the arithmetic.
    """
    mx, vx = terms_x if terms_x is not None else _local_terms(xc, filt, cov_norm)
    mf, vf = terms_f if terms_f is not None else _local_terms(fc, filt, cov_norm)
    vxf = filt(xc * fc).sub_(mx * mf).mul_(cov_norm)
    cs = vxf.mul_(2).add_(c2).div_((vx + vf).add_(c2))  # x and f may differ in batch: broadcast here
    mx, mf = mx + CENTRE, mf + CENTRE
    lum_den = (mx * mx + mf * mf).add_(c1)
    lum = (mx * mf).mul_(2).add_(c1).div_(lum_den)
    return lum.mul_(cs), cs


@register_metric(
    "SSIM",
    higher_is_better=True,
    profiles=("reference", "vifb", "cddfuse"),
    reference="Wang, Bovik, Sheikh & Simoncelli, IEEE TIP 13(4), 2004",
)
def ssim(fused: Tensor, a: Tensor, b: Tensor, *, profile: str = "reference") -> Tensor:
    """Fusion SSIM = SSIM(A,F) + SSIM(B,F) (range up to 2).

    ``reference`` / ``vifb``: Wang's Gaussian 11×11, σ = 1.5, K = (0.01, 0.03), L = 255, mean of the
    'valid' map (``vifb`` per RGB channel, averaged). ``cddfuse``: scikit-image 0.19 defaults as called by
    CDDFuse — 7×7 uniform window, sample covariance (49/48), ``data_range = 2`` on 0–255 data (so
    C1 = 4e-4, C2 = 3.6e-3), values ≈ 1.
    """
    f, xa, xb = prepare(profile, fused, a, b)
    if profile == "cddfuse":
        # C2 = 3.6e-3 is far below float32 round-off of window variances, so the sums must be exact: the
        # data are uint8 levels, centred half-integers whose products and 7×7 sums float32 holds exactly
        c1, c2, cov, dtype = (0.01 * 2) ** 2, (0.03 * 2) ** 2, 49 / 48, torch.float32
        filt: Filter = lambda t: box_filter_valid(t, 7)
    else:
        c1, c2, cov, dtype = (0.01 * 255) ** 2, (0.03 * 255) ** 2, 1.0, window_dtype(f.device)
        filt = _gaussian(11, 1.5, f.device, dtype)
    fc = _centred(f, dtype)
    terms_f = _local_terms(fc, filt, cov)
    total = 0
    for source, x in ((a, xa), (b, xb)):
        xc = _centred(x, dtype)
        terms_x = per_source(source, ("SSIM", profile, x.shape), lambda xc=xc: _local_terms(xc, filt, cov))
        total = total + _mean64(_ssim_maps(xc, fc, filt, c1, c2, cov, terms_x, terms_f)[0])
    return channel_mean(total)


def _ms_ssim_levels(x: Tensor, filt: Filter) -> list[tuple[Tensor, tuple[Tensor, Tensor]]]:
    """Per MS-SSIM scale the centred image and its :func:`_local_terms` (2×2 average pooling between
    scales, zero padding on odd sizes)."""
    levels = []
    for level in range(len(MS_SSIM_WEIGHTS)):
        if level:
            x = F.avg_pool2d(x, kernel_size=2, padding=[s % 2 for s in x.shape[-2:]])
        xc = _centred(x)
        levels.append((xc, _local_terms(xc, filt, 1.0)))
    return levels


def _ms_ssim_single(xs: list, fs: list, filt: Filter) -> Tensor:
    """MS-SSIM of a source against F from both :func:`_ms_ssim_levels`."""
    c1, c2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2
    weights = torch.tensor(MS_SSIM_WEIGHTS, dtype=torch.float64, device=fs[0][0].device)
    factors = []
    for level, ((xc, terms_x), (fc, terms_f)) in enumerate(zip(xs, fs)):
        s_map, cs_map = _ssim_maps(xc, fc, filt, c1, c2, 1.0, terms_x, terms_f)
        factors.append(torch.relu(_mean64(cs_map if level < len(MS_SSIM_WEIGHTS) - 1 else s_map)))
    stacked = torch.stack(torch.broadcast_tensors(*factors), dim=0)
    return torch.prod(stacked ** weights.view(-1, 1, 1), dim=0)


@register_metric(
    "MS_SSIM",
    higher_is_better=True,
    profiles=("reference",),
    reference="Wang, Simoncelli & Bovik, Asilomar 2003 (pytorch-msssim conventions)",
)
def ms_ssim(fused: Tensor, a: Tensor, b: Tensor, *, profile: str = "reference") -> Tensor:
    """Multi-scale SSIM summed over the sources, MS-SSIM(A,F) + MS-SSIM(B,F).

    5 scales, weights (0.0448, 0.2856, 0.3001, 0.2363, 0.1333), Gaussian 11/1.5 'valid', 2×2 average
    pooling (zero padding on odd sizes), ReLU on each factor, L = 255: the pytorch-msssim convention.
    The shorter image side must exceed 160 pixels. (Tang's "MS_SSIM" is a different, MEF-type metric.)
    """
    f, xa, xb = prepare(profile, fused, a, b)
    if min(f.shape[-2:]) <= 160:
        raise ValueError(f"MS_SSIM needs both image sides > 160 pixels; got {tuple(f.shape[-2:])}")
    filt = _gaussian(11, 1.5, f.device, window_dtype(f.device))
    fs = _ms_ssim_levels(f, filt)
    total = 0
    for source, x in ((a, xa), (b, xb)):
        xs = per_source(source, ("MS_SSIM", profile, x.shape), lambda x=x: _ms_ssim_levels(x, filt))
        total = total + _ms_ssim_single(xs, fs, filt)
    return channel_mean(total)


def _vif_channel(s1: Tensor, s2: Tensor, s12: Tensor, sigma_nsq: float, *, log: bool = True
                 ) -> tuple[Tensor, Tensor, Tensor]:
    """Per-pixel gain g and information maps log10(1 + g²σ_X²/(σ_v² + σ_n²)), log10(1 + σ_X²/σ_n²)
    (``log=False``: the maps' arguments, for :func:`_log10_sum`).

    The VIF channel model F = g·X + V with vifp_mscale's stabilising rules (ε = 1e-10: g = 0 where
    σ_X² < ε or σ_F² < ε or g < 0; σ_v² = max(σ_F² − g·σ_XF, ε); σ_X² = 0 where < ε). Wherever those rules
    set g = 0 the first map is exactly log10(1) = 0 whatever σ_v², so the rules reduce to one mask. Masks
    are applied by multiplication and the maps are built in place: on CPU ``torch.where`` and fresh
    full-size temporaries (page faults) cost more than the arithmetic; the values are the same.
    """
    eps = 1e-10
    s1, s2, s12 = torch.broadcast_tensors(s1, s2, s12)
    g = torch.add(s1, eps)
    torch.div(s12, g, out=g)
    keep = (s1 >= eps) & (s2 >= eps) & (g > 0)
    sv = torch.mul(g, s12)
    torch.sub(s2, sv, out=sv).clamp_(min=eps).add_(sigma_nsq)
    g.mul_(keep)
    s1 = s1 * (s1 >= eps)
    info = torch.mul(g, g).mul_(s1).div_(sv).add_(1)
    ind = s1.div_(sigma_nsq).add_(1)
    return (g, info.log10_(), ind.log10_()) if log else (g, info, ind)


def _log10_sum(v: Tensor) -> Tensor:
    """Σ log10 v over the last two dims for v ≥ 1; on the CPU as the logs of products of 16 entries.

    There a float64 log costs as much as a dozen additions; one per 16 entries makes VIF's sums 7× cheaper.
    The VIF arguments are below 1 + 255²/2, so a product of 16 stays far inside float64's range; should one
    overflow anyway, the plain sum of logs is taken. Elsewhere (cheap logs) the plain sum.
    """
    flat = v.flatten(-2)
    if flat.device.type != "cpu":
        return flat.log10().sum(-1)
    n = flat.shape[-1] - flat.shape[-1] % 16
    products = flat[..., :n].unflatten(-1, (-1, 16)).prod(-1)
    if not bool(torch.isfinite(products).all()):
        return flat.log10().sum(-1)
    return products.log10_().sum(-1) + flat[..., n:].log10().sum(-1)


def _moment(p: Tensor, q: Tensor, win: Tensor, saturate: bool) -> Tensor:
    """Windowed E[p·q]; ``saturate`` clips the products at 255 first (uint8 arithmetic, tang_legacy)."""
    prod = p * q
    return separable_filter(prod.clamp_(max=255) if saturate else prod, win)


def _variance(e2: Tensor, mu_a: Tensor, mu_b: Tensor) -> Tensor:
    """e2 − mu_a·mu_b, in place in ``e2``."""
    return e2.sub_(mu_a * mu_b)


SourceScales = list[tuple[Tensor, Tensor, Tensor]]


def _vif_window(scale: int, device: torch.device) -> Tensor:
    n = 2 ** (5 - scale) + 1
    return gaussian_1d(n, n / 5.0, device=device)


def _vif_source_scales(x: Tensor, clip_products: bool) -> SourceScales:
    """Per scale 1..4 a source's working image (centred, then filtered and decimated), windowed mean and
    variance σ_X²: the terms that do not depend on the fused image."""
    x = x.to(torch.float64) - (0.0 if clip_products else CENTRE)
    terms = []
    for scale in range(1, 5):
        win = _vif_window(scale, x.device)
        if scale > 1:
            x = separable_filter(x, win, step=2)
        mu = separable_filter(x, win)
        terms.append((x, mu, _variance(_moment(x, x, win, clip_products and scale == 1), mu, mu).clamp_(min=0)))
    return terms


def _vif_scales(f: Tensor, sources: Sequence[SourceScales], *, clip_products: bool = False):
    """Yield, per scale 1..4, the VIF statistics ([σ_X² per source], σ_F², [σ_XF per source]), per (B, C).

    ``sources`` holds each source's :func:`_vif_source_scales`. Gaussian windows N_s = 2^(5−s)+1,
    σ = N_s/5 are applied in float64 by :func:`separable_filter` ('valid'; filter-and-decimate by 2 between
    scales computes only the kept pixels), on data centred on 127.5 (variances are shift invariant; the
    normalised windows keep the data centred across scales).
    """
    f = f.to(torch.float64) - (0.0 if clip_products else CENTRE)  # uint8 saturation (tang_legacy): raw values
    for scale, terms in enumerate(zip(*sources), start=1):
        win = _vif_window(scale, f.device)
        if scale > 1:
            f = separable_filter(f, win, step=2)
        saturate = clip_products and scale == 1
        mu_f = separable_filter(f, win)
        s2 = _variance(_moment(f, f, win, saturate), mu_f, mu_f).clamp_(min=0)
        s12s = [_variance(_moment(x, f, win, saturate), mu_x, mu_f) for x, mu_x, _ in terms]
        yield [s1 for _, _, s1 in terms], s2, s12s


def _vif_sources(profile: str, pairs: Sequence[tuple[Tensor, Tensor]], clip_products: bool = False
                 ) -> list[SourceScales]:
    """:func:`_vif_source_scales` of each (input, prepared) source pair, once per shared source."""
    key = ("VIF", profile, clip_products)
    return [per_source(src, (*key, x.shape), lambda x=x: _vif_source_scales(x, clip_products)) for src, x in pairs]


def _vif_sum(f: Tensor, sources: Sequence[SourceScales], *, clip_products: bool = False) -> Tensor:
    """Σ_X VIF-P(X, F) (Sheikh & Bovik 2006, pixel domain, 4 scales, σ_n² = 2), per (B, C)."""
    num = [0.0] * len(sources)
    den = [0.0] * len(sources)
    for s1s, s2, s12s in _vif_scales(f, sources, clip_products=clip_products):
        for i, (s1, s12) in enumerate(zip(s1s, s12s)):
            _, vid, vind = _vif_channel(s1, s2, s12, 2.0, log=False)
            num[i] = num[i] + _log10_sum(vid)
            den[i] = den[i] + _log10_sum(vind)
    return sum(nu / de for nu, de in zip(num, den))


@register_metric(
    "VIF",
    higher_is_better=True,
    profiles=("reference", "tang", "tang_legacy", "cddfuse"),
    reference="Sheikh & Bovik, IEEE TIP 15(2), 2006 (VIF-P, vifp_mscale)",
)
def vif(fused: Tensor, a: Tensor, b: Tensor, *, profile: str = "reference") -> Tensor:
    """Pixel-domain visual information fidelity VIF(A,F) + VIF(B,F) (range ≈ 0–2), in float64.

    4 scales; Gaussian windows N_s = 2^(5−s)+1, σ = N_s/5, 'valid' filtering, filter-and-decimate by 2
    between scales; σ_n² = 2 (0–255 data); variances clamped at 0; the stabilising rules of the
    reference ``vifp_mscale`` code (ε = 1e-10: g = 0 where σ_ref² < ε, σ_v² = 0 where σ_dist² < ε,
    negative gains set to 0 with σ_v² = σ_dist², σ_v² ≥ ε). CDDFuse calls this "VIFF".
    ``tang_legacy`` saturates the scale-1 products at 255 as uint8 arithmetic does.
    """
    f, xa, xb = prepare(profile, fused, a, b)
    if min(f.shape[-2:]) < 65:  # four 'valid' scales: 17-tap, decimate, 9-tap, ... need ≥ 65 pixels
        raise ValueError(f"VIF needs both image sides >= 65 pixels; got {tuple(f.shape[-2:])}")
    clip = profile == "tang_legacy"
    return channel_mean(_vif_sum(f, _vif_sources(profile, ((a, xa), (b, xb)), clip), clip_products=clip))


VIFF_SCALE_WEIGHTS = (1.0, 0.0, 0.15, 1.0)


@register_metric(
    "VIFF",
    higher_is_better=True,
    profiles=("reference", "mefb"),
    reference="Han, Cai, Cao & Xu, Inf. Fusion 14(2), 2013",
)
def viff(fused: Tensor, a: Tensor, b: Tensor, *, profile: str = "reference") -> Tensor:
    """Visual information fidelity for fusion (VIFF), range ≈ 0–1; MEFB's column "VIF".

    The VIF channel model of each source X against F (the 4 scales, windows and stabilising rules of
    :func:`vif`) with visual noise σ_n² = 0.005·255²; at every pixel the source with the smaller gain g is
    kept (B on ties), its VID = log10(1 + g²σ_X²/(σ_v² + σ_n²)) and VIND = log10(1 + σ_X²/σ_n²);
    F_s = Σ(VID + C)/Σ(VIND + C) with C = 1e-7; VIFF = Σ_s p_s F_s, p = (1, 0, 0.15, 1)/2.15.
    ``mefb``: per RGB channel (MEFB passes single channels, so its CIELAB branch never runs);
    ``reference``: the profile's grey image.
    """
    f, xa, xb = prepare(profile, fused, a, b)
    if min(f.shape[-2:]) < 65:
        raise ValueError(f"VIFF needs both image sides >= 65 pixels; got {tuple(f.shape[-2:])}")
    sigma_nsq, c = 0.005 * 255 * 255, 1e-7
    total = 0.0
    scales = _vif_scales(f, _vif_sources(profile, ((a, xa), (b, xb))))
    for weight, ((s1a, s1b), s2, (s12a, s12b)) in zip(VIFF_SCALE_WEIGHTS, scales):
        ga, vid_a, vind_a = _vif_channel(s1a, s2, s12a, sigma_nsq)
        gb, vid_b, vind_b = _vif_channel(s1b, s2, s12b, sigma_nsq)
        pick_a = ga < gb
        vid = torch.where(pick_a, vid_a, vid_b)
        vind = torch.where(pick_a, vind_a, vind_b)
        total = total + weight * (vid + c).sum(dim=(-2, -1)) / (vind + c).sum(dim=(-2, -1))
    return channel_mean(total / sum(VIFF_SCALE_WEIGHTS))


def _uiqi_terms(x: Tensor, f: Tensor, size: int = 8) -> tuple[Tensor, Tensor, Tensor]:
    """UIQI map Q0(x, f | w) and the window variances of x and f on size×size sliding windows."""
    # float64 window sums (exact on integer data): flat windows are detected by exact zero variances
    xc, fc = _centred(x, torch.float64), _centred(f, torch.float64)
    mx, mf = box_filter_valid(xc, size), box_filter_valid(fc, size)
    vx = box_filter_valid(xc * xc, size) - mx * mx
    vf = box_filter_valid(fc * fc, size) - mf * mf
    vxf = box_filter_valid(xc * fc, size) - mx * mf
    mx, mf = mx + CENTRE, mf + CENTRE
    n = size * size
    # unbiased (N−1) statistics as in Wang & Bovik's img_qi.m; the ratio makes the normalisation cancel
    vx, vf, vxf = vx * n / (n - 1), vf * n / (n - 1), vxf * n / (n - 1)
    mean_sq = mx * mx + mf * mf
    var_sum = vx + vf
    den = var_sum * mean_sq
    q = torch.ones_like(den)
    only_means = (var_sum == 0) & (mean_sq != 0)
    q = torch.where(only_means, 2 * mx * mf / torch.where(only_means, mean_sq, torch.ones_like(mean_sq)), q)
    ok = den != 0
    q = torch.where(ok, 4 * vxf * mx * mf / torch.where(ok, den, torch.ones_like(den)), q)
    return q, vx, vf


def _piella(xa: Tensor, xb: Tensor, f: Tensor, weighted: bool) -> Tensor:
    qa, va, _ = _uiqi_terms(xa, f)
    qb, vb, _ = _uiqi_terms(xb, f)
    va, vb = va.clamp(min=0), vb.clamp(min=0)
    s = va + vb
    lam = torch.where(s > 0, va / torch.where(s > 0, s, torch.ones_like(s)), torch.full_like(s, 0.5))
    local = lam * qa + (1 - lam) * qb
    if not weighted:
        return local.mean(dim=(-2, -1))
    c = torch.maximum(va, vb)
    c, local = torch.broadcast_tensors(c, local)
    total = c.sum(dim=(-2, -1))
    return torch.where(total > 0, (c * local).sum(dim=(-2, -1)) / total.clamp(min=1e-300), local.mean(dim=(-2, -1)))


_PIELLA_REF = "Piella & Heijmans, ICIP 2003; UIQI: Wang & Bovik, IEEE SPL 9(3), 2002"


@register_metric("Q0", higher_is_better=True, profiles=("reference",), reference=_PIELLA_REF)
def q0(fused: Tensor, a: Tensor, b: Tensor, *, profile: str = "reference") -> Tensor:
    """Piella's fusion quality index Q built on the UIQI Q0.

    Q = mean_w [λ(w)·Q0(A,F|w) + (1 − λ(w))·Q0(B,F|w)], λ = σ_A²/(σ_A² + σ_B²) (½ where both are 0), on
    8×8 sliding windows ('valid'). Q0 = 4σ_xf·μ_x·μ_f / ((σ_x² + σ_f²)(μ_x² + μ_f²)) with Wang & Bovik's
    conventions for flat windows: 2μ_xμ_f/(μ_x² + μ_f²) when both variances are 0, 1 when all terms are 0.
    """
    f, xa, xb = prepare(profile, fused, a, b)
    return channel_mean(_piella(xa, xb, f, weighted=False))


@register_metric("Qw", higher_is_better=True, profiles=("reference", "mefb"), reference=_PIELLA_REF)
def qw(fused: Tensor, a: Tensor, b: Tensor, *, profile: str = "reference") -> Tensor:
    """Piella's weighted fusion quality index: the Q sum weighted by c(w) = max(σ_A², σ_B²)/Σ max(σ_A², σ_B²).

    ``reference``: UIQI on 8×8 windows of the images. ``mefb``: what MEFB's ``metricsQw`` computes — the
    same weighted sum with Wang's SSIM (Gaussian 11/1.5) on Prewitt edge images only, per RGB channel
    (see :func:`fusion.metrics.windowed.qw_edge`); needs sides ≥ 11.
    """
    f, xa, xb = prepare(profile, fused, a, b)
    if profile == "mefb":
        if min(f.shape[-2:]) < 11:
            raise ValueError(f"Qw (mefb) needs both image sides >= 11 pixels; got {tuple(f.shape[-2:])}")
        return channel_mean(qw_edge(f, xa, xb, (a, b)))
    return channel_mean(_piella(xa, xb, f, weighted=True))


def _sobel_magnitude(x: Tensor) -> Tensor:
    gx, gy = sobel(x)
    return torch.sqrt(gx * gx + gy * gy)


@register_metric("Qe", higher_is_better=True, profiles=("reference",), reference=_PIELLA_REF)
def qe(fused: Tensor, a: Tensor, b: Tensor, *, profile: str = "reference") -> Tensor:
    """Piella's edge-dependent fusion quality index Qe = Qw(A,B,F)·Qw(A′,B′,F′)^α with α = 1.

    The paper leaves the edge operator open; we use the 3×3 Sobel gradient magnitude (zero padding) as
    the edge images A′, B′, F′.
    """
    f, xa, xb = prepare(profile, fused, a, b)
    direct = _piella(xa, xb, f, weighted=True)
    edges = _piella(_sobel_magnitude(xa), _sobel_magnitude(xb), _sobel_magnitude(f), weighted=True)
    return channel_mean(direct * edges)


@register_metric(
    "MEF_SSIM",
    higher_is_better=True,
    profiles=("reference", "mefb"),
    reference="Ma, Zeng & Wang, IEEE TIP 24(11), 2015 (reference: fusion.losses.mef_ssim)",
)
def mef_ssim(fused: Tensor, a: Tensor, b: Tensor, *, profile: str = "reference") -> Tensor:
    """MEF-SSIM of the fused image against the source pair, delegated to ``fusion.losses.mef_ssim``.

    The differentiable implementation lives with the losses (it is also a training objective); it is
    imported at call time so that the metrics package does not depend on the nets code. Inputs are the
    [0, 1] images; colour images are reduced to BT.601 luma first.

    ``mefb`` is a different algorithm, not a reparametrisation of the loss: MEFB's ``mef_ms_ssim`` uses the
    adaptive structure exponent p = tan(πR/2), box-window patch contrasts and ``rgb2gray`` uint8 images
    (:func:`fusion.metrics.windowed.mef_ssim_mefb`).
    """
    if profile == "mefb":
        return mef_ssim_mefb(*prepare(profile, fused, a, b), (a, b))
    try:
        from fusion.losses import mef_ssim as _mef_ssim
    except ImportError as err:  # pragma: no cover - depends on the nets part being present
        raise NotImplementedError("MEF_SSIM needs fusion.losses.mef_ssim, which is not available") from err
    f, xa, xb = prepare(profile, fused, a, b)
    f, xa, xb = torch.broadcast_tensors(f / 255.0, xa / 255.0, xb / 255.0)
    return _mef_ssim(f, xa, xb).reshape(-1)

