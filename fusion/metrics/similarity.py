"""Source-similarity metrics: SCD, CC, MSE, PSNR, RMSE."""

from __future__ import annotations

import torch
from torch import Tensor

from fusion.metrics._utils import channel_mean, correlation
from fusion.metrics.profiles import prepare
from fusion.metrics.registry import register_metric

__all__ = ["cc", "mse", "psnr", "rmse", "scd"]

GREY = ("reference", "tang", "tang_legacy", "cddfuse")


@register_metric(
    "SCD", higher_is_better=True, profiles=GREY, reference="Aslantas & Bendes, AEU 69(12), 2015"
)
def scd(fused: Tensor, a: Tensor, b: Tensor, *, profile: str = "reference") -> Tensor:
    """Sum of the correlations of differences, corr(F − B, A) + corr(F − A, B) (scale invariant)."""
    f, xa, xb = prepare(profile, fused, a, b)
    return channel_mean(correlation(f - xb, xa) + correlation(f - xa, xb))


@register_metric("CC", higher_is_better=True, profiles=GREY, reference="mean Pearson correlation with the sources")
def cc(fused: Tensor, a: Tensor, b: Tensor, *, profile: str = "reference") -> Tensor:
    """Correlation coefficient ½[corr(A,F) + corr(B,F)] (some papers report the sum)."""
    f, xa, xb = prepare(profile, fused, a, b)
    return channel_mean(0.5 * (correlation(xa, f) + correlation(xb, f)))


def _mse(f: Tensor, xa: Tensor, xb: Tensor) -> Tensor:
    return 0.5 * (((xa - f) ** 2).mean(dim=(-2, -1)) + ((xb - f) ** 2).mean(dim=(-2, -1)))


def _vifb_r(f: Tensor, xa: Tensor, xb: Tensor) -> Tensor:
    """VIFB's per-channel r = ½[√Σ(A−F)² + √Σ(B−F)²]/(MN) (not an MSE, despite its name)."""
    mn = f.shape[-2] * f.shape[-1]
    ra = torch.sqrt(((xa - f) ** 2).sum(dim=(-2, -1))) / mn
    rb = torch.sqrt(((xb - f) ** 2).sum(dim=(-2, -1))) / mn
    return 0.5 * (ra + rb)


@register_metric("MSE", higher_is_better=False, profiles=GREY, reference="mean squared error to the sources")
def mse(fused: Tensor, a: Tensor, b: Tensor, *, profile: str = "reference") -> Tensor:
    """½[mean(A−F)² + mean(B−F)²]; on 0–255 data, except ``tang``/``tang_legacy`` which use [0, 1]."""
    f, xa, xb = prepare(profile, fused, a, b)
    out = channel_mean(_mse(f, xa, xb))
    return out / 255.0**2 if profile in ("tang", "tang_legacy") else out


@register_metric(
    "PSNR",
    higher_is_better=True,
    profiles=("reference", "vifb", "tang", "tang_legacy", "cddfuse", "mefb"),
    reference="Jagalingam & Hegde, Aquatic Procedia 4, 2015",
)
def psnr(fused: Tensor, a: Tensor, b: Tensor, *, profile: str = "reference") -> Tensor:
    """Peak signal-to-noise ratio against the two sources, in dB.

    ``reference``: 10·log10(255²/MSE). ``tang``: 20·log10(255/√MSE) with MSE on [0, 1] (= true PSNR +
    48.13 dB). ``cddfuse``: peak max(F). ``vifb``: per channel 20·log10(255/√r) with VIFB's r (see RMSE),
    then averaged over channels; ``mefb`` is the same code as ``vifb``.
    """
    f, xa, xb = prepare(profile, fused, a, b)
    if profile in ("vifb", "mefb"):
        return channel_mean(20 * torch.log10(255.0 / torch.sqrt(_vifb_r(f, xa, xb))))
    m = _mse(f, xa, xb)
    if profile in ("tang", "tang_legacy"):
        return channel_mean(20 * torch.log10(255.0 / torch.sqrt(m / 255.0**2)))
    peak = f.flatten(-2).amax(-1) if profile == "cddfuse" else torch.full_like(m, 255.0)
    return channel_mean(10 * torch.log10(peak**2 / m))


@register_metric(
    "RMSE",
    higher_is_better=False,
    profiles=("reference", "vifb"),
    reference="reference: √MSE; vifb: Jagalingam & Hegde 2015 as coded in VIFB",
)
def rmse(fused: Tensor, a: Tensor, b: Tensor, *, profile: str = "reference") -> Tensor:
    """Root mean squared error. ``reference``: √MSE on 0–255. ``vifb``: its r, averaged over channels."""
    f, xa, xb = prepare(profile, fused, a, b)
    if profile == "vifb":
        return channel_mean(_vifb_r(f, xa, xb))
    return channel_mean(torch.sqrt(_mse(f, xa, xb)))
