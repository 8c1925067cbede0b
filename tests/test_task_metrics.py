"""Downstream-task metrics against values worked out by hand (tasks/metrics.py)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from tasks.metrics import ConfusionMatrix, box_iou, coco_map, segmentation_scores, voc_ap

# ------------------------------------------------------------------ segmentation
# 3 classes, 10 pixels, the last one ignored (255):
#   gt   0 0 0 1 1 2 2 2 2 255
#   pred 0 0 1 1 2 2 2 0 2 1
# rows = gt, cols = pred:  gt0 → [2 1 0], gt1 → [0 1 1], gt2 → [1 0 3]
TARGET = torch.tensor([[0, 0, 0, 1, 1, 2, 2, 2, 2, 255]])
PRED = torch.tensor([[0, 0, 1, 1, 2, 2, 2, 0, 2, 1]])
CM = [[2, 1, 0], [0, 1, 1], [1, 0, 3]]
IOU = [2 / (3 + 3 - 2), 1 / (2 + 2 - 1), 3 / (4 + 4 - 3)]  # TP / (gt + pred − TP)
ACC = [2 / 3, 1 / 2, 3 / 4]  # TP / gt


def test_confusion_matrix_from_predictions_and_logits():
    cm = ConfusionMatrix(3)
    cm.update(PRED, TARGET)
    assert cm.matrix.tolist() == CM
    logits = torch.nn.functional.one_hot(PRED, 3).permute(0, 2, 1).float()  # (1, 3, 10) → argmax = PRED
    cm2 = ConfusionMatrix(3)
    cm2.update(logits, TARGET)
    assert cm2.matrix.tolist() == CM
    cm2.update(logits, TARGET)  # accumulates
    assert cm2.matrix.tolist() == [[2 * v for v in row] for row in CM]
    cm2.reset()
    assert cm2.matrix.sum() == 0


def test_segmentation_scores_hand_computed():
    out = segmentation_scores(torch.tensor(CM), ["a", "b", "c"])
    for c, name in enumerate("abc"):
        assert out[f"IoU/{name}"] == pytest.approx(IOU[c])
        assert out[f"Acc/{name}"] == pytest.approx(ACC[c])
    assert out["mIoU"] == pytest.approx(sum(IOU) / 3)  # 0.47778
    assert out["mAcc"] == pytest.approx(sum(ACC) / 3)  # 0.63889
    assert out["aAcc"] == pytest.approx(6 / 9)


def test_absent_class_rules_and_exclude():
    # class 3 has no ground truth but is predicted once (IoU 0, Acc undefined);
    # class 4 is neither in the ground truth nor predicted (both undefined).
    cm = np.zeros((5, 5), dtype=np.int64)
    cm[:3, :3] = CM
    cm[0, 3] = 1  # one gt-0 pixel predicted as 3
    iou0 = 2 / (4 + 3 - 2)
    acc0 = 2 / 4
    nan_rule = segmentation_scores(cm)
    assert nan_rule["IoU/3"] == 0.0 and math.isnan(nan_rule["Acc/3"])
    assert math.isnan(nan_rule["IoU/4"]) and math.isnan(nan_rule["Acc/4"])
    assert nan_rule["mIoU"] == pytest.approx((iou0 + IOU[1] + IOU[2] + 0.0) / 4)
    assert nan_rule["mAcc"] == pytest.approx((acc0 + ACC[1] + ACC[2]) / 3)
    zero_rule = segmentation_scores(cm, absent="zero")
    assert zero_rule["IoU/4"] == 0.0 and zero_rule["Acc/3"] == 0.0
    assert zero_rule["mIoU"] == pytest.approx((iou0 + IOU[1] + IOU[2]) / 5)
    assert zero_rule["mAcc"] == pytest.approx((acc0 + ACC[1] + ACC[2]) / 5)
    # exclude drops classes from the means only; by name or index
    names = ["u", "a", "b", "c", "d"]
    ex = segmentation_scores(cm, names, absent="zero", exclude=("u", 4))
    assert ex["mIoU"] == pytest.approx((IOU[1] + IOU[2] + 0.0) / 3)
    assert ex["IoU/u"] == pytest.approx(iou0)
    with pytest.raises(ValueError, match="unknown class"):
        segmentation_scores(cm, names, exclude=("nope",))
    with pytest.raises(ValueError, match="absent"):
        segmentation_scores(cm, absent="skip")


def test_confusion_matrix_rejects_bad_labels():
    cm = ConfusionMatrix(3)
    with pytest.raises(ValueError, match="outside"):
        cm.update(torch.tensor([[0, 1]]), torch.tensor([[0, 7]]))
    with pytest.raises(ValueError, match="shape"):
        cm.update(torch.tensor([[0, 1, 2]]), torch.tensor([[0, 1]]))


# ------------------------------------------------------------------ detection
def _case():
    """Class 0: 3 gt boxes in two images; detections TP (.9), FP (.8), duplicate FP (.7), TP (.6).

    cum TP 1 1 1 2, FP 0 1 2 2 → recall 1/3 1/3 1/3 2/3, precision 1 1/2 1/3 1/2;
    VOC all-point AP = 1/3·1 + 1/3·1/2 = 0.5. COCO 101-point: r ≤ 1/3 (34 points) → 1, 1/3 < r ≤ 2/3 (33 points)
    → 0.5, else 0: (34 + 16.5)/101 = 0.5 at every IoU threshold (matches are exact, misses have IoU 0).
    Class 1: one gt box detected exactly → AP 1. Class 2: no ground truth → NaN, left out of the means.
    """
    targets = [
        {"boxes": torch.tensor([[0.0, 0, 10, 10], [20, 20, 30, 30], [40, 40, 60, 50]]),
         "labels": torch.tensor([0, 0, 1])},
        {"boxes": torch.tensor([[0.0, 0, 10, 10]]), "labels": torch.tensor([0])},
    ]
    predictions = [
        {"boxes": torch.tensor([[0.0, 0, 10, 10], [0, 0, 10, 10], [40, 40, 60, 50]]),
         "scores": torch.tensor([0.9, 0.7, 0.95]), "labels": torch.tensor([0, 0, 1])},
        {"boxes": torch.tensor([[50.0, 50, 60, 60], [0, 0, 10, 10]]),
         "scores": torch.tensor([0.8, 0.6]), "labels": torch.tensor([0, 0])},
    ]
    return predictions, targets


def test_voc_ap_hand_computed():
    predictions, targets = _case()
    out = voc_ap(predictions, targets, 3, ["p", "q", "r"])
    assert out["AP50/p"] == pytest.approx(0.5)
    assert out["AP50/q"] == pytest.approx(1.0)
    assert math.isnan(out["AP50/r"])
    assert out["mAP50"] == pytest.approx(0.75)


def test_voc_ap_threshold_and_perfect():
    gt = [{"boxes": torch.tensor([[0.0, 0, 10, 10]]), "labels": torch.tensor([0])}]
    half = [{"boxes": torch.tensor([[0.0, 0, 10, 5]]), "scores": torch.tensor([1.0]), "labels": torch.tensor([0])}]
    below = [{"boxes": torch.tensor([[0.0, 0, 10, 4.9]]), "scores": torch.tensor([1.0]), "labels": torch.tensor([0])}]
    assert voc_ap(half, gt, 1)["mAP50"] == 1.0  # IoU exactly 0.5 counts (metrics.md: IoU ≥ 0.5)
    assert voc_ap(below, gt, 1)["mAP50"] == 0.0
    # the legacy "+1" convention changes IoU: (10+1)(5+1)/((10+1)(10+1)) = 6/11 ≥ 0.5
    assert box_iou(np.array([[0, 0, 10, 5]]), np.array([[0, 0, 10, 10]]), plus_one=True)[0, 0] == pytest.approx(6 / 11)
    # no detection at all: AP 0
    empty = [{"boxes": torch.zeros(0, 4), "scores": torch.zeros(0), "labels": torch.zeros(0, dtype=torch.long)}]
    assert voc_ap(empty, gt, 1)["mAP50"] == 0.0


def test_coco_map_hand_computed_and_perfect():
    predictions, targets = _case()
    out = coco_map(predictions, targets, 3, ["p", "q", "r"])
    assert out["coco/AP/p"] == pytest.approx(0.5)
    assert out["coco/AP/q"] == pytest.approx(1.0)
    assert math.isnan(out["coco/AP/r"])
    assert out["coco/mAP"] == pytest.approx(0.75)
    assert out["coco/AP50"] == pytest.approx(0.75)
    perfect = [{"boxes": t["boxes"], "scores": torch.ones(len(t["boxes"])), "labels": t["labels"]} for t in targets]
    assert coco_map(perfect, targets, 3)["coco/mAP"] == pytest.approx(1.0)
    assert voc_ap(perfect, targets, 3)["mAP50"] == pytest.approx(1.0)
    empty = [{"boxes": torch.zeros(0, 4), "scores": torch.zeros(0), "labels": torch.zeros(0, dtype=torch.long)}] * 2
    assert coco_map(empty, targets, 3)["coco/mAP"] == 0.0


def test_detection_inputs_validated():
    predictions, targets = _case()
    with pytest.raises(ValueError, match="labels outside"):
        voc_ap(predictions, targets, 1)
    with pytest.raises(ValueError, match="one per image"):
        coco_map(predictions[:1], targets, 3)
    with pytest.raises(KeyError, match="scores"):
        voc_ap([{"boxes": torch.zeros(0, 4), "labels": torch.zeros(0)}], targets[:1], 3)
