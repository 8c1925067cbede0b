"""Information-theoretic fusion metrics: EN, MI, NMI, CE, Qncie, TE.

All are histogram based. Histograms are built for the whole batch at once with one ``bincount`` (per
(image, channel) offsets), so B fused images against one source pair cost one pass.
"""

from __future__ import annotations

import torch
from torch import Tensor

from fusion.metrics._utils import (
    channel_mean,
    entropy_from_counts,
    histogram,
    joint_histogram,
    minmax_normalise,
    normalise_255,
    quantise_levels,
)
from fusion.metrics.profiles import prepare
from fusion.metrics.registry import register_metric

__all__ = ["ce", "en", "mi", "nmi", "qncie", "te"]

TSALLIS_Q = 1.85
"""Cvejic's order of the Tsallis entropy, as MEFB uses it."""

ALL = ("reference", "vifb", "tang", "tang_legacy", "cddfuse", "mefb")


def _flat_levels(x: Tensor) -> Tensor:
    return quantise_levels(x).flatten(2)


def _liu_levels(x: Tensor) -> tuple[Tensor, Tensor]:
    """Liu's ``normalize1`` levels (MEFB's NMI, Qncie, TE) and a per-(B, C) flag of NaN channels.

    A constant non-zero channel has no range: MATLAB then produces NaN, so the metric is NaN for it.
    """
    n = normalise_255(x)
    bad = torch.isnan(n).flatten(2).any(-1)
    return torch.nan_to_num(n).to(torch.int32).flatten(2), bad


@register_metric("EN", higher_is_better=True, profiles=ALL, reference="Shannon entropy (Roberts et al. 2008)")
def en(fused: Tensor, a: Tensor, b: Tensor, *, profile: str = "reference") -> Tensor:
    """Entropy H(F) = −Σ p_i log2 p_i of the 256-level histogram of the fused image, in bits.

    Every profile bins uint8 levels (the reference profile rounds its float grey image to the nearest
    level); ``vifb`` and ``mefb`` compute it per RGB channel and average.
    """
    (f,) = prepare(profile, fused)
    return channel_mean(entropy_from_counts(histogram(_flat_levels(f), 256)))


def _mi_levels(x: Tensor, profile: str) -> Tensor:
    """Bin indices for MI under each profile."""
    if profile == "vifb":  # min–max normalised, int16(x*255) rounding (halves away from zero)
        return (minmax_normalise(x) * 255 + 0.5).to(torch.int32).flatten(2)  # ≥ 0.5: truncation is the floor
    idx = _flat_levels(x)
    if profile in ("tang", "tang_legacy"):  # MATLAB bins min(v+1, 255): levels 254 and 255 share one bin
        idx = idx.clamp(max=254)
    return idx


def _mi_terms(x_idx: Tensor, f_idx: Tensor, log) -> tuple[Tensor, Tensor, Tensor]:
    """(MI(X,F), H(X), H(F)) per (B, C) from the exact 256×256 joint histogram."""
    joint = joint_histogram(x_idx, f_idx, 256)
    hx = entropy_from_counts(joint.sum(-1), log=log)
    hf = entropy_from_counts(joint.sum(-2), log=log)
    hxf = entropy_from_counts(joint, dims=(-2, -1), log=log)
    return hx + hf - hxf, hx, hf


@register_metric("MI", higher_is_better=True, profiles=ALL[:-1], reference="Qu, Zhang & Yan, Electron. Lett. 38(7), 2002")
def mi(fused: Tensor, a: Tensor, b: Tensor, *, profile: str = "reference") -> Tensor:
    """Mutual information MI(A,F) + MI(B,F), with MI(X,F) = H(X) + H(F) − H(X,F).

    Profiles: ``reference`` log2 on 256 levels; ``vifb`` natural log, each image min–max normalised and
    re-quantised to round(x·255) per RGB channel, channel mean; ``tang`` log2 with levels 254/255 merged
    (its MATLAB bins are min(v+1, 255)); ``cddfuse`` natural log (sklearn ``mutual_info_score``, nats).
    """
    f, xa, xb = prepare(profile, fused, a, b)
    log = torch.log if profile in ("vifb", "cddfuse") else torch.log2
    fi = _mi_levels(f, profile)
    total = _mi_terms(_mi_levels(xa, profile), fi, log)[0] + _mi_terms(_mi_levels(xb, profile), fi, log)[0]
    return channel_mean(total)


