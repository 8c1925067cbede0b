"""Downstream-task metrics: segmentation confusion matrix scores, VOC AP@0.5 and COCO mAP.

Segmentation follows the MFNet/RTFNet convention: one confusion matrix accumulated over every
test pixel (rows = ground truth, columns = prediction), IoU_c = TP/(TP + FP + FN), Acc_c = TP/(TP + FN) (per-class
recall), and mIoU/mAcc as plain means over *all* classes, unlabelled included. The rule for undefined ratios is
explicit (``absent``) because published tables silently differ on it.

Detection offers two protocols that papers mix up:

* :func:`voc_ap`: VOC AP@0.5 with all-point interpolation, the py-faster-rcnn ``voc_eval`` lineage that BDL's
  evaluator uses. No installed library implements exactly this (torchmetrics/pycocotools interpolate at 101 points),
  so it is written here and tested against hand-computed cases.
* :func:`coco_map`: COCO mAP@[.50:.95] / AP50 / AP75 computed by pycocotools itself on in-memory COCO objects.

Boxes are xyxy in absolute pixels and labels are 0..C−1, as everywhere in the toolkit.
"""

from __future__ import annotations

import contextlib
import io
import math
from collections.abc import Mapping, Sequence

import numpy as np
import torch
from torch import Tensor

__all__ = ["ABSENT_RULES", "ConfusionMatrix", "box_iou", "coco_map", "segmentation_scores", "voc_ap"]

ABSENT_RULES = ("nan", "zero")


class ConfusionMatrix:
    """Accumulates a (C, C) confusion matrix over batches; rows are ground truth, columns predictions.

    Args:
        num_classes: number of classes C (MFNet: 9, unlabelled included).
        ignore_index: target value whose pixels are skipped (255, the toolkit's convention).

    Example:
        >>> cm = ConfusionMatrix(3)
        >>> cm.update(torch.tensor([[0, 1, 2]]), torch.tensor([[0, 1, 1]]))
        >>> cm.matrix.tolist()
        [[1, 0, 0], [0, 1, 1], [0, 0, 0]]
    """

    def __init__(self, num_classes: int, ignore_index: int | None = 255) -> None:
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        self.matrix = torch.zeros(num_classes, num_classes, dtype=torch.int64)

    def reset(self) -> None:
        self.matrix.zero_()

    @torch.no_grad()
    def update(self, pred: Tensor, target: Tensor) -> None:
        """Add one batch.

        Args:
            pred: logits (B, C, H, W) (floating point, argmax over dim 1) or class predictions (B, H, W) (integer).
            target: (B, H, W) integer labels in 0..C−1, or ``ignore_index``.
        """
        if pred.is_floating_point():
            if pred.dim() != target.dim() + 1 or pred.shape[1] != self.num_classes:
                raise ValueError(f"logits must be (B, {self.num_classes}, H, W) for a (B, H, W) target; "
                                 f"got {tuple(pred.shape)} and {tuple(target.shape)}")
            pred = pred.argmax(dim=1)
        if pred.shape != target.shape:
            raise ValueError(f"prediction {tuple(pred.shape)} and target {tuple(target.shape)} differ in shape")
        pred = pred.reshape(-1).long().cpu()
        target = target.reshape(-1).long().cpu()
        if self.ignore_index is not None:
            keep = target != self.ignore_index
            pred, target = pred[keep], target[keep]
        for name, t in (("target", target), ("prediction", pred)):
            if t.numel() and (t.min() < 0 or t.max() >= self.num_classes):
                raise ValueError(f"{name} holds labels outside 0..{self.num_classes - 1} "
                                 f"(ignore_index={self.ignore_index}): min {int(t.min())}, max {int(t.max())}")
        counts = torch.bincount(target * self.num_classes + pred, minlength=self.num_classes ** 2)
        self.matrix += counts.reshape(self.num_classes, self.num_classes)

    def compute(self, class_names: Sequence[str] | None = None, *, absent: str = "nan",
                exclude: Sequence[int | str] = ()) -> dict[str, float]:
        """Scores of the accumulated matrix; see :func:`segmentation_scores`."""
        return segmentation_scores(self.matrix, class_names, absent=absent, exclude=exclude)


