"""Semantic-segmentation constraint: any segmentation-models-pytorch architecture on the fused image.

BDL (IJCAI 2023) constrains fusion with a segmentation network trained on MFNet; the group's later works use
SegFormer. Rather than fixing one network, this task builds any ``smp.create_model(arch, encoder_name, ...)``
with ``encoder_weights=None`` (the toolkit runs offline; a local weights file can be loaded strictly). The loss is
cross-entropy with ``ignore_index`` plus optional Dice; evaluation is the MFNet confusion-matrix protocol of
:mod:`tasks.metrics`.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from tasks.base import Task, eval_mode, load_state_dict_file
from tasks.metrics import ConfusionMatrix, segmentation_scores

__all__ = ["MFNET_CLASSES", "SegTask"]

#: MFNet / MSRS class order.
MFNET_CLASSES = ("unlabelled", "car", "person", "bike", "curve", "car_stop", "guardrail", "color_cone", "bump")


class SegTask(Task):
    """Segmentation constraint task around a segmentation-models-pytorch model.

    Args:
        arch: smp architecture (``"Unet"``, ``"DeepLabV3Plus"``, ``"FPN"``, ``"Segformer"``, …). DeepLabV3+ needs
            batch ≥ 2 in train mode (BatchNorm after global pooling).
        encoder_name: smp encoder (``"resnet18"``, ``"resnet34"``, ``"mit_b3"``, ``"tu-<timm name>"``, …).
        num_classes: number of classes; defaults to ``len(class_names)``, or 9 (MFNet) when neither is given.
        class_names: names for the per-class metrics; MFNet's when neither argument is given, else "0".."C−1".
        weights: optional local file with the smp model's state dict (or this task's, keys ``model.*``), loaded
            strictly so a mismatched checkpoint fails loudly.
        ignore_index: target value ignored by the loss and the metrics (255, the toolkit's convention).
        dice_weight: weight of the multiclass Dice loss added to cross-entropy (0 = CE only).
        class_weights: optional per-class cross-entropy weights.
        input_norm: ``"imagenet"`` (what smp encoders expect), ``"instance"`` or ``"none"``.
        absent: metric rule for classes without ground truth, ``"nan"`` or ``"zero"`` (:func:`segmentation_scores`).
        exclude: classes left out of mIoU/mAcc (e.g. ``("guardrail",)`` for BDL's 8-class table).
        **model_kwargs: passed to ``smp.create_model`` (``encoder_depth``, ``decoder_channels``, …).

    Inputs of any size work: the network input is replicate-padded at the bottom/right to the encoder's output
    stride and the logits are cropped back.
    """

    name = "seg"
    needs = frozenset({"mask"})

    def __init__(self, arch: str = "Unet", encoder_name: str = "resnet18", num_classes: int | None = None,
                 class_names: Sequence[str] | None = None, *, weights: str | Path | None = None,
                 ignore_index: int = 255, dice_weight: float = 0.0, class_weights: Sequence[float] | None = None,
                 input_norm: str = "imagenet", absent: str = "nan", exclude: Sequence[int | str] = (),
                 **model_kwargs: Any) -> None:
        super().__init__(input_norm=input_norm)
        try:
            import segmentation_models_pytorch as smp
        except ImportError as exc:  # pragma: no cover - a core dependency
            raise ImportError("SegTask needs segmentation-models-pytorch: pip install segmentation-models-pytorch") \
                from exc
        if class_names is None:
            class_names = MFNET_CLASSES if num_classes in (None, len(MFNET_CLASSES)) else \
                [str(i) for i in range(num_classes)]
        if num_classes is None:
            num_classes = len(class_names)
        if len(class_names) != num_classes:
            raise ValueError(f"{len(class_names)} class names for num_classes={num_classes}")
        if dice_weight < 0:
            raise ValueError(f"dice_weight must be >= 0, got {dice_weight}")
        if absent not in ("nan", "zero"):
            raise ValueError(f"unknown absent rule {absent!r}; expected 'nan' or 'zero'")
        self.arch, self.encoder_name = arch, encoder_name
        self.num_classes, self.class_names = num_classes, tuple(str(n) for n in class_names)
        self.ignore_index, self.dice_weight = ignore_index, float(dice_weight)
        self.absent, self.exclude = absent, tuple(exclude)
        self.model = smp.create_model(arch, encoder_name=encoder_name, encoder_weights=None, in_channels=3,
                                      classes=num_classes, **model_kwargs)
        if weights is not None:
            self.model.load_state_dict(load_state_dict_file(weights, "model."), strict=True)
        if class_weights is not None and len(class_weights) != num_classes:
            raise ValueError(f"{len(class_weights)} class weights for {num_classes} classes")
        self.register_buffer("class_weights", None if class_weights is None else
                             torch.tensor(class_weights, dtype=torch.float32))
        self.dice = smp.losses.DiceLoss("multiclass", ignore_index=ignore_index) if dice_weight > 0 else None
        divisible = getattr(self.model, "requires_divisible_input_shape", True)
        self.stride = int(getattr(self.model.encoder, "output_stride", 32)) if divisible else 1

    def forward(self, fused: Tensor) -> Tensor:
        """Fused image in [0, 1] (B, 1|3, H, W) → logits (B, num_classes, H, W)."""
        x = self.prepare(fused)
        h, w = x.shape[-2:]
        ph, pw = -h % self.stride, -w % self.stride
        if ph or pw:
            x = F.pad(x, (0, pw, 0, ph), mode="replicate")
        return self.model(x)[..., :h, :w]

    def _target(self, batch: Mapping[str, Any], fused: Tensor) -> Tensor:
        self.check_fused(fused)
        self.check_batch(batch, fused)
        mask = batch["mask"]
        if not isinstance(mask, Tensor) or mask.dim() != 3 or mask.shape[-2:] != fused.shape[-2:]:
            shape = tuple(mask.shape) if isinstance(mask, Tensor) else type(mask).__name__
            raise ValueError(f"batch['mask'] must be (B, H, W) = ({fused.shape[0]}, {fused.shape[-2]}, "
                             f"{fused.shape[-1]}), got {shape}")
        if mask.is_floating_point():
            raise ValueError(f"batch['mask'] must hold integer labels, got {mask.dtype}")
        return mask.to(fused.device, torch.long)

    def loss(self, fused: Tensor, batch: Mapping[str, Any]) -> dict[str, Tensor]:
        """Cross-entropy (+ Dice) of the network on ``fused``: ``{"loss", "ce", ["dice"]}``."""
        target = self._target(batch, fused)
        logits = self(fused)
        ce = F.cross_entropy(logits, target, weight=self.class_weights, ignore_index=self.ignore_index)
        # Every pixel ignored: CE's mean is 0/0. Chosen on the device: no host sync (CUDA graphs).
        ce = torch.where((target != self.ignore_index).any(), ce, logits.sum() * 0.0)
        out = {"loss": ce, "ce": ce}
        if self.dice is not None:
            dice = self.dice(logits, target)
            out["dice"] = dice
            out["loss"] = ce + self.dice_weight * dice
        return out

    @torch.no_grad()
    def evaluate(self, pairs: Iterable[tuple[Tensor, Mapping[str, Any]]]) -> dict[str, float]:
        """MFNet protocol over all pixels of all pairs: ``mIoU``, ``mAcc``, ``aAcc``, ``IoU/<c>``, ``Acc/<c>``."""
        cm = ConfusionMatrix(self.num_classes, self.ignore_index)
        with eval_mode(self):
            for fused, batch in pairs:
                target = self._target(batch, fused)
                cm.update(self(fused), target)
        if cm.matrix.sum() == 0:
            raise ValueError("evaluate() saw no labelled pixel")
        return segmentation_scores(cm.matrix, self.class_names, absent=self.absent, exclude=self.exclude)

    def extra_repr(self) -> str:
        return (f"arch={self.arch!r}, encoder={self.encoder_name!r}, num_classes={self.num_classes}, "
                f"dice_weight={self.dice_weight}, input_norm={self.input_norm!r}")
