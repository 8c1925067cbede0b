"""Object-detection constraint: torchvision (FCOS, RetinaNet, Faster R-CNN) or mmdet 3.x on the fused image.

BDL (IJCAI 2023) constrains fusion with an FCOS detector trained on M3FD; MoE-Fusion
trains Faster R-CNNs jointly. This task wraps a detector behind one interface: the lower- and upper-level loss is
the sum of the detector's own loss dict, and evaluation reports VOC AP@0.5 (BDL's protocol) and COCO mAP.

Conventions: boxes xyxy in absolute pixels of the fused image, labels 0..C−1.
torchvision reserves class 0 for the background, so its adapter builds C + 1 classes, adds 1 to the labels going in
and subtracts 1 coming out; mmdet uses 0..C−1 natively. Images are never resized behind the user's back:
torchvision's internal resize is set by ``min_size``/``max_size`` (set them to the training resolution; the
torchvision default upsizes to 800) and this task owns input normalisation (``prepare``), so the detector's own
``image_mean``/``image_std`` are the identity.

No weights are downloaded (``weights=None, weights_backbone=None``). Without pretrained weights torchvision uses
ordinary BatchNorm in the backbone; with small batches and inside functional hypergradient calls, prefer
``norm="frozen"`` or ``"group"``.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import math
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from tasks.base import Task, eval_mode, load_state_dict_file
from tasks.metrics import coco_map, voc_ap

__all__ = ["DET_NORMS", "FCOS_DECODES", "M3FD_CLASSES", "MMDET_BUILTIN_CONFIGS", "TORCHVISION_DETECTORS", "DetTask"]

#: M3FD class order (its annotations' label ids 0..5).
M3FD_CLASSES = ("People", "Car", "Bus", "Motorcycle", "Lamp", "Truck")
#: torchvision detector names: ``<detector>_<backbone>_fpn``.
TORCHVISION_DETECTORS = tuple(f"{d}_{b}_fpn" for d in ("fcos", "retinanet", "fasterrcnn")
                              for b in ("resnet18", "resnet34", "resnet50")) + ("fasterrcnn_mobilenet_v3_large_fpn",)
MMDET_BUILTIN_CONFIGS = ("retinanet_r18_fpn", "fcos_r18_fpn")
DET_NORMS = ("batch", "frozen", "group")
#: FCOS box decodings: torchvision's relu(t)·stride, or the FCOS paper's exp(s_l·t) (BDL's released head).
FCOS_DECODES = ("stride", "exp")
#: strides of the FPN levels P3–P7 (torchvision's FCOS anchor sizes are the same numbers)
_FCOS_STRIDES = (8, 16, 32, 64, 128)


# --------------------------------------------------------------------------------------------------- torchvision
def _norm_layer(norm: str) -> Any:
    from torchvision.ops import FrozenBatchNorm2d

    if norm == "batch":
        return nn.BatchNorm2d
    if norm == "frozen":
        return FrozenBatchNorm2d
    if norm == "group":
        return lambda channels, **_: nn.GroupNorm(math.gcd(32, channels), channels)
    raise ValueError(f"unknown backbone norm {norm!r}; expected one of {DET_NORMS}")


def _build_torchvision(name: str, num_classes: int, *, min_size: int, max_size: int, norm: str,
                       trainable_layers: int | None, fpn_channels: int, head_convs: int, score_thresh: float,
                       nms_thresh: float, detections_per_img: int, fcos_decode: str = "stride") -> nn.Module:
    """Builds a randomly initialised torchvision detector with ``num_classes`` foreground classes (+1 background)."""
    import torchvision
    from torchvision.models.detection import FCOS, FasterRCNN, RetinaNet
    from torchvision.models.detection.anchor_utils import AnchorGenerator
    from torchvision.models.detection.backbone_utils import BackboneWithFPN, mobilenet_backbone
    from torchvision.models.detection.fcos import FCOSHead
    from torchvision.models.detection.retinanet import RetinaNetHead
    from torchvision.ops.feature_pyramid_network import LastLevelMaxPool, LastLevelP6P7

    if name not in TORCHVISION_DETECTORS:
        raise ValueError(f"unknown torchvision detector {name!r}; expected one of {TORCHVISION_DETECTORS}")
    detector, backbone_name = name.split("_", 1)
    backbone_name = backbone_name[: -len("_fpn")]
    norm_layer = _norm_layer(norm)
    common = {"min_size": min_size, "max_size": max_size, "image_mean": [0.0, 0.0, 0.0], "image_std": [1.0, 1.0, 1.0]}
    classes = num_classes + 1

    if backbone_name == "mobilenet_v3_large":
        layers = 6 if trainable_layers is None else trainable_layers
        backbone = mobilenet_backbone(backbone_name=backbone_name, weights=None, fpn=True, norm_layer=norm_layer,
                                      trainable_layers=layers)
        anchors = AnchorGenerator(((32, 64, 128, 256, 512),) * 3, ((0.5, 1.0, 2.0),) * 3)
        return FasterRCNN(backbone, classes, rpn_anchor_generator=anchors, rpn_score_thresh=0.05,
                          box_score_thresh=score_thresh, box_nms_thresh=nms_thresh,
                          box_detections_per_img=detections_per_img, **common)

    resnet = getattr(torchvision.models, backbone_name)(weights=None, norm_layer=norm_layer)
    layers = 5 if trainable_layers is None else trainable_layers
    if not 0 <= layers <= 5:
        raise ValueError(f"trainable_layers must be in 0..5 for ResNet backbones, got {layers}")
    train = ["layer4", "layer3", "layer2", "layer1", "conv1", "bn1"][: layers + (layers == 5)]
    for pname, p in resnet.named_parameters():
        if not any(pname.startswith(t) for t in train):
            p.requires_grad_(False)
    returned = [2, 3, 4] if detector in ("fcos", "retinanet") else [1, 2, 3, 4]
    stage2 = resnet.inplanes // 8
    backbone = BackboneWithFPN(
        resnet, {f"layer{k}": str(v) for v, k in enumerate(returned)}, [stage2 * 2 ** (i - 1) for i in returned],
        fpn_channels, extra_blocks=LastLevelP6P7(fpn_channels, fpn_channels) if detector != "fasterrcnn"
        else LastLevelMaxPool())
    if detector == "fcos":
        head = FCOSHead(fpn_channels, 1, classes, num_convs=head_convs)
        anchors = None
        if fcos_decode == "exp":
            head.regression_head, anchors = _exp_fcos_parts(fpn_channels, head_convs)
        return FCOS(backbone, classes, head=head, anchor_generator=anchors, score_thresh=score_thresh,
                    nms_thresh=nms_thresh, detections_per_img=detections_per_img, **common)
    if detector == "retinanet":
        model = RetinaNet(backbone, classes, score_thresh=score_thresh, nms_thresh=nms_thresh,
                          detections_per_img=detections_per_img, **common)
        model.head = RetinaNetHead(fpn_channels, model.anchor_generator.num_anchors_per_location()[0], classes)
        return model
    return FasterRCNN(backbone, classes, box_score_thresh=score_thresh, box_nms_thresh=nms_thresh,
                      box_detections_per_img=detections_per_img, **common)


def _exp_fcos_parts(in_channels: int, num_convs: int) -> tuple[nn.Module, nn.Module]:
    """The regression head and anchors of the FCOS paper's decoding (``fcos_decode="exp"``).

    Distances are exp(s_l·t) pixels with one learned scale s_l per level, from cell centres at
    x·stride + ⌊stride/2⌋ — BDL's released detector (``ScaleExp``, ``coords_fmap2orig``). torchvision decodes
    its regression output t as t·anchor size (= stride) from centres at x·stride, so the head hands it
    exp(s_l·t)/stride and the anchors move by half a stride; training (GIoU on decoded boxes) and inference
    then both see the released geometry.
    """
    from torchvision.models.detection.anchor_utils import AnchorGenerator
    from torchvision.models.detection.fcos import FCOSRegressionHead

    class ExpRegressionHead(FCOSRegressionHead):
        def __init__(self) -> None:
            super().__init__(in_channels, 1, num_convs=num_convs)
            self.scale_exp = nn.ParameterList([nn.Parameter(torch.ones(1)) for _ in _FCOS_STRIDES])

        def forward(self, x: list[Tensor]) -> tuple[Tensor, Tensor]:
            if len(x) != len(_FCOS_STRIDES):
                raise ValueError(f"the exp FCOS decoding expects {len(_FCOS_STRIDES)} FPN levels, got {len(x)}")
            regression, ctrness = [], []
            for features, scale, stride in zip(x, self.scale_exp, _FCOS_STRIDES):
                feature = self.conv(features)
                n = feature.shape[0]
                distances = torch.exp(self.bbox_reg(feature).float() * scale) / stride
                regression.append(distances.permute(0, 2, 3, 1).reshape(n, -1, 4))
                ctrness.append(self.bbox_ctrness(feature).permute(0, 2, 3, 1).reshape(n, -1, 1))
            return torch.cat(regression, dim=1), torch.cat(ctrness, dim=1)

    class CentredAnchors(AnchorGenerator):
        """torchvision derives a level's stride from image size // grid size (96 for a 192 px side at P7);
        the released code uses the nominal stride, as here."""

        def grid_anchors(self, grid_sizes: list[list[int]], strides: list[list[Tensor]]) -> list[Tensor]:
            anchors = []
            for (h, w), stride, base in zip(grid_sizes, _FCOS_STRIDES, self.cell_anchors):
                ys, xs = torch.meshgrid(torch.arange(h, device=base.device) * stride + stride // 2,
                                        torch.arange(w, device=base.device) * stride + stride // 2, indexing="ij")
                centres = torch.stack((xs, ys, xs, ys), dim=-1).reshape(-1, 4).to(base)
                anchors.append(centres + base.view(1, 4))
            return anchors

    return ExpRegressionHead(), CentredAnchors(tuple((s,) for s in _FCOS_STRIDES), ((1.0,),) * len(_FCOS_STRIDES))


@contextlib.contextmanager
def _loss_mode(model: nn.Module) -> Iterator[None]:
    """torchvision computes losses only when ``training`` is set; switch it on for everything but BatchNorm.

    BatchNorm layers keep the mode the caller chose, so ``task.eval()`` gives losses with frozen running
    statistics (no update of them) and ``task.train()`` the usual training behaviour.
    """
    saved = [(m, m.training) for m in model.modules()]
    for m in model.modules():
        if not isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.training = True
    try:
        yield
    finally:
        for m, mode in saved:
            m.training = mode


class _TorchvisionAdapter(nn.Module):
    """Labels 0..C−1 ↔ torchvision's 1..C, losses as a dict, predictions as per-image dicts."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def losses(self, images: Tensor, targets: list[dict[str, Tensor]]) -> dict[str, Tensor]:
        shifted = [{"boxes": t["boxes"], "labels": t["labels"] + 1} for t in targets]
        with _loss_mode(self.model):
            return dict(self.model(list(images), shifted))

    def predict(self, images: Tensor) -> list[dict[str, Tensor]]:
        out = []
        for d in self.model(list(images)):  # FCOS/RetinaNet score the background slot too: drop it
            keep = d["labels"] > 0
            out.append({"boxes": d["boxes"][keep], "scores": d["scores"][keep], "labels": d["labels"][keep] - 1})
        return out


