"""TC-MoA as general fusion: the runner picks each dataset's router and loss, and a multi-task run
(``data.name="a+b+c"``) draws one batch of every task per iteration and sums the task losses."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from experiments import run
from experiments.config import ConfigError, DataConfig, LossConfig, NetConfig, RunConfig, TrainConfig
from experiments.data import (
    GROUP_KEY,
    TASK_KEY,
    DataError,
    Streams,
    component_specs,
    dataset_task,
    with_dataset_defaults,
)
from experiments.experiment import build, check_names, task_loss_name
from fusion.colour import to_image
from fusion.losses import create_fusion_loss
from fusion.nets import create_fusion_net

SIZE = (56, 60)   # H, W of the generated pairs: larger than the crop, so crops are drawn


def _pairs(root: Path, n: int, grey_every: int = 0) -> None:
    """``n`` MEFB-style scenes ``<s>/<s>_A.png``, ``<s>/<s>_B.png``; every ``grey_every``-th pair is grey."""
    rng = np.random.default_rng(len(str(root)))
    for i in range(n):
        grey = grey_every and i % grey_every == 0
        for suffix in ("A", "B"):
            shape = SIZE if grey else (*SIZE, 3)
            path = root / f"s{i}" / f"s{i}_{suffix}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8)).save(path)


def _routers(net: torch.nn.Module) -> dict[int, list[torch.Tensor]]:
    """Task index → the router weights (``w_gate``) of every TC-MoA module."""
    modules = [*net.moa.values(), *net.decoder_moa.values()]
    return {t: [m.routers[t].w_gate.detach().clone() for m in modules] for t in range(len(net.tasks))}


def _changed(before: dict[int, list[torch.Tensor]], after: dict[int, list[torch.Tensor]]) -> dict[int, bool]:
    """Per task: did the router of *every* module change?"""
    return {t: all(not torch.equal(a, b) for a, b in zip(before[t], after[t])) for t in before}


def _multi_cfg(root: Path, **train) -> RunConfig:
    return RunConfig(name="general", task="fusion",
                     data=DataConfig(name="synthetic+mef+mff", root=str(root), crop=48, length=8, ul_length=4,
                                     test_length=2, num_workers=0, cache_gb=0),
                     net=NetConfig(name="tc_moa_tiny"), loss=LossConfig(name="tc_moa_vif"),
                     train=TrainConfig(iters=2, warmup_iters=0, batch=2, ul_batch=2, device="cpu", **train))


@pytest.fixture
def mef_mff(tmp_path: Path) -> Path:
    _pairs(tmp_path / "mef", 6)
    _pairs(tmp_path / "mff", 6, grey_every=2)   # grey and colour pairs mixed, as in MFIFB
    return tmp_path


# ------------------------------------------------------------------------------------------------ data
def test_datasets_declare_their_task_and_holdout() -> None:
    assert [dataset_task(n) for n in ("vifb", "synthetic", "mef", "pairs_ab", "mff")] == ["vif"] * 2 + ["mef"] * 2 + ["mff"]
    base = RunConfig()
    for name, every in (("mef", 10), ("mff", 10), ("mef+mff", 10), ("vifb", 0), ("vifb+mef", 0),
                        ("synthetic+mff", 10)):
        cfg = dataclasses.replace(base, data=DataConfig(name=name))
        assert with_dataset_defaults(cfg).data.holdout == every, name
    kept = dataclasses.replace(base, data=DataConfig(name="mef", holdout=4))
    assert with_dataset_defaults(kept).data.holdout == 4


def test_components_read_subfolders_and_their_own_kwargs(tmp_path: Path) -> None:
    cfg = RunConfig(data=DataConfig(name="synthetic+mef+mff", root=str(tmp_path),
                                    kwargs={"mff": {"root": "/elsewhere", "size_policy": "resize"}}))
    specs = component_specs(cfg)
    assert [(s.name, s.root, s.kwargs) for s in specs] == [
        ("synthetic", None, ()), ("mef", str(tmp_path / "mef"), ()), ("mff", "/elsewhere", (("size_policy", "resize"),))]
    stray = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, kwargs={"size_policy": "resize"}))
    with pytest.raises(DataError, match="keyed by component"):
        component_specs(stray)
    with pytest.raises(ConfigError, match="nosuch"):
        check_names(dataclasses.replace(cfg, data=DataConfig(name="mef+nosuch")))
    with pytest.raises(DataError, match="distinct"):
        component_specs(dataclasses.replace(cfg, data=DataConfig(name="mef+mef")))


def test_loss_follows_the_task_only_for_tc_moa_presets() -> None:
    assert [task_loss_name("tc_moa_vif", t) for t in ("vif", "mef", "mff")] == ["tc_moa_vif", "tc_moa_mef", "tc_moa_mff"]
    assert task_loss_name("bdl", "mef") == "bdl"


def test_select_task_sets_the_default_router_and_the_config(one_thread) -> None:
    net = create_fusion_net("tc_moa_tiny").eval()
    ir, vis = torch.rand(1, 1, 32, 32), torch.rand(1, 3, 32, 32)
    net.moa["1"].routers[1].w_gate.data.normal_()   # the MEF router differs from the others
    net.select_task("mef")
    assert net.task == "mef" and net.config["task"] == "mef"
    with torch.no_grad():
        assert torch.equal(net(ir, vis)["fused"], net(ir, vis, task="mef")["fused"])
        assert not torch.equal(net(ir, vis)["fused"], net(ir, vis, task="vif")["fused"])
    assert create_fusion_net("tc_moa_tiny", **{k: v for k, v in net.config.items() if k != "backbone_ckpt"}).task == "mef"
    with pytest.raises(ValueError, match="routers for"):
        net.select_task("nope")


# ------------------------------------------------------------------------------------------- the runner
def test_group_batch_routes_each_task_and_sums_the_weighted_task_losses(mef_mff: Path, one_thread) -> None:
    cfg = _multi_cfg(mef_mff)
    cfg = dataclasses.replace(cfg, loss=dataclasses.replace(cfg.loss, task_weights={"mef": 0.5, "mff": 2.0}))
    exp = build(cfg)
    assert exp.cfg.data.holdout == 10                    # the MEF/MFF default, recorded in the run's config
    assert exp.net.task == "vif" and sorted(exp.task_losses) == ["mef", "mff", "vif"]
    batches = exp.streams.next()
    exp.streams.close()
    group = batches[exp.step.upper_stream]
    assert list(group[GROUP_KEY]) == ["synthetic", "mef", "mff"]
    assert [b[TASK_KEY] for b in group[GROUP_KEY].values()] == ["vif", "mef", "mff"]
    assert all(b["vis"].shape == (2, 3, 48, 48) for b in group[GROUP_KEY].values())   # grey MFF made RGB
    torch.manual_seed(0)
    out = exp.forward(exp.net, group)
    expected, weights = [], {"vif": 1.0, "mef": 0.5, "mff": 2.0}
    total = 0.0
    torch.manual_seed(0)   # the routers' noise is drawn in member order, as in the group forward
    for c, b in group[GROUP_KEY].items():
        raw = exp.net(b["ir"], b["vis"], task=b[TASK_KEY])
        z = to_image(raw["fused"], "rgb", b["vis"], clamp=False)
        expected.append(z.reshape(-1))
        loss = create_fusion_loss(f"tc_moa_{b[TASK_KEY]}")(z, b["ir"], b["vis"])["loss"]
        total = total + weights[b[TASK_KEY]] * loss
        assert torch.allclose(out.aux[f"{c}/balance"], raw["aux_losses"]["balance"])
    assert torch.allclose(out.value, torch.cat(expected))
    parts = exp.fusion_loss(out.value, group)
    assert torch.allclose(parts["loss"], total, rtol=1e-5)
    assert set(parts) >= {"synthetic/loss", "mef/loss", "mef/mef_ssim", "mff/mask_grad"}


def test_multi_task_batches_are_a_function_of_seed_and_iteration(mef_mff: Path, one_thread) -> None:
    cfg = _multi_cfg(mef_mff)
    exp = build(cfg)

    def draw(streams: Streams, n: int) -> list[dict]:
        out = [streams.next()[exp.step.upper_stream][GROUP_KEY] for _ in range(n)]
        streams.close()
        return out

    full = draw(exp.streams, 3)
    resumed = draw(_restreams(exp, start=2), 1)
    for c in full[2]:
        assert torch.equal(full[2][c]["ir"], resumed[0][c]["ir"]) and full[2][c]["name"] == resumed[0][c]["name"]


def _restreams(exp, start: int) -> Streams:
    """The run's streams rebuilt from iteration ``start`` (what ``--resume`` does)."""
    return build(exp.cfg, start_step=start).streams


