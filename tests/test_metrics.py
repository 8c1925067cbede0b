"""Property tests of the fusion metrics: closed forms, invariances, registry, profiles, devices.

Oracles are closed-form values, independent library implementations (scikit-image SSIM, pytorch-msssim)
and the per-image NumPy/SciPy evaluator of ``experiments/bench_metrics.py`` (CDDFuse conventions).
"""

from __future__ import annotations

import collections
import contextlib
import math

import numpy as np
import pytest
import torch

import fusion.metrics as M
from bilevel.registry import UnknownNameError
from fusion.metrics import ProfileError, compute_metrics, get_metric, list_metrics

CANONICAL = ["EN", "SD", "SF", "AG", "EI", "MI", "NMI", "FMI", "FMI_pixel", "FMI_dct", "FMI_wavelet", "SCD", "CC", "PSNR", "MSE", "RMSE", "CE", "VIF", "VIFF", "Qabf", "Nabf", "SSIM", "MS_SSIM", "Qcb", "Qcv", "Q0", "Qw", "Qe", "Qy", "Qncie", "Qp", "Qc", "TE", "MEF_SSIM"]
LOWER_IS_BETTER = {"CE", "MSE", "RMSE", "Nabf", "Qcv"}
SYMMETRIC = ["MI", "NMI", "SCD", "CC", "PSNR", "MSE", "RMSE", "CE", "VIF", "Qabf", "Nabf", "SSIM", "Qcb", "Qcv", "Q0", "Qw", "Qe"]