def segmentation_scores(cm: Tensor | np.ndarray, class_names: Sequence[str] | None = None, *, absent: str = "nan",
                        exclude: Sequence[int | str] = ()) -> dict[str, float]:
    """Per-class IoU/Acc and their means from a confusion matrix (MFNet convention).

    IoU_c = TP/(TP + FP + FN) and Acc_c = TP/(TP + FN), with TP = cm[c, c], FN = row sum − TP, FP = column sum − TP.

    Undefined ratios (``absent``): Acc_c is 0/0 when class c has no ground-truth pixel; IoU_c is 0/0 when c is
    neither in the ground truth nor predicted (an absent class that *is* predicted has IoU 0, a real error).

    * ``"nan"`` (default, RTFNet/mmseg): undefined values are NaN and left out of mIoU/mAcc (NaN-mean).
    * ``"zero"``: undefined values count as 0 in the per-class table and in the means.

    Args:
        cm: (C, C) counts, rows = ground truth, columns = prediction.
        class_names: C names for the per-class keys (default "0".."C−1").
        absent: rule for undefined ratios, ``"nan"`` or ``"zero"``.
        exclude: classes (indices or names) left out of the means only, e.g. ``("guardrail",)`` for BDL's 8-class
            table or ``(0,)`` for a variant without "unlabelled". Their pixels stay in the matrix (they still count as
            FP/FN of the other classes) and their per-class values are still reported.

    Returns:
        ``mIoU``, ``mAcc``, ``aAcc`` (overall pixel accuracy), ``IoU/<name>`` and ``Acc/<name>``, as fractions in
        [0, 1] (NaN when undefined under ``absent="nan"``).
    """
    if absent not in ABSENT_RULES:
        raise ValueError(f"unknown absent rule {absent!r}; expected one of {ABSENT_RULES}")
    cm = torch.as_tensor(np.asarray(cm), dtype=torch.float64)
    if cm.dim() != 2 or cm.shape[0] != cm.shape[1]:
        raise ValueError(f"confusion matrix must be square (C, C), got {tuple(cm.shape)}")
    num_classes = cm.shape[0]
    names = [str(i) for i in range(num_classes)] if class_names is None else [str(n) for n in class_names]
    if len(names) != num_classes:
        raise ValueError(f"{len(names)} class names for a {num_classes}-class confusion matrix")
    excluded = set()
    for item in exclude:
        if isinstance(item, str):
            if item not in names:
                raise ValueError(f"exclude names unknown class {item!r}; classes are {names}")
            excluded.add(names.index(item))
        else:
            if not 0 <= int(item) < num_classes:
                raise ValueError(f"exclude index {item} outside 0..{num_classes - 1}")
            excluded.add(int(item))
    if len(excluded) == num_classes:
        raise ValueError("exclude leaves no class to average")

    tp = cm.diagonal()
    gt = cm.sum(dim=1)
    union = gt + cm.sum(dim=0) - tp
    nan = torch.tensor(float("nan"), dtype=torch.float64)
    iou = torch.where(union > 0, tp / union.clamp_min(1), nan)
    acc = torch.where(gt > 0, tp / gt.clamp_min(1), nan)
    if absent == "zero":
        iou, acc = iou.nan_to_num(0.0), acc.nan_to_num(0.0)
    keep = torch.tensor([c not in excluded for c in range(num_classes)])
    total = cm.sum()
    out = {
        "mIoU": _nanmean(iou[keep]),
        "mAcc": _nanmean(acc[keep]),
        "aAcc": float(tp.sum() / total) if total > 0 else float("nan"),
    }
    for c, name in enumerate(names):
        out[f"IoU/{name}"] = float(iou[c])
    for c, name in enumerate(names):
        out[f"Acc/{name}"] = float(acc[c])
    return out