# --------------------------------------------------------------------------------------------------- mmdet
def _import_mmdet():
    try:
        from mmdet.registry import MODELS
        from mmdet.structures import DetDataSample
        from mmdet.utils import register_all_modules
        from mmengine.config import Config
        from mmengine.structures import InstanceData
    except ImportError as exc:
        raise ImportError(
            "DetTask(backend='mmdet') needs mmdet 3.x, mmengine and mmcv 2.x (full, with ops). Install mmcv 2.1.0 "
            "first (scripts/build_mmcv.sh, or a prebuilt mmcv 2.1.0 wheel), then `pip install -e .[mmdet]`; "
            f"import failed with: {exc}") from exc
    register_all_modules(init_default_scope=True)
    return MODELS, DetDataSample, InstanceData, Config


def _mmdet_builtin(name: str, num_classes: int, fpn_channels: int, head_convs: int, score_thresh: float,
                   nms_thresh: float, detections_per_img: int) -> dict:
    """Small ResNet-18 RetinaNet/FCOS configs for tests and quick runs (random init, ``init_cfg=None``)."""
    backbone = {"type": "ResNet", "depth": 18, "num_stages": 4, "out_indices": (1, 2, 3), "frozen_stages": -1,
                    "norm_cfg": {"type": "BN", "requires_grad": True}, "norm_eval": False, "style": "pytorch", "init_cfg": None}
    neck = {"type": "FPN", "in_channels": [128, 256, 512], "out_channels": fpn_channels, "start_level": 0,
                "add_extra_convs": "on_output", "num_outs": 5}
    test_cfg = {"nms_pre": 1000, "min_bbox_size": 0, "score_thr": score_thresh,
                    "nms": {"type": "nms", "iou_threshold": nms_thresh}, "max_per_img": detections_per_img}
    focal = {"type": "FocalLoss", "use_sigmoid": True, "gamma": 2.0, "alpha": 0.25, "loss_weight": 1.0}
    if name == "retinanet_r18_fpn":
        head = {"type": "RetinaHead", "num_classes": num_classes, "in_channels": fpn_channels, "stacked_convs": head_convs,
                    "feat_channels": fpn_channels,
                    "anchor_generator": {"type": "AnchorGenerator", "octave_base_scale": 4, "scales_per_octave": 3,
                                          "ratios": [0.5, 1.0, 2.0], "strides": [8, 16, 32, 64, 128]},
                    "bbox_coder": {"type": "DeltaXYWHBBoxCoder", "target_means": [0.0] * 4, "target_stds": [1.0] * 4},
                    "loss_cls": focal, "loss_bbox": {"type": "L1Loss", "loss_weight": 1.0}}
        train_cfg = {"assigner": {"type": "MaxIoUAssigner", "pos_iou_thr": 0.5, "neg_iou_thr": 0.4, "min_pos_iou": 0,
                                       "ignore_iof_thr": -1},
                         "sampler": {"type": "PseudoSampler"}, "allowed_border": -1, "pos_weight": -1, "debug": False}
        return {"type": "RetinaNet", "backbone": backbone, "neck": neck, "bbox_head": head, "train_cfg": train_cfg,
                    "test_cfg": test_cfg}
    if name == "fcos_r18_fpn":
        head = {"type": "FCOSHead", "num_classes": num_classes, "in_channels": fpn_channels, "stacked_convs": head_convs,
                    "feat_channels": fpn_channels, "strides": [8, 16, 32, 64, 128], "norm_cfg": {"type": "GN", "num_groups": math.gcd(32, fpn_channels)},
                    "loss_cls": focal, "loss_bbox": {"type": "IoULoss", "loss_weight": 1.0},
                    "loss_centerness": {"type": "CrossEntropyLoss", "use_sigmoid": True, "loss_weight": 1.0}}
        return {"type": "FCOS", "backbone": backbone, "neck": neck, "bbox_head": head, "train_cfg": None, "test_cfg": test_cfg}
    raise ValueError(f"unknown built-in mmdet config {name!r}; expected one of {MMDET_BUILTIN_CONFIGS} "
                     "or a path to an mmdet 3.x config file (also 'mmdet::retinanet/retinanet_r50_fpn_1x_coco.py')")


