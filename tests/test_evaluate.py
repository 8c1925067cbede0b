"""End-to-end tests of ``experiments/evaluate.py`` on tiny temporary folders and on two VIFB pairs."""

from __future__ import annotations

import csv
import json
import warnings
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from experiments import evaluate as ev
from fusion.image_io import ImagePairError


def _save(path: Path, array: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array.astype(np.uint8)).save(path)


@pytest.fixture
def folders(tmp_path):
    rng = np.random.default_rng(0)
    h, w = 72, 80  # VIF needs sides >= 65
    for stem in ("a1", "a2", "a3"):
        ir = rng.integers(0, 256, (h, w))
        vi = rng.integers(0, 256, (h, w, 3))
        _save(tmp_path / "ir" / f"{stem}.png", ir)
        _save(tmp_path / "vi" / f"{stem}.png", vi)
        grey = vi.mean(-1)
        _save(tmp_path / "fused" / "avg" / f"{stem}.png", (ir + grey) / 2)
        _save(tmp_path / "fused" / "max" / f"{stem}.png", np.maximum(ir, grey))
    _save(tmp_path / "ir" / "lonely.png", rng.integers(0, 256, (h, w)))  # no visible partner
    _save(tmp_path / "fused" / "avg" / "extra.png", rng.integers(0, 256, (h, w)))  # no sources
    return tmp_path


def _read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def test_evaluate_cli_end_to_end(folders, capsys):
    out = folders / "out"
    rc = ev.main([
        "--ir", str(folders / "ir"), "--vi", str(folders / "vi"),
        "--fused", f"avg={folders / 'fused' / 'avg'}", f"max={folders / 'fused' / 'max'}",
        "--metrics", "en,SD,mi,Qabf,qcv", "--out", str(out), "--no-progress",
    ])
    assert rc == 0
    for name in ("per_image.csv", "summary.csv", "meta.json", "table.md", "table.tex"):
        assert (out / name).is_file(), name
    per_image = _read_csv(out / "per_image.csv")
    assert list(per_image[0]) == ["image", "method", "EN", "SD", "MI", "Qabf", "Qcv"]
    assert sorted((r["image"], r["method"]) for r in per_image) == [
        ("a1", "avg"), ("a1", "max"), ("a2", "avg"), ("a2", "max"), ("a3", "avg"), ("a3", "max")
    ]
    summary = {r["method"]: r for r in _read_csv(out / "summary.csv")}
    assert summary["avg"]["n_images"] == "3" and summary["max"]["n_images"] == "3"
    mean_sd = np.mean([float(r["SD"]) for r in per_image if r["method"] == "avg"])
    assert float(summary["avg"]["SD"]) == pytest.approx(mean_sd)
    meta = json.loads((out / "meta.json").read_text())
    assert meta["profile"] == "reference" and meta["metrics"] == ["EN", "SD", "MI", "Qabf", "Qcv"]
    assert meta["higher_is_better"]["Qcv"] is False
    assert "torch" in meta["versions"]
    unmatched = "\n".join(meta["unmatched"])
    assert "lonely" in unmatched and "extra" in unmatched
    captured = capsys.readouterr()
    assert "| Method |" in captured.out and "lonely" in captured.err
    # the best value of each column is bold, by direction (Qcv: lower is better)
    md = (out / "table.md").read_text()
    best_qcv = min(float(summary[m]["Qcv"]) for m in summary)
    assert f"**{best_qcv:.4f}**" in md or f"**{best_qcv:.1f}**" in md
    assert "\\textbf{" in (out / "table.tex").read_text()
    # n per method in both tables
    assert "| Method | n |" in md and "| avg | 3 |" in md and "| max | 3 |" in md
    assert "avg & 3 &" in (out / "table.tex").read_text()


def test_values_match_direct_computation(folders):
    import torch

    from fusion.image_io import read_image
    from fusion.metrics import compute_metrics

    res = ev.evaluate_folders(folders / "ir", folders / "vi", {"avg": folders / "fused" / "avg"},
                              metrics=["EN", "SSIM", "VIF"], progress=False)
    row = next(r for r in res.rows if r["image"] == "a2")
    load = lambda p: read_image(p)[None].to(torch.float64)
    direct = compute_metrics(load(folders / "fused" / "avg" / "a2.png"), load(folders / "ir" / "a2.png"),
                             load(folders / "vi" / "a2.png"), ["EN", "SSIM", "VIF"])
    for name, v in direct.items():
        assert row[name] == pytest.approx(v.item(), rel=1e-6)


