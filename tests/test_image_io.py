"""fusion.image_io: bit depths, modes, pairs, size policies, saving and every bad input (oracle: the bytes
written by Pillow/OpenCV here, and hand-computed values)."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from PIL import Image

from fusion.image_io import (
    ImagePairError,
    list_images,
    match_pairs,
    read_image,
    read_mask,
    read_pair,
    save_image,
)


def _grad(h: int = 6, w: int = 10) -> np.ndarray:
    return (np.arange(h * w).reshape(h, w) * 4 % 256).astype(np.uint8)


# ------------------------------------------------------------------------------------------------ reading
def test_read_8bit_grey_and_rgb(tmp_path: Path) -> None:
    grey = _grad()
    Image.fromarray(grey).save(tmp_path / "g.png")
    x = read_image(tmp_path / "g.png")
    assert x.shape == (1, 6, 10) and x.dtype == torch.float32
    torch.testing.assert_close(x[0], torch.from_numpy(grey).float() / 255)
    rgb = np.stack([grey, 255 - grey, grey // 2], axis=-1)
    for ext in ("png", "bmp", "tif"):
        Image.fromarray(rgb).save(tmp_path / f"c.{ext}")
        y = read_image(tmp_path / f"c.{ext}")
        assert y.shape == (3, 6, 10)
        torch.testing.assert_close(y, torch.from_numpy(rgb).permute(2, 0, 1).float() / 255)
    Image.fromarray(rgb).save(tmp_path / "c.JPG", quality=100)
    assert read_image(tmp_path / "c.JPG").shape == (3, 6, 10)


def test_read_16bit_grey_png_and_tiff(tmp_path: Path) -> None:
    values = np.array([[0, 1, 1000, 30000, 65535, 257]], dtype=np.uint16)
    for name in ("t.png", "t.tif"):
        Image.fromarray(values).save(tmp_path / name)
        x = read_image(tmp_path / name)
        assert x.shape == (1, 1, 6)
        torch.testing.assert_close(x[0], torch.from_numpy(values.astype(np.float32)) / 65535)
    # big-endian 16 bit TIFF (Pillow mode I;16B)
    Image.fromarray(values.astype(">u2")).save(tmp_path / "be.tif")
    torch.testing.assert_close(read_image(tmp_path / "be.tif")[0], torch.from_numpy(values.astype(np.float32)) / 65535)


def test_read_16bit_colour_png(tmp_path: Path) -> None:
    rgb = np.zeros((4, 5, 3), np.uint16)
    rgb[..., 0], rgb[..., 1], rgb[..., 2] = 65535, 1000, 7
    cv2.imwrite(str(tmp_path / "c16.png"), rgb[..., ::-1].copy())  # OpenCV writes BGR
    x = read_image(tmp_path / "c16.png")
    assert x.shape == (3, 4, 5)
    torch.testing.assert_close(x[:, 0, 0], torch.tensor([65535, 1000, 7], dtype=torch.float32) / 65535)


def test_read_palette_alpha_and_bilevel(tmp_path: Path) -> None:
    pal = Image.new("P", (4, 3))
    pal.putpalette([0, 0, 0, 255, 0, 0, 0, 0, 255] + [0] * 759)
    pal.putpixel((1, 1), 1)
    pal.putpixel((2, 2), 2)
    pal.save(tmp_path / "p.png")
    x = read_image(tmp_path / "p.png")
    assert x.shape == (3, 3, 4)
    assert x[:, 1, 1].tolist() == [1.0, 0.0, 0.0] and x[:, 2, 2].tolist() == [0.0, 0.0, 1.0]
    assert read_mask(tmp_path / "p.png").tolist()[1][1] == 1  # masks keep palette indices
    Image.new("LA", (4, 3), (100, 7)).save(tmp_path / "la.png")
    torch.testing.assert_close(read_image(tmp_path / "la.png"), torch.full((1, 3, 4), 100 / 255))
    Image.new("RGBA", (4, 3), (10, 20, 30, 40)).save(tmp_path / "rgba.png")
    assert read_image(tmp_path / "rgba.png").shape == (3, 3, 4)
    four = read_image(tmp_path / "rgba.png", keep_alpha=True)
    assert four.shape == (4, 3, 4) and four[3, 0, 0].item() == pytest.approx(40 / 255)
    Image.new("1", (4, 3), 1).save(tmp_path / "b.png")
    assert read_image(tmp_path / "b.png").min().item() == 1.0


def test_float_tiff_in_range_ok_out_of_range_error(tmp_path: Path) -> None:
    Image.fromarray(np.full((3, 4), 0.25, np.float32)).save(tmp_path / "f.tif")
    assert read_image(tmp_path / "f.tif").max().item() == 0.25
    Image.fromarray(np.full((3, 4), 300.0, np.float32)).save(tmp_path / "bad.tif")
    with pytest.raises(ImagePairError, match=r"bad\.tif.*\[0, 1\]"):
        read_image(tmp_path / "bad.tif")


def test_32bit_integer_beyond_16bit_is_rejected(tmp_path: Path) -> None:
    Image.fromarray(np.full((3, 4), 70000, np.int32)).save(tmp_path / "i32.tif")
    with pytest.raises(ImagePairError, match=r"unsupported bit depth in .*i32\.tif"):
        read_image(tmp_path / "i32.tif")


def test_corrupt_truncated_and_missing_files(tmp_path: Path) -> None:
    (tmp_path / "junk.png").write_bytes(b"this is not an image")
    with pytest.raises(ImagePairError, match=r"junk\.png"):
        read_image(tmp_path / "junk.png")
    Image.fromarray(_grad(64, 64)).save(tmp_path / "full.png")
    data = (tmp_path / "full.png").read_bytes()
    (tmp_path / "cut.png").write_bytes(data[: len(data) // 2])
    with pytest.raises(ImagePairError, match=r"cut\.png"):
        read_image(tmp_path / "cut.png")
    with pytest.raises(ImagePairError, match=r"nothere\.png"):
        read_image(tmp_path / "nothere.png")


# -------------------------------------------------------------------------------------------------- pairs
def _rgb(h: int, w: int, seed: int, same: bool = False) -> np.ndarray:
    rng = np.random.default_rng(seed)
    if same:
        return np.repeat(rng.integers(0, 256, (h, w, 1), dtype=np.uint8), 3, axis=2)
    return rng.integers(0, 256, (h, w, 3), dtype=np.uint8)


def test_read_pair_ir_channel_rules(tmp_path: Path) -> None:
    same, diff, vis = _rgb(5, 7, 0, same=True), _rgb(5, 7, 1), _rgb(5, 7, 2)
    Image.fromarray(same).save(tmp_path / "same.png")
    Image.fromarray(diff).save(tmp_path / "diff.png")
    Image.fromarray(vis).save(tmp_path / "vis.png")
    ir, v = read_pair(tmp_path / "same.png", tmp_path / "vis.png")
    assert ir.shape == (1, 5, 7) and v.shape == (3, 5, 7)
    assert torch.equal(ir[0], torch.from_numpy(same[..., 0]).float() / 255)  # exactly channel 0
    ir, _ = read_pair(tmp_path / "diff.png", tmp_path / "vis.png")
    d = torch.from_numpy(diff).float().permute(2, 0, 1) / 255
    torch.testing.assert_close(ir[0], 0.299 * d[0] + 0.587 * d[1] + 0.114 * d[2])
    _, g = read_pair(tmp_path / "same.png", tmp_path / "vis.png", vis_mode="grey")
    assert g.shape == (1, 5, 7)
    Image.fromarray(same[..., 0]).save(tmp_path / "grey.png")
    _, r = read_pair(tmp_path / "same.png", tmp_path / "grey.png", vis_mode="rgb")
    assert r.shape == (3, 5, 7) and torch.equal(r[0], r[2])
    with pytest.raises(ValueError, match="vis_mode"):
        read_pair(tmp_path / "same.png", tmp_path / "vis.png", vis_mode="lab")


def test_size_mismatch_policies(tmp_path: Path) -> None:
    Image.fromarray(_grad(6, 10)).save(tmp_path / "ir.png")
    Image.fromarray(_rgb(8, 14, 3)).save(tmp_path / "vis.png")
    with pytest.raises(ImagePairError) as info:
        read_pair(tmp_path / "ir.png", tmp_path / "vis.png")
    msg = str(info.value)
    assert "ir.png" in msg and "vis.png" in msg and "10x6" in msg and "14x8" in msg
    ir, vis = read_pair(tmp_path / "ir.png", tmp_path / "vis.png", size_policy="resize")
    assert ir.shape == (1, 6, 10) and vis.shape == (3, 6, 10)
    assert 0.0 <= vis.min() and vis.max() <= 1.0
    ir, vis = read_pair(tmp_path / "ir.png", tmp_path / "vis.png", size_policy="crop")
    assert ir.shape == (1, 6, 10) and vis.shape == (3, 6, 10)
    full = torch.from_numpy(_rgb(8, 14, 3)).permute(2, 0, 1).float() / 255
    torch.testing.assert_close(vis, full[:, 1:7, 2:12])  # centre crop: (8-6)//2, (14-10)//2
    with pytest.raises(ValueError, match="size_policy"):
        read_pair(tmp_path / "ir.png", tmp_path / "vis.png", size_policy="pad")


# ------------------------------------------------------------------------------------------------- saving
def test_save_8bit_rounding_clipping_and_modes(tmp_path: Path) -> None:
    x = torch.tensor([[[-0.2, 0.0, 0.1, 0.5, 1.0, 1.3]]])
    save_image(x, tmp_path / "a.png")
    stored = np.asarray(Image.open(tmp_path / "a.png"))
    assert stored.tolist() == [[0, 0, 26, 128, 255, 255]]  # round(0.1*255)=26, round(127.5)=128
    rgb = torch.rand(3, 5, 6)
    save_image(rgb, tmp_path / "rgb.bmp")
    back = read_image(tmp_path / "rgb.bmp")
    assert back.shape == (3, 5, 6) and (back - rgb).abs().max() <= 0.5 / 255 + 1e-6
    smooth = torch.linspace(0.1, 0.9, 32).expand(3, 16, 32) * torch.tensor([1.0, 0.8, 0.5])[:, None, None]
    save_image(smooth, tmp_path / "rgb.jpg")
    assert (read_image(tmp_path / "rgb.jpg") - smooth).abs().mean() < 0.02  # lossy, but close
    assert not list(tmp_path.glob(".*tmp*"))  # atomic write leaves no temporary file


def test_save_16bit_round_trip(tmp_path: Path) -> None:
    grey = torch.tensor([[[0, 1, 300, 65535]]], dtype=torch.float32) / 65535
    save_image(grey, tmp_path / "g.png", bits=16)
    assert np.asarray(Image.open(tmp_path / "g.png")).tolist() == [[0, 1, 300, 65535]]
    torch.testing.assert_close(read_image(tmp_path / "g.png"), grey)
    rgb = torch.randint(0, 65536, (3, 4, 5)).float() / 65535
    save_image(rgb, tmp_path / "c.tif", bits=16)
    torch.testing.assert_close(read_image(tmp_path / "c.tif"), rgb)
    save_image(rgb, tmp_path / "c.png", bits=16)
    torch.testing.assert_close(read_image(tmp_path / "c.png"), rgb)
    with pytest.raises(ValueError, match="16-bit"):
        save_image(grey, tmp_path / "g.jpg", bits=16)


def test_save_refuses_overwrite_and_bad_input(tmp_path: Path) -> None:
    path = tmp_path / "x.png"
    save_image(torch.zeros(1, 2, 2), path)
    with pytest.raises(FileExistsError, match="x.png"):
        save_image(torch.ones(1, 2, 2), path)
    assert read_image(path).max() == 0
    save_image(torch.ones(1, 2, 2), path, overwrite=True)
    assert read_image(path).min() == 1
    with pytest.raises(ValueError, match="NaN"):
        save_image(torch.full((1, 2, 2), float("nan")), tmp_path / "n.png")
    with pytest.raises(ValueError, match="shape|tensor"):
        save_image(torch.zeros(2, 2, 2), tmp_path / "s.png")
    with pytest.raises(ValueError, match="extension"):
        save_image(torch.zeros(1, 2, 2), tmp_path / "s.gif")


# ------------------------------------------------------------------------------------------------ folders
def test_list_images_sorted_case_insensitive(tmp_path: Path) -> None:
    for name in ("b.JPG", "a.png", "c.TiF", "notes.txt", ".hidden.png"):
        (tmp_path / name).write_bytes(b"x")
    assert [p.name for p in list_images(tmp_path)] == ["a.png", "b.JPG", "c.TiF"]
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ImagePairError, match="empty folder.*empty"):
        list_images(empty)
    with pytest.raises(ImagePairError, match="missing_dir"):
        list_images(tmp_path / "missing_dir")


def test_match_pairs(tmp_path: Path) -> None:
    (tmp_path / "ir").mkdir()
    (tmp_path / "vi").mkdir()
    for name in ("ir/a.png", "ir/b.png", "vi/a.jpg", "vi/b.PNG", "ir/c.png", "vi/d.png"):
        (tmp_path / name).write_bytes(b"x")
    with pytest.raises(ImagePairError) as info:
        match_pairs(tmp_path / "ir", tmp_path / "vi")
    assert "c.png" in str(info.value) and str(tmp_path / "vi") in str(info.value)
    pairs, unmatched = match_pairs(tmp_path / "ir", tmp_path / "vi", strict=False)
    assert [(s, i.name, v.name) for s, i, v in pairs] == [("a", "a.png", "a.jpg"), ("b", "b.png", "b.PNG")]
    assert sorted(p.name for p in unmatched) == ["c.png", "d.png"]
    (tmp_path / "ir" / "c.png").unlink()
    with pytest.raises(ImagePairError, match=r"d\.png.*" + str(tmp_path / "ir").replace("\\", "\\\\")):
        match_pairs(tmp_path / "ir", tmp_path / "vi")