def test_tmp_multi_task_run_trains_every_router(mef_mff: Path, one_thread) -> None:
    exp = build(_multi_cfg(mef_mff))
    torch.manual_seed(0)
    before = _routers(exp.net)
    for _ in range(2):
        exp.train_mode()
        diag = exp.step.step(exp.streams.next())
        assert diag["upper_step"] == 1.0 and {"loss/aux/mef/mir", "loss/aux/mff/balance"} <= set(diag)
    exp.streams.close()
    assert _changed(before, _routers(exp.net)) == {0: True, 1: True, 2: True}


# ------------------------------------------------------------------------------------ real (shared) data
SMOKE = ["--smoke", "--wandb", "disabled", "--set", "log.image_every=0", "--set", "eval.val_every=0",
         "--set", "train.iters=2"]


def test_shared_multi_task_run_trains_all_three_routers(shared_data, tmp_path: Path, one_thread) -> None:
    shared_data("vifb"), shared_data("mef"), shared_data("mff")
    root = str(shared_data())
    result = run.main(["--preset", "tc_moa_general", *SMOKE, "--data", "vifb+mef+mff", "--data-root", root,
                       "--set", "data.holdout=7", "--crop", "48", "--set", "eval.enabled=False",
                       "--out", str(tmp_path)])
    exp = result.experiment
    assert result.steps == 2 and exp.cfg.net.name == "tc_moa_tiny"
    torch.manual_seed(exp.cfg.train.seed)
    fresh = create_fusion_net(exp.cfg.net.name)
    assert _changed(_routers(fresh), _routers(exp.net)) == {0: True, 1: True, 2: True}


