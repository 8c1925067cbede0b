"""fusion.colour: BT.601 constants, exact inverse, legacy flag and to_image modes (oracles: closed forms)."""

from __future__ import annotations

import pytest
import torch

from fusion.colour import as_rgb, luminance, rgb_to_ycbcr, to_image, ycbcr_to_rgb


def test_forward_constants_on_primaries() -> None:
    rgb = torch.eye(3).reshape(3, 3, 1, 1)  # pure red, green, blue as a batch of three 1x1 images
    ycc = rgb_to_ycbcr(rgb)[..., 0, 0]
    y = torch.tensor([0.299, 0.587, 0.114])
    torch.testing.assert_close(ycc[:, 0], y)
    torch.testing.assert_close(ycc[:, 1], (torch.tensor([0.0, 0.0, 1.0]) - y) * 0.564 + 0.5)  # Cb
    torch.testing.assert_close(ycc[:, 2], (torch.tensor([1.0, 0.0, 0.0]) - y) * 0.713 + 0.5)  # Cr


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_round_trip_exact(dtype: torch.dtype, device: torch.device) -> None:
    rgb = torch.rand(2, 3, 17, 9, dtype=dtype, device=device)
    back = ycbcr_to_rgb(rgb_to_ycbcr(rgb))
    assert (back - rgb).abs().max().item() < 1e-5


def test_legacy_inverse_differs_but_is_close() -> None:
    rgb = torch.rand(1, 3, 16, 16)
    ycc = rgb_to_ycbcr(rgb)
    legacy = ycbcr_to_rgb(ycc, legacy_inverse=True)
    err = (legacy - rgb).abs().max().item()
    assert 1e-5 < err < 2e-2  # the rounded constants are measurably, but only slightly, off
    # hand-computed legacy red channel: R = Y + 1.403 (Cr - 0.5)
    torch.testing.assert_close(legacy[:, 0], ycc[:, 0] + 1.403 * (ycc[:, 2] - 0.5))


def test_luminance_and_as_rgb() -> None:
    rgb = torch.rand(2, 3, 4, 5)
    torch.testing.assert_close(luminance(rgb)[:, 0], 0.299 * rgb[:, 0] + 0.587 * rgb[:, 1] + 0.114 * rgb[:, 2])
    grey = torch.rand(2, 1, 4, 5)
    assert luminance(grey) is grey
    assert as_rgb(grey).shape == (2, 3, 4, 5)
    assert torch.equal(as_rgb(grey)[:, 2], grey[:, 0])
    assert as_rgb(rgb) is rgb
    with pytest.raises(ValueError, match="channels|shape"):
        as_rgb(torch.rand(1, 2, 4, 4))


def test_to_image_y_takes_visible_chroma() -> None:
    vis = torch.rand(2, 3, 8, 8) * 0.6 + 0.2
    y = torch.rand(2, 1, 8, 8) * 0.6 + 0.2
    out = to_image(y, "y", vis, clamp=False)
    assert out.shape == vis.shape
    ycc_out, ycc_vis = rgb_to_ycbcr(out), rgb_to_ycbcr(vis)
    assert (ycc_out[:, :1] - y).abs().max() < 1e-5  # luminance is the net output
    assert (ycc_out[:, 1:] - ycc_vis[:, 1:]).abs().max() < 1e-5  # chroma is the visible chroma
    # feeding the visible luminance back reproduces the visible image
    assert (to_image(luminance(vis), "y", vis) - vis).abs().max() < 1e-5


def test_to_image_modes_and_clamp() -> None:
    grey_vis = torch.rand(1, 1, 6, 6)
    raw = torch.rand(1, 1, 6, 6) * 2 - 0.5
    out = to_image(raw, "grey", grey_vis)
    assert out.shape == (1, 1, 6, 6)
    torch.testing.assert_close(out, raw.clamp(0, 1))
    rgb_raw = torch.rand(1, 3, 6, 6)
    torch.testing.assert_close(to_image(rgb_raw, "rgb", grey_vis), luminance(rgb_raw))  # grey visible → grey
    torch.testing.assert_close(to_image(rgb_raw, "rgb", torch.rand(1, 3, 6, 6)), rgb_raw)
    assert not torch.equal(to_image(raw, "grey", grey_vis, clamp=False), out)


def test_to_image_errors() -> None:
    vis = torch.rand(1, 3, 4, 4)
    with pytest.raises(ValueError, match="out_space"):
        to_image(torch.rand(1, 1, 4, 4), "lab", vis)
    with pytest.raises(ValueError, match="expects"):
        to_image(torch.rand(1, 3, 4, 4), "y", vis)
    with pytest.raises(ValueError, match="expects"):
        to_image(torch.rand(1, 1, 4, 4), "rgb", vis)