def _set_num_classes(cfg: Any, num_classes: int) -> None:
    """Sets every ``num_classes`` entry of a (nested) model config, e.g. the bbox head(s)."""
    if isinstance(cfg, Mapping):
        for key in list(cfg):
            if key == "num_classes":
                cfg[key] = num_classes
            else:
                _set_num_classes(cfg[key], num_classes)
    elif isinstance(cfg, (list, tuple)):
        for item in cfg:
            _set_num_classes(item, num_classes)


def _build_mmdet(config: str | Path, num_classes: int, **builtin_kw: Any) -> nn.Module:
    MODELS, _, _, Config = _import_mmdet()
    from mmengine.config import ConfigDict
    from mmengine.logging import MMLogger

    if str(config) in MMDET_BUILTIN_CONFIGS:
        model_cfg = _mmdet_builtin(str(config), num_classes, **builtin_kw)
    else:
        if not str(config).startswith("mmdet::") and not Path(config).is_file():
            raise FileNotFoundError(f"mmdet config {config!r} is neither a built-in ({MMDET_BUILTIN_CONFIGS}) "
                                    "nor an existing file")
        model_cfg = copy.deepcopy(Config.fromfile(str(config)).model.to_dict())
        model_cfg.get("backbone", {})["init_cfg"] = None  # never fetch pretrained weights
        _set_num_classes(model_cfg, num_classes)
    model_cfg.pop("data_preprocessor", None)  # the task normalises and pads itself
    model = MODELS.build(ConfigDict(model_cfg))
    logger = MMLogger.get_current_instance()
    level = logger.level
    logger.setLevel(logging.WARNING)  # init_weights logs every parameter at INFO
    try:
        model.init_weights()
    finally:
        logger.setLevel(level)
    return model


