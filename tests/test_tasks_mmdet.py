"""Detection task, mmdet 3.x backend (skipped when mmdet/mmcv are not installed)."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("mmdet")
pytest.importorskip("mmcv.ops")

from fusion.data import collate_pairs, create_dataset
from tasks.det import DetTask

pytestmark = pytest.mark.mmdet
SMALL = {"fpn_channels": 32, "head_convs": 1}


@pytest.fixture(scope="module")
def batch() -> dict:
    ds = create_dataset("synthetic", split="train", size=64, length=2, seed=0)
    return collate_pairs([ds[i] for i in range(2)])  # two scenes, three boxes: enough, and CPU-cheap


def test_mmdet_builtin_trains_and_evaluates(batch):
    task = DetTask("retinanet_r18_fpn", backend="mmdet", **SMALL)
    fused = (0.5 * batch["ir"] + 0.5 * batch["vis"]).clamp(0, 1)
    opt = torch.optim.Adam(task.parameters(), lr=1e-3)
    losses = []
    for _ in range(3):
        out = task.lower_loss(fused, batch)
        opt.zero_grad()
        out["loss"].backward()
        opt.step()
        losses.append(out["loss"].item())
    assert {"loss_cls", "loss_bbox"} <= set(out)
    assert losses[-1] < losses[0]
    grey = fused.mean(1, keepdim=True).requires_grad_(True)
    (grad,) = torch.autograd.grad(task.upper_loss(grey, batch)["loss"], grey)
    assert grad.abs().sum() > 0
    metrics = task.evaluate([(fused, batch)])
    assert 0.0 <= metrics["mAP50"] <= 1.0 and "coco/mAP" in metrics


def test_mmdet_config_file(tmp_path, batch):
    """A user config file: num_classes is overridden, the pretrained init_cfg dropped, data_preprocessor ignored."""
    from tasks.det import _mmdet_builtin

    model = _mmdet_builtin("fcos_r18_fpn", 80, fpn_channels=32, head_convs=1, score_thresh=0.05, nms_thresh=0.6,
                           detections_per_img=100)
    model["backbone"]["init_cfg"] = {"type": "Pretrained", "checkpoint": "torchvision://resnet18"}
    model["data_preprocessor"] = {"type": "DetDataPreprocessor", "mean": [0, 0, 0], "std": [1, 1, 1]}
    path = tmp_path / "fcos_small.py"
    path.write_text(f"model = {model!r}\n")
    task = DetTask(str(path), backend="mmdet")
    assert task.detector.model.bbox_head.num_classes == 6
    fused = (0.5 * batch["ir"] + 0.5 * batch["vis"]).clamp(0, 1)
    assert torch.isfinite(task.lower_loss(fused, batch)["loss"])
    with pytest.raises(FileNotFoundError, match="built-in"):
        DetTask(str(tmp_path / "missing.py"), backend="mmdet")
