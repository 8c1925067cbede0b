"""Information-theoretic fusion metrics: EN, MI, NMI, CE.

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
    quantise_levels,
)
from fusion.metrics.profiles import prepare
from fusion.metrics.registry import register_metric

__all__ = ["en", "mi", "nmi", "ce"]

ALL = ("reference", "vifb", "tang", "tang_legacy", "cddfuse")


def _flat_levels(x: Tensor) -> Tensor:
    return quantise_levels(x).flatten(2)


@register_metric("EN", higher_is_better=True, profiles=ALL, reference="Shannon entropy (Roberts et al. 2008)")
def en(fused: Tensor, a: Tensor, b: Tensor, *, profile: str = "reference") -> Tensor:
    """Entropy H(F) = −Σ p_i log2 p_i of the 256-level histogram of the fused image, in bits.

    Every profile bins uint8 levels (the reference profile rounds its float grey image to the nearest
    level); ``vifb`` computes it per RGB channel and averages.
    """
    (f,) = prepare(profile, fused)
    return channel_mean(entropy_from_counts(histogram(_flat_levels(f), 256)))


def _mi_levels(x: Tensor, profile: str) -> Tensor:
    """Bin indices for MI under each profile."""
    if profile == "vifb":  # min–max normalised, int16(x*255) rounding (halves away from zero)
        return torch.floor(minmax_normalise(x) * 255 + 0.5).to(torch.int64).flatten(2)  # x ≥ 0
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


@register_metric("MI", higher_is_better=True, profiles=ALL, reference="Qu, Zhang & Yan, Electron. Lett. 38(7), 2002")
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


@register_metric(
    "NMI",
    higher_is_better=True,
    profiles=("reference",),
    reference="Hossny, Nahavandi & Creighton, Electron. Lett. 44(18), 2008 (MEFB convention)",
)
def nmi(fused: Tensor, a: Tensor, b: Tensor, *, profile: str = "reference") -> Tensor:
    """Normalised MI, 2·[MI(A,F)/(H(A)+H(F)) + MI(B,F)/(H(B)+H(F))] on 256 levels (range 0–2).

    This is Hossny's correction of MI as used by MEFB, not scikit-image's
    ``normalized_mutual_information`` ((H(A)+H(B))/H(A,B)).
    """
    f, xa, xb = prepare(profile, fused, a, b)
    fi = _flat_levels(f)
    mia, ha, hfa = _mi_terms(_flat_levels(xa), fi, torch.log2)
    mib, hb, hfb = _mi_terms(_flat_levels(xb), fi, torch.log2)
    return channel_mean(2 * (mia / (ha + hfa) + mib / (hb + hfb)))


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
    profiles=("reference", "vifb"),
    reference="Bulanon, Burks & Alchanatis, Biosyst. Eng. 103(1), 2009 (VIFB convention)",
)
def ce(fused: Tensor, a: Tensor, b: Tensor, *, profile: str = "reference") -> Tensor:
    """Cross entropy ½[CE(A,F) + CE(B,F)], CE(X,F) = Σ p_X log2(p_X/p_F) over bins where both are non-zero.

    Lower is better (it is a KL-type divergence of grey-level histograms). ``vifb``: per RGB channel, mean.
    """
    f, xa, xb = prepare(profile, fused, a, b)
    hf = histogram(_flat_levels(f), 256)
    ha = histogram(_flat_levels(xa), 256)
    hb = histogram(_flat_levels(xb), 256)
    return channel_mean(0.5 * (_cross_entropy(ha, hf) + _cross_entropy(hb, hf)))