class _MMDetAdapter(nn.Module):
    """Wraps an mmdet 3.x detector: (B, 3, H, W) normalised images + targets → loss dict / predictions."""

    def __init__(self, model: nn.Module, pad_divisor: int = 32) -> None:
        super().__init__()
        self.model = model
        self.pad_divisor = pad_divisor
        _, self._sample_cls, self._instance_cls, _ = _import_mmdet()

    def _inputs(self, images: Tensor, targets: list[dict[str, Tensor]] | None):
        h, w = images.shape[-2:]
        ph, pw = -h % self.pad_divisor, -w % self.pad_divisor
        padded = F.pad(images, (0, pw, 0, ph)) if ph or pw else images
        meta = {"img_shape": (h, w), "ori_shape": (h, w), "pad_shape": tuple(padded.shape[-2:]),
                    "batch_input_shape": tuple(padded.shape[-2:]), "scale_factor": (1.0, 1.0)}
        samples = []
        for i in range(images.shape[0]):
            sample = self._sample_cls(metainfo=dict(meta))
            if targets is not None:
                sample.gt_instances = self._instance_cls(bboxes=targets[i]["boxes"], labels=targets[i]["labels"])
            samples.append(sample)
        return padded, samples

    def losses(self, images: Tensor, targets: list[dict[str, Tensor]]) -> dict[str, Tensor]:
        padded, samples = self._inputs(images, targets)
        raw = self.model.loss(padded, samples)
        out = {}
        for key, value in raw.items():  # mmdet returns per-level lists for some heads
            out[key] = sum(value) if isinstance(value, (list, tuple)) else value
        return {k: v for k, v in out.items() if "loss" in k}

    def predict(self, images: Tensor) -> list[dict[str, Tensor]]:
        padded, samples = self._inputs(images, None)
        results = self.model.predict(padded, samples, rescale=False)
        return [{"boxes": r.pred_instances.bboxes, "scores": r.pred_instances.scores,
                 "labels": r.pred_instances.labels} for r in results]


