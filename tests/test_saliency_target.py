"""One saliency target: the fusion loss and the critic weigh IR against visible with the same map.

``fusion.losses.saliency_map`` builds the map of a batch (a shipped saliency map, label masks, boxes, else the
announced IR fallback); the runner gives it to the fusion loss with the critic's options, and the critic's
"real" sample uses it too.
"""

from __future__ import annotations

import logging

import pytest
import torch

import tasks.critic as critic_module
from experiments import run
from experiments.data import size_batches
from experiments.experiment import Experiment, build
from fusion import losses
from fusion.data import collate_pairs, create_dataset
from fusion.losses import saliency_fallback, saliency_map
from tasks.critic import CriticTask
from tests.conftest import shared_data_dir


def _batch() -> dict:
    g = torch.Generator().manual_seed(3)
    return {"ir": torch.rand(2, 1, 6, 5, generator=g), "vis": torch.rand(2, 3, 6, 5, generator=g),
            "mask": torch.tensor([[0, 2, 255, 1, 0]] * 6).expand(2, 6, 5).clone(),
            "boxes": [torch.tensor([[1.0, 2.0, 3.0, 4.0]]), torch.zeros(0, 4)]}


def test_saliency_map_sources_and_order() -> None:
    batch, like = _batch(), torch.zeros(2, 1, 6, 5)
    labels = torch.tensor([0.0, 1.0, 0.0, 1.0, 0.0]).expand(2, 1, 6, 5)   # > 0 and not the ignore index 255
    box = torch.zeros(2, 1, 6, 5)
    box[0, 0, 2:4, 1:3] = 1.0
    explicit = torch.full((2, 6, 5), 0.25)
    assert torch.equal(saliency_map(batch, like, source="mask"), labels)
    assert torch.equal(saliency_map(batch, like, source="boxes"), box)
    assert torch.equal(saliency_map(batch, like, source="ir"), saliency_fallback(batch["ir"]))
    assert torch.equal(saliency_map(batch, like, source="ir", sigma=1.0), saliency_fallback(batch["ir"], 1.0))
    # "auto": a shipped map, then labels, then boxes, then the fallback
    assert torch.equal(saliency_map({**batch, "saliency": explicit}, like), explicit.unsqueeze(1))
    assert torch.equal(saliency_map(batch, like), labels)
    assert torch.equal(saliency_map({**batch, "mask": None}, like), box)
    sources = {"ir": batch["ir"], "vis": batch["vis"]}
    assert torch.equal(saliency_map(sources, like), saliency_fallback(batch["ir"]))
    with pytest.raises(ValueError, match="mask_fallback='none'"):
        saliency_map(sources, like, fallback="none")
    with pytest.raises(KeyError, match="boxes"):
        saliency_map(sources, like, source="boxes")
    with pytest.raises(ValueError, match="shape"):
        saliency_map(batch, torch.zeros(2, 1, 6, 4), source="mask")
    with pytest.raises(ValueError, match="unknown saliency source"):
        saliency_map(batch, like, source="labels")
    half = saliency_map(batch, like.double(), source="ir")    # computed in float32 or wider, returned in like's dtype
    assert half.dtype == torch.float64


def test_map_is_the_same_inside_autocast() -> None:
    """The net's attention is built inside the bf16 forward, the loss's mask outside: one map for both."""
    batch, like = _batch(), torch.zeros(2, 1, 6, 5)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        inside = saliency_map(batch, like, source="ir")
    assert torch.equal(inside, saliency_map(batch, like, source="ir"))


def test_fallback_is_announced_once(monkeypatch, caplog) -> None:
    monkeypatch.setattr(losses, "_ANNOUNCED", set())
    sources = {k: v for k, v in _batch().items() if k in ("ir", "vis")}
    with caplog.at_level(logging.WARNING, logger="fusion.losses"):
        for _ in range(3):
            saliency_map(sources, torch.zeros(2, 1, 6, 5))
        saliency_map(_batch(), torch.zeros(2, 1, 6, 5))   # labels: nothing to announce
    notes = [r for r in caplog.records if "ir_saliency" in r.getMessage()]
    assert len(notes) == 1


