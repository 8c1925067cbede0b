"""Colour handling shared by every fusion net: BT.601 YCbCr with an exact inverse.

Fusion nets in the infrared/visible literature fuse the visible *luminance* with the infrared image and
put the visible chroma back afterwards. The forward constants are the ones used by BDL, SeAFusion and most
released code (contracts.md "Images"); the inverse here is the exact algebraic inverse of that forward
transform, so a round trip is lossless to float precision. The literature's rounded inverse
(1.403, -0.714, -0.344, 1.773) is available only with ``legacy_inverse=True`` for reproducing old numbers.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = [
    "KB",
    "KG",
    "KR",
    "OUT_SPACES",
    "as_rgb",
    "luminance",
    "rgb_to_ycbcr",
    "to_image",
    "ycbcr_to_rgb",
]

KR, KG, KB = 0.299, 0.587, 0.114
CR_SCALE, CB_SCALE = 0.713, 0.564  # Cr = (R - Y) * 0.713 + 0.5, Cb = (B - Y) * 0.564 + 0.5
OUT_SPACES = ("y", "grey", "rgb")


def _check_channels(x: Tensor, channels: int, what: str) -> None:
    if x.dim() < 3 or x.shape[-3] != channels:
        raise ValueError(f"{what} expects a (..., {channels}, H, W) tensor, got shape {tuple(x.shape)}")


def rgb_to_ycbcr(rgb: Tensor) -> Tensor:
    """RGB in [0, 1] → channels (Y, Cb, Cr), BT.601 luma with chroma offset 0.5.

    Shape: (..., 3, H, W) → (..., 3, H, W).
    """
    _check_channels(rgb, 3, "rgb_to_ycbcr")
    r, g, b = rgb.unbind(dim=-3)
    y = KR * r + KG * g + KB * b
    cb = (b - y) * CB_SCALE + 0.5
    cr = (r - y) * CR_SCALE + 0.5
    return torch.stack((y, cb, cr), dim=-3)


def ycbcr_to_rgb(ycbcr: Tensor, *, legacy_inverse: bool = False) -> Tensor:
    """Inverse of :func:`rgb_to_ycbcr` on channels (Y, Cb, Cr).

    The exact inverse uses 1/0.713 and 1/0.564; ``legacy_inverse=True`` uses the rounded constants
    R = Y + 1.403 Cr', G = Y - 0.714 Cr' - 0.344 Cb', B = Y + 1.773 Cb' that most released code ships.
    """
    _check_channels(ycbcr, 3, "ycbcr_to_rgb")
    y, cb, cr = ycbcr.unbind(dim=-3)
    cb = cb - 0.5
    cr = cr - 0.5
    if legacy_inverse:
        r = y + 1.403 * cr
        g = y - 0.714 * cr - 0.344 * cb
        b = y + 1.773 * cb
    else:
        r = y + cr / CR_SCALE
        b = y + cb / CB_SCALE
        g = (y - KR * r - KB * b) / KG
    return torch.stack((r, g, b), dim=-3)


def luminance(image: Tensor) -> Tensor:
    """Y channel of an RGB image, or the image itself when it is already grey. Shape (..., 1, H, W)."""
    if image.shape[-3] == 1:
        return image
    _check_channels(image, 3, "luminance")
    r, g, b = image.unbind(dim=-3)
    return (KR * r + KG * g + KB * b).unsqueeze(-3)


def as_rgb(image: Tensor) -> Tensor:
    """Repeat a grey image to 3 channels; RGB passes through. Used to feed RGB-only constraint nets."""
    if image.shape[-3] == 3:
        return image
    _check_channels(image, 1, "as_rgb")
    return image.expand(*image.shape[:-3], 3, *image.shape[-2:])


def to_image(raw: Tensor, out_space: str, vis: Tensor, *, clamp: bool = True,
             legacy_inverse: bool = False) -> Tensor:
    """Turn a fusion net's raw output into an image in the visible image's mode.

    Args:
        raw: the net output, (B, 1, H, W) for ``out_space`` "y"/"grey", (B, 3, H, W) for "rgb".
        out_space: what ``raw`` holds: the fused luminance ("y"), a grey image ("grey") or RGB ("rgb").
            "y" and "grey" are both treated as luminance and take the visible chroma.
        vis: the visible source (B, 3, H, W) or (B, 1, H, W); supplies the chroma for one-channel outputs.
        clamp: clamp to [0, 1] (fusion outputs are unbounded, e.g. BDL's PReLU head). Differentiable
            callers that want gradients through saturated pixels can pass ``False``.
        legacy_inverse: use the literature's rounded YCbCr inverse (compatibility only).

    Returns:
        (B, 3, H, W) when ``vis`` is RGB and (B, 1, H, W) when it is grey.
    """
    if out_space not in OUT_SPACES:
        raise ValueError(f"unknown out_space {out_space!r}; expected one of {OUT_SPACES}")
    if out_space == "rgb":
        _check_channels(raw, 3, "to_image(out_space='rgb')")
        image = raw if vis.shape[-3] == 3 else luminance(raw)
    else:
        _check_channels(raw, 1, f"to_image(out_space={out_space!r})")
        if vis.shape[-3] == 1:
            image = raw
        else:  # a grey/luminance output takes the visible image's chroma
            chroma = rgb_to_ycbcr(vis)[..., 1:, :, :]
            image = ycbcr_to_rgb(torch.cat((raw, chroma), dim=-3), legacy_inverse=legacy_inverse)
    return image.clamp(0.0, 1.0) if clamp else image
