"""Every preset trains (a warm-up, and a bi-level upper step where the CI budget allows) and evaluates at its own
crop, batch and nets.

Real data from ../shared/data where it exists (RoadScene; VIFB, MEF and MFF for ``tc_moa_general``; MSRS person
masks); otherwise a generated fixture of the dataset's folder layout with realistic, mixed image sizes (MFNet,
MSRS, FMB, M3FD, LLVIP). Only the number of iterations is reduced (see :func:`_train_and_evaluate`), so a preset
that cannot run at its real sizes on its real layout fails here, not on a user's GPU.
"""

from __future__ import annotations

import csv
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from experiments import run
from experiments.cli import native_bf16
from experiments.presets import get_preset, list_presets

# Sizes as the datasets ship them (H, W), mixed within a dataset.
MFNET_SIZES = ((480, 640), (360, 480))
M3FD_SIZES = ((768, 1024), (480, 640))
LLVIP_SIZES = ((512, 640), (384, 480))        # LLVIP ships 1024x1280; half size keeps CPU tests short
MSRS_SIZES = ((480, 640), (360, 480))
FMB_SIZES = ((600, 800), (480, 640))
SPLITS = {"train": 4, "val": 2, "test": 2}


def _scene(rng: np.random.Generator, size: tuple[int, int]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """An IR/visible pair with a few bright rectangles and their class mask (values 0..8)."""
    h, w = size
    ir = rng.integers(20, 80, (h, w), dtype=np.uint8)
    vis = rng.integers(0, 120, (h, w, 3), dtype=np.uint8)
    mask = np.zeros((h, w), np.uint8)
    boxes = []
    for cls in rng.integers(1, 9, 3):
        y0, x0 = int(rng.integers(0, h // 2)), int(rng.integers(0, w // 2))
        y1, x1 = y0 + int(rng.integers(h // 8, h // 3)), x0 + int(rng.integers(w // 8, w // 3))
        ir[y0:y1, x0:x1] = 220
        vis[y0:y1, x0:x1] = rng.integers(120, 255, 3)
        mask[y0:y1, x0:x1] = cls
        boxes.append((int(cls), (x0, y0, x1, y1)))
    return ir, vis, mask, boxes


def _voc(path: Path, size: tuple[int, int], objects: list[tuple[str, tuple[int, int, int, int]]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    body = "".join(f"<object><name>{n}</name><difficult>0</difficult><bndbox><xmin>{b[0]}</xmin><ymin>{b[1]}"
                   f"</ymin><xmax>{b[2]}</xmax><ymax>{b[3]}</ymax></bndbox></object>" for n, b in objects)
    path.write_text(f"<annotation><size><width>{size[1]}</width><height>{size[0]}</height></size>{body}"
                    "</annotation>")


def _save(path: Path, array: np.ndarray, mode: str | None = None) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array, mode=mode).save(path)


def _samples(sizes):
    """(split, stem, size) for every fixture sample: the sizes alternate within each split."""
    for k, (split, n) in enumerate(SPLITS.items()):
        for i in range(n):
            yield split, f"{split}{i:03d}", sizes[(i + k) % len(sizes)]


def write_mfnet(root: Path) -> Path:
    rng = np.random.default_rng(0)
    for split, stem, size in _samples(MFNET_SIZES):
        ir, vis, mask, _ = _scene(rng, size)
        _save(root / "images" / f"{stem}.png", np.dstack([vis, ir]), "RGBA")
        _save(root / "labels" / f"{stem}.png", mask)
        with open(root / f"{split}.txt", "a") as f:
            f.write(stem + "\n")
    return root


def _write_split_folders(root: Path, sizes, seed: int, ir: str, vis: str, labels: str) -> Path:
    """``<split>/{ir,vis,labels}`` with train and test only (MSRS, FMB ship no val split)."""
    rng = np.random.default_rng(seed)
    for split, stem, size in _samples(sizes):
        split = "train" if split == "val" else split
        ir_img, vis_img, mask, _ = _scene(rng, size)
        _save(root / split / ir / f"{stem}.png", ir_img)
        _save(root / split / vis / f"{stem}.png", vis_img)
        _save(root / split / labels / f"{stem}.png", mask)
    return root


def write_msrs(root: Path) -> Path:
    return _write_split_folders(root, MSRS_SIZES, 1, "ir", "vi", "Segmentation_labels")


def write_fmb(root: Path) -> Path:
    return _write_split_folders(root, FMB_SIZES, 2, "Infrared", "Visible", "Label")


def write_m3fd(root: Path) -> Path:
    from fusion.data import M3FD_CLASSES

    rng = np.random.default_rng(3)
    for split, stem, size in _samples(M3FD_SIZES):
        ir, vis, _, boxes = _scene(rng, size)
        _save(root / "Ir" / f"{stem}.png", ir)
        _save(root / "Vis" / f"{stem}.png", vis)
        _voc(root / "Annotation" / f"{stem}.xml", size, [(M3FD_CLASSES[c % len(M3FD_CLASSES)], b) for c, b in boxes])
        with open(root / f"{split}.txt", "a") as f:
            f.write(stem + "\n")
    return root


def write_llvip(root: Path) -> Path:
    rng = np.random.default_rng(4)
    for split, stem, size in _samples(LLVIP_SIZES):
        split = "train" if split == "val" else split          # LLVIP ships train and test only
        ir, vis, _, boxes = _scene(rng, size)
        _save(root / "infrared" / split / f"{stem}.jpg", ir)
        _save(root / "visible" / split / f"{stem}.jpg", vis)
        _voc(root / "Annotations" / f"{stem}.xml", size, [("person", b) for _, b in boxes])
    return root


FIXTURES = {"mfnet": write_mfnet, "msrs": write_msrs, "fmb": write_fmb, "m3fd": write_m3fd, "llvip": write_llvip}
SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"


def _train_and_evaluate(tmp_path: Path, preset: str, *extra: str, upper_step: bool = True, warmup: bool = True,
                        aux: tuple[str, ...] = ()) -> dict[str, float]:
    """A warm-up iteration (where the preset has one), then one bi-level iteration with an upper step, then
    evaluation. The upper step comes first (``bilevel.ul_every=1``): the lower-only iterations before it in a
    preset's schedule (BDL's: 9) run the same forwards and LL steps at the same sizes, the upper step holds the
    peak memory, and they cost CI time (133 s of 277 s for the MSRS test on a 2-core AVX2 machine). With
    ``upper_step=False`` (other layouts of a dataset that a test already takes through an upper step at the
    same sizes) two iterations of the preset's schedule: lower-level steps and the data path at full size.
    ``warmup=False``: straight to the upper step. ``aux``: the net's auxiliary losses the last upper step must
    log (finite)."""
    cfg = get_preset(preset)
    warmups = min(cfg.train.warmup_iters, int(warmup))   # one warm-up iteration where the preset has any
    reaches_upper = cfg.bilevel.ul_every <= 2 or upper_step
    schedule = ["--set", "bilevel.ul_every=1"] if reaches_upper else []
    iters = warmups + 1 if reaches_upper else 2   # [warm-up,] the upper step; or two LL iterations
    result = run.main(["--preset", preset, "--iters", str(iters), "--set", f"train.warmup_iters={warmups}",
                       *schedule, "--out", str(tmp_path / "runs"),
                       "--wandb", "disabled", "--device", "cpu", "--set", "log.progress=False", *extra])
    exp = result.experiment
    assert result.steps == iters
    assert exp.cfg.data.crop == cfg.data.crop
    assert exp.cfg.train.batch == cfg.train.batch or "--batch" in extra
    assert exp.cfg.net.name == cfg.net.name and cfg.net.kwargs.items() <= exp.cfg.net.kwargs.items()
    assert exp.cfg.tasks == cfg.tasks
    metrics = result.metrics
    assert metrics and all(math.isfinite(v) for k, v in metrics.items() if not k.startswith("eval/critic"))
    with open(result.run_dir / "metrics.csv", newline="") as f:
        rows = [r for r in csv.DictReader(f) if r.get("upper_step")]
    assert rows, "no training row logged"
    for k in exp.cfg.constraints if reaches_upper else ():   # the last iteration was an upper step through all
        assert math.isfinite(float(rows[-1][f"loss/upper/{k}"])), k
    for name in aux:
        keys = [k for k in rows[-1] if k.startswith("loss/aux/") and k.endswith(name) and rows[-1][k]]
        assert keys and all(math.isfinite(float(rows[-1][k])) for k in keys), (name, sorted(rows[-1]))
    return metrics


def _needs_shared(name: str) -> Path:
    path = SHARED / name
    if not path.is_dir():
        pytest.skip(f"../shared/data/{name} not present")
    return path


@pytest.mark.parametrize("preset", [p for p in list_presets() if p.startswith("synthetic_")])
def test_synthetic_presets(tmp_path: Path, preset: str) -> None:
    _train_and_evaluate(tmp_path, preset)


# The real-size runs that peak at 12-14 GB on the CPU (RoadScene's batch 16 × 192 px, BDL's full-resolution
# net at 384 px with the LL and UL graphs, TC-MoA's ViT-B at 448 px) share one test worker: two at once exceed
# a 24 GiB machine (``xdist_group``, honoured by ``--dist loadgroup``).
PEAK_MEMORY = pytest.mark.xdist_group("peak_memory")


@pytest.fixture(autouse=True)
def _group_is_honoured(request: pytest.FixtureRequest) -> None:
    """Under ``--dist loadgroup`` xdist tags grouped tests' ids; pytest 9.2 drops the tag silently and the
    group's peaks then meet (an OOM kill, not a failure that names the cause)."""
    if request.node.get_closest_marker("xdist_group") and getattr(request.config.option, "loadgroup", False):
        assert request.node.nodeid.endswith("@peak_memory"), "xdist_group ignored: use pytest<9.2 (requirements-test.txt)"


@pytest.fixture(autouse=True)
def _critical_path_threads(request: pytest.FixtureRequest) -> None:
    """The peak-memory group runs on one worker for most of the suite (its critical path): its large
    convolutions take every core while the other worker runs tests on its share (tests/conftest.py)."""
    if request.node.get_closest_marker("xdist_group") is not None:
        request.getfixturevalue("all_cores")


#: Whether this CPU computes bf16 natively. Where it does not (AVX2 only) the runner trains the bf16 presets
#: in float32 (``experiments.experiment.training_amp``), which doubles their activations and, on such a
#: 2-core machine, their time: the GPU-sized presets below then keep their crops, nets and data but do less
#: (half their batch or less: at full batch these four tests kept one test worker busy for 17 of the suite's
#: 19 minutes on such a machine).
NATIVE_BF16 = native_bf16(torch.device("cpu"))
#: BDL's presets without native bf16: an upper-level batch of 2 instead of 4 (the lower level's is 2 already).
HALF_BATCH = () if NATIVE_BF16 else ("--batch", "2")


@PEAK_MEMORY
def test_roadscene_presets_on_real_roadscene(tmp_path: Path) -> None:
    """Both RoadScene presets, one after the other. Without native bf16 only the recommended one (the other
    has the same nets, data and sizes), straight to its upper step, at half its batch: in float32 with
    recomputation its upper step and evaluation at batch 16 took 4.3 minutes alone on a 2-core AVX2 machine,
    7-8 under CI, the suite's longest test (the upper step is 76 % of it)."""
    root = str(_needs_shared("roadscene"))
    presets = [p for p in list_presets() if "roadscene" in p]
    assert len(presets) >= 2 and "recipe_roadscene_seg" in presets
    # In float32 BDL's net keeps twice bf16's activations (24 GB peak for the upper step at batch 16 × 192 px,
    # more than this worker has); recomputing its blocks (the same gradients) brings that to 9-11 GB.
    fallback = [] if NATIVE_BF16 else ["--set", "net.kwargs.grad_checkpointing=True", "--batch", "8"]
    for preset in presets if NATIVE_BF16 else ["recipe_roadscene_seg"]:
        # 4 of the 23 held-out pairs (mixed sizes) keep the evaluation's share of CI small
        metrics = _train_and_evaluate(tmp_path / preset, preset, "--data-root", root, "--set", "eval.max_images=4",
                                      *fallback, warmup=NATIVE_BF16)
        assert "eval/mIoU" in metrics and "eval/EN" in metrics, preset


@pytest.mark.parametrize("data", ["mfnet", "msrs", "fmb"])
def test_bdl_mfnet_seg_on_segmentation_layouts(tmp_path: Path, data: str) -> None:
    root = FIXTURES[data](tmp_path / data)
    # the upper step at this preset's sizes runs on the real MSRS pairs below (CI budget)
    metrics = _train_and_evaluate(tmp_path, "bdl_mfnet_seg", "--data", data, "--data-root", str(root),
                                  upper_step=False)
    assert 0.0 <= metrics["eval/mIoU"] <= 1.0


@pytest.mark.parametrize("data", [pytest.param("m3fd", marks=PEAK_MEMORY), "llvip"])
def test_bdl_m3fd_det_on_detection_layouts(tmp_path: Path, data: str) -> None:
    root = FIXTURES[data](tmp_path / data)
    metrics = _train_and_evaluate(tmp_path, "bdl_m3fd_det", "--data", data, "--data-root", str(root),
                                  *HALF_BATCH, upper_step=data == "m3fd")
    assert 0.0 <= metrics["eval/mAP50"] <= 1.0


def _folder(root: Path, sizes: list[tuple[int, int]]) -> Path:
    rng = np.random.default_rng(5)
    for i, size in enumerate(sizes):
        ir, vis, _, _ = _scene(rng, size)
        _save(root / "ir" / f"p{i:02d}.png", ir)
        _save(root / "vi" / f"p{i:02d}.png", vis)
    return root


def test_crop_sizes_are_checked_against_the_data_before_training(tmp_path: Path, capsys, caplog) -> None:
    root = _folder(tmp_path / "pairs", [(64, 80)] * 5 + [(20, 30)])
    argv = ["--task", "fusion", "--data", "folder", "--data-root", str(root), "--set", "data.holdout=3",
            "--iters", "1", "--batch", "2", "--out", str(tmp_path / "runs"), "--wandb", "disabled"]
    assert run.cli([*argv, "--crop", "96"]) == 2                  # 20 px → 96 px: a 4.8x upscale
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: data.crop=96") and "'p05'" in err[0] and "4.8x" in err[0]
    assert not (tmp_path / "runs").exists()                       # refused before a run directory exists
    root = _folder(tmp_path / "ok", [(64, 80)] * 6)
    argv[argv.index(str(tmp_path / "pairs"))] = str(root)
    capsys.readouterr()
    assert run.cli([*argv, "--crop", "72"]) == 2          # VIF needs 65 px sides: refused before training
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "VIF" in err[0] and "eval.metrics" in err[0] and "p00.png" in err[0]
    assert not (tmp_path / "runs").exists()
    assert run.cli([*argv, "--crop", "72", "--set", "eval.metrics=('EN','SD')", "--set", "eval.max_images=1"]) == 0
    assert any("smaller than the 72 px crop" in r.getMessage() for r in caplog.records)     # 64 → 72 px: said


@PEAK_MEMORY
def test_bdl_mfnet_seg_on_real_msrs_person_masks(tmp_path: Path) -> None:
    """The 8 real MSRS pairs with person masks: segmentation labels, and the saliency map of loss and critic."""
    root = _needs_shared("msrs_person8")
    metrics = _train_and_evaluate(tmp_path, "bdl_mfnet_seg", "--data", "msrs_person8", "--data-root", str(root),
                                  "--set", "data.holdout=4", *HALF_BATCH)
    assert 0.0 <= metrics["eval/mIoU"] <= 1.0


@PEAK_MEMORY
def test_tc_moa_general_on_real_benchmarks(tmp_path: Path) -> None:
    """One iteration (a batch of 3 pairs of each task at 448 px through the ViT-B TC-MoA) and the evaluation of
    the held-out pairs (of the primary task, VIFB), on the real VIFB, MEF and MFF pairs. Without native bf16 one
    pair of each task and one held-out pair: in float32 the full test took 9 minutes alone on a 2-core AVX2
    machine, with one pair per task 205 s (29 % of it fusing the two 640 px held-out pairs in 448 px tiles)."""
    for name in ("vifb", "mef", "mff"):
        _needs_shared(name)
    batch = [] if NATIVE_BF16 else ["--batch", "1", "--set", "eval.max_images=1"]
    metrics = _train_and_evaluate(tmp_path, "tc_moa_general", "--data-root", str(SHARED), *batch,
                                  aux=("mir", "balance"))
    assert "eval/EN" in metrics