def _nanmean(values: Tensor) -> float:
    finite = values[~values.isnan()]
    return float(finite.mean()) if finite.numel() else float("nan")


def box_iou(a: np.ndarray, b: np.ndarray, *, plus_one: bool = False) -> np.ndarray:
    """Pairwise IoU of xyxy boxes, (N, 4) × (M, 4) → (N, M).

    ``plus_one`` uses the legacy VOC pixel convention (width = x2 − x1 + 1) of py-faster-rcnn's ``voc_eval``.
    """
    off = 1.0 if plus_one else 0.0
    a = np.asarray(a, dtype=np.float64).reshape(-1, 4)
    b = np.asarray(b, dtype=np.float64).reshape(-1, 4)
    iw = np.minimum(a[:, None, 2], b[None, :, 2]) - np.maximum(a[:, None, 0], b[None, :, 0]) + off
    ih = np.minimum(a[:, None, 3], b[None, :, 3]) - np.maximum(a[:, None, 1], b[None, :, 1]) + off
    inter = np.clip(iw, 0, None) * np.clip(ih, 0, None)
    area_a = (a[:, 2] - a[:, 0] + off) * (a[:, 3] - a[:, 1] + off)
    area_b = (b[:, 2] - b[:, 0] + off) * (b[:, 3] - b[:, 1] + off)
    union = area_a[:, None] + area_b[None, :] - inter
    return np.divide(inter, union, out=np.zeros_like(inter), where=union > 0)


def _as_numpy(x) -> np.ndarray:
    return x.detach().cpu().numpy() if isinstance(x, Tensor) else np.asarray(x)


def _check_detections(predictions: Sequence[Mapping], targets: Sequence[Mapping], num_classes: int):
    """Validates and converts per-image prediction/target dicts to numpy (boxes (N,4) f64, labels (N,) i64)."""
    if len(predictions) != len(targets):
        raise ValueError(f"{len(predictions)} prediction entries for {len(targets)} target entries (one per image)")
    preds, gts = [], []
    for i, (p, t) in enumerate(zip(predictions, targets, strict=True)):
        for key, d, what in (("boxes", p, "prediction"), ("scores", p, "prediction"), ("labels", p, "prediction"),
                             ("boxes", t, "target"), ("labels", t, "target")):
            if key not in d:
                raise KeyError(f"{what} {i} lacks key {key!r}")
        pb = _as_numpy(p["boxes"]).astype(np.float64).reshape(-1, 4)
        ps = _as_numpy(p["scores"]).astype(np.float64).reshape(-1)
        pl = _as_numpy(p["labels"]).astype(np.int64).reshape(-1)
        tb = _as_numpy(t["boxes"]).astype(np.float64).reshape(-1, 4)
        tl = _as_numpy(t["labels"]).astype(np.int64).reshape(-1)
        if not len(pb) == len(ps) == len(pl) or len(tb) != len(tl):
            raise ValueError(f"image {i}: boxes/scores/labels lengths differ")
        for lab, what in ((pl, "prediction"), (tl, "target")):
            if lab.size and (lab.min() < 0 or lab.max() >= num_classes):
                raise ValueError(f"image {i}: {what} labels outside 0..{num_classes - 1}: {np.unique(lab).tolist()}")
        preds.append((pb, ps, pl))
        gts.append((tb, tl))
    return preds, gts


def _class_names(class_names: Sequence[str] | None, num_classes: int) -> list[str]:
    names = [str(i) for i in range(num_classes)] if class_names is None else [str(n) for n in class_names]
    if len(names) != num_classes:
        raise ValueError(f"{len(names)} class names for {num_classes} classes")
    return names