def _levels(profile: str, *images: Tensor) -> tuple[list[Tensor], Tensor]:
    """Bin indices of each image and a (B, C) NaN flag: ``mefb`` uses ``normalize1``, others uint8 levels."""
    if profile == "mefb":
        pairs = [_liu_levels(x) for x in images]
        bad = torch.zeros((), dtype=torch.bool, device=images[0].device)
        for _, flag in pairs:
            bad = bad | flag
        return [p for p, _ in pairs], bad
    return [_flat_levels(x) for x in images], torch.zeros((), dtype=torch.bool, device=images[0].device)


def _nan_where(values: Tensor, bad: Tensor) -> Tensor:
    return torch.where(bad, torch.full_like(values, float("nan")), values)


@register_metric(
    "NMI",
    higher_is_better=True,
    profiles=("reference", "mefb"),
    reference="Hossny, Nahavandi & Creighton, Electron. Lett. 44(18), 2008 (MEFB convention)",
)
def nmi(fused: Tensor, a: Tensor, b: Tensor, *, profile: str = "reference") -> Tensor:
    """Normalised MI, 2·[MI(A,F)/(H(A)+H(F)) + MI(B,F)/(H(B)+H(F))] on 256 levels, log2 (range 0–2).

    This is Hossny's correction of MI as used by MEFB, not scikit-image's
    ``normalized_mutual_information`` ((H(A)+H(B))/H(A,B)). ``mefb``: per RGB channel, each image first
    min–max normalised to round(0–255) (Z. Liu's ``normalize1``), channel mean.
    """
    f, xa, xb = prepare(profile, fused, a, b)
    (fi, ai, bi), bad = _levels(profile, f, xa, xb)
    mia, ha, hfa = _mi_terms(ai, fi, torch.log2)
    mib, hb, hfb = _mi_terms(bi, fi, torch.log2)
    return channel_mean(_nan_where(2 * (mia / (ha + hfa) + mib / (hb + hfb)), bad))


def _ncc(x_idx: Tensor, y_idx: Tensor) -> Tensor:
    """Wang's nonlinear correlation coefficient (H(X) + H(Y) − H(X,Y))/log2(256) on a 256×256 histogram."""
    mi_xy = _mi_terms(x_idx, y_idx, torch.log2)[0]
    return mi_xy / 8.0


@register_metric(
    "Qncie",
    higher_is_better=True,
    profiles=("reference", "mefb"),
    reference="Wang, Shen & Zhang, Physica D 200(3-4), 2005; Wang, Shen & Jin, in Image Fusion (Stathaki), 2008",
)
def qncie(fused: Tensor, a: Tensor, b: Tensor, *, profile: str = "reference") -> Tensor:
    """Nonlinear correlation information entropy Q_NCIE = 1 − H_R (range 0–1).

    NCC(X, Y) = (H(X) + H(Y) − H(X,Y))/log2 256 from the 256×256 joint histogram (log2); R is the 3×3
    matrix with unit diagonal and off-diagonal NCC(A,B), NCC(A,F), NCC(B,F); with its eigenvalues λ_i,
    H_R = −Σ_i (λ_i/3)·log_256(λ_i/3) (K = 3 variables, b = 256 levels; 0·log 0 = 0, eigenvalues clamped
    at 0). ``mefb``: per RGB channel on Liu's ``normalize1`` levels, channel mean; ``reference``: the
    profile's grey image on its 256 levels.
    """
    f, xa, xb = prepare(profile, fused, a, b)
    (fi, ai, bi), bad = _levels(profile, f, xa, xb)
    n_ab, n_af, n_bf = torch.broadcast_tensors(_ncc(ai, bi), _ncc(ai, fi), _ncc(bi, fi))
    one = torch.ones_like(n_ab)
    r = torch.stack(
        [torch.stack([one, n_ab, n_af], -1), torch.stack([n_ab, one, n_bf], -1), torch.stack([n_af, n_bf, one], -1)],
        -2,
    )
    lam = (torch.linalg.eigvalsh(r).clamp(min=0) / 3.0)
    h_r = -torch.where(lam > 0, lam * torch.log2(torch.where(lam > 0, lam, one[..., None])), torch.zeros_like(lam))
    return channel_mean(_nan_where(1 - h_r.sum(-1) / 8.0, bad))