def _experiment(tmp_path, *args: str) -> Experiment:
    argv = ["--task", "critic", "--smoke", "--wandb", "disabled", "--out", str(tmp_path), *args]
    return build(run.resolve_config(run.get_args_parser().parse_args(argv)))


def _spy_maps(exp: Experiment, monkeypatch) -> tuple[list, list]:
    """Record the mask the fusion loss receives and the map the critic builds."""
    to_loss, to_critic = [], []
    exp.loss_fn.register_forward_pre_hook(lambda module, args: to_loss.append(args[3]))

    def recording(*args, **kwargs):
        to_critic.append(saliency_map(*args, **kwargs))
        return to_critic[-1]

    monkeypatch.setattr(critic_module, "saliency_map", recording)
    return to_loss, to_critic


def _loss_and_critic_maps(exp: Experiment, batch: dict, monkeypatch) -> tuple[torch.Tensor, torch.Tensor]:
    to_loss, to_critic = _spy_maps(exp, monkeypatch)
    critic = exp.tasks["critic"]
    assert isinstance(critic, CriticTask) and critic.real == "saliency"
    z = exp.forward(exp.net, batch).value
    exp.fusion_loss(z, batch)
    critic.lower_loss(z.detach(), batch)
    assert len(to_loss) == 1 and len(to_critic) == 1
    return to_loss[0], to_critic[0]


def test_loss_and_critic_get_the_same_map_on_synthetic(tmp_path, monkeypatch, one_thread) -> None:
    exp = _experiment(tmp_path, "--set", "loss.name=bdl")
    batch = next(size_batches(exp.test_sets["run"], 2, 2))
    to_loss, to_critic = _loss_and_critic_maps(exp, batch, monkeypatch)
    labels = ((batch["mask"] > 0) & (batch["mask"] != 255)).float().unsqueeze(1)
    assert torch.equal(to_loss, to_critic)
    assert torch.equal(to_loss, labels)          # from the labels, not the blurred-IR fallback
    # without labels both fall back to the same IR map
    sources = {k: batch[k] for k in ("name", "ir", "vis")}
    to_loss, to_critic = _loss_and_critic_maps(exp, sources, monkeypatch)
    assert torch.equal(to_loss, to_critic)
    assert torch.equal(to_loss, saliency_fallback(batch["ir"]))


def test_critic_options_choose_the_map_for_both(tmp_path, monkeypatch, one_thread) -> None:
    exp = _experiment(tmp_path, "--set", "loss.name=bdl", "--set",
                      "tasks.critic.kwargs={'saliency_source': 'ir', 'saliency_sigma': 1.5}")
    batch = next(size_batches(exp.test_sets["run"], 2, 2))
    to_loss, to_critic = _loss_and_critic_maps(exp, batch, monkeypatch)
    assert torch.equal(to_loss, to_critic)
    assert torch.equal(to_loss, saliency_fallback(batch["ir"], 1.5))


def test_loss_without_a_mask_term_gets_none(tmp_path, monkeypatch, one_thread) -> None:
    exp = _experiment(tmp_path, "--set", "loss.name=max_grad_ssim")
    assert not exp.loss_fn.uses_mask
    to_loss, _ = _spy_maps(exp, monkeypatch)
    batch = next(size_batches(exp.test_sets["run"], 2, 2))
    exp.fusion_loss(exp.forward(exp.net, batch).value, batch)
    assert to_loss == [None]


def test_msrs_person_mask_feeds_loss_and_critic(tmp_path, monkeypatch, one_thread) -> None:
    root = shared_data_dir("msrs_person8")
    data = create_dataset("msrs_person8", root, split="all")
    batch = collate_pairs([data[0], data[1]])
    person = (batch["mask"] == 2).float().unsqueeze(1)     # the stored 0/255 person mask, 255 → class 2
    assert person.sum() > 0
    exp = _experiment(tmp_path, "--set", "loss.name=bdl")
    to_loss, to_critic = _loss_and_critic_maps(exp, batch, monkeypatch)
    assert torch.equal(to_loss, person) and torch.equal(to_critic, person)
