"""Gradient-based edge-transfer metrics: Qabf (Xydeas & Petrović) and Nabf (fusion artefacts)."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from fusion.metrics._utils import channel_mean, sobel, window_dtype
from fusion.metrics.profiles import get_profile, per_source, prepare
from fusion.metrics.registry import register_metric

__all__ = ["nabf", "qabf"]

HALF_PI = math.pi / 2


def _angle(sx: Tensor, sy: Tensor, sx2: Tensor) -> Tensor:
    """atan(Sy/Sx), with π/2 where Sx = 0 (the reference codes' rule; ±inf or NaN there), as
    atan2(Sy·Sx + t, Sx²) (``sx2`` = Sx²; t the dtype's smallest normal number).

    The same angle: Sx² > 0 keeps it in (−π/2, π/2), and where Sx = 0, t makes it +π/2. Elsewhere t is far
    below the last bit of any product but the tiniest (Sobel responses of uint8 data are integers, their
    products exact), and where Sy = 0 it leaves an angle t/Sx² that no later difference can see. On the
    CPU a float32 ``atan`` is scalar code: one vectorised ``atan2`` replaces it, the division and the mask
    fill (2.5× faster) and, without the rounded quotient, lands closer to the float64 angle.
    """
    return torch.atan2(torch.mul(sy, sx).add_(torch.finfo(sx.dtype).tiny), sx2)


def _edges(x: Tensor, pad_mode: str = "zeros", scale: float = 1.0) -> tuple[Tensor, Tensor, Tensor]:
    """Squared Sobel strength, strength and orientation, as the reference codes' ``conv2(·, h, 'same')``.

    ``conv2`` with h3 = [−1 0 1; −2 0 2; −1 0 1] and h1 = [1 2 1; 0 0 0; −1 −2 −1] (true convolution)
    is correlation with the flipped kernels, i.e. Sx = corr([1 0 −1; 2 0 −2; 1 0 −1]), Sy = −corr([1 2 1; 0 0 0; −1 −2 −1]). The signs
    matter: where Sx = 0 the angle is +π/2 whatever the sign of Sy.
    """
    sx, sy = sobel(x, pad_mode)
    sy = -sy
    if scale != 1.0:
        sx, sy = sx * scale, sy * scale
    sx2 = sx * sx
    g2 = sx2 + sy * sy
    return g2, torch.sqrt(g2), _angle(sx, sy, sx2)


def _ratio(g2x: Tensor, g2f: Tensor, gx: Tensor, gf: Tensor, equal: Tensor) -> Tensor:
    """min(g_X, g_F)/max(g_X, g_F), with ``equal`` where g_X == g_F (compared on exact squared strengths).

    The square root is monotone, so min/max of the strengths pick the same pair as comparing the squared
    strengths; 0/0 arises only where both are zero, which the ``equal`` branch replaces.
    """
    ratio = torch.minimum(gx, gf).div_(torch.maximum(gx, gf))
    return torch.where(g2x == g2f, equal, ratio)


@register_metric(
    "Qabf",
    higher_is_better=True,
    profiles=("reference", "vifb", "tang", "cddfuse", "mefb"),
    reference="Xydeas & Petrović, Electron. Lett. 36(4), 2000",
)
def qabf(fused: Tensor, a: Tensor, b: Tensor, *, profile: str = "reference") -> Tensor:
    """Gradient-information transfer Q^{AB/F} = Σ(Q^{AF}g_A + Q^{BF}g_B)/Σ(g_A + g_B) (weights g^L, L = 1).

    Sobel strength g and orientation α = atan(Sy/Sx) (π/2 where Sx = 0); G = min/max strength ratio,
    A = 1 − |α_X − α_F|/(π/2); Q_g = 0.9994/(1 + e^{−15(G − 0.5)}), Q_α = 0.9879/(1 + e^{−22(A − 0.8)}).
    Where g_X = g_F the compatibility profiles keep the codes' quirk G = g_F (VIFB works on 255×
    scaled data, so G = 255·g_F there; ``mefb`` runs the same code); ``reference`` uses the intended G = 1.

    On CPU the uint8 profiles run the per-pixel terms in float32 (their Sobel responses are integers, exact
    there; the sigmoids are accurate to ~1e-7) and the sums in float64; ``FUSION_METRICS_FLOAT64=1`` forces
    float64. ``reference`` (unquantised grey levels) stays in float64: float32 would merge nearly equal
    levels, flipping the equal-strength branch and the sign of near-zero Sx (angles jump by π), which moved
    VIFB values by up to 2e-3.
    """
    dtype = window_dtype(fused.device) if get_profile(profile).quantise else torch.float64
    f, xa, xb = (x.to(dtype) for x in prepare(profile, fused, a, b))
    tg, kg, dg, ta, ka, da = 0.9994, -15.0, 0.5, 0.9879, -22.0, 0.8
    g2f, gf, af = _edges(f)
    if profile in ("vifb", "mefb"):
        equal = 255.0 * gf
    elif profile == "reference":
        equal = torch.ones_like(gf)
    else:
        equal = gf
    num = 0.0
    den = 0.0
    for source, x in ((a, xa), (b, xb)):
        g2x, gx, ax = per_source(source, ("Qabf", profile, x.shape, dtype), lambda x=x: _edges(x))
        g = _ratio(g2x, g2f, gx, gf, equal)
        ang = (ax - af).abs_().div_(HALF_PI).neg_().add_(1)  # 1 − |α_X − α_F|/(π/2), in place
        # Γ/(1 + e^{κ(v − σ)}) = Γ·sigmoid(−κ(v − σ))
        q = g.sub_(dg).mul_(-kg).sigmoid_().mul_(ang.sub_(da).mul_(-ka).sigmoid_())
        num = num + q.mul_(gx).sum(dim=(-2, -1), dtype=torch.float64) * (tg * ta)
        den = den + gx.sum(dim=(-2, -1), dtype=torch.float64)
    return channel_mean(num / den)


@register_metric(
    "Nabf",
    higher_is_better=False,
    profiles=("reference",),
    reference="Petrović & Xydeas 2005 artefact measure, modified by Shreyamsha Kumar, SIViP 2013",
)
def nabf(fused: Tensor, a: Tensor, b: Tensor, *, profile: str = "reference") -> Tensor:
    """Fusion artefacts N^{AB/F} (modified), lower is better.

    Edge model with Sobel/8 and mirrored borders; angle term ||α_X − α_F| − π/2|·2/π; Q = √(Q_g·Q_α)
    with Q_g = 0.9999/(1 + e^{−19(G − 0.5)}), Q_α = 0.9995/(1 + e^{−22(A − 0.5)}); weights w = g^1.5 where
    g ≥ 2, else 0.001; Nabf = Σ n·((1 − Q^{AF})w_A + (1 − Q^{BF})w_B)/Σ(w_A + w_B) with n = 1 only where
    g_F exceeds both source strengths (an artefact: gradient the sources do not have). Equal strengths
    give G = 1.
    """
    f, xa, xb = prepare(profile, fused, a, b)
    nrg, kg, sg, nra, ka, sa, td = 0.9999, 19.0, 0.5, 0.9995, 22.0, 0.5, 2.0
    g2f, gf, af = _edges(f, "reflect", 1 / 8)
    ones = torch.ones_like(gf)

    def source_terms(x: Tensor) -> tuple[Tensor, ...]:
        """A source's edges and its weights w (fused-independent)."""
        g2x, gx, ax = _edges(x, "reflect", 1 / 8)
        return g2x, gx, ax, torch.where(gx >= td, gx.pow(1.5), torch.full_like(gx, 0.001))

    terms = []
    grads = []
    for src, x in ((a, xa), (b, xb)):
        g2x, gx, ax, w = per_source(src, ("Nabf", profile, x.shape), lambda x=x: source_terms(x))
        g = _ratio(g2x, g2f, gx, gf, ones)
        ang = ((ax - af).abs() - HALF_PI).abs() * (2 / math.pi)
        q = torch.sqrt(nrg / (1 + torch.exp(-kg * (g - sg))) * (nra / (1 + torch.exp(-ka * (ang - sa)))))
        terms.append((1 - q) * w)
        grads.append((gx, w))
    (ga, wa), (gb, wb) = grads
    n = ((gf > ga) & (gf > gb)).to(gf.dtype)
    num = (n * (terms[0] + terms[1])).sum(dim=(-2, -1))
    den = (wa + wb).sum(dim=(-2, -1))
    return channel_mean(num / den)
