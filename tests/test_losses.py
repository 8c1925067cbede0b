"""Fusion losses: closed-form oracles, optima, an independent patch-wise MEF-SSIM, presets and their
checks."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from bilevel.registry import UnknownNameError
from fusion.colour import luminance
from fusion.losses import (
    boxes_to_mask,
    create_fusion_loss,
    cv_squared,
    gradient_max_loss,
    intensity_loss,
    list_fusion_losses,
    load_balance_loss,
    masked_pixel_loss,
    mef_ssim,
    mff_focus_mask,
    mir_loss,
    saliency_fallback,
    sobel_gradient,
    ssim_loss,
    tc_moa_max_grad_loss,
)

PRESETS = ("bdl", "max_grad_ssim", "moe", "tc_moa_vif", "tc_moa_mef", "tc_moa_mff")


def _pair(b=2, h=48, w=40, c=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(b, 1, h, w, generator=g), torch.rand(b, c, h, w, generator=g)


# -------------------------------------------------------------------------------------------- intensity
@pytest.mark.parametrize("target", ["max", "mean", "saliency"])
def test_intensity_zero_at_target(target):
    ir, vis = _pair(c=1)
    mask = torch.rand(2, 1, 48, 40)
    t = {"max": torch.maximum(ir, vis), "mean": (ir + vis) / 2, "saliency": mask * ir + (1 - mask) * vis}[
        target
    ]
    assert intensity_loss(t, ir, vis, target, mask=mask) == 0
    assert intensity_loss(t + 0.1, ir, vis, target, mask=mask) == pytest.approx(0.1, abs=1e-6)


def test_intensity_saliency_default_is_named_fallback():
    ir, vis = _pair(c=1)
    f = torch.rand_like(ir)
    m = saliency_fallback(ir)
    torch.testing.assert_close(
        intensity_loss(f, ir, vis, "saliency"), intensity_loss(f, ir, vis, "saliency", mask=m)
    )
    with pytest.raises(ValueError, match="target"):
        intensity_loss(f, ir, vis, "median")


def test_saliency_fallback_properties():
    ir = torch.zeros(2, 1, 33, 33)
    ir[0, 0, 10, 20] = 1.0
    ir[1] = 0.3  # flat
    m = saliency_fallback(ir)
    assert m.shape == (2, 1, 33, 33)
    assert m[0].min() == 0 and m[0].max() == 1
    assert divmod(int(m[0, 0].argmax()), 33) == (10, 20)
    assert torch.all(m[1] == 0.5)
    assert saliency_fallback(torch.rand(1, 3, 20, 20)).shape == (1, 1, 20, 20)


# --------------------------------------------------------------------------------------------- gradients
def test_sobel_on_a_ramp():
    a = 0.01
    x = (a * torch.arange(20.0)).expand(1, 1, 16, 20)
    g = sobel_gradient(x)
    torch.testing.assert_close(g[..., 1:-1, 1:-1], torch.full((1, 1, 14, 18), 8 * a))


def test_gradient_losses_zero_when_copying_the_textured_source():
    a = torch.rand(2, 3, 24, 24)
    b = torch.full_like(a, 0.4)
    assert gradient_max_loss(a, a, b) < 1e-6  # a flat source's Sobel response is 0 up to rounding
    assert tc_moa_max_grad_loss(a, a, b) < 1e-6 and tc_moa_max_grad_loss(a, b, a) < 1e-6
    assert gradient_max_loss(b, a, b) > 0.1


def test_mff_focus_mask_picks_the_sharp_half():
    sharp = torch.rand(1, 1, 32, 32)
    blurred = torch.full_like(sharp, 0.5)
    a = torch.cat((sharp[..., :16], blurred[..., 16:]), -1)
    b = torch.cat((blurred[..., :16], sharp[..., 16:]), -1)
    m = mff_focus_mask(a, b, patch=16)
    assert torch.all(m[..., :16] == 1) and torch.all(m[..., 16:] == 0)


def test_boxes_to_mask_and_masked_pixel():
    m = boxes_to_mask([torch.tensor([[1.0, 2.0, 4.0, 3.0]]), torch.zeros(0, 4)], (5, 6))
    assert m.shape == (2, 1, 5, 6) and m[0, 0, 2, 1:4].tolist() == [1, 1, 1] and m.sum() == 3
    a, b = torch.rand(2, 1, 5, 6), torch.rand(2, 1, 5, 6)
    optimum = m * torch.maximum(a, b) + (1 - m) * (a + b) / 2
    assert masked_pixel_loss(optimum, a, b, m) == 0


# -------------------------------------------------------------------------------------------- structural
def test_ssim_loss_zero_for_identical():
    x = torch.rand(2, 1, 32, 32)
    assert ssim_loss(x, x).abs() < 1e-6 and ssim_loss(x, torch.rand_like(x)) > 0.5


def _mef_ssim_patchwise(fused, a, b, win=11, sigma=1.5, c2=0.03**2, p=4.0):
    """Independent single-scale MEF-SSIM, literally per window: extract patches, build x̂, compare.

    Ma, Zeng & Wang 2015 with Gaussian-weighted patch statistics (float64, grey images (1,1,H,W)).
    """
    coords = torch.arange(win, dtype=torch.float64) - (win - 1) / 2
    g1 = torch.exp(-(coords**2) / (2 * sigma**2))
    wgt = torch.outer(g1, g1).flatten()
    wgt = wgt / wgt.sum()
    patches = [F.unfold(x.double(), win)[0].t() for x in (a, b, fused)]  # (L, win²)
    xa, xb, y = patches
    dot = lambda u, v: (wgt * u * v).sum(-1)
    mean = lambda u: (wgt * u).sum(-1, keepdim=True)
    ta, tb, ty = xa - mean(xa), xb - mean(xb), y - mean(y)
    ca, cb = dot(ta, ta).sqrt(), dot(tb, tb).sqrt()
    c_hat = torch.maximum(ca, cb)
    wa, wb = ca**p, cb**p
    s_bar = (wa[:, None] * ta / ca[:, None] + wb[:, None] * tb / cb[:, None]) / (wa + wb)[:, None]
    x_hat = c_hat[:, None] * s_bar / dot(s_bar, s_bar).sqrt()[:, None]
    q = (2 * dot(x_hat, ty) + c2) / (dot(x_hat, x_hat) + dot(ty, ty) + c2)
    return q.mean()


def test_mef_ssim_matches_patchwise_reference():
    g = torch.Generator().manual_seed(3)
    a = torch.rand(1, 1, 20, 24, generator=g, dtype=torch.float64)
    b = (0.3 * torch.rand(1, 1, 20, 24, generator=g, dtype=torch.float64) + 0.5).clamp(0, 1)
    fused = 0.5 * (a + b) + 0.05 * torch.rand(1, 1, 20, 24, generator=g, dtype=torch.float64)
    ours = mef_ssim(fused, a, b, levels=1, eps=1e-12)
    ref = _mef_ssim_patchwise(fused, a, b)
    assert ours.item() == pytest.approx(ref.item(), abs=1e-6)
    assert ours.item() < 0.99


def test_mef_ssim_identity_symmetry_and_batch():
    a = torch.rand(3, 3, 48, 48)
    b = torch.rand(3, 3, 48, 48) * 0.5
    torch.testing.assert_close(mef_ssim(a, a, a), torch.ones(3), atol=1e-4, rtol=0)
    torch.testing.assert_close(mef_ssim(b, a, b), mef_ssim(b, b, a))
    flat = torch.full_like(a, 0.6)
    torch.testing.assert_close(mef_ssim(a, flat, a), torch.ones(3), atol=1e-4, rtol=0)  # all structure from a
    batched = mef_ssim(b, a, b)
    assert batched.shape == (3,)
    torch.testing.assert_close(batched[1:2], mef_ssim(b[1:2], a[1:2], b[1:2]))
    with pytest.raises(ValueError, match="levels"):
        mef_ssim(torch.rand(1, 1, 30, 30), torch.rand(1, 1, 30, 30), torch.rand(1, 1, 30, 30))


def test_mef_ssim_gradcheck():
    g = torch.Generator().manual_seed(0)
    a = torch.rand(1, 1, 13, 13, generator=g, dtype=torch.float64)
    b = torch.rand(1, 1, 13, 13, generator=g, dtype=torch.float64)
    f = torch.rand(1, 1, 13, 13, generator=g, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x: mef_ssim(x, a, b, levels=1), (f,), fast_mode=True)


# --------------------------------------------------------------------------------------------- auxiliary
def test_cv_squared_and_balance():
    assert cv_squared(torch.ones(4)) == 0
    assert cv_squared(torch.tensor([1.0, 0, 0, 0])).item() == pytest.approx(4.0)  # var 0.25 / mean² 0.0625
    assert cv_squared(torch.tensor([3.0])) == 0
    assert load_balance_loss(torch.tensor([1.0, 0, 0, 0]), torch.ones(4)).item() == pytest.approx(4.0)


def test_mir_loss():
    assert mir_loss(torch.tensor([0.3]), torch.tensor([0.7])).item() == pytest.approx(0.0, abs=1e-7)
    assert mir_loss(torch.tensor([0.8]), torch.tensor([0.8]), "paper").item() == pytest.approx(0.6)
    assert mir_loss(torch.tensor([0.8]), torch.tensor([0.8]), "code").item() == pytest.approx(0.36)
    with pytest.raises(ValueError):
        mir_loss(torch.tensor([0.5]), torch.tensor([0.5]), "l2")


# ----------------------------------------------------------------------------------------------- presets
def test_preset_registry():
    assert set(list_fusion_losses()) == set(PRESETS)
    with pytest.raises(UnknownNameError, match="unknown fusion loss 'nope'.*tc_moa_vif"):
        create_fusion_loss("nope")


@pytest.mark.parametrize("name", PRESETS)
@pytest.mark.parametrize("channels", [1, 3])
def test_presets_finite_with_gradients(name, channels):
    ir, vis = _pair(h=48, w=48)
    fused = torch.rand(2, channels, 48, 48, requires_grad=True)
    aux = {"mir": torch.tensor(0.2), "balance": torch.tensor(0.01)}
    loss_fn = create_fusion_loss(name)
    out = loss_fn(fused, ir, vis, aux_losses=aux)
    assert torch.isfinite(out["loss"]) and out["loss"].dim() == 0
    plain = loss_fn(fused, ir, vis)["loss"]
    mir_w = 1.8 if name == "tc_moa_mef" else 1.0
    assert (out["loss"] - plain).item() == pytest.approx(mir_w * 0.2 + 0.01, rel=1e-5)
    assert out["aux_mir"] == 0.2
    out["loss"].backward()
    assert fused.grad is not None and fused.grad.abs().sum() > 0


def test_bdl_preset_optimum_and_mask_handling():
    ir, vis = _pair(c=3, h=32, w=32)
    m = torch.rand(2, 32, 32)
    y = luminance(vis)
    target = m.unsqueeze(1) * ir + (1 - m.unsqueeze(1)) * y
    loss_fn = create_fusion_loss("bdl")
    out = loss_fn(target, ir, vis, mask=m)
    assert out["l1"] == 0 and out["ssim"].abs() < 1e-5
    assert loss_fn(target, ir, vis)["l1"] > 0  # without a mask the IR-saliency fallback is the target
    with pytest.raises(TypeError, match="label"):
        loss_fn(target, ir, vis, mask=torch.zeros(2, 32, 32, dtype=torch.int64))
    with pytest.raises(ValueError, match="needs a saliency mask"):
        create_fusion_loss("bdl", mask_fallback="none")(target, ir, vis)


def test_max_grad_ssim_preset_parts_and_weights():
    ir, vis = _pair(c=1, h=32, w=32)
    fused = torch.rand(2, 1, 32, 32)
    out = create_fusion_loss("max_grad_ssim")(fused, ir, vis)
    expected = (
        intensity_loss(fused, ir, vis, "max")
        + 10 * gradient_max_loss(fused, ir, vis)
        + 0.5 * ssim_loss(fused, ir)
        + 0.5 * ssim_loss(fused, vis)
    )
    torch.testing.assert_close(out["loss"], expected)


def test_tc_moa_mef_weights():
    a, b = torch.rand(2, 3, 48, 48), torch.rand(2, 3, 48, 48)
    fused = torch.rand(2, 3, 48, 48)
    out = create_fusion_loss("tc_moa_mef")(fused, b, a)
    expected = 1.8 * (out["max_grad"] + 2 * (1 - mef_ssim(fused, a, b).mean()) + out["avg_pixel"])
    torch.testing.assert_close(out["loss"], expected)


def test_shape_checks_are_actionable():
    ir, vis = _pair(h=32, w=32)
    loss_fn = create_fusion_loss("max_grad_ssim")
    with pytest.raises(ValueError, match="fused must be"):
        loss_fn(torch.rand(2, 2, 32, 32), ir, vis)
    with pytest.raises(ValueError, match="sizes differ"):
        loss_fn(torch.rand(2, 1, 32, 30), ir, vis)


@pytest.mark.parametrize("name", ["bdl", "max_grad_ssim"])
def test_loss_is_fp32_under_bf16_autocast(name):
    """Inside a bf16 autocast region (the bi-level step's), the loss must equal its fp32 value: SSIM's
    variances computed in bf16 cancel catastrophically and once trained the BDL net towards noise."""
    ir, vis = _pair(h=64, w=64)
    fused = (0.5 * luminance(ir) + 0.5 * luminance(vis) + 0.01 * torch.randn(2, 1, 64, 64)).to(torch.bfloat16)
    loss = create_fusion_loss(name)
    reference = loss(fused.float(), ir, vis)["loss"]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        under_amp = loss(fused, ir, vis)["loss"]
    assert under_amp.dtype == torch.float32
    torch.testing.assert_close(under_amp, reference, rtol=1e-5, atol=1e-6)


def test_detail_and_contrast_terms_are_optional_parts_of_any_preset() -> None:
    from fusion.losses import create_fusion_loss, gradient_max_loss, intensity_loss

    g = torch.Generator().manual_seed(0)
    fused, ir, vis = (torch.rand(2, 1, 24, 24, generator=g) for _ in range(3))
    plain = create_fusion_loss("bdl")(fused, ir, vis)
    assert "detail" not in plain and "contrast" not in plain
    rich = create_fusion_loss("bdl", detail=10.0, contrast=2.0)(fused, ir, vis)
    torch.testing.assert_close(rich["detail"], gradient_max_loss(fused, ir, vis))
    torch.testing.assert_close(rich["contrast"], intensity_loss(fused, ir, vis, "max"))
    torch.testing.assert_close(rich["loss"], plain["loss"] + 10.0 * rich["detail"] + 2.0 * rich["contrast"])
    # the fused image equal to the brighter source with its edges costs no contrast
    assert float(create_fusion_loss("moe", contrast=1.0)(torch.maximum(ir, vis), ir, vis)["contrast"]) == 0.0
