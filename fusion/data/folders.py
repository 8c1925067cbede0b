"""Folder layouts of the public infrared/visible (and MEF/MFF) datasets, one class per layout.

Layouts follow ``docs/data.md``; because several of them could not be checked against a real copy, every
subfolder name, split file, extension and class list can be overridden by keyword, and a layout that is not
found raises an error listing everything that was tried. Importing this module registers the layouts.

Example:
    >>> ds = create_dataset("msrs_person8", "data/msrs_person8")   # doctest: +SKIP
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from torch import Tensor

from fusion.data.base import FusionDataset, Record
from fusion.data.labels import (
    FMB_CLASSES,
    LLVIP_CLASSES,
    M3FD_CLASSES,
    MSRS_CLASSES,
    check_mask,
    clip_boxes,
    read_voc,
    value_lut,
)
from fusion.data.registry import register_dataset
from fusion.data.transforms import Transform
from fusion.image_io import (
    IMAGE_EXTENSIONS,
    ImagePairError,
    align_pair,
    list_images,
    match_pairs,
    read_image,
    read_mask,
    read_pair,
    to_single_channel,
)

__all__ = [
    "FMB",
    "LLVIP",
    "M3FD",
    "MFF",
    "MSRS",
    "TNO",
    "VIFB",
    "FolderPairs",
    "MFNet",
    "PairsAB",
    "RoadScene",
    "msrs_person8",
]


def _root(root: str | os.PathLike | None, owner: str) -> Path:
    if root is None:
        raise ValueError(f"{owner} needs a root folder")
    return Path(root)


def _read_split_file(path: Path) -> list[str]:
    names = []
    for line in path.read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            names.append(Path(line.split()[0]).stem if Path(line).suffix.lower() in IMAGE_EXTENSIONS
                         else line.split()[0])
    if not names:
        raise ImagePairError(f"split file {path} lists no images")
    return names


# ---------------------------------------------------------------------------------------- folder layouts
class FolderPairs(FusionDataset):
    """Generic layout: ``root/<ir_dir>/*`` and ``root/<vis_dir>/*`` paired by file stem, with an optional
    label folder (segmentation masks) or annotation folder (VOC XML boxes) and optional split list.

    Subclasses only change ``LAYOUTS`` (candidate folder names, tried in order; ``{split}`` is replaced by the
    split) and the default class lists. Keyword arguments override any folder of every candidate.

    Args:
        root: dataset root.
        split: split name; a layout without a ``{split}`` folder or split file ignores it. ``None`` or "all"
            means every image.
        ir_dir, vis_dir, mask_dir, ann_dir: folder names relative to ``root`` (may contain ``{split}``).
        split_file: text file (relative to ``root``) listing the stems of the split, one per line.
        labels: None = use label folders when they exist, True = require them, False = ignore them.
        class_names / det_class_names: override the segmentation / detection class lists.
        mask_values: map stored mask values to classes, e.g. ``{255: 2}`` (unlisted values are kept).
        extensions: accepted image extensions (case-insensitive).
        size_policy: "error" | "resize" | "crop" for IR/visible size mismatches (see ``fusion.image_io``).
        vis_mode: "keep" | "grey" | "rgb" for the visible channels.
        ignore_unknown: skip VOC objects whose class is not in ``det_class_names`` instead of raising.
        stretch16: stretch each 16-bit image's min–max to [0, 1] (raw sensor counts; ``fusion.image_io``).
        transform: callable ``(sample, generator) -> sample`` (e.g. :class:`RandomCropFlip`).
    """

    LAYOUTS: tuple[dict[str, str], ...] = ({"ir": "{split}/ir", "vis": "{split}/vi"}, {"ir": "ir", "vis": "vi"})
    CLASS_NAMES: tuple[str, ...] | None = None
    DET_CLASS_NAMES: tuple[str, ...] | None = None
    MASK_VALUES: Mapping[int, int] | None = None

    def __init__(self, root: str | os.PathLike, split: str | None = "train", *, ir_dir: str | None = None,
                 vis_dir: str | None = None, mask_dir: str | None = None, ann_dir: str | None = None,
                 split_file: str | None = None, labels: bool | None = None,
                 class_names: Sequence[str] | None = None, det_class_names: Sequence[str] | None = None,
                 mask_values: Mapping[int, int] | None = None, extensions: Sequence[str] = IMAGE_EXTENSIONS,
                 size_policy: str = "error", vis_mode: str = "keep", ignore_unknown: bool = False,
                 stretch16: bool = False, transform: Transform | None = None) -> None:
        super().__init__(transform)
        self.root = _root(root, type(self).__name__)
        self.stretch16 = stretch16
        self.split = None if split in (None, "all") else split
        self.size_policy, self.vis_mode, self.ignore_unknown = size_policy, vis_mode, ignore_unknown
        self.extensions = tuple(extensions)
        overrides = {k: v for k, v in (("ir", ir_dir), ("vis", vis_dir), ("mask", mask_dir), ("ann", ann_dir),
                                       ("split_file", split_file)) if v is not None}
        layout = self._resolve_layout(overrides)
        self.layout = layout
        cls_names = class_names if class_names is not None else self.CLASS_NAMES
        det_names = det_class_names if det_class_names is not None else self.DET_CLASS_NAMES
        mask_dir_path = self._label_dir(layout, "mask", labels)
        ann_dir_path = self._label_dir(layout, "ann", labels)
        self.has_masks, self.has_boxes = mask_dir_path is not None, ann_dir_path is not None
        if labels and not (self.has_masks or self.has_boxes):
            raise ValueError(f"{type(self).__name__}: labels=True but the layout names no label folder; "
                             "pass mask_dir=... or ann_dir=...")
        self.class_names = tuple(cls_names) if cls_names is not None and self.has_masks else None
        self.det_class_names = tuple(det_names) if det_names is not None else None
        if self.has_boxes and self.det_class_names is None:
            raise ValueError(f"{type(self).__name__}: annotation folder {ann_dir_path} needs det_class_names")
        if not self.has_boxes:
            self.det_class_names = None
        self._lut = value_lut(mask_values if mask_values is not None else self.MASK_VALUES)
        self.records = self._index(layout, mask_dir_path, ann_dir_path)

    # -- layout resolution
    def _format(self, template: str) -> str | None:
        if "{split}" in template:
            return None if self.split is None else template.format(split=self.split)
        return template

    def _resolve_layout(self, overrides: Mapping[str, str]) -> dict[str, Any]:
        tried = []
        for candidate in self.LAYOUTS:
            candidate = {**candidate, **overrides}
            ir, vis = self._format(candidate["ir"]), self._format(candidate["vis"])
            if ir is None or vis is None:
                continue
            tried.append(f"{self.root / ir} + {self.root / vis}")
            if (self.root / ir).is_dir() and (self.root / vis).is_dir():
                return {**candidate, "ir": ir, "vis": vis}
        raise ImagePairError(
            f"{type(self).__name__}: no known layout under {self.root} (split={self.split!r}); looked for: "
            + "; ".join(tried) + ". Override with ir_dir=/vis_dir= (folders relative to root).")

    def _label_dir(self, layout: Mapping[str, Any], key: str, labels: bool | None) -> Path | None:
        if labels is False or key not in layout:
            return None
        rel = self._format(layout[key])
        path = None if rel is None else self.root / rel
        if path is not None and path.is_dir():
            return path
        if labels:
            what = "mask_dir" if key == "mask" else "ann_dir"
            raise ImagePairError(f"{type(self).__name__}: label folder {path or layout[key]} not found "
                                 f"(pass {what}=... or labels=False)")
        return None

    def _split_names(self, layout: Mapping[str, Any]) -> list[str] | None:
        if "split_file" not in layout or self.split is None:
            return None
        candidates = layout["split_file"]
        candidates = [candidates] if isinstance(candidates, str) else list(candidates)
        paths = [self.root / c.format(split=self.split) for c in candidates]
        for path in paths:
            if path.is_file():
                return _read_split_file(path)
        if any("{split}" in layout[k] for k in ("ir", "vis")):
            return None  # the split is already a folder
        raise ImagePairError(
            f"{type(self).__name__}: split {self.split!r} needs a split list; looked for "
            + ", ".join(str(p) for p in paths) + " (pass split_file=... or split='all' for every image)")

    # -- indexing
    def _pairs(self, layout: Mapping[str, Any]) -> list[tuple[str, Path, Path]]:
        return match_pairs(self.root / layout["ir"], self.root / layout["vis"], extensions=self.extensions)

    def _index(self, layout: Mapping[str, Any], mask_dir: Path | None, ann_dir: Path | None) -> list[Record]:
        pairs = self._pairs(layout)
        wanted = self._split_names(layout)
        if wanted is not None:
            by_stem = {stem: (stem, ir, vis) for stem, ir, vis in pairs}
            missing = [n for n in wanted if n not in by_stem]
            if missing:
                raise ImagePairError(
                    f"{type(self).__name__}: {len(missing)} name(s) of split {self.split!r} have no image pair in "
                    f"{self.root / layout['ir']} / {self.root / layout['vis']}, e.g. {missing[:3]}")
            pairs = [by_stem[n] for n in wanted]
        masks = {p.stem: p for p in list_images(mask_dir, extensions=self.extensions)} if mask_dir else {}
        anns = {p.stem: p for p in ann_dir.glob("*.xml")} if ann_dir else {}
        records = []
        for stem, ir, vis in pairs:
            if mask_dir is not None and stem not in masks:
                raise ImagePairError(f"missing label for {ir}: no file with stem {stem!r} in {mask_dir}")
            if ann_dir is not None and stem not in anns:
                raise ImagePairError(f"missing annotation for {ir}: no {stem}.xml in {ann_dir}")
            records.append(Record(stem, ir, vis, masks.get(stem), anns.get(stem)))
        if not records:
            raise ImagePairError(f"{type(self).__name__}: no images for split {self.split!r} under {self.root}")
        return records

    def __len__(self) -> int:
        return len(self.records)

    def _read_sources(self, record: Record) -> tuple[Tensor, Tensor]:
        return read_pair(record.ir, record.vis, size_policy=self.size_policy, vis_mode=self.vis_mode,
                         stretch16=self.stretch16)

    def load(self, index: int) -> dict[str, Any]:
        record = self.records[index]
        ir, vis = self._read_sources(record)
        sample: dict[str, Any] = {"name": record.name, "ir": ir, "vis": vis}
        height, width = ir.shape[-2:]
        if record.mask is not None:
            mask = read_mask(record.mask)
            if self._lut is not None:
                mask = self._lut[mask]
            if tuple(mask.shape) != (height, width):
                raise ImagePairError(
                    f"label {record.mask} is {mask.shape[1]}x{mask.shape[0]} (WxH) but the image pair "
                    f"{record.ir} / {record.vis} is {width}x{height}")
            check_mask(mask, len(self.class_names) if self.class_names else None, record.mask, self.ignore_index)
            sample["mask"] = mask
        if record.ann is not None:
            boxes, labels = read_voc(record.ann, self.det_class_names or (), ignore_unknown=self.ignore_unknown)
            sample["boxes"], sample["labels"] = clip_boxes(boxes, labels, height, width)
        return sample

    def __repr__(self) -> str:
        return f"{type(self).__name__}(root={str(self.root)!r}, split={self.split!r}, n={len(self)})"


class RoadScene(FolderPairs):
    """RoadScene: original ``cropinfrared/`` + ``crop_LR_visible/``, or the redistributed ``ir/`` + ``vi/``."""

    LAYOUTS = ({"ir": "cropinfrared", "vis": "crop_LR_visible"}, {"ir": "ir", "vis": "vi"})


class TNO(FolderPairs):
    """TNO as commonly redistributed: ``ir/`` + ``vi/`` (or ``vis/``) with matching names."""

    LAYOUTS = ({"ir": "ir", "vis": "vi"}, {"ir": "ir", "vis": "vis"}, {"ir": "IR", "vis": "VI"})


class VIFB(FolderPairs):
    """VIFB: original ``input/IR`` + ``input/VI``, or the redistributed ``ir/`` + ``vi/``."""

    LAYOUTS = ({"ir": "input/IR", "vis": "input/VI"}, {"ir": "ir", "vis": "vi"})


class MSRS(FolderPairs):
    """MSRS: ``<split>/{ir,vi,Segmentation_labels}`` [labels folder unverified], or the SeAFusion copy
    ``{Infrared,Visible,Label}/`` with ``split/<split>.txt``. Masks hold 0..8 (``MSRS_CLASSES``)."""

    LAYOUTS = (
        {"ir": "{split}/ir", "vis": "{split}/vi", "mask": "{split}/Segmentation_labels"},
        {"ir": "Infrared", "vis": "Visible", "mask": "Label",
         "split_file": ("split/{split}.txt", "{split}.txt")},
    )
    CLASS_NAMES = MSRS_CLASSES


class FMB(FolderPairs):
    """FMB (SegMiF): ``<split>/{Infrared,Visible,Label}`` [unverified]; class list ``FMB_CLASSES``
    [unverified], configurable with ``class_names=``."""

    LAYOUTS = ({"ir": "{split}/Infrared", "vis": "{split}/Visible", "mask": "{split}/Label"},)
    CLASS_NAMES = FMB_CLASSES


class M3FD(FolderPairs):
    """M3FD (TarDAL): ``Ir/``, ``Vis/``, ``Annotation/*.xml`` (VOC, classes ``M3FD_CLASSES``). Copies with
    ``<split>.txt`` lists select a split; without one pass ``split="all"`` (refusing instead of silently
    training on every image, test images included)."""

    LAYOUTS = ({"ir": "Ir", "vis": "Vis", "ann": "Annotation",
                "split_file": ("{split}.txt", "split/{split}.txt", "splits/{split}.txt")},)
    DET_CLASS_NAMES = M3FD_CLASSES


class LLVIP(FolderPairs):
    """LLVIP: ``infrared/<split>``, ``visible/<split>``, ``Annotations/*.xml`` (VOC, class ``person``)."""

    LAYOUTS = ({"ir": "infrared/{split}", "vis": "visible/{split}", "ann": "Annotations"},)
    DET_CLASS_NAMES = LLVIP_CLASSES


class MFNet(FolderPairs):
    """MFNet: 4-channel PNGs ``images/*.png`` (R, G, B, thermal), ``labels/*.png`` (0..8, ``MSRS_CLASSES``)
    and split lists ``<split>.txt`` (train, val, test, test_day, test_night)."""

    LAYOUTS = ({"ir": "images", "vis": "images", "mask": "labels", "split_file": ("{split}.txt",)},)
    CLASS_NAMES = MSRS_CLASSES

    def _pairs(self, layout: Mapping[str, Any]) -> list[tuple[str, Path, Path]]:
        files = list_images(self.root / layout["ir"], extensions=self.extensions)
        return [(p.stem, p, p) for p in files]

    def _read_sources(self, record: Record) -> tuple[Tensor, Tensor]:
        rgbt = read_image(record.ir, keep_alpha=True, stretch16=self.stretch16)
        if rgbt.shape[0] != 4:
            raise ImagePairError(f"MFNet image {record.ir} has {rgbt.shape[0]} channels; expected 4 (R, G, B, T)")
        vis = rgbt[:3]
        if self.vis_mode == "grey":
            vis = to_single_channel(vis)
        return rgbt[3:].contiguous(), vis.contiguous()


# ------------------------------------------------------------------------------------- A/B pairs (MEF/MFF)
class PairsAB(FusionDataset):
    """Two-source pairs for multi-exposure (MEF) and multi-focus (MFF) fusion.

    Layouts (auto-detected): ``root/A/*`` + ``root/B/*`` matched by stem, or files ``<name>_A.<ext>`` +
    ``<name>_B.<ext>`` either in per-scene subfolders (MEFB/MFIFB: ``<scene>/<scene>_A.JPG``,
    ``<scene>/<scene>_B.jpg``) or flat in ``root``. Suffixes and extensions are compared case-insensitively.

    The samples keep the contract's keys: ``ir`` holds source A and ``vis`` source B. Both sources are RGB by
    default (``a_mode="rgb"``, ``vis_mode="rgb"``; a grey file is repeated to three channels), so that the
    mixed grey/colour pairs of MFF sets batch together; ``"keep"`` keeps the stored channels and ``"grey"``
    gives one channel (luminance).

    Registered as ``mef`` and ``pairs_ab`` (``fusion_task = "mef"``) and, through :class:`MFF`, as ``mff``.
    These benchmarks have no splits: ``default_holdout = 10`` makes the runner hold out every 10th pair for
    testing (and every 10th offset by 5 for the upper level) unless ``data.holdout`` says otherwise.
    """

    fusion_task = "mef"
    default_holdout = 10

    def __init__(self, root: str | os.PathLike, split: str | None = None, *, a_suffix: str = "_A",
                 b_suffix: str = "_B", a_dir: str = "A", b_dir: str = "B", a_mode: str = "rgb",
                 vis_mode: str = "rgb", size_policy: str = "error", extensions: Sequence[str] = IMAGE_EXTENSIONS,
                 stretch16: bool = False, transform: Transform | None = None) -> None:
        super().__init__(transform)
        # these benchmarks have no splits; ``split`` is kept for the registry API
        self.root, self.split = _root(root, "PairsAB"), split
        self.stretch16 = stretch16
        self.a_mode, self.vis_mode, self.size_policy = a_mode, vis_mode, size_policy
        for mode in (a_mode, vis_mode):
            if mode not in ("keep", "grey", "rgb"):
                raise ValueError(f"unknown mode {mode!r}; expected 'keep', 'grey' or 'rgb'")
        self.extensions = tuple(extensions)
        if not self.root.is_dir():
            raise ImagePairError(f"PairsAB: dataset folder not found: {self.root}")
        if (self.root / a_dir).is_dir() and (self.root / b_dir).is_dir():
            pairs = match_pairs(self.root / a_dir, self.root / b_dir, extensions=self.extensions)
        else:
            pairs = self._suffix_pairs(a_suffix.lower(), b_suffix.lower(), a_dir, b_dir)
        self.records = [Record(stem, a, b) for stem, a, b in pairs]

    def _suffix_pairs(self, a_suffix: str, b_suffix: str, a_dir: str, b_dir: str) -> list[tuple[str, Path, Path]]:
        exts = {e.lower() for e in self.extensions}
        files = [p for p in self.root.iterdir() if p.is_file()]
        for sub in sorted(p for p in self.root.iterdir() if p.is_dir()):
            files.extend(p for p in sub.iterdir() if p.is_file())
        # key: (folder, lower-cased name) -> {"a": path, "b": path}; names compared case-insensitively because
        # MEFB mixes cases within a pair (Farmhouse_A.png / FarmHouse_B.png)
        sources: dict[tuple[Path, str], dict[str, Path]] = {}
        for path in files:
            if path.suffix.lower() not in exts or path.name.startswith("."):
                continue
            for key, suffix in (("a", a_suffix), ("b", b_suffix)):
                if path.stem.lower().endswith(suffix):
                    name = path.stem[: len(path.stem) - len(suffix)]
                    found = sources.setdefault((path.parent, name.lower()), {})
                    if key in found:
                        raise ImagePairError(f"ambiguous source {key.upper()} for {name!r}: {found[key]} and {path}")
                    found[key] = path
        if not sources:
            raise ImagePairError(
                f"PairsAB: no pairs under {self.root}: looked for {a_dir}/ + {b_dir}/ folders and files named "
                f"<name>{a_suffix.upper()}.<ext> / <name>{b_suffix.upper()}.<ext> (extensions {sorted(exts)}) in "
                "the root and its subfolders")
        pairs = []
        for key in sorted(sources, key=lambda k: (k[1], str(k[0]))):
            found = sources[key]
            if "a" not in found or "b" not in found:
                have, lacking = ("a", "b") if "a" in found else ("b", "a")
                suffix = a_suffix if lacking == "a" else b_suffix
                name = found[have].stem[: -len(b_suffix if have == "b" else a_suffix)]
                raise ImagePairError(f"missing partner: {found[have]} has no {name}{suffix.upper()}.<ext> file in "
                                     f"{found[have].parent}")
            name = found["a"].stem[: -len(a_suffix)] if a_suffix else found["a"].stem
            pairs.append((name, found["a"], found["b"]))
        names = [p[0].lower() for p in pairs]
        if len(set(names)) < len(names):  # same name in two folders: keep them apart by folder
            pairs = [(str(a.parent.relative_to(self.root) / n), a, b) for n, a, b in pairs]
        return pairs

    def __len__(self) -> int:
        return len(self.records)

    def load(self, index: int) -> dict[str, Any]:
        record = self.records[index]
        a, b = read_image(record.ir, stretch16=self.stretch16), read_image(record.vis, stretch16=self.stretch16)
        a = {"keep": a, "grey": to_single_channel(a), "rgb": a.expand(3, -1, -1).contiguous()
             if a.shape[0] == 1 else a}[self.a_mode]
        b = {"keep": b, "grey": to_single_channel(b), "rgb": b.expand(3, -1, -1).contiguous()
             if b.shape[0] == 1 else b}[self.vis_mode]
        a, b = align_pair(a, b, self.size_policy, ir_path=record.ir, vis_path=record.vis)
        return {"name": record.name, "ir": a, "vis": b}

    def __repr__(self) -> str:
        return f"{type(self).__name__}(root={str(self.root)!r}, n={len(self)})"


class MFF(PairsAB):
    """Multi-focus pairs (MFIFB layout): :class:`PairsAB` for the ``mff`` task (router and loss)."""

    fusion_task = "mff"


for _name, _cls in (("folder", FolderPairs), ("roadscene", RoadScene), ("tno", TNO), ("vifb", VIFB),
                    ("msrs", MSRS), ("mfnet", MFNet), ("fmb", FMB), ("m3fd", M3FD), ("llvip", LLVIP),
                    ("pairs_ab", PairsAB), ("mef", PairsAB), ("mff", MFF)):
    register_dataset(_name)(_cls)


@register_dataset("msrs_person8")
def msrs_person8(root: str | os.PathLike, split: str | None = "train", **kwargs: Any) -> FolderPairs:
    """The 8-pair MSRS excerpt: ``ir/``, ``vi/`` and binary person masks ``mask/`` (0/255) mapped to MSRS
    classes (255 → 2 "person")."""
    kwargs = {"mask_dir": "mask", "mask_values": {255: 2}, "class_names": MSRS_CLASSES, **kwargs}
    return FolderPairs(root, split, **kwargs)