def _all_point_ap(recall: np.ndarray, precision: np.ndarray) -> float:
    """Area under the precision envelope, Σ_i (r_{i+1} − r_i)·max_{r′ ≥ r_{i+1}} p(r′) (VOC 2010+)."""
    mrec = np.concatenate(([0.0], recall, [1.0]))
    mpre = np.concatenate(([0.0], precision, [0.0]))
    mpre = np.maximum.accumulate(mpre[::-1])[::-1]
    i = np.flatnonzero(mrec[1:] != mrec[:-1])
    return float(np.sum((mrec[i + 1] - mrec[i]) * mpre[i + 1]))


def voc_ap(predictions: Sequence[Mapping], targets: Sequence[Mapping], num_classes: int,
           class_names: Sequence[str] | None = None, *, iou_threshold: float = 0.5,
           plus_one: bool = False) -> dict[str, float]:
    """VOC average precision at one IoU threshold, all-point interpolation, per class and its mean.

    Per class, the detections of all images are sorted by descending score (stable sort, so ties keep input
    order). A detection is a true positive when its best-overlapping ground-truth box of that class in the same
    image has IoU ≥ ``iou_threshold`` and is not yet matched; otherwise (no overlap, or the best box already taken)
    it is a false positive — py-faster-rcnn's ``voc_eval`` rule (which writes ``>``; mmdet uses ``≥``).
    AP is the area under the monotone precision envelope (:func:`_all_point_ap`).

    Classes without any ground-truth box have AP NaN and are left out of the mean (mmdet's ``eval_map`` rule).

    Args:
        predictions: one dict per image with ``boxes`` (N, 4) xyxy px, ``scores`` (N,), ``labels`` (N,) in 0..C−1.
        targets: one dict per image with ``boxes`` (M, 4) and ``labels`` (M,).
        num_classes: C (M3FD: 6).
        class_names: names for the per-class keys.
        iou_threshold: matching threshold (0.5 for VOC AP@0.5).
        plus_one: legacy VOC "+1" pixel widths, as in py-faster-rcnn.

    Returns:
        ``mAP50`` (or ``mAP<thr·100>``) and ``AP50/<name>`` per class, fractions in [0, 1].
    """
    names = _class_names(class_names, num_classes)
    preds, gts = _check_detections(predictions, targets, num_classes)
    tag = f"{round(iou_threshold * 100):d}"
    out: dict[str, float] = {}
    aps = []
    for c in range(num_classes):
        gt_boxes = [tb[tl == c] for tb, tl in gts]
        n_gt = sum(len(b) for b in gt_boxes)
        det_img, det_box, det_score = [], [], []
        for i, (pb, ps, pl) in enumerate(preds):
            sel = pl == c
            det_img.extend([i] * int(sel.sum()))
            det_box.append(pb[sel])
            det_score.append(ps[sel])
        if n_gt == 0:
            ap = float("nan")
        else:
            boxes = np.concatenate(det_box) if det_box else np.zeros((0, 4))
            scores = np.concatenate(det_score) if det_score else np.zeros(0)
            order = np.argsort(-scores, kind="stable")
            matched = [np.zeros(len(b), dtype=bool) for b in gt_boxes]
            tp = np.zeros(len(order))
            for k, d in enumerate(order):
                img = det_img[d]
                if len(gt_boxes[img]) == 0:
                    continue
                overlaps = box_iou(boxes[d:d + 1], gt_boxes[img], plus_one=plus_one)[0]
                j = int(np.argmax(overlaps))
                if overlaps[j] >= iou_threshold and not matched[img][j]:
                    tp[k] = 1.0
                    matched[img][j] = True
            ctp = np.cumsum(tp)
            cfp = np.cumsum(1.0 - tp)
            recall = ctp / n_gt
            precision = ctp / np.maximum(ctp + cfp, np.finfo(np.float64).eps)
            ap = _all_point_ap(recall, precision)
        out[f"AP{tag}/{names[c]}"] = ap
        aps.append(ap)
    valid = [a for a in aps if not math.isnan(a)]
    return {f"mAP{tag}": float(np.mean(valid)) if valid else float("nan"), **out}