# --------------------------------------------------------------------------------------------------- task
class DetTask(Task):
    """Detection constraint task (torchvision or mmdet backend).

    Args:
        model: torchvision: one of :data:`TORCHVISION_DETECTORS` (e.g. ``"fcos_resnet50_fpn"`` as BDL,
            ``"fasterrcnn_mobilenet_v3_large_fpn"`` for speed, ``"fcos_resnet18_fpn"`` for tests); mmdet: a path to
            an mmdet 3.x config file, an ``mmdet::…`` package config, or a built-in (:data:`MMDET_BUILTIN_CONFIGS`).
        num_classes: foreground classes C; defaults to ``len(class_names)``, or 6 (M3FD).
        class_names: names for the per-class metrics (M3FD's by default when C = 6).
        backend: ``"torchvision"`` or ``"mmdet"`` (lazy import, clear ImportError when absent).
        weights: optional local state dict of the detector (or of this task), loaded strictly.
        min_size, max_size: torchvision's internal resize; set to the training resolution (BDL: 270/360) so that
            nothing is resized. Ignored by mmdet (which never resizes here).
        norm: torchvision backbone normalisation: ``"batch"`` (torchvision's choice without pretrained weights),
            ``"frozen"`` (FrozenBatchNorm with identity statistics) or ``"group"`` (GroupNorm, batch-independent).
        trainable_layers: torchvision backbone stages left trainable (default: all).
        fpn_channels: FPN width of ResNet backbones (256 as torchvision; smaller for tests).
        head_convs: convolutions per FCOS head branch (4 as torchvision) / mmdet built-in ``stacked_convs``.
        fcos_decode: torchvision FCOS box distances: ``"stride"`` (torchvision's relu(t)·stride) or ``"exp"``
            (exp(s_l·t) pixels with a learned scale per level, from cell centres at x·stride + ⌊stride/2⌋: the
            FCOS paper and BDL's released detector, which ``import_weights.py --kind bdl_fcos`` needs).
        score_thresh, nms_thresh, detections_per_img: inference post-processing (BDL: score > 0.05, NMS 0.6).
        input_norm: ``"imagenet"``, ``"instance"`` or ``"none"`` (applied by :meth:`prepare`).
        iou_threshold: VOC matching threshold for :meth:`evaluate`.
    """

    name = "det"
    needs = frozenset({"boxes", "labels"})

    def __init__(self, model: str = "fcos_resnet50_fpn", num_classes: int | None = None,
                 class_names: Sequence[str] | None = None, *, backend: str = "torchvision",
                 weights: str | Path | None = None, min_size: int = 270, max_size: int = 360, norm: str = "batch",
                 trainable_layers: int | None = None, fpn_channels: int = 256, head_convs: int = 4,
                 score_thresh: float = 0.05, nms_thresh: float = 0.6, detections_per_img: int = 100,
                 input_norm: str = "imagenet", iou_threshold: float = 0.5, fcos_decode: str = "stride") -> None:
        super().__init__(input_norm=input_norm)
        if class_names is None:
            class_names = M3FD_CLASSES if num_classes in (None, len(M3FD_CLASSES)) else \
                [str(i) for i in range(num_classes)]
        if num_classes is None:
            num_classes = len(class_names)
        if len(class_names) != num_classes:
            raise ValueError(f"{len(class_names)} class names for num_classes={num_classes}")
        if norm not in DET_NORMS:
            raise ValueError(f"unknown backbone norm {norm!r}; expected one of {DET_NORMS}")
        if fcos_decode not in FCOS_DECODES:
            raise ValueError(f"unknown fcos_decode {fcos_decode!r}; expected one of {FCOS_DECODES}")
        if fcos_decode != "stride" and not (backend == "torchvision" and str(model).startswith("fcos_")):
            raise ValueError(f"fcos_decode={fcos_decode!r} applies to torchvision FCOS models, not {model!r}")
        self.model_name, self.backend = str(model), backend
        self.num_classes, self.class_names = num_classes, tuple(str(n) for n in class_names)
        self.iou_threshold = iou_threshold
        post = {"score_thresh": score_thresh, "nms_thresh": nms_thresh, "detections_per_img": detections_per_img}
        if backend == "torchvision":
            self.detector = _TorchvisionAdapter(_build_torchvision(
                str(model), num_classes, min_size=min_size, max_size=max_size, norm=norm,
                trainable_layers=trainable_layers, fpn_channels=fpn_channels, head_convs=head_convs,
                fcos_decode=fcos_decode, **post))
        elif backend == "mmdet":
            self.detector = _MMDetAdapter(_build_mmdet(model, num_classes, fpn_channels=fpn_channels,
                                                       head_convs=head_convs, **post))
        else:
            raise ValueError(f"unknown detection backend {backend!r}; expected 'torchvision' or 'mmdet'")
        if weights is not None:
            self.detector.model.load_state_dict(load_state_dict_file(weights, "detector.model."), strict=True)

    def forward(self, fused: Tensor) -> list[dict[str, Tensor]]:
        """Detections on a fused batch: per image ``boxes`` (N, 4) xyxy px, ``scores``, ``labels`` 0..C−1.

        Call in eval mode (torchvision returns detections only then). Boxes and scores are float32 even under
        bf16 autocast, where the heads return bf16: bf16 resolves only 2 px at x = 300, and NumPy (the
        metrics) has no bf16.
        """
        detections = self.detector.predict(self.prepare(fused))
        return [{k: v.float() if v.is_floating_point() else v for k, v in d.items()} for d in detections]

    def targets(self, batch: Mapping[str, Any], fused: Tensor) -> list[dict[str, Tensor]]:
        """Validated per-image targets on ``fused``'s device (boxes float32 xyxy px, labels int64 0..C−1)."""
        self.check_fused(fused)
        self.check_batch(batch, fused)
        h, w = fused.shape[-2:]
        out = []
        for i, (boxes, labels) in enumerate(zip(batch["boxes"], batch["labels"], strict=True)):
            boxes = torch.as_tensor(boxes, dtype=torch.float32, device=fused.device).reshape(-1, 4)
            labels = torch.as_tensor(labels, dtype=torch.int64, device=fused.device).reshape(-1)
            if len(boxes) != len(labels):
                raise ValueError(f"image {i}: {len(boxes)} boxes but {len(labels)} labels")
            if len(labels) and (labels.min() < 0 or labels.max() >= self.num_classes):
                raise ValueError(f"image {i}: labels must be in 0..{self.num_classes - 1}, got "
                                 f"{labels.unique().tolist()}")
            if len(boxes) and ((boxes[:, 2] <= boxes[:, 0]) | (boxes[:, 3] <= boxes[:, 1])).any():
                raise ValueError(f"image {i}: boxes must be xyxy with x2 > x1 and y2 > y1 (degenerate boxes "
                                 "should be dropped by the dataset)")
            if len(boxes) and (boxes[:, 2].max() > w + 1 or boxes[:, 3].max() > h + 1 or boxes[:, :2].min() < -1):
                raise ValueError(f"image {i}: boxes exceed the {h}×{w} image; they must be absolute pixels")
            out.append({"boxes": boxes, "labels": labels})
        return out

    def loss(self, fused: Tensor, batch: Mapping[str, Any]) -> dict[str, Tensor]:
        """The detector's loss dict on ``fused`` plus ``loss`` = its sum."""
        targets = self.targets(batch, fused)
        parts = self.detector.losses(self.prepare(fused), targets)
        return {"loss": sum(parts.values()), **parts}

    @torch.no_grad()
    def evaluate(self, pairs: Iterable[tuple[Tensor, Mapping[str, Any]]]) -> dict[str, float]:
        """VOC AP@0.5 (``mAP50``, ``AP50/<c>``) and COCO (``coco/mAP``, ``coco/AP50``, ``coco/AP75``, ``coco/AP/<c>``)."""
        predictions, targets = [], []
        with eval_mode(self):
            for fused, batch in pairs:
                tgt = self.targets(batch, fused)
                for det, t in zip(self(fused), tgt, strict=True):
                    predictions.append({k: v.detach().cpu() for k, v in det.items()})
                    targets.append({k: v.cpu() for k, v in t.items()})
        if not targets:
            raise ValueError("evaluate() received no (fused, batch) pairs")
        out = voc_ap(predictions, targets, self.num_classes, self.class_names, iou_threshold=self.iou_threshold)
        out.update(coco_map(predictions, targets, self.num_classes, self.class_names))
        return out

    def extra_repr(self) -> str:
        return (f"backend={self.backend!r}, model={self.model_name!r}, num_classes={self.num_classes}, "
                f"input_norm={self.input_norm!r}")
