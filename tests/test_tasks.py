"""Constraint tasks (tasks/): interface, losses on synthetic scenes, gradients to the fused image, evaluation wiring."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from bilevel.registry import UnknownNameError
from fusion.colour import luminance
from fusion.data import collate_pairs, create_dataset
from fusion.losses import saliency_fallback
from tasks import registry
from tasks.base import Task, normalize_input
from tasks.critic import CriticTask, PatchCritic, PixelCritic, critic_loss, generator_loss
from tasks.det import DetTask, _TorchvisionAdapter
from tasks.registry import create_task, list_tasks, register_task
from tasks.seg import SegTask

SIZE = 64
DET_TINY = {"min_size": SIZE, "max_size": SIZE}  # no internal resize at the test resolution


@pytest.fixture(scope="module")
def batch() -> dict:
    """Four synthetic RGB-T scenes (64 px) with masks and boxes; at least one box in the batch."""
    ds = create_dataset("synthetic", split="train", size=SIZE, length=6, seed=0)
    b = collate_pairs([ds[i] for i in range(4)])
    assert sum(len(x) for x in b["boxes"]) > 0 and b["mask"].shape == (4, SIZE, SIZE)
    return b


def _fused(batch: dict, channels: int) -> torch.Tensor:
    rgb = (0.5 * batch["ir"] + 0.5 * batch["vis"]).clamp(0, 1)
    return rgb if channels == 3 else luminance(rgb)


def _images(batch: dict, name: str) -> dict:
    """Detection is the slow task on CPU: give it the first two scenes (three boxes) only."""
    if not name.startswith("det"):
        return batch
    return {k: v[:2] for k, v in batch.items()}


def _task(name: str) -> Task:
    return create_task(name, **(DET_TINY if name == "det_tiny" else {}))


# ------------------------------------------------------------------ registry and base
def test_registry_lists_and_rejects(monkeypatch):
    assert {"critic", "seg", "det", "critic_tiny", "seg_tiny", "det_tiny"} <= set(list_tasks())
    with pytest.raises(UnknownNameError, match="unknown task 'segmentation_xl'.*valid names: critic"):
        create_task("segmentation_xl")
    monkeypatch.setattr(registry, "_TASKS", dict(registry._TASKS))
    register_task("my_critic", CriticTask)
    assert isinstance(create_task("my_critic", loss="hinge", clip_value=None), CriticTask)
    with pytest.warns(UserWarning, match="overwriting"):
        register_task("my_critic", CriticTask)


def test_prepare_is_per_image_not_batch_wide():
    task = create_task("critic_tiny")
    x = torch.rand(3, 3, 8, 8)
    x[1] *= 0.1  # a dark image must not change the others' inputs
    for mode in ("imagenet", "instance"):
        full = normalize_input(x, mode)
        assert torch.allclose(full[0], normalize_input(x[:1], mode)[0])
    seg = SegTask("Unet", "tu-resnet10t", encoder_depth=3, decoder_channels=(8, 8, 8))
    grey = torch.rand(2, 1, 8, 8)
    prepared = seg.prepare(grey)
    assert prepared.shape == (2, 3, 8, 8)
    mean = torch.tensor([0.485, 0.456, 0.406]).view(3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(3, 1, 1)
    assert torch.allclose(prepared, (grey.expand(-1, 3, -1, -1) - mean) / std)
    with pytest.raises(ValueError, match="B, 1 or 3"):
        task.prepare(torch.rand(2, 2, 8, 8))


@pytest.mark.parametrize("name, key", [("seg_tiny", "mask"), ("det_tiny", "boxes"), ("critic_tiny", "ir")])
def test_missing_batch_key_is_named(batch, name, key):
    task = _task(name)
    assert key in task.needs
    partial_batch = {k: v for k, v in batch.items() if k != key}
    with pytest.raises(KeyError, match=key):
        task.lower_loss(_fused(batch, 3), partial_batch)


# ------------------------------------------------------------------ every task: flow, gradients, decrease
@pytest.mark.parametrize("name", ["critic_tiny", "seg_tiny", "det_tiny"])
@pytest.mark.parametrize("channels", [1, 3])
def test_fused_batch_flows_through_task(batch, name, channels, device):
    batch = _images(batch, name)
    task = _task(name).to(device)
    fused = _fused(batch, channels).to(device).requires_grad_(True)
    lower = task.lower_loss(fused.detach(), batch)
    assert "loss" in lower and all(torch.isfinite(v).all() for v in lower.values())
    upper = task.upper_loss(fused, batch)
    assert torch.isfinite(upper["loss"])
    (grad,) = torch.autograd.grad(upper["loss"], fused)
    assert torch.isfinite(grad).all() and grad.abs().sum() > 0  # F_k is differentiable w.r.t. the fused image
    task.train()
    metrics = task.evaluate([(fused.detach(), batch)])
    assert task.training and all(m.training for m in task.modules())  # evaluate restores the mode
    assert metrics and all(isinstance(v, float) for v in metrics.values())


@pytest.mark.parametrize("name, steps", [("critic_tiny", 8), ("seg_tiny", 6), ("det_tiny", 4)])
def test_lower_loss_decreases(batch, name, steps):
    batch = _images(batch, name)
    task = _task(name)
    fused = _fused(batch, 3)
    opt = torch.optim.Adam([p for p in task.parameters() if p.requires_grad], lr=1e-3)
    losses = []
    for _ in range(steps):
        loss = task.lower_loss(fused, batch)["loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert all(math.isfinite(v) for v in losses)
    assert losses[-1] < losses[0]


@pytest.mark.parametrize("name", ["critic_tiny", "seg_tiny", "det_tiny"])
def test_upper_loss_decreases_in_the_fused_image(batch, name):
    """With the task fixed, gradient steps on the fused image lower F_k: the gradient is a useful signal."""
    batch = _images(batch, name)
    task = _task(name).eval()
    logit = torch.logit(_fused(batch, 3).clamp(0.05, 0.95)).requires_grad_(True)
    opt = torch.optim.Adam([logit], lr=0.05)
    losses = []
    for _ in range(4):
        loss = task.upper_loss(torch.sigmoid(logit), batch)["loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]


# ------------------------------------------------------------------ critic
def test_bdl_pixel_critic_parameter_counts():
    def count(module: nn.Module) -> int:
        return sum(p.numel() for p in module.parameters())

    assert count(PixelCritic(norm="batch")) == 8704  # architectures.md §2
    assert count(PixelCritic(norm="group")) == 8704  # GroupNorm has the same affine parameters
    assert count(PixelCritic(norm="none")) == 8704 - 256 + 128  # no norm affine, a bias instead
    assert count(create_task("critic")) == 8704
    out = PatchCritic(ndf=8, n_layers=2, norm="group")(torch.rand(2, 1, 32, 32))
    assert out.shape[:2] == (2, 1) and out.shape[-1] < 32


def test_gan_losses_hand_computed():
    d_real, d_fake = torch.tensor([1.0, 3.0]), torch.tensor([0.0, 2.0])
    assert critic_loss(d_real, d_fake, "wgan") == pytest.approx(0.5 * (1.0 - 2.0))
    assert critic_loss(d_real, d_fake, "lsgan") == pytest.approx(0.5 * ((0 + 4) / 2 + (0 + 4) / 2))
    assert critic_loss(d_real, d_fake, "hinge") == pytest.approx(0 + (1 + 3) / 2)
    assert generator_loss(d_fake, "wgan") == pytest.approx(-1.0)
    assert generator_loss(d_fake, "hinge") == pytest.approx(-1.0)
    assert generator_loss(d_fake, "lsgan") == pytest.approx(0.5 * (1 + 1) / 2)


def test_real_samples():
    ir = torch.tensor([0.9, 0.1, 0.5, 0.2]).view(1, 1, 2, 2)
    vis = torch.rand(1, 3, 2, 2)
    y = luminance(vis)
    mask = torch.tensor([[[3, 0], [255, 1]]])
    m = torch.tensor([[1.0, 0.0], [0.0, 1.0]]).view(1, 1, 2, 2)  # >0 and not ignored
    base = {"ir": ir, "vis": vis}
    like = torch.zeros(1, 3, 2, 2)
    assert torch.allclose(CriticTask(real="vis").real_sample(base, like), y)
    assert torch.allclose(CriticTask(real="max").real_sample(base, like), torch.maximum(ir, y))
    sal = CriticTask(real="saliency")
    assert torch.allclose(sal.real_sample({**base, "mask": mask}, like), m * ir + (1 - m) * y)
    explicit = torch.full((1, 1, 2, 2), 0.25)
    assert torch.allclose(sal.real_sample({**base, "mask": mask, "saliency": explicit}, like), 0.25 * ir + 0.75 * y)
    fallback = saliency_fallback(ir, 3.0)
    assert torch.allclose(sal.real_sample(base, like), fallback * ir + (1 - fallback) * y)
    rgb = CriticTask(real="max", space="rgb").real_sample(base, like)
    assert torch.allclose(rgb, torch.maximum(ir.expand(-1, 3, -1, -1), vis))
    with pytest.raises(KeyError, match="mask"):
        CriticTask(saliency_source="mask").lower_loss(like, base)


def test_gradient_penalty_closed_form():
    """A linear 1×1 critic D(x) = w·x has ‖∇_x Σ D‖ = |w|·√(HW) per image, so GP = (|w|·√(HW) − 1)²."""
    task = CriticTask(gp_weight=10.0, norm="none")
    task.critic = nn.Conv2d(1, 1, 1, bias=False)
    nn.init.constant_(task.critic.weight, 0.25)
    real, fake = torch.rand(3, 1, 2, 2), torch.rand(3, 1, 2, 2)
    assert task.gradient_penalty(real, fake).item() == pytest.approx((0.25 * 2 - 1) ** 2)
    b = {"ir": torch.rand(3, 1, 2, 2), "vis": torch.rand(3, 3, 2, 2)}
    out = task.lower_loss(torch.rand(3, 3, 2, 2), b)
    assert out["loss"].item() == pytest.approx(out["adv"].item() + 10 * 0.25)
    out["loss"].backward()  # the penalty is differentiable w.r.t. the critic (double backward)
    assert task.critic.weight.grad is not None


def test_weight_clipping(batch):
    task = create_task("critic_tiny", clip_value=0.01)
    task.lower_loss(_fused(batch, 3), batch)
    assert all(p.abs().max() <= 0.01 for p in task.parameters())


# ------------------------------------------------------------------ segmentation
def test_seg_any_size_and_strict_weights(tmp_path):
    task = create_task("seg_tiny")
    fused = torch.rand(2, 3, 60, 68)  # not divisible by the encoder stride
    assert task(fused).shape == (2, 9, 60, 68)
    path = tmp_path / "seg.pt"
    torch.save(task.state_dict(), path)  # a task-level state dict ("model." prefix) loads too
    clone = create_task("seg_tiny", weights=str(path)).eval()
    assert torch.equal(clone(fused), task.eval()(fused))
    torch.save({"bogus": torch.zeros(1)}, path)
    with pytest.raises(RuntimeError):
        create_task("seg_tiny", weights=str(path))


def test_seg_evaluate_equals_hand_computed():
    """A stub network with fixed predictions: evaluate() = the hand-computed MFNet scores of test_task_metrics."""
    task = SegTask("Unet", "tu-resnet10t", num_classes=3, class_names=["a", "b", "c"], encoder_depth=3,
                   decoder_channels=(8, 8, 8))

    class Fixed(nn.Module):
        def forward(self, x):
            pred = torch.tensor([[0, 0, 1, 1, 2, 2, 2, 0, 2, 1]]).view(1, 1, 10)
            return nn.functional.one_hot(pred, 3).permute(0, 3, 1, 2).float()

    task.model = Fixed()
    task.stride = 1
    target = torch.tensor([[0, 0, 0, 1, 1, 2, 2, 2, 2, 255]]).view(1, 1, 10)
    out = task.evaluate([(torch.rand(1, 3, 1, 10), {"mask": target})])
    assert out["mIoU"] == pytest.approx((2 / 4 + 1 / 3 + 3 / 5) / 3)
    assert out["mAcc"] == pytest.approx((2 / 3 + 1 / 2 + 3 / 4) / 3)
    assert out["IoU/b"] == pytest.approx(1 / 3)


def test_seg_dice_component(batch):
    task = create_task("seg_tiny", dice_weight=0.5)
    out = task.lower_loss(_fused(batch, 3), batch)
    assert out["loss"].item() == pytest.approx(out["ce"].item() + 0.5 * out["dice"].item(), rel=1e-5)


def test_seg_loss_ignores_labels_on_the_device(batch):
    """Cross-entropy over the labelled pixels only; a batch with none gives 0 and zero gradients, not 0/0 —
    decided without reading a value on the host (a CUDA graph can hold the step)."""
    task = create_task("seg_tiny", class_weights=[1.0, 2.0, 0.5, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0])
    fused = _fused(batch, 3).requires_grad_(True)
    mask = batch["mask"].clone()
    mask[:, :, : mask.shape[-1] // 2] = 255
    logits = task(fused)
    expected = torch.nn.functional.cross_entropy(logits, mask, weight=task.class_weights, ignore_index=255)
    assert task.loss(fused, dict(batch, mask=mask))["loss"].item() == pytest.approx(expected.item(), rel=1e-6)
    none = task.loss(fused, dict(batch, mask=torch.full_like(mask, 255)))["loss"]
    none.backward()
    assert none.item() == 0.0 and bool((fused.grad == 0).all())
    assert all(bool((p.grad == 0).all()) for p in task.parameters() if p.grad is not None)


# ------------------------------------------------------------------ detection
def test_torchvision_label_offset():
    """Labels 0..C−1 go in as 1..C (background 0) and come back as 0..C−1; background predictions are dropped."""

    class Stub(nn.Module):
        def forward(self, images, targets=None):
            if targets is not None:
                self.seen = targets
                return {"loss_a": images[0].sum() * 0}
            return [{"boxes": torch.ones(3, 4), "scores": torch.ones(3), "labels": torch.tensor([0, 1, 6])}]

    adapter = _TorchvisionAdapter(Stub())
    adapter.losses(torch.rand(1, 3, 4, 4), [{"boxes": torch.ones(1, 4), "labels": torch.tensor([0])}])
    assert adapter.model.seen[0]["labels"].tolist() == [1]
    assert adapter.predict(torch.rand(1, 3, 4, 4))[0]["labels"].tolist() == [0, 5]


@pytest.mark.parametrize("model, kw", [
    ("retinanet_resnet18_fpn", {"fpn_channels": 32, "norm": "frozen"}),
    ("fasterrcnn_resnet18_fpn", {"fpn_channels": 32, "norm": "group"}),
    ("fasterrcnn_mobilenet_v3_large_fpn", {}),
    ("fcos_resnet18_fpn", {"fpn_channels": 32, "head_convs": 1, "fcos_decode": "exp"}),
])
def test_torchvision_detectors_build_and_backprop(batch, model, kw):
    batch = _images(batch, "det")
    task = DetTask(model, min_size=SIZE, max_size=SIZE, **kw)
    fused = _fused(batch, 3).requires_grad_(True)
    out = task.upper_loss(fused, batch)
    assert torch.isfinite(out["loss"]) and len(out) > 2
    (grad,) = torch.autograd.grad(out["loss"], fused)
    assert grad.abs().sum() > 0
    dets = task.eval()(fused.detach())
    assert len(dets) == fused.shape[0]
    assert all(d["labels"].min() >= 0 for d in dets if len(d["labels"]))


def test_det_evaluate_equals_hand_computed():
    """A stub detector returning the hand-worked case of test_task_metrics: mAP50 = coco/mAP = 0.75."""
    # class p: TP .9, FP .8, duplicate FP .7, TP .6 over 3 gt boxes → AP 0.5 (VOC and COCO, see test_task_metrics);
    # class q: one exact detection → 1; class r: no ground truth → NaN, left out of the mean.
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
    task = create_task("det_tiny", num_classes=3, class_names=["p", "q", "r"], min_size=SIZE, max_size=SIZE)
    queue = list(predictions)
    task.detector.predict = lambda images: [queue.pop(0)]
    pairs = [(torch.rand(1, 3, SIZE, SIZE), {"boxes": [t["boxes"]], "labels": [t["labels"]]}) for t in targets]
    out = task.evaluate(pairs)
    assert out["mAP50"] == pytest.approx(0.75) and out["AP50/p"] == pytest.approx(0.5)
    assert out["coco/mAP"] == pytest.approx(0.75)


def test_det_rejects_bad_targets(batch):
    task = create_task("det_tiny", **DET_TINY)
    fused = _fused(batch, 3)[:1]
    bad = {"boxes": [torch.tensor([[10.0, 10, 5, 20]])], "labels": [torch.tensor([0])]}
    with pytest.raises(ValueError, match="x2 > x1"):
        task.lower_loss(fused, bad)
    bad = {"boxes": [torch.tensor([[1.0, 1, 5, 5]])], "labels": [torch.tensor([6])]}
    with pytest.raises(ValueError, match="0..5"):
        task.lower_loss(fused, bad)
    with pytest.raises(ValueError, match="unknown torchvision detector"):
        DetTask("yolo_v8")
    with pytest.raises(ValueError, match="unknown fcos_decode"):
        DetTask("fcos_resnet18_fpn", fcos_decode="log")
    with pytest.raises(ValueError, match="applies to torchvision FCOS"):
        DetTask("retinanet_resnet18_fpn", fcos_decode="exp")


def test_mmdet_backend_missing_gives_clear_import_error(monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "mmdet", None)  # makes `import mmdet` fail as if it were not installed
    with pytest.raises(ImportError, match="mmdet 3.x"):
        DetTask("retinanet_r18_fpn", backend="mmdet")


def test_det_weights_load_strictly(tmp_path):
    task = create_task("det_tiny", **DET_TINY)
    path = tmp_path / "det.pt"
    torch.save(task.detector.model.state_dict(), path)  # the bare detector's state dict
    clone = create_task("det_tiny", weights=str(path), **DET_TINY)
    assert all(torch.equal(a, b) for a, b in zip(task.state_dict().values(), clone.state_dict().values(),
                                             strict=True))
    torch.save({"head.bogus": torch.zeros(1)}, path)
    with pytest.raises(RuntimeError):
        create_task("det_tiny", weights=str(path), **DET_TINY)


@pytest.mark.parametrize("name", ["seg", "det"])
def test_default_configs_build_and_backprop(batch, name):
    """The full-size defaults (U-Net/ResNet-18, FCOS/ResNet-50 as BDL) on one 64 px scene."""
    one = {k: v[1:2] for k, v in batch.items()}  # scene 1 has boxes
    task = create_task(name, **({"min_size": SIZE, "max_size": SIZE} if name == "det" else {}))
    fused = _fused(one, 3).requires_grad_(True)
    (grad,) = torch.autograd.grad(task.upper_loss(fused, one)["loss"], fused)
    assert torch.isfinite(grad).all() and grad.abs().sum() > 0