def coco_map(predictions: Sequence[Mapping], targets: Sequence[Mapping], num_classes: int,
             class_names: Sequence[str] | None = None, *, max_dets: int = 100) -> dict[str, float]:
    """COCO box mAP@[.50:.95], AP50, AP75 (and per-class mAP) computed by pycocotools.

    The ground truth and detections are turned into in-memory COCO objects (xywh boxes, area = w·h,
    ``iscrowd`` 0, category ids 1..C) and evaluated with ``COCOeval(iouType="bbox")``; pycocotools' prints are
    suppressed. Its −1 sentinel for "no ground truth" becomes NaN.

    Args:
        predictions, targets, num_classes, class_names: as in :func:`voc_ap`.
        max_dets: detections kept per image (pycocotools keeps the top-scoring ``max_dets``).

    Returns:
        ``coco/mAP``, ``coco/AP50``, ``coco/AP75`` and ``coco/AP/<name>`` (mAP@[.50:.95] per class).
    """
    try:
        from pycocotools.coco import COCO
        from pycocotools.cocoeval import COCOeval
    except ImportError as exc:  # pragma: no cover - pycocotools is a core dependency
        raise ImportError("coco_map needs pycocotools: pip install pycocotools") from exc
    names = _class_names(class_names, num_classes)
    preds, gts = _check_detections(predictions, targets, num_classes)
    nan_out = {"coco/mAP": float("nan"), "coco/AP50": float("nan"), "coco/AP75": float("nan"),
               **{f"coco/AP/{n}": float("nan") for n in names}}

    images, annotations = [], []
    for i, (tb, tl) in enumerate(gts):
        images.append({"id": i + 1})  # bbox evaluation needs no image size
        for box, lab in zip(tb, tl, strict=True):
            x1, y1, x2, y2 = box.tolist()
            annotations.append({"id": len(annotations) + 1, "image_id": i + 1, "category_id": int(lab) + 1,
                                "bbox": [x1, y1, x2 - x1, y2 - y1], "area": (x2 - x1) * (y2 - y1), "iscrowd": 0})
    if not annotations:
        return nan_out
    dets = []
    for i, (pb, ps, pl) in enumerate(preds):
        for box, score, lab in zip(pb, ps, pl, strict=True):
            x1, y1, x2, y2 = box.tolist()
            dets.append({"image_id": i + 1, "category_id": int(lab) + 1, "bbox": [x1, y1, x2 - x1, y2 - y1],
                         "score": float(score)})
    categories = [{"id": c + 1, "name": names[c]} for c in range(num_classes)]
    with contextlib.redirect_stdout(io.StringIO()):
        coco_gt = COCO()
        coco_gt.dataset = {"images": images, "annotations": annotations, "categories": categories}
        coco_gt.createIndex()
        if not dets:  # pycocotools cannot load an empty result list; nothing detected means AP 0 where GT exists
            out = {"coco/mAP": 0.0, "coco/AP50": 0.0, "coco/AP75": 0.0}
            has_gt = {a["category_id"] - 1 for a in annotations}
            out.update({f"coco/AP/{n}": 0.0 if c in has_gt else float("nan") for c, n in enumerate(names)})
            return out
        coco_dt = coco_gt.loadRes(dets)
        ev = COCOeval(coco_gt, coco_dt, iouType="bbox")
        ev.params.maxDets = [1, 10, max_dets]
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    stats = [float("nan") if s < 0 else float(s) for s in ev.stats[:3]]
    out = {"coco/mAP": stats[0], "coco/AP50": stats[1], "coco/AP75": stats[2]}
    precision = ev.eval["precision"][:, :, :, 0, -1]  # (T iou thresholds, R recall points, K classes), area "all"
    for c, n in enumerate(names):
        p = precision[:, :, c]
        p = p[p > -1]
        out[f"coco/AP/{n}"] = float(p.mean()) if p.size else float("nan")
    return out
