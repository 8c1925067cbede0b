"""Issue 13, items 6, 8 and 9: image sizes, output folders that are inputs, 16-bit images with a narrow range.

Images too large (the pixel limit, PIL's decompression-bomb limit) or too small for a metric's windows are
errors naming the file and the limit, before any work; ``fuse.py`` fuses tiny images (the nets pad);
``--out`` may not be an input folder; a 16-bit image that uses a small part of its range warns once per
folder and ``stretch16`` / ``--stretch-16bit`` stretches it. Every CLI error: exit 2, one ``error:`` line
naming the file, no traceback, nothing written.
"""

from __future__ import annotations

import csv
import math
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from experiments import evaluate, fuse
from experiments.checkpoint import FORMAT, save_checkpoint
from fusion import image_io
from fusion.image_io import ImagePairError, SixteenBitRangeWarning, image_size, read_image, read_pair
from fusion.metrics import get_metric, list_metrics, list_profiles

SIZE = (12, 16)


def _png(path: Path, array: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)
    return path


def _grey(shape=SIZE, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, shape).astype(np.uint8)


def _pairs(root: Path, shape=SIZE, stems=("a", "b")) -> Path:
    """ir/, vi/, fused/m/ with one image per stem."""
    for i, stem in enumerate(stems):
        _png(root / "ir" / f"{stem}.png", _grey(shape, i))
        _png(root / "vi" / f"{stem}.png", _grey(shape, 10 + i))
        _png(root / "fused" / "m" / f"{stem}.png", _grey(shape, 20 + i))
    return root


def _checkpoint(path: Path) -> Path:
    from fusion.nets.registry import create_fusion_net

    torch.manual_seed(0)
    net = create_fusion_net("bdl_tiny")
    return save_checkpoint(path, {"format": FORMAT, "config": {}, "net": {"name": "bdl_tiny", "kwargs": {}},
                                  "model": net.state_dict()})


def _ev(root: Path, *extra: str, metrics: str = "EN,SD", out: str = "evout") -> list[str]:
    return ["--ir", str(root / "ir"), "--vi", str(root / "vi"), "--fused", f"m={root / 'fused' / 'm'}",
            "--metrics", metrics, "--out", str(root / out), "--no-progress", *extra]


def _fu(root: Path, *extra: str, out: str = "fout") -> list[str]:
    return ["--checkpoint", str(root / "good.pt"), "--ir", str(root / "ir"), "--vi", str(root / "vi"),
            "--out", str(root / out), *extra]


# -------------------------------------------------------------------------------------- too large
def test_pixel_limit_is_checked_from_the_header(tmp_path) -> None:
    path = _png(tmp_path / "x.png", _grey())
    n = SIZE[0] * SIZE[1]
    for call in (lambda: read_image(path, max_pixels=n - 1), lambda: image_size(path, max_pixels=n - 1),
                 lambda: read_pair(path, path, max_pixels=n - 1)):
        with pytest.raises(ImagePairError, match=f"{path}.*16x12 = {n} pixels, over the limit of {n - 1}"):
            call()
    assert read_image(path, max_pixels=n).shape == (1, *SIZE)        # the limit itself is allowed
    assert image_size(path) == SIZE


def test_pil_decompression_bomb_is_an_image_error(tmp_path, monkeypatch) -> None:
    path = _png(tmp_path / "x.png", _grey())
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 50)      # PIL refuses above twice this: 192 > 100
    for call in (lambda: read_image(path, max_pixels=10**9), lambda: image_size(path, max_pixels=10**9)):
        with pytest.raises(ImagePairError, match=f"{path} is too large for PIL.*MAX_IMAGE_PIXELS = 50"):
            call()


@pytest.mark.parametrize("limit", ["ours", "PIL"])
def test_commands_refuse_images_over_the_limit(tmp_path, expect_error, monkeypatch, limit) -> None:
    root = _pairs(tmp_path)
    _checkpoint(root / "good.pt")
    if limit == "ours":
        monkeypatch.setattr(image_io, "MAX_PIXELS", SIZE[0] * SIZE[1] - 1)
        names = ("limit of 191 pixels",)
    else:
        monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 50)
        names = ("too large for PIL",)
    first = str(root / "ir" / "a.png")
    expect_error(root, evaluate.main, _ev(root), first, *names)
    expect_error(root, fuse.main, _fu(root), first, *names)