def _tsallis(x_idx: Tensor, f_idx: Tensor, q: float, transposed: bool) -> Tensor:
    """Tsallis mutual information I_q(X;F) = (1 − Σ P(x,f)^q / (p(x)p(f))^(q−1)) / (1 − q), per (B, C).

    ``transposed`` reproduces Z. Liu's code (used by MEFB): the marginal product at (i, j) is
    p_F(i)·p_X(j) instead of p_X(i)·p_F(j); cells where that product is 0 are skipped.
    """
    joint = joint_histogram(x_idx, f_idx, 256)
    p = joint / joint.sum(dim=(-2, -1), keepdim=True)
    px, pf = p.sum(-1), p.sum(-2)
    prod = pf[..., :, None] * px[..., None, :] if transposed else px[..., :, None] * pf[..., None, :]
    ok = prod > 0
    terms = torch.where(ok, p.pow(q) / torch.where(ok, prod, torch.ones_like(prod)).pow(q - 1), torch.zeros_like(p))
    return (1 - terms.sum(dim=(-2, -1))) / (1 - q)


@register_metric(
    "TE",
    higher_is_better=True,
    profiles=("reference", "mefb"),
    reference="Cvejic, Canagarajah & Bull, Electron. Lett. 42(11), 2006 (Tsallis entropy, q = 1.85)",
)
def te(fused: Tensor, a: Tensor, b: Tensor, *, profile: str = "reference") -> Tensor:
    """Tsallis-entropy fusion metric I_q(A;F) + I_q(B;F) with q = 1.85 on 256-level joint histograms.

    ``reference``: Cvejic's definition on the profile's grey levels. ``mefb``: Z. Liu's code as MEFB runs
    it — per RGB channel, ``normalize1`` levels, and the marginal product transposed (p_F(i)·p_X(j) against
    P(X = i, F = j)), which changes the value whenever the two marginals differ; channel mean.
    """
    f, xa, xb = prepare(profile, fused, a, b)
    (fi, ai, bi), bad = _levels(profile, f, xa, xb)
    transposed = profile == "mefb"
    total = _tsallis(ai, fi, TSALLIS_Q, transposed) + _tsallis(bi, fi, TSALLIS_Q, transposed)
    return channel_mean(_nan_where(total, bad))


def _cross_entropy(x_counts: Tensor, f_counts: Tensor) -> Tensor:
    px = x_counts / x_counts.sum(-1, keepdim=True)
    pf = f_counts / f_counts.sum(-1, keepdim=True)
    px, pf = torch.broadcast_tensors(px, pf)
    both = (px > 0) & (pf > 0)
    ratio = torch.where(both, px / torch.where(both, pf, torch.ones_like(pf)), torch.ones_like(px))
    return (px * torch.log2(ratio)).sum(-1)


@register_metric(
    "CE",
    higher_is_better=False,
    profiles=("reference", "vifb", "mefb"),
    reference="Bulanon, Burks & Alchanatis, Biosyst. Eng. 103(1), 2009 (VIFB convention)",
)
def ce(fused: Tensor, a: Tensor, b: Tensor, *, profile: str = "reference") -> Tensor:
    """Cross entropy ½[CE(A,F) + CE(B,F)], CE(X,F) = Σ p_X log2(p_X/p_F) over bins where both are non-zero.

    Lower is better (it is a KL-type divergence of grey-level histograms). ``vifb``/``mefb``: per RGB
    channel, mean.
    """
    f, xa, xb = prepare(profile, fused, a, b)
    hf = histogram(_flat_levels(f), 256)
    ha = histogram(_flat_levels(xa), 256)
    hb = histogram(_flat_levels(xb), 256)
    return channel_mean(0.5 * (_cross_entropy(ha, hf) + _cross_entropy(hb, hf)))