@pytest.mark.parametrize("name,task", [("mef", 1), ("mff", 2)])
def test_shared_mef_mff_run_with_defaults(shared_data, tmp_path: Path, name: str, task: int, one_thread) -> None:
    """``--data mef|mff`` with nothing else: mixed sizes and channels batch, every 10th pair is held out (and
    recorded), and TC-MoA trains that task's router alone and keeps it as its default."""
    result = run.main(["--task", "fusion", *SMOKE, "--fusion-net", "tc_moa_tiny", "--data", name, "--data-root",
                       str(shared_data(name)), "--set", "eval.max_images=1", "--out", str(tmp_path)])
    exp = result.experiment
    assert exp.cfg.data.holdout == 10 and result.metrics["eval/EN"] > 0
    train = {exp.streams.datasets[s].load(i)["name"] for s in exp.streams.datasets
             for i in range(len(exp.streams.datasets[s]))}
    test = {exp.test_sets["run"].load(i)["name"] for i in range(len(exp.test_sets["run"]))}
    assert test and not train & test
    ckpt = torch.load(result.run_dir / "checkpoints" / "last.pt", weights_only=True)
    assert ckpt["config"]["data"]["holdout"] == 10 and ckpt["net"]["kwargs"]["task"] == name
    torch.manual_seed(exp.cfg.train.seed)
    changed = _changed(_routers(create_fusion_net("tc_moa_tiny")), _routers(exp.net))
    assert changed == {t: t == task for t in range(3)}