# -------------------------------------------------------------------------------------- too small
@pytest.mark.parametrize("profile", list_profiles())
def test_min_image_side_matches_the_metrics(profile) -> None:
    """Oracle: the metrics themselves. At the listed side a metric computes (finite for some random image);
    one pixel less, it raises or gives NaN for every random image."""

    def outcome(name: str, side: int, seed: int) -> bool:
        g = torch.Generator().manual_seed(seed)
        f, a, b = (torch.rand(1, 1, side, side, dtype=torch.float64, generator=g) for _ in range(3))
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                return bool(torch.isfinite(get_metric(name)(f, a, b, profile=profile)).all())
        except (ValueError, RuntimeError):
            return False

    for name in list_metrics(profile):
        side = evaluate.min_image_side(name, profile)
        assert any(outcome(name, side, seed) for seed in range(3)), (name, side)
        if side > 1:
            assert not any(outcome(name, side - 1, seed) for seed in range(3)), (name, side - 1)


def test_images_too_small_for_the_metrics_are_refused_before_any_metric(tmp_path, expect_error, monkeypatch) -> None:
    root = _pairs(tmp_path)
    monkeypatch.setattr(evaluate, "score_images", lambda *a, **k: pytest.fail("a metric was computed"))
    line = expect_error(root, evaluate.main, _ev(root, metrics="EN,VIF"),
                        str(root / "ir" / "a.png"), "16x12", "65 pixels", "VIF")
    assert "and 1 more image" in line
    # the largest window of the chosen metrics decides: MS_SSIM's pyramid needs sides > 160
    expect_error(root, evaluate.main, _ev(root, metrics="EN,MS_SSIM,VIF"), "161 pixels", "MS_SSIM")


