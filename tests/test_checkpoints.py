"""The committed inference checkpoints (issue 7): each loads on CPU, fuses a VIFB pair, and reproduces the
committed ``results/vifb/per_image.csv`` values for that pair."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch

from experiments.checkpoint import INFERENCE_KEYS, load_checkpoint
from experiments.fuse import fuse_pair, load_fusion_net
from experiments.roadscene_results import DEFAULT_CHECKPOINTS, METRICS
from fusion.image_io import read_image, read_pair, save_image
from fusion.metrics import get_metric
from fusion.metrics.profiles import shared_preparation

RESULTS = Path(__file__).resolve().parents[1] / "results" / "vifb" / "per_image.csv"
IMAGE = "carWhite"


def test_checkpoints_and_results_are_committed() -> None:
    assert all(c.is_file() for c in DEFAULT_CHECKPOINTS), "missing checkpoint(s) under checkpoints/"
    assert RESULTS.is_file()
    for ckpt in DEFAULT_CHECKPOINTS:
        card = ckpt.with_suffix(".md")
        assert card.is_file(), f"{ckpt.name} has no model card {card.name}"


@pytest.mark.parametrize("ckpt", DEFAULT_CHECKPOINTS, ids=lambda p: p.stem)
def test_checkpoint_is_stripped_and_loads(ckpt: Path) -> None:
    raw = load_checkpoint(ckpt, map_location="cpu")
    assert set(raw) == set(INFERENCE_KEYS)      # stripped: no optimiser or constraint-net states
    net = load_fusion_net(ckpt)
    assert sum(p.numel() for p in net.parameters()) == 417_730    # BDL's released width, not a shrunk net


@pytest.mark.parametrize("ckpt", DEFAULT_CHECKPOINTS, ids=lambda p: p.stem)
def test_checkpoint_fuses_a_vifb_pair_and_reproduces_the_committed_metrics(ckpt: Path, shared_data, tmp_path) -> None:
    vifb = shared_data("vifb")
    ir, vis = read_pair(vifb / "ir" / f"{IMAGE}.jpg", vifb / "vi" / f"{IMAGE}.jpg")
    fused = fuse_pair(load_fusion_net(ckpt), ir, vis)
    assert fused.shape == vis.shape and torch.isfinite(fused).all()
    assert 0.0 <= fused.min() and fused.max() <= 1.0 and fused.std() > 0.05
    # the 8-bit PNG round trip of fuse.py, then the metrics of evaluate.py --profile reference
    save_image(fused, tmp_path / f"{IMAGE}.png")
    batch = read_image(tmp_path / f"{IMAGE}.png").to(torch.float64)[None]
    a = read_image(vifb / "ir" / f"{IMAGE}.jpg").to(torch.float64)[None]
    b = read_image(vifb / "vi" / f"{IMAGE}.jpg").to(torch.float64)[None]
    with open(RESULTS, newline="") as fh:
        expected = next(r for r in csv.DictReader(fh) if r["image"] == IMAGE and r["method"] == ckpt.stem)
    with torch.no_grad(), shared_preparation():
        for name in METRICS.split(","):
            value = float(get_metric(name)(batch, a, b, profile="reference")[0])
            # a different thread count may flip the rounding of a few pixels: allow 0.1 %
            assert value == pytest.approx(float(expected[name]), rel=1e-3, abs=1e-6), name


ROADSCENE_RESULTS = Path(__file__).resolve().parents[1] / "results" / "roadscene" / "per_image.csv"


@pytest.mark.parametrize("ckpt", DEFAULT_CHECKPOINTS, ids=lambda p: p.stem)
def test_committed_checkpoint_evaluates_on_a_fresh_clone(ckpt: Path, shared_data, tmp_path) -> None:
    """``--resume <ckpt> --eval-only`` needs no path of the machine that trained it (``net.init`` there is
    provenance only) and reproduces the committed RoadScene test values of its first test image."""
    from experiments import run

    warm_start = load_checkpoint(ckpt)["config"]["net"]["init"]
    assert warm_start and not Path(warm_start).exists()      # a path of the training machine
    result = run.main(["--resume", str(ckpt), "--eval-only", "--data-root", str(shared_data("roadscene")),
                       "--wandb", "disabled", "--out", str(tmp_path), "--set", "eval.max_images=1",
                       "--set", "tasks.seg.data_kwargs.test_length=2", "--set", "log.progress=False"])
    with open(result.run_dir / "eval" / "per_image.csv", newline="") as fh:
        (row,) = list(csv.DictReader(fh))
    with open(ROADSCENE_RESULTS, newline="") as fh:
        expected = next(r for r in csv.DictReader(fh) if r["image"] == row["image"] and r["method"] == ckpt.stem)
    for name in ("EN", "SD", "SF", "AG", "MI", "VIF", "Qabf", "SSIM"):
        assert float(row[name]) == pytest.approx(float(expected[name]), rel=1e-3, abs=1e-6), name
    # inference-only: the constraint nets were not in the file, so no task metric is reported for them
    meta = json.loads((result.run_dir / "eval" / "meta.json").read_text())
    assert meta["untrained_constraints"] == sorted(result.experiment.tasks) != []
    assert not any(k in result.metrics for k in ("eval/mIoU", "eval/critic/gap", "eval/mAP50"))
