"""Fusion losses: building blocks, the nets' auxiliary losses, and named composite presets.

Building blocks (pure functions on [0, 1] tensors, shape (B, C, H, W)):
    :func:`intensity_loss` (target max / mean / saliency-weighted), :func:`saliency_fallback`,
    :func:`sobel_gradient`, :func:`gradient_max_loss`, :func:`ssim_loss` (pytorch-msssim), :func:`mef_ssim`
    (Ma, Zeng & Wang 2015), :func:`tc_moa_max_grad_loss`, :func:`mff_focus_mask`, :func:`masked_pixel_loss`,
    :func:`boxes_to_mask`, and :func:`saliency_map`: a batch's saliency map, the one map the fusion loss, the
    critic's target and a MoE-Fusion net with external attention share.
Auxiliary losses used inside the nets: :func:`cv_squared`, :func:`load_balance_loss` (Shazeer et al. 2017),
    :func:`mir_loss` (TC-MoA's mutual-information regularisation).
Presets (``create_fusion_loss(name, **weights)``), all called as
``loss(fused, ir, vis, mask=None, aux_losses=None) -> {"loss": total, <unweighted parts>...}``:

=================  ==========================================================================================
``bdl``            L1(F, T) + 1.1·(1 − SSIM(F, T)), T = m⊙ir + (1−m)⊙Y (BDL, Liu et al.)
``max_grad_ssim``  L1(F, max(ir, Y)) + 10·L1(|∇F|, max|∇|) + ½(1 − SSIM(F, ir)) + ½(1 − SSIM(F, Y))
``moe``            10·L1(|∇F|, max|∇|) + box/saliency-masked pixel loss + aux (MoE-Fusion, Cao et al. 2023)
``tc_moa_vif``     1.5·MaxGrad + 1.5·MaxPixel + MIR + 2·SSIM + aux (TC-MoA, Zhu et al. 2024; latest code)
``tc_moa_mef``     1.8·(MaxGrad + MIR + 2·(1 − MEF-SSIM) + AvgPixel) + aux
``tc_moa_mff``     20·(MaskGrad + MaskPixel) + MIR + 3·SSIM + aux
=================  ==========================================================================================

Spaces: ``fused`` is the net's *raw* output. A one-channel output (out_space "y"/"grey") is compared with the
luminance of each source; a three-channel output ("rgb") with the sources repeated to RGB. ``ir`` may have
one or three channels (for MEF/MFF pairs pass the second exposure/focus image as ``ir``).

``mask`` is a *saliency/foreground weight map* in [0, 1], (B, 1, H, W) or (B, H, W), e.g. BDL's shipped
saliency masks or :func:`boxes_to_mask` for MoE-Fusion; :func:`saliency_map` builds it from a batch. It is not a
segmentation label map: integer masks are rejected. Without a mask the presets that need one
(``loss.uses_mask``) use the named fallback ``mask_fallback="ir_saliency"`` (:func:`saliency_fallback`), or raise
when ``mask_fallback="none"``.

Every preset also takes ``detail`` and ``contrast`` weights (default 0): the max-gradient and max-intensity
terms of the strongest published infrared/visible losses, added as parts ``detail`` and ``contrast``.

``aux_losses`` is the dict from :func:`fusion.nets.fused_output`; its values are already weighted by the net's
coefficients. Each preset adds ``aux_weight · Σ aux`` (key ``"mir"`` is weighted by the preset's MIR weight
instead). The TC-MoA code divides its balance term by (epoch + 1): a trainer does that by setting
``loss_fn.aux_weight`` per epoch.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from pytorch_msssim import ssim as _ssim
from torch import Tensor, nn

from bilevel.registry import lookup
from fusion.colour import as_rgb, luminance

__all__ = [
    "MASK_FALLBACKS",
    "SALIENCY_SOURCES",
    "BDLLoss",
    "FusionLoss",
    "MaxGradSSIMLoss",
    "MoELoss",
    "TCMoAMEFLoss",
    "TCMoAMFFLoss",
    "TCMoAVIFLoss",
    "boxes_to_mask",
    "create_fusion_loss",
    "cv_squared",
    "gradient_max_loss",
    "intensity_loss",
    "list_fusion_losses",
    "load_balance_loss",
    "masked_pixel_loss",
    "mef_ssim",
    "mff_focus_mask",
    "mir_loss",
    "saliency_fallback",
    "saliency_map",
    "sobel_gradient",
    "ssim_loss",
    "tc_moa_max_grad_loss",
]

MASK_FALLBACKS = ("ir_saliency", "none")
SALIENCY_SOURCES = ("auto", "saliency", "mask", "boxes", "ir")

log = logging.getLogger(__name__)
_ANNOUNCED: set[str] = set()  # fallbacks already announced in the log (once per process)


# --------------------------------------------------------------------------------------------------- helpers
def _check_image(x: Tensor, what: str) -> None:
    if x.dim() != 4 or x.shape[1] not in (1, 3):
        raise ValueError(f"{what} must be (B, 1 or 3, H, W), got shape {tuple(x.shape)}")


def _gaussian_kernel1d(size: int, sigma: float, like: Tensor) -> Tensor:
    coords = torch.arange(size, dtype=like.dtype, device=like.device) - (size - 1) / 2
    g = torch.exp(-(coords**2) / (2 * sigma**2))
    return g / g.sum()


def _filter_separable(x: Tensor, k1d: Tensor, padding: str = "valid") -> Tensor:
    """Depthwise separable filtering of (B, C, H, W) with a 1-D kernel; ``padding`` "valid" or "reflect"."""
    c, n = x.shape[1], k1d.numel()
    if padding == "reflect":
        p = n // 2
        x = F.pad(x, (p, p, p, p), mode="reflect" if min(x.shape[-2:]) > p else "replicate")
    kh = k1d.view(1, 1, n, 1).expand(c, 1, n, 1)
    kw = k1d.view(1, 1, 1, n).expand(c, 1, 1, n)
    return F.conv2d(F.conv2d(x, kh, groups=c), kw, groups=c)


def _as_float_mask(mask: Tensor, ref: Tensor) -> Tensor:
    if mask.dtype in (torch.bool,) or mask.is_floating_point():
        m = mask.to(ref.dtype)
    else:
        raise TypeError(
            "mask must be a float (or bool) saliency/foreground map in [0, 1]; got an integer tensor "
            "(a segmentation label map?). Convert labels with e.g. (labels > 0).float()."
        )
    if m.dim() == 3:
        m = m.unsqueeze(1)
    if m.dim() != 4 or m.shape[1] != 1 or m.shape[0] != ref.shape[0] or m.shape[-2:] != ref.shape[-2:]:
        raise ValueError(
            f"mask must be (B, 1, H, W) or (B, H, W) matching {tuple(ref.shape)}, got {tuple(mask.shape)}"
        )
    return m


# ---------------------------------------------------------------------------------------------- intensity
def saliency_fallback(ir: Tensor, sigma: float = 3.0) -> Tensor:
    """The named mask-free fallback ``"ir_saliency"``: blurred IR, min–max normalised per image.

    Why: BDL's saliency masks were shipped separately from the code; bright IR regions (people, engines) are
    the thermal targets those masks mark, so a smoothed, normalised IR is the closest mask-free proxy.

    Shape: (B, C, H, W) → (B, 1, H, W) in [0, 1] (a flat image gives 0.5).
    """
    _check_image(ir, "saliency_fallback(ir)")
    size = 2 * math.ceil(3 * sigma) + 1
    blurred = _filter_separable(luminance(ir), _gaussian_kernel1d(size, sigma, ir), padding="reflect")
    lo = blurred.amin(dim=(-2, -1), keepdim=True)
    hi = blurred.amax(dim=(-2, -1), keepdim=True)
    span = hi - lo
    return torch.where(span > 1e-12, (blurred - lo) / span.clamp_min(1e-12), torch.full_like(blurred, 0.5))


def intensity_loss(
    fused: Tensor, ir: Tensor, vis: Tensor, target: str = "max", mask: Tensor | None = None
) -> Tensor:
    """Mean L1 distance between ``fused`` and an intensity target built from the two sources.

    Args:
        fused, ir, vis: (B, C, H, W), all in the same space.
        target: "max" (max(ir, vis)), "mean" ((ir + vis)/2) or "saliency" (m⊙ir + (1−m)⊙vis).
        mask: saliency map m for ``target="saliency"``; ``None`` uses :func:`saliency_fallback` of ``ir``.
    """
    if target == "max":
        t = torch.maximum(ir, vis)
    elif target == "mean":
        t = 0.5 * (ir + vis)
    elif target == "saliency":
        m = saliency_fallback(ir) if mask is None else _as_float_mask(mask, fused)
        t = m * ir + (1 - m) * vis
    else:
        raise ValueError(f"unknown intensity target {target!r}; expected 'max', 'mean' or 'saliency'")
    return F.l1_loss(fused, t)


def masked_pixel_loss(fused: Tensor, a: Tensor, b: Tensor, mask: Tensor) -> Tensor:
    """MoE-Fusion's box-masked pixel loss: inside the mask L1(F, max(a, b)), outside L1(F, (a + b)/2).

    Each term is a mean over *all* pixels with the other region zeroed (as the released code does), and a
    soft mask weights the two terms per pixel.
    """
    m = _as_float_mask(mask, fused)
    inside = (m * (fused - torch.maximum(a, b)).abs()).mean()
    outside = ((1 - m) * (fused - 0.5 * (a + b)).abs()).mean()
    return inside + outside


def boxes_to_mask(
    boxes: Sequence[Tensor], size: tuple[int, int], device: torch.device | None = None
) -> Tensor:
    """Rasterise per-image xyxy boxes (absolute pixels) into a (B, 1, H, W) float foreground mask."""
    h, w = size
    out = torch.zeros(len(boxes), 1, h, w, device=device)
    for i, bx in enumerate(boxes):
        for x0, y0, x1, y1 in bx.tolist():
            c0, r0 = max(0, math.floor(x0)), max(0, math.floor(y0))
            c1, r1 = min(w, math.ceil(x1)), min(h, math.ceil(y1))
            out[i, :, r0:r1, c0:c1] = 1.0
    return out


def saliency_map(
    batch: Mapping[str, Any],
    like: Tensor,
    *,
    source: str = "auto",
    sigma: float = 3.0,
    ignore_index: int = 255,
    fallback: str = "ir_saliency",
) -> Tensor:
    """The saliency map m (B, 1, H, W) in [0, 1] that weighs IR against visible for ``batch``.

    Why one function: the fusion loss's target m⊙ir + (1−m)⊙Y, the critic's "real" sample and the foreground
    of a MoE-Fusion net with ``attention="input"`` must weigh the sources with the same map.

    Sources (``source="auto"`` takes the first the batch has):
        ``"saliency"``: ``batch["saliency"]``, a float map (B, [1,] H, W), e.g. BDL's released saliency masks;
        ``"mask"``: segmentation labels ``batch["mask"]`` (B, H, W): every class > 0 counts as salient, pixels
            equal to ``ignore_index`` do not (MSRS-style person masks: the person pixels);
        ``"boxes"``: ``batch["boxes"]`` (a list of (N, 4) xyxy), rasterised by :func:`boxes_to_mask` (the
            ground-truth box mask of MoE-Fusion's loss);
        ``"ir"``: the fallback, :func:`saliency_fallback` of ``batch["ir"]`` with ``sigma``.
    Under ``"auto"`` a batch with none of the three gets ``fallback``: ``"ir_saliency"`` (the ``"ir"`` map,
    announced once per process in the log) or ``"none"`` (ValueError). A forced source missing from the batch
    raises KeyError.

    Returns:
        the map on ``like``'s device in ``like``'s dtype, sized like ``like`` (B, ·, H, W); it carries no
        gradient. Computed in at least float32 with autocast off, so callers inside and outside a bf16 region
        get the same map.
    """
    if source not in SALIENCY_SOURCES:
        raise ValueError(f"unknown saliency source {source!r}; expected one of {SALIENCY_SOURCES}")
    if fallback not in MASK_FALLBACKS:
        raise ValueError(f"unknown saliency fallback {fallback!r}; expected one of {MASK_FALLBACKS}")
    if source == "auto":
        source = next((k for k in ("saliency", "mask", "boxes") if batch.get(k) is not None), None)
        if source is None:
            if fallback == "none":
                raise ValueError("the batch has no 'saliency', 'mask' or 'boxes' to build a saliency map from "
                                 "(mask_fallback='none')")
            source = "ir"
            if "ir_saliency" not in _ANNOUNCED:
                _ANNOUNCED.add("ir_saliency")
                log.warning("saliency map: the batch has no saliency map, label mask or boxes; the fusion loss and "
                            "the critic weigh the sources by the 'ir_saliency' fallback (blurred IR, min-max "
                            "normalised per image, sigma %g); announced once", sigma)
    elif batch.get(source) is None:
        raise KeyError(f"saliency source {source!r} needs batch[{source!r}], which this batch lacks")
    b, (h, w) = like.shape[0], like.shape[-2:]
    dtype = torch.promote_types(like.dtype, torch.float32)
    with torch.no_grad(), torch.autocast(like.device.type, enabled=False):
        if source == "saliency":
            m = batch["saliency"].to(like.device, dtype)
            m = m.unsqueeze(1) if m.dim() == 3 else m
        elif source == "mask":
            labels = batch["mask"].to(like.device)
            m = ((labels > 0) & (labels != ignore_index)).to(dtype).unsqueeze(1)
        elif source == "boxes":
            m = boxes_to_mask(batch["boxes"], (h, w), like.device).to(dtype)
        else:
            m = saliency_fallback(batch["ir"].to(like.device, dtype), sigma)
    if m.shape != (b, 1, h, w):
        raise ValueError(f"saliency map from {source!r} has shape {tuple(m.shape)}; expected ({b}, 1, {h}, {w})")
    return m.to(like.dtype)


# ----------------------------------------------------------------------------------------------- gradients
def sobel_gradient(x: Tensor) -> Tensor:
    """|Sobel_x| + |Sobel_y| per channel (3×3, 1/2/1 weights, reflect padding). Shape preserved."""
    kx = torch.tensor([[-1.0, 0.0, 1.0], [-2.0, 0.0, 2.0], [-1.0, 0.0, 1.0]], dtype=x.dtype, device=x.device)
    c = x.shape[1]
    weight = torch.stack((kx, kx.t())).unsqueeze(1).repeat(c, 1, 1, 1)  # (2C, 1, 3, 3)
    g = F.conv2d(F.pad(x, (1, 1, 1, 1), mode="reflect"), weight, groups=c)
    return g.abs().view(x.shape[0], c, 2, *x.shape[-2:]).sum(2)


def gradient_max_loss(fused: Tensor, a: Tensor, b: Tensor) -> Tensor:
    """L1(|∇F|, max(|∇a|, |∇b|)) with the Sobel magnitude of :func:`sobel_gradient`."""
    return F.l1_loss(sobel_gradient(fused), torch.maximum(sobel_gradient(a), sobel_gradient(b)))


def _tc_moa_signed_grad(x: Tensor) -> Tensor:
    """TC-MoA's signed gradient of the channel sum: a Sobel-like kernel with 0.2/1/0.2 weights. (B, 2, H,
    W)."""
    k = torch.tensor([[-0.2, 0.0, 0.2], [-1.0, 0.0, 1.0], [-0.2, 0.0, 0.2]], dtype=x.dtype, device=x.device)
    weight = torch.stack((k, k.t())).unsqueeze(1)
    return F.conv2d(F.pad(x.sum(1, keepdim=True), (1, 1, 1, 1), mode="reflect"), weight)


def tc_moa_max_grad_loss(fused: Tensor, a: Tensor, b: Tensor) -> Tensor:
    """TC-MoA MaxGrad: L1 to the signed gradient of whichever source has the larger |gradient| per pixel."""
    ga, gb = _tc_moa_signed_grad(a), _tc_moa_signed_grad(b)
    return F.l1_loss(_tc_moa_signed_grad(fused), torch.where(ga.abs() >= gb.abs(), ga, gb))


def mff_focus_mask(a: Tensor, b: Tensor, patch: int = 16) -> Tensor:
    """Per ``patch``×``patch`` block, 1 where ``a`` has the larger max Sobel magnitude (is in focus), else 0.

    Shape: (B, 1, H, W). Blocks at the border may be partial (ceil mode).
    """
    ga = F.max_pool2d(sobel_gradient(a).sum(1, keepdim=True), patch, ceil_mode=True)
    gb = F.max_pool2d(sobel_gradient(b).sum(1, keepdim=True), patch, ceil_mode=True)
    m = (ga >= gb).to(a.dtype)
    return F.interpolate(m, scale_factor=patch, mode="nearest")[..., : a.shape[-2], : a.shape[-1]]


# -------------------------------------------------------------------------------------------- structural
def ssim_loss(x: Tensor, y: Tensor) -> Tensor:
    """1 − SSIM(x, y) (Gaussian window 11/1.5, K = (0.01, 0.03), data range 1; pytorch-msssim), batch mean.

    Needs H, W ≥ 11.
    """
    return 1 - _ssim(x, y, data_range=1.0, size_average=True)


_MS_WEIGHTS = (
    0.0448,
    0.2856,
    0.3001,
)  # the first three MS-SSIM weights (Wang et al. 2003), renormalised below


def _mef_ssim_one_scale(
    fused: Tensor, seq: Tensor, window: Tensor, c2: float, p: float, eps: float
) -> Tensor:
    """Mean MEF-SSIM quality map at one scale. fused (B,1,H,W), seq (B,K,H,W) → (B,)."""
    k = seq.shape[1]
    filt = lambda t: _filter_separable(t, window)
    mu_y = filt(fused)
    mu_x = filt(seq)
    var_y = (filt(fused * fused) - mu_y**2).clamp_min(0)[:, 0]
    # (weighted) covariances between sources, and between each source and the fused image
    pairs = [(i, j) for i in range(k) for j in range(i, k)]
    cross = filt(torch.stack([seq[:, i] * seq[:, j] for i, j in pairs], 1))
    cov = {}
    for n, (i, j) in enumerate(pairs):
        cov[i, j] = cov[j, i] = cross[:, n] - mu_x[:, i] * mu_x[:, j]
    var_x = torch.stack([cov[i, i].clamp_min(0) for i in range(k)], 1)  # (B,K,h,w)
    cov_xy = filt(seq * fused) - mu_x * mu_y  # (B,K,h,w); mu_y (B,1,h,w) broadcasts over sources

    contrast = var_x.add(eps).sqrt()  # c_k = ||x̃_k||
    c_hat = contrast.amax(1)  # desired contrast: the largest among the sources
    # s̄ = Σ_k w_k s_k / Σ_k w_k with w_k = c_k^p and s_k = x̃_k / c_k, i.e. s̄ = Σ_k a_k x̃_k
    a = contrast ** (p - 1) / (contrast**p).sum(1, keepdim=True)
    s_norm_sq = sum(a[:, i] * a[:, j] * cov[i, j] for i in range(k) for j in range(k))
    scale = c_hat / s_norm_sq.clamp_min(0).add(eps).sqrt()  # x̂ = ĉ · s̄ / ||s̄||
    cov_hat_y = scale * (a * cov_xy).sum(1)
    var_hat = c_hat**2
    q = (2 * cov_hat_y + c2) / (var_hat + var_y + c2)
    return q.mean(dim=(-2, -1))


def mef_ssim(
    fused: Tensor,
    a: Tensor,
    b: Tensor,
    *,
    levels: int = 3,
    window_size: int = 11,
    sigma: float = 1.5,
    k2: float = 0.03,
    p: float = 4.0,
    eps: float = 1e-8,
) -> Tensor:
    """MEF-SSIM of ``fused`` against the exposure pair {a, b}, differentiable and batched.

    Implemented from K. Ma, K. Zeng, Z. Wang, "Perceptual Quality Assessment for Multi-Exposure Image Fusion",
    IEEE TIP 24(11), 2015. For every window, each source patch x_k is split into a contrast c_k = ||x_k −
    μ_k|| and a structure s_k = (x_k − μ_k)/c_k. The desired patch is x̂ = ĉ·s̄/||s̄|| with ĉ = max_k c_k and
    s̄ = Σ_k c_k^p s_k / Σ_k c_k^p (p = 4); the local quality is the SSIM contrast–structure term
    (2σ_x̂F + C2)/(σ_x̂² + σ_F² + C2), C2 = (k2·1)², and luminance is deliberately ignored. The score is the
    mean over windows; with ``levels > 1`` it is Π_l Q_l^β_l over a 2×2 average-pooling pyramid with the first
    ``levels`` MS-SSIM weights renormalised (the paper's multi-scale form, 3 levels).

    [design] Window statistics use the 11×11 Gaussian (σ = 1.5) throughout, with "valid" filtering, so x̂ is
    evaluated in closed form through local (co)variances rather than by extracting patches; patch norms are
    Gaussian-weighted. Colour inputs are compared on their BT.601 luminance.

    Args:
        fused, a, b: (B, 1 or 3, H, W) in [0, 1]; the coarsest level needs a side ≥ ``window_size``.

    Returns:
        (B,) scores, 1 for ``fused == a == b``; symmetric in a, b.
    """
    for t, what in ((fused, "fused"), (a, "a"), (b, "b")):
        _check_image(t, f"mef_ssim({what})")
    if not (fused.shape[0] == a.shape[0] == b.shape[0] and fused.shape[-2:] == a.shape[-2:] == b.shape[-2:]):
        raise ValueError(f"mef_ssim: shapes differ: {tuple(fused.shape)}, {tuple(a.shape)}, {tuple(b.shape)}")
    if not 1 <= levels <= len(_MS_WEIGHTS):
        raise ValueError(f"levels must be in 1..{len(_MS_WEIGHTS)}, got {levels}")
    need = window_size * 2 ** (levels - 1)
    if min(fused.shape[-2:]) < need:
        raise ValueError(
            f"mef_ssim with levels={levels} needs H, W ≥ {need}; got {tuple(fused.shape[-2:])} "
            f"(use fewer levels)"
        )
    y = luminance(fused)
    seq = torch.cat((luminance(a), luminance(b)), 1)
    window = _gaussian_kernel1d(window_size, sigma, y)
    weights = torch.tensor(_MS_WEIGHTS[:levels], dtype=y.dtype, device=y.device)
    weights = weights / weights.sum()
    score = y.new_ones(y.shape[0])
    for level in range(levels):
        if level:
            y, seq = F.avg_pool2d(y, 2), F.avg_pool2d(seq, 2)
        q = _mef_ssim_one_scale(y, seq, window, k2**2, p, eps)
        score = score * (q.clamp_min(eps) ** weights[level] if levels > 1 else q)
    return score


# ------------------------------------------------------------------------------------- auxiliary (per net)
def cv_squared(x: Tensor, eps: float = 1e-10) -> Tensor:
    """Squared coefficient of variation var(x)/mean(x)² (Shazeer et al. 2017); 0 for a single element."""
    x = x.float()
    if x.numel() <= 1:
        return x.new_zeros(())
    return x.var() / (x.mean() ** 2 + eps)


def load_balance_loss(importance: Tensor, load: Tensor) -> Tensor:
    """CV²(importance) + CV²(load) over experts, as in the sparsely-gated MoE (Shazeer et al., ICLR 2017)."""
    return cv_squared(importance) + cv_squared(load)


def mir_loss(p_x: Tensor, p_y: Tensor, variant: str = "paper") -> Tensor:
    """TC-MoA mutual-information regularisation on the prompts: they should sum to one per token.

    ``variant="paper"``: mean |p_x + p_y − 1| (Zhu et al., CVPR 2024, Eq. 7); ``"code"``: mean (p_x + p_y −
    1)²
    (the released code's MSE).
    """
    d = p_x + p_y - 1
    if variant == "paper":
        return d.abs().mean()
    if variant == "code":
        return (d**2).mean()
    raise ValueError(f"unknown MIR variant {variant!r}; expected 'paper' or 'code'")


# ------------------------------------------------------------------------------------------------ presets
class FusionLoss(nn.Module):
    """Base of the composite presets: checks shapes, maps the sources into the output space, adds aux losses.

    Subclasses implement :meth:`terms` (unweighted parts) and set ``weights`` (part → weight).

    Args:
        aux_weight: weight of every auxiliary loss except ``"mir"``.
        mir_weight: weight of the aux key ``"mir"`` (TC-MoA).
        mask_fallback: what stands in for a missing ``mask``: "ir_saliency" (:func:`saliency_fallback`) or
            "none" (a missing mask is an error). Only used by presets that take a mask.
        detail: weight of an extra part ``detail`` = L1(|∇F|, max(|∇ir|, |∇Y|)) (:func:`gradient_max_loss`),
            added to any preset: it keeps the sharper source's edges, which a blend target smooths away.
        contrast: weight of an extra part ``contrast`` = L1(F, max(ir, Y)): it keeps the brighter source's
            intensity (hot targets stay bright), where a blend target lowers contrast.

    ``uses_mask`` says whether the preset reads ``mask`` (a trainer builds the map only for those).
    """

    weights: dict[str, float]
    uses_mask: bool = False

    def __init__(
        self, *, aux_weight: float = 1.0, mir_weight: float = 1.0, mask_fallback: str = "ir_saliency",
        detail: float = 0.0, contrast: float = 0.0,
    ):
        super().__init__()
        if mask_fallback not in MASK_FALLBACKS:
            raise ValueError(f"unknown mask_fallback {mask_fallback!r}; expected one of {MASK_FALLBACKS}")
        self.aux_weight = aux_weight
        self.mir_weight = mir_weight
        self.mask_fallback = mask_fallback
        self.extra_weights = {name: float(w) for name, w in (("detail", detail), ("contrast", contrast)) if w}

    def terms(self, fused: Tensor, ir: Tensor, vis: Tensor, mask: Tensor | None) -> dict[str, Tensor]:
        raise NotImplementedError

    def _mask(self, mask: Tensor | None, ir: Tensor, ref: Tensor) -> Tensor:
        if mask is not None:
            return _as_float_mask(mask, ref)
        if self.mask_fallback == "none":
            raise ValueError(f"{type(self).__name__} needs a saliency mask (mask_fallback='none')")
        return saliency_map({"ir": ir}, ref, fallback=self.mask_fallback)

    def forward(
        self,
        fused: Tensor,
        ir: Tensor,
        vis: Tensor,
        mask: Tensor | None = None,
        aux_losses: dict[str, Tensor] | None = None,
    ) -> dict[str, Tensor]:
        """Compute the weighted total and its parts.

        Args:
            fused: raw net output, (B, 1, H, W) (compared with source luminance) or (B, 3, H, W) (RGB).
            ir: (B, 1 or 3, H, W) in [0, 1] (the second source of an MEF/MFF pair).
            vis: (B, 1 or 3, H, W) in [0, 1].
            mask: optional float saliency/foreground map (B, 1, H, W) or (B, H, W).
            aux_losses: the net's auxiliary losses (already weighted by the net).

        Returns:
            ``{"loss": total, <part>: unweighted value, "aux_<name>": value}``.
        """
        _check_image(fused, "fused")
        _check_image(ir, "ir")
        _check_image(vis, "vis")
        if not (
            fused.shape[0] == ir.shape[0] == vis.shape[0]
            and fused.shape[-2:] == ir.shape[-2:] == vis.shape[-2:]
        ):
            raise ValueError(
                f"batch/spatial sizes differ: fused {tuple(fused.shape)}, ir {tuple(ir.shape)}, "
                f"vis {tuple(vis.shape)}"
            )
        # Always fp32, autocast off: under bf16 autocast the SSIM convolutions would run in bf16, and its
        # variances E[x²] − E[x]² cancel catastrophically there (the loss then trains towards noise).
        fused, ir, vis = fused.float(), ir.float(), vis.float()
        if fused.shape[1] == 1:
            ir, vis = luminance(ir), luminance(vis)
        else:
            ir, vis = as_rgb(ir), as_rgb(vis)
        with torch.autocast(fused.device.type, enabled=False):
            parts = self.terms(fused, ir, vis, mask)
            if "detail" in self.extra_weights:
                parts["detail"] = gradient_max_loss(fused, ir, vis)
            if "contrast" in self.extra_weights:
                parts["contrast"] = intensity_loss(fused, ir, vis, "max")
        weights = {**self.weights, **self.extra_weights}
        total = sum(weights[k] * v for k, v in parts.items())
        out = dict(parts)
        for name, value in self.weigh_aux(aux_losses or {}).items():
            total = total + value
            out[f"aux_{name}"] = aux_losses[name]
        return {"loss": total, **out}

    def weigh_aux(self, aux_losses: dict[str, Tensor]) -> dict[str, Tensor]:
        """The net's auxiliary losses as this loss weighs them (``mir`` by ``mir_weight``, the rest by
        ``aux_weight``): what a trainer adds to the fusion objective when it handles them itself."""
        return {name: (self.mir_weight if name == "mir" else self.aux_weight) * value
                for name, value in aux_losses.items()}

    def extra_repr(self) -> str:
        weights = {**self.weights, **self.extra_weights}
        return ", ".join(f"{k}={v}" for k, v in weights.items()) + f", aux_weight={self.aux_weight}"


class BDLLoss(FusionLoss):
    """BDL fusion loss: L1(F, T) + 1.1·(1 − SSIM(F, T)), T = m⊙ir + (1−m)⊙Y (BDL's released code)."""

    uses_mask = True

    def __init__(self, *, l1: float = 1.0, ssim: float = 1.1, **kw):
        super().__init__(**kw)
        self.weights = {"l1": l1, "ssim": ssim}

    def terms(self, fused, ir, vis, mask):
        m = self._mask(mask, ir, fused)
        target = m * ir + (1 - m) * vis
        return {"l1": F.l1_loss(fused, target), "ssim": ssim_loss(fused, target)}


class MaxGradSSIMLoss(FusionLoss):
    """L1(F, max(ir, Y)) + 10·L1(|∇F|, max|∇|) + ½(1 − SSIM(F, ir)) + ½(1 − SSIM(F, Y)) (a common IVIF
    loss)."""

    def __init__(
        self, *, intensity: float = 1.0, grad: float = 10.0, ssim_ir: float = 0.5, ssim_vis: float = 0.5, **kw
    ):
        super().__init__(**kw)
        self.weights = {"intensity": intensity, "grad": grad, "ssim_ir": ssim_ir, "ssim_vis": ssim_vis}

    def terms(self, fused, ir, vis, mask):
        return {
            "intensity": intensity_loss(fused, ir, vis, "max"),
            "grad": gradient_max_loss(fused, ir, vis),
            "ssim_ir": ssim_loss(fused, ir),
            "ssim_vis": ssim_loss(fused, vis),
        }


class MoELoss(FusionLoss):
    """MoE-Fusion: 10·L1(|∇F|, max(|∇V|, |∇I|)) + masked pixel loss + aux (the nets' balance terms).

    ``mask`` should be the ground-truth box mask (:func:`boxes_to_mask`; :func:`saliency_map` gives it for a
    batch with boxes); the detection losses of the original are the detector task's business, not this loss's.
    """

    uses_mask = True

    def __init__(self, *, grad: float = 10.0, pixel: float = 1.0, **kw):
        super().__init__(**kw)
        self.weights = {"grad": grad, "pixel": pixel}

    def terms(self, fused, ir, vis, mask):
        return {
            "grad": gradient_max_loss(fused, vis, ir),
            "pixel": masked_pixel_loss(fused, vis, ir, self._mask(mask, ir, fused)),
        }


def _mean_ssim_loss(fused: Tensor, a: Tensor, b: Tensor) -> Tensor:
    return 0.5 * (ssim_loss(fused, a) + ssim_loss(fused, b))


class TCMoAVIFLoss(FusionLoss):
    """TC-MoA VIF: 1.5·MaxGrad + 1.5·MaxPixel + MIR + 2·SSIM + aux; SSIM = mean of 1 − SSIM to each source."""

    def __init__(
        self,
        *,
        max_grad: float = 1.5,
        max_pixel: float = 1.5,
        ssim: float = 2.0,
        mir_weight: float = 1.0,
        **kw,
    ):
        super().__init__(mir_weight=mir_weight, **kw)
        self.weights = {"max_grad": max_grad, "max_pixel": max_pixel, "ssim": ssim}

    def terms(self, fused, ir, vis, mask):
        return {
            "max_grad": tc_moa_max_grad_loss(fused, vis, ir),
            "max_pixel": intensity_loss(fused, ir, vis, "max"),
            "ssim": _mean_ssim_loss(fused, vis, ir),
        }


class TCMoAMEFLoss(FusionLoss):
    """TC-MoA MEF: 1.8·(MaxGrad + MIR + 2·(1 − MEF-SSIM) + AvgPixel) + aux (MEF-SSIM on luminance, 3
    levels)."""

    def __init__(self, *, scale: float = 1.8, mef_ssim_levels: int = 3, **kw):
        kw.setdefault("mir_weight", scale)
        super().__init__(**kw)
        self.mef_ssim_levels = mef_ssim_levels
        self.weights = {"max_grad": scale, "mef_ssim": 2 * scale, "avg_pixel": scale}

    def terms(self, fused, ir, vis, mask):
        q = mef_ssim(fused, vis, ir, levels=self.mef_ssim_levels)
        return {
            "max_grad": tc_moa_max_grad_loss(fused, vis, ir),
            "mef_ssim": 1 - q.mean(),
            "avg_pixel": intensity_loss(fused, ir, vis, "mean"),
        }


class TCMoAMFFLoss(FusionLoss):
    """TC-MoA MFF: 20·(MaskGrad + MaskPixel) + MIR + 3·SSIM + aux.

    The focus mask picks, per 16×16 block, the source with the larger max |Sobel| (:func:`mff_focus_mask`).
    MaskPixel = L1(F, m⊙vis + (1−m)⊙ir); MaskGrad = L1(|∇F|, m⊙|∇vis| + (1−m)⊙|∇ir|) ([design]: blending the
    gradient maps avoids the false edges a composite image has at block seams).
    """

    def __init__(
        self, *, mask_grad: float = 20.0, mask_pixel: float = 20.0, ssim: float = 3.0, patch: int = 16, **kw
    ):
        super().__init__(**kw)
        self.patch = patch
        self.weights = {"mask_grad": mask_grad, "mask_pixel": mask_pixel, "ssim": ssim}

    def terms(self, fused, ir, vis, mask):
        m = mff_focus_mask(vis, ir, self.patch)
        grad_target = m * sobel_gradient(vis) + (1 - m) * sobel_gradient(ir)
        return {
            "mask_grad": F.l1_loss(sobel_gradient(fused), grad_target),
            "mask_pixel": F.l1_loss(fused, m * vis + (1 - m) * ir),
            "ssim": _mean_ssim_loss(fused, vis, ir),
        }


_LOSSES: dict[str, type[FusionLoss]] = {
    "bdl": BDLLoss,
    "max_grad_ssim": MaxGradSSIMLoss,
    "moe": MoELoss,
    "tc_moa_vif": TCMoAVIFLoss,
    "tc_moa_mef": TCMoAMEFLoss,
    "tc_moa_mff": TCMoAMFFLoss,
}


def list_fusion_losses() -> list[str]:
    """Names accepted by :func:`create_fusion_loss`."""
    return sorted(_LOSSES)


def create_fusion_loss(name: str, **kwargs) -> FusionLoss:
    """Build a composite fusion loss preset by name; ``None`` kwargs are dropped (preset defaults apply).

    Raises:
        bilevel.registry.UnknownNameError: unknown ``name``; the message lists the presets.
        ValueError: a negative or non-finite weight (a negative weight would maximise its term).
    """
    cls = lookup(_LOSSES, "fusion loss", name)
    loss = cls(**{k: v for k, v in kwargs.items() if v is not None})
    weights = {**loss.weights, **loss.extra_weights, "aux_weight": loss.aux_weight, "mir_weight": loss.mir_weight}
    for key, w in weights.items():
        if not (isinstance(w, (int, float)) and math.isfinite(w) and w >= 0):
            raise ValueError(f"fusion loss {name!r}: weight {key}={w!r} must be a finite number >= 0")
    return loss