def test_one_pixel_images(tmp_path, expect_error) -> None:
    root = _pairs(tmp_path, shape=(1, 1))
    expect_error(root, evaluate.main, _ev(root, metrics="EN,SF"), "1x1", "2 pixels", "SF")
    assert evaluate.main(_ev(root, metrics="EN")) == 0          # EN needs no window
    with open(root / "evout" / "per_image.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert [float(r["EN"]) for r in rows] == [0.0, 0.0]            # one grey level: zero entropy


def test_fuse_works_on_tiny_images(tmp_path, capsys) -> None:
    """The nets pad, so a 2×2 pair fuses; the PNG is the net's output as fuse_pair gives it (the oracle)."""
    root = _pairs(tmp_path, shape=(2, 2), stems=("t",))
    _checkpoint(root / "good.pt")
    assert fuse.main(_fu(root)) == 0
    net = fuse.load_fusion_net(root / "good.pt")
    ir, vis = read_pair(root / "ir" / "t.png", root / "vi" / "t.png")
    expected = torch.round(fuse.fuse_pair(net, ir, vis).clamp(0, 1) * 255).to(torch.uint8)[0].numpy()
    assert np.array_equal(np.asarray(Image.open(root / "fout" / "t.png")), expected)


# ------------------------------------------------------------------------------- --out is an input
@pytest.mark.parametrize("out, flag", [("ir", "ir"), ("vi", "vi"), ("fused/m", "fused/m"),
                                       ("ir/eval", "ir"), ("fused/m/eval", "fused/m")])
def test_evaluate_out_may_not_be_an_input_folder(tmp_path, expect_error, out, flag) -> None:
    root = _pairs(tmp_path)
    expect_error(root, evaluate.main, _ev(root, out=out), f"--out {root / out}", "input folder",
                 str(root / flag))


def test_evaluate_out_inside_fused_root_or_pairs_is_refused(tmp_path, expect_error) -> None:
    root = _pairs(tmp_path)
    argv = ["--ir", str(root / "ir"), "--vi", str(root / "vi"), "--fused-root", str(root / "fused"),
            "--metrics", "EN", "--out", str(root / "fused" / "results"), "--no-progress"]
    expect_error(root, evaluate.main, argv, "is inside the input folder", str(root / "fused"))
    for scene in ("s1", "s2"):
        for side in "AB":
            _png(root / "pairs" / scene / f"{scene}_{side}.png", _grey(seed=ord(side)))
    argv = ["--pairs", str(root / "pairs"), "--fused", f"m={root / 'fused' / 'm'}", "--metrics", "EN",
            "--out", str(root / "pairs" / "s1"), "--no-progress"]
    expect_error(root, evaluate.main, argv, "is inside the input folder", str(root / "pairs"))


def test_fuse_out_may_not_be_the_visible_folder(tmp_path, expect_error) -> None:
    root = _pairs(tmp_path)
    _checkpoint(root / "good.pt")
    expect_error(root, fuse.main, _fu(root, out="vi"), "is the input folder", str(root / "vi"))


# ------------------------------------------------------------------------------------------ 16-bit
@pytest.fixture
def fresh_warnings(monkeypatch):
    """Every test starts with no folder reported yet."""
    monkeypatch.setattr(image_io, "_NARROW_WARNED", set())


def _raw16(seed: int, lo: int = 7000, hi: int = 8020, shape=SIZE) -> np.ndarray:
    raw = np.random.default_rng(seed).integers(lo, hi + 1, shape).astype(np.uint16)
    raw.flat[0], raw.flat[1] = lo, hi            # the exact span
    return raw


def test_narrow_16bit_warns_once_per_folder_naming_the_file(tmp_path, fresh_warnings) -> None:
    first = _png(tmp_path / "raw" / "a.png", _raw16(0))
    second = _png(tmp_path / "raw" / "b.png", _raw16(1))
    other = _png(tmp_path / "other" / "c.png", _raw16(2))
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        x = read_image(first)
        read_image(second)
        read_image(other)
    narrow = [w for w in seen if issubclass(w.category, SixteenBitRangeWarning)]
    assert [str(w.message).split(":")[0] for w in narrow] == [str(first), str(other)]
    assert "7000-8020" in str(narrow[0].message) and "--stretch-16bit" in str(narrow[0].message)
    torch.testing.assert_close(x[0], torch.from_numpy(_raw16(0).astype(np.float32)) / 65535, rtol=0, atol=0)


def test_full_range_16bit_and_8bit_do_not_warn(tmp_path, fresh_warnings) -> None:
    wide = _png(tmp_path / "w.png", _raw16(0, 0, 65535))
    with warnings.catch_warnings():
        warnings.simplefilter("error", SixteenBitRangeWarning)
        read_image(wide)
        read_image(_png(tmp_path / "g.png", _grey()))
        assert torch.equal(read_image(tmp_path / "g.png", stretch16=True), read_image(tmp_path / "g.png"))


def test_stretch16_maps_min_max_to_0_1(tmp_path, fresh_warnings) -> None:
    raw = _raw16(3)
    path = _png(tmp_path / "r.png", raw)
    with warnings.catch_warnings():
        warnings.simplefilter("error", SixteenBitRangeWarning)
        x = read_image(path, stretch16=True)
    expected = ((raw.astype(np.float64) - 7000) / 1020).astype(np.float32)
    assert torch.equal(x[0], torch.from_numpy(expected)) and x.min() == 0 and x.max() == 1
    flat = _png(tmp_path / "flat.png", np.full(SIZE, 7000, np.uint16))
    assert torch.equal(read_image(flat, stretch16=True), torch.zeros(1, *SIZE))


def _sixteen_bit_pairs(root: Path) -> Path:
    for i, stem in enumerate(("a", "b")):
        _png(root / "ir" / f"{stem}.png", _raw16(i, shape=(24, 24)))
        _png(root / "vi" / f"{stem}.png", _grey((24, 24), 10 + i))
        _png(root / "fused" / "m" / f"{stem}.png", _grey((24, 24), 20 + i))
    return root


def test_fuse_stretch_16bit(tmp_path, capsys, fresh_warnings) -> None:
    root = _sixteen_bit_pairs(tmp_path)
    _checkpoint(root / "good.pt")
    with pytest.warns(SixteenBitRangeWarning, match="ir/a.png"):
        assert fuse.main(_fu(root, out="plain")) == 0
    with warnings.catch_warnings():
        warnings.simplefilter("error", SixteenBitRangeWarning)
        assert fuse.main(_fu(root, "--stretch-16bit", out="stretched")) == 0
    net = fuse.load_fusion_net(root / "good.pt")
    raw = _raw16(0, shape=(24, 24))
    ir = torch.from_numpy(((raw.astype(np.float64) - 7000) / 1020).astype(np.float32))[None]
    vis = read_image(root / "vi" / "a.png")
    expected = torch.round(fuse.fuse_pair(net, ir, vis).clamp(0, 1) * 255).to(torch.uint8)[0].numpy()
    assert np.array_equal(np.asarray(Image.open(root / "stretched" / "a.png")), expected)
    assert not np.array_equal(np.asarray(Image.open(root / "plain" / "a.png")), expected)


def test_evaluate_stretch_16bit(tmp_path, capsys, fresh_warnings) -> None:
    root = _sixteen_bit_pairs(tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("error", SixteenBitRangeWarning)
        assert evaluate.main(_ev(root, "--stretch-16bit", metrics="CC,MI")) == 0
    with open(root / "evout" / "per_image.csv", newline="") as fh:
        rows = {r["image"]: r for r in csv.DictReader(fh)}
    stretched = ((_raw16(0, shape=(24, 24)).astype(np.float64) - 7000) / 1020).astype(np.float32)
    a = torch.from_numpy(stretched).double()[None, None]
    b = read_image(root / "vi" / "a.png").double()[None]
    f = read_image(root / "fused" / "m" / "a.png").double()[None]
    for name in ("CC", "MI"):
        value = float(get_metric(name)(f, a, b, profile="reference")[0])
        assert math.isclose(float(rows["a"][name]), value, rel_tol=1e-12), name
