"""Run-directory plumbing: fresh folders, the metrics CSV, wandb mode resolution, atomic checkpoints."""

from __future__ import annotations

import csv
import datetime as dt
import errno
import json

import pytest
import torch

from experiments.checkpoint import CheckpointError, load_checkpoint, save_checkpoint, strip_checkpoint
from experiments.logging_utils import (
    MetricsCSV,
    OutputError,
    Tracker,
    image_panel,
    make_run_dir,
    resolve_wandb_mode,
    write_env,
)
from experiments.plots import make_plots, read_metrics


def test_run_dirs_are_never_reused(tmp_path) -> None:
    now = dt.datetime(2026, 11, 23, 10, 15, 0)
    a = make_run_dir(tmp_path, "seg", 3, now)
    b = make_run_dir(tmp_path, "seg", 3, now)
    assert a.name == "20261123-101500-s3" and b.name == "20261123-101500-s3-1"
    assert all((a / sub).is_dir() for sub in ("eval", "plots", "checkpoints"))


def test_env_json_has_provenance(tmp_path) -> None:
    env = write_env(tmp_path, {"x": 1})
    saved = json.loads((tmp_path / "env.json").read_text())
    assert saved == env and {"git_sha", "torch", "cuda", "python", "packages", "x"} <= set(saved)
    assert saved["torch"] == torch.__version__


def test_metrics_csv_grows_columns_and_truncates(tmp_path) -> None:
    path = tmp_path / "metrics.csv"
    m = MetricsCSV(path)
    m.log(1, {"a": 1.0})
    m.log(2, {"a": 2.0, "b": torch.tensor(3.0)})
    m.log(3, {"b": 4.0})
    with open(path, newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert list(rows[0]) == ["step", "a", "b"]
    assert [(r["step"], r["a"], r["b"]) for r in rows] == [("1", "1.0", ""), ("2", "2.0", "3.0"), ("3", "", "4.0")]
    again = MetricsCSV(path)             # reopened (resume): continues the same file
    again.truncate_after(2)
    again.log(3, {"a": 5.0})
    assert read_metrics(path)["a"] == ([1, 2, 3], [1.0, 2.0, 5.0])


def test_wandb_mode_resolution(monkeypatch, tmp_path) -> None:
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))            # no ~/.netrc
    monkeypatch.delenv("WANDB_MODE", raising=False)
    assert resolve_wandb_mode(None) == "offline"          # no key: never blocks on the network
    monkeypatch.setenv("WANDB_API_KEY", "k" * 40)
    assert resolve_wandb_mode(None) == "online"
    monkeypatch.setenv("WANDB_MODE", "disabled")
    assert resolve_wandb_mode(None) == "disabled"         # WANDB_MODE is respected
    assert resolve_wandb_mode("offline") == "offline"     # the flag wins


def test_tracker_survives_a_failing_wandb(monkeypatch, tmp_path) -> None:
    import sys
    import types

    broken = types.ModuleType("wandb")

    def init(**kw):
        raise RuntimeError("network down")

    broken.init = init
    monkeypatch.setitem(sys.modules, "wandb", broken)
    tracker = Tracker("online", tmp_path, {}, "p", "n")
    assert not tracker.active
    tracker.log({"a": 1.0}, 1)            # no-ops
    tracker.finish()
    assert not Tracker("disabled", tmp_path, {}, "p", "n").active


def test_checkpoint_is_atomic_and_weights_only(tmp_path, monkeypatch) -> None:
    path = tmp_path / "ck" / "last.pt"
    ckpt = {"format": 1, "config": {"a": [1, 2]}, "net": {"name": "bdl", "kwargs": {}},
            "model": {"w": torch.ones(2)}, "step": 3}
    save_checkpoint(path, ckpt)
    loaded = load_checkpoint(path)
    assert loaded["step"] == 3 and torch.equal(loaded["model"]["w"], torch.ones(2))
    assert set(strip_checkpoint(loaded)) == {"format", "config", "net", "model"}

    def disk_full(obj, f, *a, **k):
        with open(f, "wb") as fh:
            fh.write(b"partial")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch, "save", disk_full)
    with pytest.raises(OutputError, match="full"):
        save_checkpoint(path, {**ckpt, "step": 4})
    monkeypatch.undo()
    assert load_checkpoint(path)["step"] == 3                      # the old checkpoint is intact
    assert [p.name for p in path.parent.iterdir()] == ["last.pt"]  # no temporary file left behind
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError):
        load_checkpoint(tmp_path / "junk.pt")
    with pytest.raises(FileNotFoundError):
        load_checkpoint(tmp_path / "missing.pt")


def test_image_panel_layout() -> None:
    ir, vis, fused = torch.zeros(1, 8, 10), torch.ones(3, 8, 10), torch.full((3, 8, 10), 0.5)
    mask = torch.zeros(8, 10, dtype=torch.long)
    panel = image_panel(ir, vis, fused, mask=mask, pred_mask=mask)
    assert panel.shape == (8, 5 * 10 + 4 * 2, 3) and panel.dtype.name == "uint8"
    assert panel[0, 0].tolist() == [0, 0, 0] and panel[0, 12].tolist() == [255, 255, 255]
    boxed = image_panel(ir, vis, fused, boxes=torch.tensor([[1.0, 1.0, 5.0, 6.0]]), labels=torch.tensor([0]))
    assert boxed.shape[1] == 4 * 10 + 3 * 2


def test_plots_from_metrics_csv(tmp_path) -> None:
    m = MetricsCSV(tmp_path / "metrics.csv")
    for step in range(1, 6):
        m.log(step, {"loss/upper/fusion": 1.0 / step, "agg/weight/seg": 0.5, "agg/weight/critic": 0.5,
                     "hypergrad/norm/seg": 2.0, "lr/upper": 1e-3})
    written = make_plots(tmp_path)
    assert {p.name for p in written} == {"losses.png", "agg_weights.png", "hypergrad.png", "lr.png"}
    assert all(p.stat().st_size > 1000 for p in written)
    assert make_plots(tmp_path / "nothing") == []