def textured(h: int = 72, w: int = 72, seed: int = 0, batch: int = 1, channels: int = 1) -> torch.Tensor:
    """Smooth random texture in [0.1, 0.9] (float64), so windows have structure and no clipping."""
    g = torch.Generator().manual_seed(seed)
    coarse = torch.rand(batch, channels, h // 8 + 1, w // 8 + 1, generator=g, dtype=torch.float64)
    x = torch.nn.functional.interpolate(coarse, size=(h, w), mode="bilinear", align_corners=True)
    x = x + 0.15 * torch.rand(batch, channels, h, w, generator=g, dtype=torch.float64)
    x = (x - x.amin()) / (x.amax() - x.amin())
    return 0.1 + 0.8 * x


def value(name: str, f, a, b, profile: str = "reference") -> float:
    out = get_metric(name)(f, a, b, profile=profile)
    assert out.shape == (f.shape[0] if f.dim() == 4 else 1,)
    return out[0].item()


# ----------------------------------------------------------------------------------------- registry
def test_registry_names_and_directions():
    assert list_metrics(implemented_only=False) == CANONICAL
    for name in CANONICAL:
        assert get_metric(name).higher_is_better == (name not in LOWER_IS_BETTER)
        assert get_metric(name.lower()).name == name
        assert get_metric(name.upper()).name == name
    assert M.higher_is_better("qcv") is False


def test_unknown_metric_lists_valid_names():
    with pytest.raises(KeyError, match="Qabf"):
        get_metric("nope")


def test_required_metrics_are_implemented():
    required = "EN SD SF AG EI MI NMI SCD CC PSNR MSE RMSE CE VIF Qabf Nabf SSIM MS_SSIM Qcb Qcv Q0 Qw Qe"
    implemented = set(list_metrics())
    assert set(required.split()) <= implemented


@pytest.mark.parametrize("name", ["FMI_wavelet"])
def test_unimplemented_metrics_raise(name):
    x = textured()
    assert name not in list_metrics()
    with pytest.raises(NotImplementedError, match=name):
        get_metric(name)(x, x, x)


def test_profile_errors():
    x = textured()
    with pytest.raises(ProfileError, match="vifb"):
        M.vif(x, x, x, profile="vifb")  # VIFB has no VIF
    with pytest.raises(UnknownNameError, match="valid names"):
        M.en(x, x, x, profile="nope")
    assert "VIF" not in list_metrics("vifb")
    assert set(list_metrics("vifb")) == {
        "EN", "SD", "SF", "AG", "EI", "MI", "PSNR", "RMSE", "CE", "Qabf", "SSIM", "Qcb", "Qcv"
    }


def test_compute_metrics_and_module():
    f, a, b = textured(seed=1, batch=3), textured(seed=2), textured(seed=3)
    out = compute_metrics(f, a, b, "en, SSIM ,qabf")
    assert list(out) == ["EN", "SSIM", "Qabf"]
    assert all(v.shape == (3,) for v in out.values())
    mod = M.FusionMetric("ssim")
    assert torch.allclose(mod(f, a, b), out["SSIM"])
    assert "SSIM" in repr(mod)
    big = textured(176, 176, seed=1)  # MS-SSIM needs sides > 160
    every = compute_metrics(big, big.flip(-1), big.flip(-2))
    assert set(every) == set(list_metrics("reference"))
    assert all(torch.isfinite(v).all() for k, v in every.items()), every


def test_compute_metrics_records_a_metric_that_cannot_run_and_keeps_the_others():
    f, a, b = textured(seed=1, batch=2), textured(seed=2), textured(seed=3)  # 64 px: MS-SSIM needs > 160
    with pytest.raises(ValueError, match="MS_SSIM"):
        compute_metrics(f, a, b, "EN,MS_SSIM")
    failures: dict[str, str] = {}
    out = compute_metrics(f, a, b, "EN,MS_SSIM", failures=failures)
    assert list(out) == ["EN", "MS_SSIM"] and list(failures) == ["MS_SSIM"]
    assert "MS_SSIM" in failures["MS_SSIM"]
    assert torch.isnan(out["MS_SSIM"]).all() and out["MS_SSIM"].shape == (2,)
    assert torch.equal(out["EN"], compute_metrics(f, a, b, "EN")["EN"])


def test_batch_and_broadcast_consistency():
    f, a, b = textured(seed=1, batch=3), textured(seed=2), textured(seed=3)
    names = [n for n in list_metrics("reference") if n not in ("MS_SSIM", "MEF_SSIM")]
    batched = compute_metrics(f, a, b, names)
    for i in range(3):
        single = compute_metrics(f[i : i + 1], a.expand(1, -1, -1, -1), b, names)
        for n in names:
            rtol = 1e-6 if n in ("SSIM", "Qabf") else 1e-9  # float32 CPU path (see fusion.metrics._utils)
            assert torch.allclose(batched[n][i], single[n][0], rtol=rtol, atol=1e-12), n


def test_shape_errors():
    x = textured()
    with pytest.raises(ValueError, match="spatial size"):
        M.mi(x, textured(32, 32), x)
    with pytest.raises(ValueError):
        M.sd(torch.rand(1, 2, 8, 8), x, x)


# ----------------------------------------------------------------------------------------- closed forms
def two_level(h: int = 32, w: int = 32) -> torch.Tensor:
    x = torch.zeros(1, 1, h, w, dtype=torch.float64)
    x[..., :, w // 2 :] = 1.0
    return x


@pytest.mark.parametrize("profile", ["reference", "vifb", "tang", "cddfuse"])
def test_en_closed_forms(profile):
    x = two_level()
    assert value("EN", x, x, x, profile) == pytest.approx(1.0, abs=1e-12)
    assert value("EN", torch.full_like(x, 0.3), x, x, profile) == pytest.approx(0.0, abs=1e-12)
    ramp = (torch.arange(256, dtype=torch.float64) / 255).repeat(4, 1)[None, None]
    assert value("EN", ramp, ramp, ramp, profile) == pytest.approx(8.0, abs=1e-12)


def test_sd_closed_form_and_scaling():
    x = two_level()
    assert value("SD", x, x, x) == pytest.approx(127.5)
    assert value("SD", x, x, x, "vifb") == pytest.approx(127.5)
    t = textured()
    assert value("SD", 0.5 * t, t, t) == pytest.approx(0.5 * value("SD", t, t, t), rel=1e-12)


def test_sf_closed_forms():
    h, w = 16, 20
    stripes = (torch.arange(w) % 2).to(torch.float64).expand(1, 1, h, w)
    assert value("SF", stripes, stripes, stripes) == pytest.approx(255.0)
    # VIFB places R, G, B side by side: constant channels 0, 1, 0 give two seams of 255 per row
    rgb = torch.zeros(1, 3, h, w, dtype=torch.float64)
    rgb[:, 1] = 1.0
    assert value("SF", rgb, rgb, rgb, "vifb") == pytest.approx(255 * math.sqrt(2 * h / (h * 3 * w)))
    assert value("SF", rgb, rgb, rgb, "reference") == pytest.approx(0.0, abs=1e-12)


def test_ag_and_ei_closed_forms():
    h, w, c = 12, 16, 2.0 / 255
    ramp = (torch.arange(w, dtype=torch.float64) * c).expand(1, 1, h, w)
    expected_ag = h * w * (2.0 / math.sqrt(2)) / ((h - 1) * (w - 1))
    assert value("AG", ramp, ramp, ramp) == pytest.approx(expected_ag)
    assert value("AG", ramp, ramp, ramp, "cddfuse") == pytest.approx(2.0 / math.sqrt(2))
    # Sobel response 8·2 inside, 4·2 on the replicated border columns
    expected_ei = (16.0 * (w - 2) + 8.0 * 2) / w
    assert value("EI", ramp, ramp, ramp) == pytest.approx(expected_ei)
    assert value("EI", torch.full_like(ramp, 0.4), ramp, ramp) == pytest.approx(0.0, abs=1e-12)


def test_mi_nmi_ce_closed_forms():
    x = two_level()
    const = torch.full_like(x, 0.5)
    assert value("MI", x, x, const) == pytest.approx(1.0)  # H(A) bits + 0
    assert value("MI", x, x, const, "vifb") == pytest.approx(math.log(2))  # nats
    assert value("MI", x, x, const, "cddfuse") == pytest.approx(math.log(2))
    assert value("NMI", x, x, x) == pytest.approx(2.0)
    assert value("CE", x, x, x) == pytest.approx(0.0, abs=1e-12)
    # p_A = (½, ½), p_F = (¼, ¾) on the same two levels: ½·log2(2) + ½·log2(2/3)
    f = x.clone()
    f[..., : f.shape[-2] // 2, : f.shape[-1] // 2] = 1.0
    expected = 0.5 * math.log2(0.5 / 0.25) + 0.5 * math.log2(0.5 / 0.75)  # same for A and B
    assert value("CE", f, x, x) == pytest.approx(expected)


def test_mi_tang_merges_top_levels():
    x = two_level() * (254 / 255)
    y = two_level()
    assert value("MI", y, x, x) == pytest.approx(2.0)
    assert value("MI", torch.full_like(x, 254 / 255) + (y - x), x, x, "tang") == pytest.approx(0.0, abs=1e-12)


def test_similarity_closed_forms():
    a = torch.full((1, 1, 8, 8), 0.5, dtype=torch.float64)
    b = a + 10 / 255
    f = a.clone()
    assert value("MSE", f, a, b) == pytest.approx(50.0)
    assert value("RMSE", f, a, b) == pytest.approx(math.sqrt(50.0))
    assert value("PSNR", f, a, b) == pytest.approx(10 * math.log10(255**2 / 50))
    assert value("MSE", f, a, b, "tang") == pytest.approx(50.0 / 255**2)
    assert value("PSNR", f, a, b, "tang") == pytest.approx(10 * math.log10(255**2 / 50) + 20 * math.log10(255))
    # VIFB's r = ½(0 + √(64·100))/64 = 0.625 per channel
    assert value("RMSE", f, a, b, "vifb") == pytest.approx(0.625)
    assert value("PSNR", f, a, b, "vifb") == pytest.approx(20 * math.log10(255 / math.sqrt(0.625)))
    t = textured()
    assert value("CC", t, t, t) == pytest.approx(1.0)
    u, v = textured(seed=40), textured(seed=41)
    # corr(F − B, A) + corr(F − A, B) is invariant to a common gain and offset
    assert value("SCD", 0.5 * t + 0.2, 0.5 * u + 0.2, 0.5 * v + 0.2) == pytest.approx(value("SCD", t, u, v), rel=1e-9)
    assert value("SCD", u + v, u, v) == pytest.approx(2.0)


@pytest.mark.parametrize(
    "name, expected",
    [("SSIM", 2.0), ("MS_SSIM", 2.0), ("VIF", 2.0), ("Q0", 1.0), ("Qw", 1.0), ("Qe", 1.0), ("Qcb", 1.0),
     ("Qcv", 0.0), ("Nabf", 0.0), ("CE", 0.0), ("NMI", 2.0)],
)
def test_identical_inputs(name, expected):
    size = 176 if name == "MS_SSIM" else 72
    t = textured(size, size, seed=4)
    assert value(name, t, t, t) == pytest.approx(expected, abs=1e-5)


def test_qabf_identical_inputs_closed_form():
    t = textured(seed=5)
    per_pixel = 0.9994 / (1 + math.exp(-15 * 0.5)) * 0.9879 / (1 + math.exp(-22 * 0.2))
    assert value("Qabf", t, t, t) == pytest.approx(per_pixel, rel=1e-6)


@pytest.mark.parametrize("name", SYMMETRIC)
def test_source_symmetry(name):
    f, a, b = textured(seed=6), textured(seed=7), textured(seed=8)
    assert value(name, f, a, b) == pytest.approx(value(name, f, b, a), rel=1e-9, abs=1e-12)


@pytest.mark.parametrize("name", ["Qabf", "SCD", "CC", "SSIM", "Q0", "Qw", "VIF"])
def test_unit_range(name):
    f, a, b = textured(seed=9), textured(seed=10), textured(seed=11)
    v = value(name, f, a, b)
    upper = 2.0 if name in ("SSIM", "VIF", "SCD") else 1.0
    assert -upper <= v <= upper + 1e-9


@pytest.mark.parametrize("name", ["Qabf", "SD", "SF", "AG", "EI"])
def test_scaling(name):
    f, a, b = textured(seed=12), textured(seed=13), textured(seed=14)
    k = 0.5
    base, scaled = value(name, f, a, b), value(name, k * f, k * a, k * b)
    assert scaled == pytest.approx(base if name == "Qabf" else k * base, rel=1e-6)


def test_ssim_matches_scikit_image():
    skm = pytest.importorskip("skimage.metrics")
    f, a, b = textured(48, 56, seed=15), textured(48, 56, seed=16), textured(48, 56, seed=17)
    ff, aa, bb = (x[0, 0].numpy() * 255 for x in (f, a, b))
    kw = {"gaussian_weights": True, "sigma": 1.5, "use_sample_covariance": False, "data_range": 255}
    expected = skm.structural_similarity(ff, aa, **kw) + skm.structural_similarity(ff, bb, **kw)
    assert value("SSIM", f, a, b) == pytest.approx(expected, rel=1e-5)


def test_ms_ssim_matches_pytorch_msssim():
    pm = pytest.importorskip("pytorch_msssim")
    f, a, b = textured(176, 192, seed=18), textured(176, 192, seed=19), textured(176, 192, seed=20)
    # pytorch-msssim builds its window in float32 (≈1e-5 relative effect here): give it the float64 one
    win = M._utils.gaussian_1d(11, 1.5).view(1, 1, 1, 11)
    expected = sum(
        pm.ms_ssim(f * 255, x * 255, data_range=255, size_average=False, win=win).item() for x in (a, b)
    )
    assert value("MS_SSIM", f, a, b) == pytest.approx(expected, rel=1e-6)
    with pytest.raises(ValueError, match="160"):
        M.ms_ssim(f[..., :100, :100], a[..., :100, :100], b[..., :100, :100])
    with pytest.raises(ValueError, match="65"):
        M.vif(f[..., :64, :], a[..., :64, :], b[..., :64, :])


@pytest.mark.parametrize("name", ["EN", "SD", "SF", "AG", "MI", "SCD", "VIF", "Qabf", "SSIM"])
def test_cddfuse_profile_matches_numpy_evaluator(name):
    from experiments.bench_metrics import BASELINE

    f, a, b = (torch.round(textured(66, 72, seed=s) * 255) / 255 for s in (21, 22, 23))
    expected = BASELINE[name](*(x[0, 0].numpy() * 255 for x in (f, a, b)))
    assert value(name, f, a, b, "cddfuse") == pytest.approx(expected, rel=1e-7, abs=1e-10)


def test_vifb_grey_source_is_replicated():
    f, a, b = textured(seed=24, channels=3), textured(seed=25), textured(seed=26, channels=3)
    for name in list_metrics("vifb"):
        direct = get_metric(name)(f, a, b, profile="vifb")
        replicated = get_metric(name)(f, a.expand(-1, 3, -1, -1), b, profile="vifb")
        assert torch.allclose(direct, replicated, rtol=1e-12), name


def test_reference_uses_bt601_luma():
    rgb = textured(seed=27, channels=3)
    y = (0.299 * rgb[:, 0] + 0.587 * rgb[:, 1] + 0.114 * rgb[:, 2])[:, None]
    assert value("SD", rgb, rgb, rgb) == pytest.approx(value("SD", y, y, y), rel=1e-12)


def test_nabf_counts_only_new_gradients():
    a = textured(seed=28)
    flat = torch.full_like(a, 0.5)
    assert value("Nabf", a, a, flat) == pytest.approx(0.0, abs=1e-12)  # F never exceeds A's gradient
    noisy = (a + 0.2 * textured(seed=29)).clamp(0, 1)
    assert value("Nabf", noisy, a, flat) > 0


def test_mef_ssim_wrapper():
    losses = pytest.importorskip("fusion.losses")
    if not hasattr(losses, "mef_ssim"):
        pytest.skip("fusion.losses.mef_ssim not available")
    t = textured(72, 72, seed=30)
    assert value("MEF_SSIM", t, t, t) == pytest.approx(1.0, abs=1e-3)
    assert value("MEF_SSIM", textured(72, 72, seed=31), t, t) < 0.99


def test_devices(device):
    f, a, b = textured(seed=32, batch=2), textured(seed=33), textured(seed=34)
    names = [n for n in list_metrics("reference") if n not in ("MS_SSIM", "MEF_SSIM")]
    cpu = compute_metrics(f, a, b, names)
    dev = compute_metrics(f.to(device), a.to(device), b.to(device), names)
    for n in names:
        assert dev[n].device.type == device.type
        assert torch.allclose(dev[n].cpu(), cpu[n], rtol=1e-5, atol=1e-8), n
    vifb = compute_metrics(f.to(device), a.to(device), b.to(device), list_metrics("vifb"), profile="vifb")
    assert all(v.shape == (2,) for v in vifb.values())


@pytest.mark.parametrize("step", [1, 2])
def test_separable_filter_matches_2d_correlation(step):
    """The shift-and-add filter equals SciPy's direct 2-D 'valid' correlation with k ⊗ k (then decimated)."""
    from scipy.signal import correlate2d

    from fusion.metrics._utils import gaussian_1d, separable_filter

    x = torch.rand(2, 3, 37, 41, dtype=torch.float64, generator=torch.Generator().manual_seed(5)) * 255
    k = gaussian_1d(9, 1.8)
    got = separable_filter(x, k, step=step)
    k2 = (k[:, None] * k[None, :]).numpy()
    for i in range(2):
        for c in range(3):
            ref = correlate2d(x[i, c].numpy(), k2, mode="valid")[::step, ::step]
            assert got[i, c].numpy() == pytest.approx(ref, rel=1e-12, abs=1e-10)


@pytest.mark.parametrize("n", [2, 3, 4, 9, 17])
@pytest.mark.parametrize("width", [40, 41])
def test_decimating_filter_is_the_full_filter_subsampled_to_the_bit(n, width):
    """Filter-and-decimate (the horizontal taps read the column phases) sums the same products in the same
    order as the full 'valid' filter, so its outputs are the full filter's even rows and columns exactly."""
    from fusion.metrics._utils import gaussian_1d, separable_filter

    x = torch.rand(2, 3, 37, width, dtype=torch.float64, generator=torch.Generator().manual_seed(7)) * 255
    k = gaussian_1d(n, n / 5)
    assert torch.equal(separable_filter(x, k, step=2), separable_filter(x, k, step=1)[..., ::2, ::2])


@pytest.mark.parametrize("n", [3, 4, 9, 17])
def test_banded_filter_matches_shift_and_add(n):
    """The GPU float64 path (products with banded matrices) gives the shift-and-add's 'valid' outputs for
    both steps, to float64 round-off."""
    from fusion.metrics._utils import banded_filter, gaussian_1d, separable_filter

    x = torch.rand(2, 3, 37, 50, dtype=torch.float64, generator=torch.Generator().manual_seed(6)) * 255
    k = gaussian_1d(n, n / 5)
    for step in (1, 2):
        assert torch.allclose(banded_filter(x, k, step), separable_filter(x, k, step), rtol=0, atol=1e-11)


def test_metrics_through_banded_filters_equal_the_default_path(monkeypatch):
    """Every metric gives the same value when its shift-and-add windows go through the banded products (as
    on an A100/H100) — flat patches included, where VIF's ε rules meet round-off."""
    from fusion.metrics import _utils

    f, a, b = (textured(168, 176, seed=s, batch=2 if s == 40 else 1) for s in (40, 41, 42))
    for t in (f, a, b):
        t[..., 20:60, 8:70] = 0.5
    profiles = {p: [n for n in list_metrics(p) if n != "MEF_SSIM"] for p in ("reference", "cddfuse")}
    default = {p: compute_metrics(f, a, b, names, profile=p) for p, names in profiles.items()}
    monkeypatch.setattr(_utils, "fast_float64_matmul", lambda device: True)
    for p, names in profiles.items():
        banded = compute_metrics(f, a, b, names, profile=p)
        for n in names:
            assert torch.allclose(banded[n], default[p][n], rtol=1e-10, atol=1e-12), (p, n)


def test_banded_filters_on_a_vifb_pair(monkeypatch, shared_data):
    """On real images (near-flat sky, saturated lamps) the banded products move VIF, VIFF and Qp by round-off
    only: well inside the 4 decimals the metrics are reported with."""
    from PIL import Image

    from fusion.metrics import _utils

    root = shared_data("vifb")
    grey = lambda p: torch.from_numpy(np.asarray(Image.open(p).convert("L"), dtype=np.float64) / 255)[None, None]
    f, a, b = (grey(root / d / "carLight.jpg") for d in ("fused/ADF", "ir", "vi"))
    names = ["VIF", "VIFF", "Qp"]
    default = compute_metrics(f, a, b, names)
    monkeypatch.setattr(_utils, "fast_float64_matmul", lambda device: True)
    banded = compute_metrics(f, a, b, names)
    for n in names:
        assert torch.allclose(banded[n], default[n], rtol=1e-8, atol=0), n


@pytest.mark.parametrize("n", [1, 2, 3, 7, 8, 11])
def test_window_sums_are_exact_moving_sums(n):
    """Doubling gives exactly the moving sums of integer data along either axis, for any window length."""
    from fusion.metrics._utils import box_filter_valid, window_sums

    x = torch.randint(0, 256, (2, 1, 23, 29), generator=torch.Generator().manual_seed(n)).to(torch.float64)
    original = x.clone()
    for dim in (-2, -1):
        sums = window_sums(x, n, dim)
        assert torch.equal(sums, x.unfold(dim, n, 1).sum(-1))
        sums.add_(1)  # a fresh tensor, which callers may modify in place (n = 1 must not alias x)
        assert torch.equal(x, original)
    box = x.unfold(-2, n, 1).unfold(-2, n, 1).sum(dim=(-2, -1)) / (n * n)
    assert torch.equal(box_filter_valid(x, n), box)
    # float32 sums of centred uint8 products are exact: the same float64 result, extremes included
    x[..., :n, :n] = 255.0
    for p, q in ((x, x), (x, 255 - x)):
        prod = (p - 127.5) * (q - 127.5)
        assert torch.equal(box_filter_valid(prod.float(), n), box_filter_valid(prod, n))


def test_cddfuse_ssim_float32_sums_change_nothing(monkeypatch):
    """The cddfuse SSIM's float32 window sums give the value of float64 sums to the bit (flat patches too)."""
    from fusion.metrics import structural

    f, a, b = (torch.round(textured(70, 90, seed=s) * 255) / 255 for s in (31, 32, 33))
    f[..., :20, :30], a[..., :20, :30], b[..., 5:25, :30] = 1.0, 0.0, 0.5
    fast = value("SSIM", f, a, b, "cddfuse")
    sums64 = structural.box_filter_valid
    monkeypatch.setattr(structural, "box_filter_valid", lambda t, n: sums64(t.to(torch.float64), n))
    assert value("SSIM", f, a, b, "cddfuse") == fast


@pytest.mark.parametrize(
    ("batch_a", "batch_b", "chunks", "profile"),
    [(5, 5, 5, "cddfuse"), (1, 1, 3, "reference"), (5, 1, 3, "reference"), (1, 5, 3, "reference"),
     (1, 1, 3, "mefb"), (5, 1, 3, "mefb")],
)
def test_compute_metrics_chunks_give_the_batch_values(monkeypatch, batch_a, batch_b, chunks, profile):
    """CPU chunking changes no value: distinct pairs go one pair per chunk; fused images against a source
    of batch 1 two per chunk (the last one alone), that source whole in every chunk and its own terms
    computed once (:func:`fusion.metrics.profiles.shared_sources`)."""
    from fusion.metrics import registry

    monkeypatch.setattr(registry, "CPU_CHUNK_PIXELS", 72 * 72)  # one 72 px image
    calls = []
    monkeypatch.setattr(registry, "shared_preparation", lambda: calls.append(1) or contextlib.nullcontext())
    f = textured(seed=35, batch=5)
    a, b = textured(seed=36, batch=batch_a), textured(seed=37, batch=batch_b)
    every = ["EN", "MI", "VIF", "VIFF", "Qabf", "Nabf", "SSIM", "Qcb", "Qcv", "Qc", "Qy", "Qw", "Qp", "MEF_SSIM", "FMI"]
    names = [n for n in every if profile in get_metric(n).profiles]
    chunked = compute_metrics(f, a, b, names, profile=profile)
    assert len(calls) == chunks
    whole = {n: get_metric(n)(f, a, b, profile=profile) for n in names}
    for n in names:
        # the reference SSIM takes its Gaussian moments in float32 on CPU: the depthwise convolution's
        # rounding depends on how many images it filters at once (the documented ~1e-7)
        rtol = 1e-6 if (n, profile) == ("SSIM", "reference") else 1e-13
        assert chunked[n].shape == (5,)
        assert torch.allclose(chunked[n], whole[n], rtol=rtol, atol=0, equal_nan=True), n  # MEF_SSIM: Q_l < 0


@pytest.mark.parametrize(("batch_a", "calls"), [(1, 2), (5, 4)])
def test_shared_sources_are_worked_once(monkeypatch, batch_a, calls):
    """Five fused images in three chunks: a source of batch 1 has its own terms computed once for the whole
    batch; a source of batch 5 is sliced per chunk and computes them in each (3 + 1 calls per metric; terms
    of both sources, MEF-SSIM's, in every chunk)."""
    from fusion.metrics import perceptual, registry, structural, windowed

    monkeypatch.setattr(registry, "CPU_CHUNK_PIXELS", 72 * 72)  # one 72 px image
    counts: collections.Counter = collections.Counter()

    def count(module, name):
        original = getattr(module, name)
        monkeypatch.setattr(module, name, lambda *args: counts.update([name]) or original(*args))

    count(perceptual, "_qcv_source")
    count(structural, "_vif_source_scales")
    count(windowed, "_mef_source_terms")  # three scales, of both sources at once
    f = textured(seed=35, batch=5)
    a, b = textured(seed=36, batch=batch_a), textured(seed=37)
    compute_metrics(f, a, b, ["Qcv", "VIF"])
    compute_metrics(f, a, b, ["MEF_SSIM"], profile="mefb")
    assert counts == {"_qcv_source": calls, "_vif_source_scales": calls,
                      "_mef_source_terms": 3 if batch_a == 1 else 9}
    counts.clear()
    get_metric("Qcv")(f, a, b)  # outside compute_metrics nothing is kept
    get_metric("Qcv")(f, a, b)
    assert counts == {"_qcv_source": 4}


@pytest.mark.parametrize("scale", [8128.0, 1e30])
def test_vif_log_sum_equals_the_sum_of_logs(scale) -> None:
    """VIF's grouped-product log sum against the plain sum of logs: the VIF range (arguments up to
    1 + 127.5²/2), and arguments so large that products of 16 overflow (the fallback). 61×67 pixels leave a
    remainder after the groups of 16."""
    from fusion.metrics.structural import _log10_sum

    v = 1 + torch.rand(2, 3, 61, 67, dtype=torch.float64, generator=torch.Generator().manual_seed(0)) * scale
    expected = v.log10().sum(dim=(-2, -1))
    torch.testing.assert_close(_log10_sum(v), expected, rtol=1e-13, atol=0)


def test_reference_qabf_is_float64(monkeypatch):
    """Unquantised grey levels: the reference Qabf is the float64 value on every device (a float32 path
    merges nearly equal levels and flips branches); the uint8 profiles may use float32 on the CPU."""
    from fusion.metrics import edges

    f, a, b = textured(seed=41, channels=3), textured(seed=42, channels=3), textured(seed=43, channels=3)
    b[..., :24, :] = f[..., :24, :] + 1e-7   # levels float32 cannot tell apart from f's
    default = value("Qabf", f, a, b)
    monkeypatch.setattr(edges, "window_dtype", lambda device: torch.float64)
    assert value("Qabf", f, a, b) == default


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_qabf_angle_is_atan_of_the_ratio(dtype):
    """atan2(Sy·Sx + t, Sx²) is the reference's atan(Sy/Sx), with +π/2 wherever Sx = 0 (Sy = 0 included)."""
    from fusion.metrics.edges import _angle

    g = torch.Generator().manual_seed(7)
    sx, sy = (torch.randint(-1020, 1021, (4096,), generator=g).to(dtype) for _ in range(2))
    sx[:300], sy[200:400] = 0, 0            # Sx = 0 with and without Sy, and Sy = 0 alone
    got = _angle(sx, sy, sx * sx).double()
    ref = torch.atan(sy.double() / sx.double()).masked_fill_(sx == 0, math.pi / 2)
    assert torch.all(got[sx == 0] == torch.tensor(math.pi / 2, dtype=dtype).double())
    assert (got - ref).abs().max() <= 4 * torch.finfo(dtype).eps
