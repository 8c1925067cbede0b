"""Datasets for infrared/visible (and multi-exposure / multi-focus) fusion.

One job per module: ``registry`` (names -> datasets), ``base`` (:class:`FusionDataset`, :class:`Record`),
``transforms`` (:class:`Resize`, :class:`RandomCropFlip`, :class:`Compose`), ``labels`` (class tables,
mask and VOC readers), ``folders`` (the public folder layouts), ``synthetic`` (procedural RGB-T scenes),
``sampling`` (:class:`StepSampler`, the collate functions, :func:`make_loader`) and ``cache`` (:class:`InMemory`,
a training set decoded once). Importing the package registers the built-in datasets; see ``docs/data.md``.
"""

from fusion.data.registry import create_dataset, list_datasets, register_dataset
from fusion.data.base import FusionDataset, Record
from fusion.data.cache import InMemory
from fusion.data.folders import FMB, LLVIP, M3FD, MFF, MSRS, TNO, VIFB, FolderPairs, MFNet, PairsAB, RoadScene
from fusion.data.labels import FMB_CLASSES, IGNORE_INDEX, LLVIP_CLASSES, M3FD_CLASSES, MSRS_CLASSES, read_voc
from fusion.data.sampling import StepSampler, collate_pairs, make_loader, pad_collate, unpad
from fusion.data.synthetic import SyntheticScenes, render_scene
from fusion.data.transforms import Compose, RandomCropFlip, Resize, Transform

__all__ = [
    "MSRS_CLASSES",
    "M3FD_CLASSES",
    "LLVIP_CLASSES",
    "FMB_CLASSES",
    "IGNORE_INDEX",
    "FusionDataset",
    "Record",
    "InMemory",
    "Transform",
    "FolderPairs",
    "PairsAB",
    "MFF",
    "RoadScene",
    "TNO",
    "VIFB",
    "MSRS",
    "MFNet",
    "FMB",
    "M3FD",
    "LLVIP",
    "SyntheticScenes",
    "render_scene",
    "read_voc",
    "RandomCropFlip",
    "Resize",
    "Compose",
    "StepSampler",
    "collate_pairs",
    "pad_collate",
    "unpad",
    "make_loader",
    "register_dataset",
    "create_dataset",
    "list_datasets",
]
