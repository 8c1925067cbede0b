"""Image statistics of the fused image alone: SD, SF, AG, EI (no source needed)."""

from __future__ import annotations

import torch
from torch import Tensor

from fusion.metrics._utils import channel_mean, round_half_away, sobel
from fusion.metrics.profiles import prepare
from fusion.metrics.registry import register_metric

__all__ = ["ag", "ei", "sd", "sf"]

ALL = ("reference", "vifb", "tang", "tang_legacy", "cddfuse", "mefb")


@register_metric("SD", higher_is_better=True, profiles=ALL, reference="Rao, Meas. Sci. Technol. 8(4), 1997")
def sd(fused: Tensor, a: Tensor, b: Tensor, *, profile: str = "reference") -> Tensor:
    """Standard deviation √(mean (F − μ_F)²) (population), on 0–255 data.

    ``vifb``/``mefb`` ("Variance") per RGB channel, averaged. ``tang_legacy`` reproduces uint8 saturation:
    d = clip(round(F − μ), 0, 255), SD = √(Σ min(d², 255)/(MN)).
    """
    (f,) = prepare(profile, fused)
    mu = f.mean(dim=(-2, -1), keepdim=True)
    if profile == "tang_legacy":
        d = round_half_away(f - mu).clamp(0, 255)
        return channel_mean(torch.sqrt((d * d).clamp(max=255).mean(dim=(-2, -1))))
    return channel_mean(torch.sqrt(((f - mu) ** 2).mean(dim=(-2, -1))))


@register_metric(
    "SF", higher_is_better=True, profiles=ALL, reference="Eskicioglu & Fisher, IEEE Trans. Commun. 43(12), 1995"
)
def sf(fused: Tensor, a: Tensor, b: Tensor, *, profile: str = "reference") -> Tensor:
    """Spatial frequency √(RF² + CF²) with RF², CF² the mean squared row / column differences.

    ``vifb`` reproduces its MATLAB loop over ``size(F)`` of an M×N×3 array: the channels are laid side by
    side as one M×3N image (the two seams contribute differences) and both sums are divided by M·3N; one
    SF, not a channel mean. ``mefb`` loops over the channels instead: per channel, both sums divided by
    M·N, then the mean of the channel SFs. ``tang_legacy`` computes it on F/255.
    """
    (f,) = prepare(profile, fused)
    if profile == "vifb":
        wide = torch.cat(f.unbind(dim=1), dim=-1)  # (B, H, C*W)
        n = wide.shape[-2] * wide.shape[-1]
        rf = (wide[..., :, 1:] - wide[..., :, :-1]).pow(2).sum(dim=(-2, -1)) / n
        cf = (wide[..., 1:, :] - wide[..., :-1, :]).pow(2).sum(dim=(-2, -1)) / n
        return torch.sqrt(rf + cf)
    if profile == "mefb":
        n = f.shape[-2] * f.shape[-1]
        rf = (f[..., :, 1:] - f[..., :, :-1]).pow(2).sum(dim=(-2, -1)) / n
        cf = (f[..., 1:, :] - f[..., :-1, :]).pow(2).sum(dim=(-2, -1)) / n
        return channel_mean(torch.sqrt(rf + cf))
    if profile == "tang_legacy":
        f = f / 255.0
    rf = (f[..., :, 1:] - f[..., :, :-1]).pow(2).mean(dim=(-2, -1))
    cf = (f[..., 1:, :] - f[..., :-1, :]).pow(2).mean(dim=(-2, -1))
    return channel_mean(torch.sqrt(rf + cf))


def _gradient(x: Tensor, dim: int) -> Tensor:
    """MATLAB ``gradient`` / ``numpy.gradient``: central inside, one-sided at the two borders."""
    n = x.shape[dim]
    if n < 2:
        return torch.zeros_like(x)
    first = x.narrow(dim, 1, 1) - x.narrow(dim, 0, 1)
    last = x.narrow(dim, n - 1, 1) - x.narrow(dim, n - 2, 1)
    if n == 2:
        return torch.cat([first, last], dim=dim)
    mid = (x.narrow(dim, 2, n - 2) - x.narrow(dim, 0, n - 2)) / 2
    return torch.cat([first, mid, last], dim=dim)


@register_metric(
    "AG", higher_is_better=True, profiles=ALL, reference="Cui et al., Opt. Commun. 341, 2015 (VIFB convention)"
)
def ag(fused: Tensor, a: Tensor, b: Tensor, *, profile: str = "reference") -> Tensor:
    """Average gradient Σ √((Gx² + Gy²)/2) / ((M−1)(N−1)) with MATLAB ``gradient`` differences.

    ``cddfuse`` divides by M·N (a plain mean); ``vifb``/``mefb`` average the RGB channels.
    """
    (f,) = prepare(profile, fused)
    gx, gy = _gradient(f, -1), _gradient(f, -2)
    s = torch.sqrt((gx * gx + gy * gy) / 2).sum(dim=(-2, -1))
    m, n = f.shape[-2:]
    denom = m * n if profile == "cddfuse" else (m - 1) * (n - 1)
    return channel_mean(s / denom)


@register_metric(
    "EI",
    higher_is_better=True,
    profiles=("reference", "vifb", "mefb"),
    reference="Rajalingam & Priya, IJESI 2018 (VIFB convention)",
)
def ei(fused: Tensor, a: Tensor, b: Tensor, *, profile: str = "reference") -> Tensor:
    """Edge intensity: mean over pixels of the 3×3 Sobel magnitude √(Sx² + Sy²), replicate borders."""
    (f,) = prepare(profile, fused)
    gx, gy = sobel(f, "replicate")
    return channel_mean(torch.sqrt(gx * gx + gy * gy).mean(dim=(-2, -1)))
