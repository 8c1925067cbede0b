"""MoE-Fusion as published: ground-truth boxes give the foreground of the box-masked pixel loss and, with
``attention="input"``, of the local experts; that mode runs from ``run.py``."""

from __future__ import annotations

import torch

from experiments import run
from experiments.data import size_batches
from experiments.experiment import Experiment, build
from fusion.colour import luminance, to_image
from fusion.losses import boxes_to_mask, masked_pixel_loss, saliency_fallback


def test_boxes_to_mask_rasterises_pixel_extents() -> None:
    mask = boxes_to_mask([torch.tensor([[1.0, 2.0, 3.0, 4.0], [3.5, 0.2, 9.0, 1.0]]), torch.zeros(0, 4)], (5, 6))
    want = torch.zeros(2, 1, 5, 6)
    want[0, 0, 2:4, 1:3] = 1.0     # rows y0:y1, columns x0:x1
    want[0, 0, 0:1, 3:6] = 1.0     # fractional edges widen to whole pixels, clipped to the image
    assert torch.equal(mask, want)


def _experiment(tmp_path, *args: str) -> Experiment:
    argv = ["--task", "critic", "--smoke", "--wandb", "disabled", "--out", str(tmp_path),
            "--fusion-net", "moe_fusion_tiny", "--set", "loss.name=moe", *args]
    return build(run.resolve_config(run.get_args_parser().parse_args(argv)))


def _boxes_batch(exp: Experiment) -> dict:
    """A synthetic batch as a box-only dataset (M3FD, LLVIP) delivers it: boxes, no label mask."""
    batch = next(size_batches(exp.test_sets["run"], 2, 2))
    assert sum(len(b) for b in batch["boxes"]) > 0
    return {k: v for k, v in batch.items() if k != "mask"}


def test_boxes_reach_the_moe_loss_and_the_local_experts(tmp_path, one_thread) -> None:
    exp = _experiment(tmp_path, "--set", "net.kwargs={'attention': 'input'}")
    batch = _boxes_batch(exp)
    box_mask = boxes_to_mask(batch["boxes"], tuple(batch["ir"].shape[-2:]))
    seen = {}
    exp.loss_fn.register_forward_pre_hook(lambda module, args: seen.update(loss=args[3]))
    exp.net.register_forward_pre_hook(lambda module, args, kwargs: seen.update(net=kwargs["attention"]),
                                      with_kwargs=True)
    z = exp.forward(exp.net, batch).value
    parts = exp.fusion_loss(z, batch)
    assert torch.equal(seen["net"], box_mask) and torch.equal(seen["loss"], box_mask)
    want = masked_pixel_loss(luminance(z.float()), luminance(batch["vis"]), batch["ir"], box_mask)
    assert torch.allclose(parts["pixel"], want, atol=1e-6)
    # the critic's target weighs the sources with the same box mask
    critic = exp.tasks["critic"]
    assert torch.equal(critic.saliency(batch, z), box_mask)


def test_learned_attention_net_gets_no_map(tmp_path, one_thread) -> None:
    exp = _experiment(tmp_path)
    batch = _boxes_batch(exp)
    assert exp.net_inputs(exp.net, batch) == {}
    seen = {}
    exp.loss_fn.register_forward_pre_hook(lambda module, args: seen.update(loss=args[3]))
    exp.fusion_loss(exp.forward(exp.net, batch).value, batch)
    assert torch.equal(seen["loss"], boxes_to_mask(batch["boxes"], tuple(batch["ir"].shape[-2:])))


def test_evaluation_uses_no_labels(tmp_path, one_thread) -> None:
    """At test time an input-attention net sees the label-free IR map: labels cannot change the fused image."""
    exp = _experiment(tmp_path, "--set", "net.kwargs={'attention': 'input'}")
    batch = next(size_batches(exp.test_sets["run"], 2, 2))
    sources = {k: batch[k] for k in ("ir", "vis")}
    fused = exp.fuse(batch)
    assert torch.equal(fused, exp.fuse(sources))
    with torch.no_grad():
        raw = exp.net.eval()(batch["ir"], batch["vis"], attention=saliency_fallback(batch["ir"]))["fused"]
    assert torch.equal(fused, to_image(raw, exp.net.out_space, batch["vis"]))


def test_input_attention_runs_from_run_py(tmp_path, one_thread) -> None:
    result = run.main(["--task", "critic", "--smoke", "--wandb", "disabled", "--out", str(tmp_path),
                       "--fusion-net", "moe_fusion_tiny", "--set", "net.kwargs={'attention': 'input'}",
                       "--set", "loss.name=moe", "--set", "train.iters=2"])
    net = result.experiment.net
    assert result.steps == 2 and net.attention_mode == "input"
    assert all(torch.isfinite(v).all() for v in net.state_dict().values())
