"""Fusion networks, fusion losses, metrics, image I/O, colour handling and datasets."""

from fusion.colour import as_rgb, luminance, rgb_to_ycbcr, to_image, ycbcr_to_rgb

__all__ = ["as_rgb", "luminance", "rgb_to_ycbcr", "to_image", "ycbcr_to_rgb"]