def test_refuses_non_empty_out(folders, capsys):
    out = folders / "busy"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    assert ev.main(["--ir", str(folders / "ir"), "--vi", str(folders / "vi"),
                    "--fused-root", str(folders / "fused"), "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:") and "overwrite" in err[0] and str(out) in err[0]
    assert sorted(p.name for p in out.iterdir()) == ["keep.txt"]


def test_fused_root_profile_and_bad_metric(folders):
    res = ev.evaluate_folders(folders / "ir", folders / "vi", ev._parse_fused([], str(folders / "fused")),
                              profile="vifb", progress=False)
    assert set(res.summary) == {"avg", "max"} and res.metrics == ev.list_metrics("vifb")
    with pytest.raises(ValueError, match="not available under profile"):
        ev.evaluate_folders(folders / "ir", folders / "vi", {"avg": folders / "fused" / "avg"},
                            profile="vifb", metrics="VIF", progress=False)


def test_images_too_small_for_ms_ssim_are_refused_before_scoring(folders):
    with pytest.raises(ImagePairError, match="161 pixels.*MS_SSIM"):
        ev.evaluate_folders(folders / "ir", folders / "vi", {"avg": folders / "fused" / "avg"},
                            metrics="EN,MS_SSIM", progress=False)


@pytest.mark.parity
def test_evaluate_on_two_vifb_pairs(shared_data, tmp_path):
    """The command on the VIFB layout (two pairs, two methods) reproduces the toolbox's CSV."""
    root = shared_data("vifb")
    stems, methods = ("kettle", "walking2"), ("ADF", "CNN")
    for sub in ("ir", "vi", *(f"fused/{m}" for m in methods)):
        (tmp_path / sub).mkdir(parents=True)
        for s in stems:  # links, never copies of the shared data
            (tmp_path / sub / f"{s}.jpg").symlink_to(root / sub / f"{s}.jpg")
    out = tmp_path / "out"
    ev.main(["--ir", str(tmp_path / "ir"), "--vi", str(tmp_path / "vi"), "--fused-root", str(tmp_path / "fused"),
             "--profile", "vifb", "--metrics", "EN,SD,MI,Qabf,SSIM,Qcb", "--out", str(out), "--no-progress"])
    from tests.test_metrics_golden import CSV_COLUMNS, last_digit_units

    column = {v: k for k, v in CSV_COLUMNS.items()}
    golden = {(r["image"], r["method"]): r for r in _read_csv(root / "metrics_vifb.csv")}
    rows = _read_csv(out / "per_image.csv")
    assert len(rows) == 4
    for r in rows:
        g = golden[(r["image"], r["method"])]
        for name in ("EN", "SD", "MI", "Qabf", "SSIM", "Qcb"):
            assert last_digit_units(float(r[name]), float(g[column[name]])) <= 1, (r["image"], r["method"], name)


def test_ab_pairs_layout_with_the_mefb_profile(shared_data, tmp_path) -> None:
    """``--pairs`` reads MEFB's input layout ``<scene>/<scene>_{A,B}.*``; a fused image that is source A itself
    scores NMI/Qncie in their ranges and shows up once per scene."""
    import shutil

    mef = shared_data("mef")
    pairs, fused = tmp_path / "pairs", tmp_path / "fused" / "srcA"
    fused.mkdir(parents=True)
    for scene in ("Arno", "Balloons"):
        shutil.copytree(mef / scene, pairs / scene)
        a = next((mef / scene).glob(f"{scene}_A.*"))
        shutil.copy(a, fused / f"{scene}{a.suffix}")
    out = tmp_path / "out"
    assert ev.main(["--pairs", str(pairs), "--fused-root", str(tmp_path / "fused"), "--profile", "mefb",
                    "--metrics", "EN,NMI,Qncie,SD", "--out", str(out), "--no-progress"]) == 0
    with open(out / "per_image.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert sorted(r["image"] for r in rows) == ["Arno", "Balloons"]
    for r in rows:
        assert 0.0 < float(r["NMI"]) <= 2.0 and 0.0 <= float(r["Qncie"]) <= 1.0 and float(r["EN"]) > 0.0


def test_score_images_writes_nan_and_warns_once_for_a_metric_that_cannot_run():
    import torch

    g = torch.Generator().manual_seed(0)
    fused, ir, vis = (torch.rand(n, 1, 64, 64, generator=g) for n in (2, 1, 1))  # MS-SSIM needs sides > 160
    failures: dict[str, str] = {}
    with pytest.warns(UserWarning, match="MS_SSIM: .*writing NaN"):
        values = ev.score_images(fused, ir, vis, ["EN", "MS_SSIM"], "reference", failures)
    assert list(failures) == ["MS_SSIM"] and torch.isnan(values["MS_SSIM"]).all()
    assert torch.isfinite(values["EN"]).all() and values["EN"].device.type == "cpu"
    with warnings.catch_warnings():
        warnings.simplefilter("error")   # the second batch's NaN is already on record: no second warning
        again = ev.score_images(fused, ir, vis, ["EN", "MS_SSIM"], "reference", failures)
    assert torch.equal(again["EN"], values["EN"])
