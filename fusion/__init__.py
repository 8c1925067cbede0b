"""Fusion networks, fusion losses, metrics, image I/O, colour handling and datasets.

The factories users reach for first are re-exported here; everything else lives in its submodule
(``fusion.nets``, ``fusion.losses``, ``fusion.metrics``, ``fusion.data``, ``fusion.image_io``).
"""

from fusion.colour import as_rgb, luminance, rgb_to_ycbcr, to_image, ycbcr_to_rgb
from fusion.data import collate_pairs, create_dataset, list_datasets, make_loader, pad_collate
from fusion.image_io import ImagePairError, read_image, read_pair, save_image
from fusion.losses import create_fusion_loss, list_fusion_losses
from fusion.metrics import compute_metrics, list_metrics
from fusion.nets import create_fusion_net, fused_output, list_fusion_nets

__all__ = [
    "ImagePairError",
    "as_rgb",
    "collate_pairs",
    "compute_metrics",
    "create_dataset",
    "create_fusion_loss",
    "create_fusion_net",
    "fused_output",
    "list_datasets",
    "list_fusion_losses",
    "list_fusion_nets",
    "list_metrics",
    "luminance",
    "make_loader",
    "pad_collate",
    "read_image",
    "read_pair",
    "rgb_to_ycbcr",
    "save_image",
    "to_image",
    "ycbcr_to_rgb",
]
