"""Datasets for infrared/visible (and multi-exposure / multi-focus) fusion.

One job per module: ``registry`` (names -> datasets), ``base`` (:class:`FusionDataset`, :class:`Record`),
``transforms`` (:class:`Resize`, :class:`RandomCropFlip`, :class:`Compose`), ``labels`` (class tables,
mask and VOC readers), ``folders`` (the public folder layouts), ``synthetic`` (procedural RGB-T scenes),
``sampling`` (:class:`StepSampler`, the collate functions, :func:`make_loader`) and ``cache`` (:class:`InMemory`,
a training set decoded once; :class:`CacheFiller`, which decodes it ahead in worker processes). Importing the
package registers the built-in datasets; see ``docs/data.md``.
"""

from fusion.data.base import FusionDataset, Record
from fusion.data.cache import CacheFiller, InMemory
from fusion.data.folders import FMB, LLVIP, M3FD, MFF, MSRS, TNO, VIFB, FolderPairs, MFNet, PairsAB, RoadScene
from fusion.data.labels import FMB_CLASSES, IGNORE_INDEX, LLVIP_CLASSES, M3FD_CLASSES, MSRS_CLASSES, read_voc
from fusion.data.registry import create_dataset, list_datasets, register_dataset
from fusion.data.sampling import StepSampler, collate_pairs, make_loader, pad_collate, unpad
from fusion.data.synthetic import SyntheticScenes, render_scene
from fusion.data.transforms import Compose, RandomCropFlip, Resize, Transform

__all__ = [
    "FMB",
    "FMB_CLASSES",
    "IGNORE_INDEX",
    "LLVIP",
    "LLVIP_CLASSES",
    "M3FD",
    "M3FD_CLASSES",
    "MFF",
    "MSRS",
    "MSRS_CLASSES",
    "TNO",
    "VIFB",
    "CacheFiller",
    "Compose",
    "FolderPairs",
    "FusionDataset",
    "InMemory",
    "MFNet",
    "PairsAB",
    "RandomCropFlip",
    "Record",
    "Resize",
    "RoadScene",
    "StepSampler",
    "SyntheticScenes",
    "Transform",
    "collate_pairs",
    "create_dataset",
    "list_datasets",
    "make_loader",
    "pad_collate",
    "read_voc",
    "register_dataset",
    "render_scene",
    "unpad",
]
