"""fusion.data: every layout on a tiny fixture written here, transforms, sampler, collate, shared data.

Oracles: the pixel values, masks and boxes written by the fixtures themselves; boxes after crop/flip are
checked against the bounding box of a mask rectangle carried through the same transform.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from bilevel.registry import UnknownNameError
from fusion.data import (
    M3FD_CLASSES,
    MSRS_CLASSES,
    FusionDataset,
    RandomCropFlip,
    Resize,
    StepSampler,
    collate_pairs,
    create_dataset,
    list_datasets,
    make_loader,
    pad_collate,
    register_dataset,
    unpad,
)
from fusion.data import registry as data_registry
from fusion.image_io import ImagePairError

H, W = 12, 16


def _img(path: Path, seed: int, channels: int = 3, size: tuple[int, int] = (H, W)) -> np.ndarray:
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    array = rng.integers(0, 256, (*size, channels) if channels > 1 else size, dtype=np.uint8)
    Image.fromarray(array).save(path)
    return array


def _mask(path: Path, values: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(values.astype(np.uint8)).save(path)


def _voc(path: Path, objects: list[tuple[str, tuple[float, float, float, float]]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    body = "".join(
        f"<object><name>{n}</name><difficult>0</difficult><bndbox><xmin>{b[0]}</xmin><ymin>{b[1]}</ymin>"
        f"<xmax>{b[2]}</xmax><ymax>{b[3]}</ymax></bndbox></object>" for n, b in objects)
    path.write_text(f"<annotation><size><width>{W}</width><height>{H}</height></size>{body}</annotation>")


def _pairs(root: Path, ir: str, vis: str, stems: list[str], ext: str = "png") -> None:
    for i, stem in enumerate(stems):
        _img(root / ir / f"{stem}.{ext}", i, channels=1)
        _img(root / vis / f"{stem}.{ext}", 100 + i)


# ------------------------------------------------------------------------------------------------ registry
def test_registry_lists_all_and_rejects_unknown() -> None:
    names = list_datasets()
    for name in ("folder", "msrs_person8", "pairs_ab", "mef", "mff", "roadscene", "tno", "vifb", "msrs", "mfnet",
                 "fmb", "m3fd", "llvip", "synthetic"):
        assert name in names
    with pytest.raises(ValueError, match="valid names.*folder"):
        create_dataset("nosuch", "x")
    with pytest.raises(UnknownNameError, match="unknown dataset 'nosuch'"):
        create_dataset("nosuch", "x")
    with pytest.raises(ValueError, match="needs a root"):
        create_dataset("roadscene")


def test_registry_user_dataset_and_duplicate_names(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(data_registry, "_REGISTRY", dict(data_registry._REGISTRY))  # leave the real one alone

    @register_dataset("user_points")
    class Points(FusionDataset):
        def __init__(self, root, split, *, n: int = 2) -> None:
            super().__init__()
            self.n = n

        def __len__(self) -> int:
            return self.n

        def load(self, index: int) -> dict:
            return {"name": str(index), "ir": torch.full((1, 2, 2), float(index)), "vis": torch.zeros(3, 2, 2)}

    assert "user_points" in list_datasets()
    ds = create_dataset("user_points", None, n=3)
    assert isinstance(ds, Points) and len(ds) == 3 and ds[2]["ir"].max().item() == 2.0
    for name in ("synthetic", "user_points"):
        with pytest.raises(ValueError, match=f"{name!r} is already registered"):
            register_dataset(name)(Points)
    assert data_registry._REGISTRY["user_points"] is Points


# -------------------------------------------------------------------------------------------- folder pairs
def test_folder_with_mask_value_map(tmp_path: Path) -> None:
    _pairs(tmp_path, "ir", "vi", ["a", "b"])
    m = np.zeros((H, W))
    m[2:5, 3:9] = 255
    _mask(tmp_path / "mask" / "a.png", m)
    _mask(tmp_path / "mask" / "b.png", np.zeros((H, W)))
    ds = create_dataset("msrs_person8", tmp_path)
    assert len(ds) == 2 and ds.has_masks and not ds.has_boxes
    assert ds.class_names == MSRS_CLASSES and ds.det_class_names is None and ds.ignore_index == 255
    s = ds[0]
    assert s["name"] == "a" and s["ir"].shape == (1, H, W) and s["vis"].shape == (3, H, W)
    assert s["ir"].dtype == torch.float32 and s["mask"].dtype == torch.int64
    assert sorted(torch.unique(s["mask"]).tolist()) == [0, 2]
    assert (s["mask"] == 2).sum().item() == 18
    expected = np.asarray(Image.open(tmp_path / "ir" / "a.png"), dtype=np.float32) / 255
    torch.testing.assert_close(s["ir"][0], torch.from_numpy(expected))
    # 255 is the ignore index; a mapped value outside the class list is an error naming the file
    assert sorted(create_dataset("folder", tmp_path, mask_dir="mask", class_names=MSRS_CLASSES)[0]["mask"]
                  .unique().tolist()) == [0, 255]
    plain = create_dataset("folder", tmp_path, mask_dir="mask", class_names=("bg",), mask_values={255: 1})
    with pytest.raises(ImagePairError, match=r"mask/a\.png"):
        plain[0]


def test_folder_missing_label_and_partner_errors(tmp_path: Path) -> None:
    _pairs(tmp_path, "ir", "vi", ["a", "b"])
    _mask(tmp_path / "mask" / "a.png", np.zeros((H, W)))
    with pytest.raises(ImagePairError, match=r"missing label for .*b\.png.*mask"):
        create_dataset("msrs_person8", tmp_path)
    _img(tmp_path / "ir" / "c.png", 9, channels=1)
    with pytest.raises(ImagePairError, match=r"c\.png.*vi"):
        create_dataset("folder", tmp_path)
    with pytest.raises(ImagePairError, match="looked for"):
        create_dataset("folder", tmp_path / "nothing")
    with pytest.raises(ValueError, match="labels=True"):
        create_dataset("folder", tmp_path, labels=True)
    with pytest.raises(ImagePairError, match="segmaps.*labels=False"):
        create_dataset("folder", tmp_path, mask_dir="segmaps", labels=True)


def test_folder_split_subfolders_and_size_mismatch(tmp_path: Path) -> None:
    _pairs(tmp_path / "train", "ir", "vi", ["a"])
    _pairs(tmp_path / "test", "ir", "vi", ["b", "c"])
    assert len(create_dataset("folder", tmp_path, "train")) == 1
    assert len(create_dataset("folder", tmp_path, "test")) == 2
    _img(tmp_path / "odd" / "ir" / "x.png", 0, channels=1)
    _img(tmp_path / "odd" / "vi" / "x.png", 1, size=(H + 4, W + 2))
    ds = create_dataset("folder", tmp_path / "odd")
    with pytest.raises(ImagePairError, match=r"ir/x\.png.*vi/x\.png"):
        ds[0]
    assert create_dataset("folder", tmp_path / "odd", size_policy="resize")[0]["vis"].shape == (3, H, W)


@pytest.mark.parametrize("name,ir,vis", [
    ("roadscene", "cropinfrared", "crop_LR_visible"), ("roadscene", "ir", "vi"), ("tno", "ir", "vi"),
    ("vifb", "input/IR", "input/VI"), ("vifb", "ir", "vi"),
])
def test_unlabelled_layouts(tmp_path: Path, name: str, ir: str, vis: str) -> None:
    _pairs(tmp_path, ir, vis, ["x1", "x2", "x3"], ext="jpg")
    ds = create_dataset(name, tmp_path)
    assert len(ds) == 3 and not ds.has_masks and not ds.has_boxes and ds.class_names is None
    s = ds[2]
    assert s["name"] == "x3" and s["ir"].shape == (1, H, W) and s["vis"].shape == (3, H, W)
    assert set(s) == {"name", "ir", "vis"}


# --------------------------------------------------------------------------------------------- MSRS / FMB
def test_msrs_both_layouts(tmp_path: Path) -> None:
    a = tmp_path / "a"
    for split, stems in (("train", ["00001D", "00002N"]), ("test", ["00003D"])):
        _pairs(a / split, "ir", "vi", stems)
        for stem in stems:
            _mask(a / split / "Segmentation_labels" / f"{stem}.png", np.arange(H * W).reshape(H, W) % 9)
    ds = create_dataset("msrs", a, "train")
    assert len(ds) == 2 and ds.has_masks and ds.class_names == MSRS_CLASSES
    assert torch.equal(ds[1]["mask"], torch.from_numpy(np.arange(H * W).reshape(H, W) % 9))
    assert len(create_dataset("msrs", a, "test")) == 1

    b = tmp_path / "b"
    _pairs(b, "Infrared", "Visible", ["00001D", "00002N", "00003D"])
    for stem in ("00001D", "00002N", "00003D"):
        _mask(b / "Label" / f"{stem}.png", np.full((H, W), 4))
    (b / "split").mkdir()
    (b / "split" / "train.txt").write_text("00003D\n00001D.png\n")
    ds = create_dataset("msrs", b, "train")
    assert [r.name for r in ds.records] == ["00003D", "00001D"]
    assert ds[0]["mask"].unique().tolist() == [4]
    with pytest.raises(ImagePairError, match=r"split/test\.txt"):
        create_dataset("msrs", b, "test")
    assert len(create_dataset("msrs", b, "all")) == 3


def test_fmb_configurable_classes(tmp_path: Path) -> None:
    _pairs(tmp_path / "train", "Infrared", "Visible", ["f1"])
    _mask(tmp_path / "train" / "Label" / "f1.png", np.full((H, W), 14))
    ds = create_dataset("fmb", tmp_path, "train")
    assert len(ds.class_names) == 15 and ds[0]["mask"].max().item() == 14
    small = create_dataset("fmb", tmp_path, "train", class_names=["a", "b", "c"])
    with pytest.raises(ImagePairError, match=r"f1\.png.*outside 0\.\.2"):
        small[0]


# ------------------------------------------------------------------------------------------------- MFNet
def test_mfnet_rgbt(tmp_path: Path) -> None:
    rgbt = np.random.default_rng(0).integers(0, 256, (H, W, 4), dtype=np.uint8)
    (tmp_path / "images").mkdir()
    for stem in ("00001D", "00002N"):
        Image.fromarray(rgbt, mode="RGBA").save(tmp_path / "images" / f"{stem}.png")
        _mask(tmp_path / "labels" / f"{stem}.png", np.full((H, W), 8))
    (tmp_path / "train.txt").write_text("00002N\n")
    ds = create_dataset("mfnet", tmp_path, "train")
    assert len(ds) == 1 and ds.class_names == MSRS_CLASSES
    s = ds[0]
    assert s["name"] == "00002N" and s["ir"].shape == (1, H, W) and s["vis"].shape == (3, H, W)
    torch.testing.assert_close(s["ir"][0], torch.from_numpy(rgbt[..., 3]).float() / 255)
    torch.testing.assert_close(s["vis"], torch.from_numpy(rgbt[..., :3]).permute(2, 0, 1).float() / 255)
    assert s["mask"].unique().tolist() == [8]
    with pytest.raises(ImagePairError, match=r"val\.txt"):
        create_dataset("mfnet", tmp_path, "val")


# ------------------------------------------------------------------------------------------- M3FD / LLVIP
def test_m3fd_voc_boxes(tmp_path: Path) -> None:
    _pairs(tmp_path, "Ir", "Vis", ["000001", "000002"])
    _voc(tmp_path / "Annotation" / "000001.xml", [("People", (1, 2, 5, 10)), ("Truck", (8, 1, 20, 6))])
    _voc(tmp_path / "Annotation" / "000002.xml", [])
    with pytest.raises(ImagePairError, match=r"train\.txt.*split='all'"):
        create_dataset("m3fd", tmp_path, "train")
    ds = create_dataset("m3fd", tmp_path, "all")
    assert ds.has_boxes and not ds.has_masks and ds.det_class_names == M3FD_CLASSES
    s = ds[0]
    assert s["boxes"].dtype == torch.float32 and s["labels"].dtype == torch.int64
    assert s["boxes"].tolist() == [[1, 2, 5, 10], [8, 1, 16, 6]]  # the truck is clipped to the 16 px width
    assert s["labels"].tolist() == [0, 5]
    assert ds[1]["boxes"].shape == (0, 4) and ds[1]["labels"].shape == (0,)
    (tmp_path / "test.txt").write_text("000002\n")
    assert [r.name for r in create_dataset("m3fd", tmp_path, "test").records] == ["000002"]
    _voc(tmp_path / "Annotation" / "000002.xml", [("Dragon", (1, 1, 3, 3))])
    with pytest.raises(ImagePairError, match=r"Dragon.*000002\.xml"):
        create_dataset("m3fd", tmp_path, "test")[0]
    assert len(create_dataset("m3fd", tmp_path, "test", ignore_unknown=True)[0]["labels"]) == 0
    (tmp_path / "Annotation" / "000002.xml").unlink()
    with pytest.raises(ImagePairError, match=r"missing annotation for .*000002"):
        create_dataset("m3fd", tmp_path, "all")


def test_llvip(tmp_path: Path) -> None:
    for split in ("train", "test"):
        _pairs(tmp_path, f"infrared/{split}", f"visible/{split}", [f"{split}01"], ext="jpg")
        _voc(tmp_path / "Annotations" / f"{split}01.xml", [("person", (2, 3, 6, 11))])
    ds = create_dataset("llvip", tmp_path, "test")
    assert len(ds) == 1 and ds.det_class_names == ("person",)
    s = ds[0]
    assert s["name"] == "test01" and s["labels"].tolist() == [0] and s["boxes"].tolist() == [[2, 3, 6, 11]]


# ------------------------------------------------------------------------------------------------ MEF/MFF
def test_pairs_ab_scene_folders_mixed_case_and_modes(tmp_path: Path) -> None:
    _img(tmp_path / "s1" / "s1_A.JPG", 0)
    _img(tmp_path / "s1" / "S1_B.jpg", 1)  # MEFB has such case differences (Farmhouse_A / FarmHouse_B)
    _img(tmp_path / "s2" / "s2_A.png", 2, channels=1)
    _img(tmp_path / "s2" / "s2_B.png", 3, channels=1)
    assert create_dataset("mef", tmp_path)[1]["ir"].shape == (3, H, W)      # default: RGB, so batches stack
    ds = create_dataset("mef", tmp_path, a_mode="keep", vis_mode="keep")
    assert len(ds) == 2 and [r.name for r in ds.records] == ["s1", "s2"]
    assert ds[0]["ir"].shape == (3, H, W) and ds[1]["ir"].shape == (1, H, W)  # stored modes kept
    grey = create_dataset("mff", tmp_path, a_mode="grey", vis_mode="grey")
    assert grey[0]["ir"].shape == (1, H, W) and grey[0]["vis"].shape == (1, H, W)
    rgb = create_dataset("mff", tmp_path, a_mode="rgb", vis_mode="rgb")
    batch = collate_pairs([rgb[0], rgb[1]])
    assert batch["ir"].shape == (2, 3, H, W)
    with pytest.raises(ValueError, match="vis_mode='rgb'"):
        collate_pairs([ds[0], ds[1]])
    (tmp_path / "s2" / "s2_B.png").unlink()
    with pytest.raises(ImagePairError, match=r"s2_A\.png.*_B"):
        create_dataset("mff", tmp_path)


def test_pairs_ab_folders(tmp_path: Path) -> None:
    _img(tmp_path / "A" / "p.png", 0)
    _img(tmp_path / "B" / "p.bmp", 1)
    ds = create_dataset("pairs_ab", tmp_path)
    assert len(ds) == 1 and ds[0]["name"] == "p"
    with pytest.raises(ImagePairError, match="no pairs"):
        create_dataset("pairs_ab", tmp_path / "A")


# ---------------------------------------------------------------------------------------------- transforms
def _boxed_sample(h: int = 20, w: int = 30) -> dict:
    """A sample whose mask marks each box with its own class value: boxes can be checked against the mask."""
    boxes = torch.tensor([[2.0, 3.0, 10.0, 9.0], [15.0, 10.0, 27.0, 18.0]])
    mask = torch.zeros(h, w, dtype=torch.int64)
    for k, (x0, y0, x1, y1) in enumerate(boxes.long().tolist(), start=1):
        mask[y0:y1, x0:x1] = k
    ir = torch.rand(1, h, w)
    return {"name": "s", "ir": ir, "vis": ir.expand(3, -1, -1).clone(), "mask": mask, "boxes": boxes,
            "labels": torch.tensor([1, 2])}


def _mask_boxes(mask: torch.Tensor, labels: list[int]) -> list[list[float]]:
    out = []
    for k in labels:
        ys, xs = torch.nonzero(mask == k, as_tuple=True)
        out.append([xs.min().item(), ys.min().item(), xs.max().item() + 1, ys.max().item() + 1])
    return out


@pytest.mark.parametrize("seed", range(8))
def test_crop_flip_moves_boxes_with_pixels(seed: int) -> None:
    t = RandomCropFlip((16, 28), hflip=True, vflip=True, min_visibility=0.0)
    out = t(_boxed_sample(), torch.Generator().manual_seed(seed))
    assert out["ir"].shape == (1, 16, 28) and out["mask"].shape == (16, 28)
    assert torch.equal(out["vis"][0], out["ir"][0])  # both sources got the same crop/flip
    assert out["boxes"].tolist() == _mask_boxes(out["mask"], out["labels"].tolist())


def test_crop_flip_is_deterministic_and_drops_hidden_boxes() -> None:
    t = RandomCropFlip(8, hflip=True)
    a = t(_boxed_sample(), torch.Generator().manual_seed(3))
    b = t(_boxed_sample(), torch.Generator().manual_seed(3))
    assert torch.equal(a["mask"], b["mask"]) and torch.equal(a["boxes"], b["boxes"])
    crops = {tuple(t(_boxed_sample(), torch.Generator().manual_seed(s))["ir"].flatten()[:5].tolist())
             for s in range(6)}
    assert len(crops) > 1
    # a crop that keeps < half of box 1 drops it together with its label
    for s in range(50):
        out = RandomCropFlip((20, 8), hflip=False)(_boxed_sample(), torch.Generator().manual_seed(s))
        visible = {k: (out["mask"] == k).sum().item() for k in (1, 2)}
        for k, full in ((1, 48), (2, 96)):
            assert (k in out["labels"].tolist()) == (visible[k] >= 0.5 * full)
        assert len(out["boxes"]) == len(out["labels"])


def _small_sample(h: int = 191, w: int = 416) -> dict:
    """A RoadScene-sized pair (416x191, shorter than a 192 crop) with two boxes marked in the mask."""
    boxes = torch.tensor([[20.0, 30.0, 120.0, 150.0], [300.0, 100.0, 400.0, 180.0]])
    mask = torch.zeros(h, w, dtype=torch.int64)
    for k, (x0, y0, x1, y1) in enumerate(boxes.long().tolist(), start=1):
        mask[y0:y1, x0:x1] = k
    ir = torch.rand(1, h, w, generator=torch.Generator().manual_seed(0))
    return {"name": "FLIR_small", "ir": ir, "vis": torch.cat([ir, 1 - ir, ir / 2]), "mask": mask,
            "boxes": boxes, "labels": torch.tensor([1, 2])}


def test_crop_larger_than_image_upscales_consistently_and_warns_once() -> None:
    t = RandomCropFlip(192, hflip=True)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        outs = [t(_small_sample(), torch.Generator().manual_seed(s)) for s in range(6)]
    assert [str(w.message) for w in caught if "upscaling" in str(w.message)] == [str(caught[0].message)]
    assert "FLIR_small" in str(caught[0].message) and "418x192" in str(caught[0].message)
    # the rule: scale by crop / short side (192 / 191), aspect kept: 416 -> round(418.18) = 418; then crop
    reference = RandomCropFlip(192, hflip=True)
    for s, out in enumerate(outs):
        assert out["ir"].shape == (1, 192, 192) and out["vis"].shape == (3, 192, 192)
        assert out["mask"].shape == (192, 192) and out["mask"].dtype == torch.int64
        assert set(out["mask"].unique().tolist()) <= {0, 1, 2}  # nearest-neighbour: no blended labels
        expected = reference(Resize((192, 418))(_small_sample()), torch.Generator().manual_seed(s))
        for key in ("ir", "vis", "mask", "boxes", "labels"):
            assert torch.equal(out[key], expected[key]), (s, key)
        # boxes still frame their mask pixels (to within the one-pixel rounding of the nearest upscale)
        from_mask = torch.tensor(_mask_boxes(out["mask"], out["labels"].tolist()), dtype=torch.float32)
        torch.testing.assert_close(out["boxes"], from_mask.reshape(-1, 4), atol=1.0, rtol=0.0)
    assert any(len(out["labels"]) for out in outs)
    with warnings.catch_warnings(record=True) as caught:  # big enough: no upscale, no warning
        warnings.simplefilter("always")
        RandomCropFlip(8)(_boxed_sample(), torch.Generator().manual_seed(0))
    assert not caught


def test_crop_upscale_covers_non_square_crops() -> None:
    with pytest.warns(UserWarning, match="smaller than the crop 40x40"):
        assert RandomCropFlip(40)(_boxed_sample())["ir"].shape == (1, 40, 40)  # 30x20 -> 60x40
    with pytest.warns(UserWarning, match="to 50x33 before"):
        out = RandomCropFlip((10, 50), hflip=False)(_boxed_sample(), torch.Generator().manual_seed(1))
    assert out["ir"].shape == (1, 10, 50) and out["mask"].shape == (10, 50)  # 30x20 -> 50x33 (width binds)


def test_resize_scales_boxes_and_mask() -> None:
    out = Resize((10, 15))(_boxed_sample())
    assert out["ir"].shape == (1, 10, 15) and out["mask"].shape == (10, 15)
    torch.testing.assert_close(out["boxes"], torch.tensor([[1.0, 1.5, 5.0, 4.5], [7.5, 5.0, 13.5, 9.0]]))


def test_getitem_with_aug_seed(tmp_path: Path) -> None:
    _pairs(tmp_path, "ir", "vi", ["a", "b"])
    ds = create_dataset("folder", tmp_path, transform=RandomCropFlip(8))
    assert torch.equal(ds[(1, 5)]["ir"], ds[(1, 5)]["ir"])
    assert ds[(1, 5)]["ir"].shape == (1, 8, 8)
    assert len({tuple(ds[(1, s)]["ir"].flatten().tolist()) for s in range(5)}) > 1


# ------------------------------------------------------------------------------------ sampler and loader
def test_step_sampler_determinism_resume_and_epochs() -> None:
    full = list(StepSampler(10, 3, seed=7, num_steps=12))
    assert full == list(StepSampler(10, 3, seed=7, num_steps=12))
    assert list(StepSampler(10, 3, seed=7, start_step=5, num_steps=12)) == full[5:]
    assert len(StepSampler(10, 3, seed=7, start_step=5, num_steps=12)) == 7
    assert full != list(StepSampler(10, 3, seed=8, num_steps=12))
    stream = [i for batch in full for i, _ in batch]
    for epoch in range(3):  # each epoch is a permutation of range(10)
        assert sorted(stream[epoch * 10:(epoch + 1) * 10]) == list(range(10))
    assert [i for b in StepSampler(4, 2, shuffle=False, num_steps=3) for i, _ in b] == [0, 1, 2, 3, 0, 1]
    endless = iter(StepSampler(5, 2, seed=1))
    assert [next(endless) for _ in range(4)] == list(StepSampler(5, 2, seed=1, num_steps=4))
    assert StepSampler(10, 3, seed=7).batch(11) == full[11]
    with pytest.raises(TypeError):
        len(StepSampler(5, 2))


def test_make_loader_batches_and_resume(tmp_path: Path) -> None:
    _pairs(tmp_path, "ir", "vi", [f"p{i}" for i in range(5)])
    ds = create_dataset("folder", tmp_path)
    batches = list(make_loader(ds, batch_size=2, seed=3, crop=8, num_steps=4))
    assert batches[0]["ir"].shape == (2, 1, 8, 8) and batches[0]["vis"].shape == (2, 3, 8, 8)
    resumed = list(make_loader(ds, batch_size=2, seed=3, crop=8, start_step=2, num_steps=4))
    for a, b in zip(batches[2:], resumed, strict=True):
        assert a["name"] == b["name"] and torch.equal(a["ir"], b["ir"])
    worker = list(make_loader(ds, batch_size=2, seed=3, crop=8, num_steps=2, num_workers=1))
    assert torch.equal(worker[1]["vis"], batches[1]["vis"])
    assert ds.transform is None  # make_loader does not mutate the dataset


def test_collate_boxes_and_size_errors() -> None:
    a, b = _boxed_sample(), _boxed_sample()
    b["boxes"], b["labels"] = b["boxes"][:1], b["labels"][:1]
    batch = collate_pairs([a, b])
    assert batch["name"] == ["s", "s"] and batch["mask"].shape == (2, 20, 30)
    assert isinstance(batch["boxes"], list) and [len(x) for x in batch["boxes"]] == [2, 1]
    with pytest.raises(ValueError, match="crop"):
        collate_pairs([a, _boxed_sample(20, 31)])


def test_pad_collate_mixed_sizes_and_unpad() -> None:
    samples = [_boxed_sample(20, 30), _boxed_sample(18, 31), _boxed_sample(20, 30)]
    samples[1]["vis"] = torch.rand(3, 18, 31)
    batch = pad_collate(samples)
    assert batch["name"] == ["s", "s", "s"] and batch["size"] == [(20, 30), (18, 31), (20, 30)]
    assert batch["ir"].shape == (3, 1, 20, 31) and batch["vis"].shape == (3, 3, 20, 31)
    assert batch["mask"].shape == (3, 20, 31) and batch["mask"].dtype == torch.int64
    for i, s in enumerate(samples):  # replicate padding at the bottom/right: numpy's "edge" mode as oracle
        h, w = batch["size"][i]
        for key in ("ir", "vis"):
            edge = np.pad(s[key].numpy(), ((0, 0), (0, 20 - h), (0, 31 - w)), mode="edge")
            assert torch.equal(batch[key][i], torch.from_numpy(edge))
        assert torch.equal(batch["mask"][i, :h, :w], s["mask"])
        assert (batch["mask"][i, h:] == 255).all() and (batch["mask"][i, :, w:] == 255).all()
        assert torch.equal(batch["boxes"][i], s["boxes"])
    for key in ("ir", "vis", "mask"):
        assert all(torch.equal(x, s[key]) for x, s in zip(unpad(batch[key], batch["size"]), samples, strict=True))
    same = pad_collate(samples[:1] * 2)
    plain = collate_pairs(samples[:1] * 2)
    assert same["size"] == [(20, 30)] * 2 and all(torch.equal(same[k], plain[k]) for k in ("ir", "vis", "mask"))
    grey = dict(samples[1], vis=samples[1]["vis"][:1])
    with pytest.raises(ValueError, match="vis_mode"):
        pad_collate([samples[0], grey])
    with pytest.raises(ValueError, match="2 sizes"):
        unpad(batch["ir"], batch["size"][:2])


# -------------------------------------------------------------------------------------------- shared data
def test_shared_vifb(shared_data) -> None:
    ds = create_dataset("vifb", shared_data("vifb"))
    assert len(ds) == 21
    for i in range(len(ds)):
        s = ds[i]
        assert s["ir"].shape[0] == 1 and s["vis"].shape[0] in (1, 3)
        assert s["ir"].shape[-2:] == s["vis"].shape[-2:]


def test_shared_roadscene(shared_data) -> None:
    ds = create_dataset("roadscene", shared_data("roadscene"))
    assert len(ds) == 221
    for i in (0, 220):
        s = ds[i]
        assert s["ir"].shape[0] == 1 and s["vis"].shape[0] == 3 and s["ir"].shape[-2:] == s["vis"].shape[-2:]


def test_shared_roadscene_small_images_train_at_crop_192(shared_data, tmp_path: Path) -> None:
    """RoadScene has pairs shorter than 192 px (416x191, 597x161, ...): crop-192 training must not crash."""
    root = shared_data("roadscene")
    ds = create_dataset("roadscene", root)
    smallest = sorted(ds.records, key=lambda r: min(Image.open(r.ir).size))[:6]
    assert min(Image.open(smallest[0].ir).size) < 192  # the case under test is really there
    (tmp_path / "small.txt").write_text("".join(f"{r.name}\n" for r in smallest))
    small = create_dataset("roadscene", root, "small", split_file=str(tmp_path / "small.txt"))
    assert [r.name for r in small.records] == [r.name for r in smallest]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        batches = list(make_loader(small, batch_size=2, seed=0, crop=192, num_steps=6))
    assert len([w for w in caught if "upscaling" in str(w.message)]) == 1
    seen = set()
    for batch in batches:
        assert batch["ir"].shape == (2, 1, 192, 192) and batch["vis"].shape == (2, 3, 192, 192)
        seen.update(batch["name"])
    assert seen == {r.name for r in smallest}


def test_shared_msrs_person8(shared_data) -> None:
    ds = create_dataset("msrs_person8", shared_data("msrs_person8"))
    assert len(ds) == 8
    values = set()
    for i in range(len(ds)):
        s = ds[i]
        assert s["ir"].shape == (1, 480, 640) and s["vis"].shape == (3, 480, 640) and s["mask"].shape == (480, 640)
        values |= set(torch.unique(s["mask"]).tolist())
    assert values == {0, 2}


@pytest.mark.parametrize("name,count", [("mef", 100), ("mff", 105)])
def test_shared_mef_mff(shared_data, name: str, count: int) -> None:
    ds = create_dataset(name, shared_data(name))
    assert len(ds) == count
    assert all(r.ir.stem.lower().endswith("_a") and r.vis.stem.lower().endswith("_b") for r in ds.records)
    s = ds[0]
    assert s["ir"].shape[-2:] == s["vis"].shape[-2:]


# ----------------------------------------------------------------------------------------- decoded once
def test_in_memory_serves_exactly_the_samples_and_crops_of_the_files(tmp_path: Path) -> None:
    from fusion.data import InMemory, SyntheticScenes

    _pairs(tmp_path, "ir", "vi", ["a", "b", "c"])
    _mask(tmp_path / "labels" / "a.png", np.full((H, W), 3))
    disk = create_dataset("folder", tmp_path, "all")
    cached = InMemory(disk)
    assert len(cached) == 3 and cached.nbytes == 0                        # nothing decoded up front
    for i in range(3):
        for key in ("ir", "vis"):
            assert torch.equal(cached[i][key], disk[i][key]) and cached[i][key].dtype == torch.float32
    assert cached.nbytes == 3 * H * W * (1 + 3)                           # 8-bit files kept as uint8
    crop = RandomCropFlip(8)
    a = list(make_loader(disk, 2, seed=5, crop=crop.crop, num_steps=3))
    b = list(make_loader(cached, 2, seed=5, crop=crop.crop, num_steps=3))
    assert all(torch.equal(x[k], y[k]) for x, y in zip(a, b) for k in ("ir", "vis"))
    first = cached[0]["ir"].clone()
    (tmp_path / "ir" / "a.png").unlink()
    assert torch.equal(cached[0]["ir"], first)                            # from memory: the file is not read again
    with pytest.raises(ImagePairError):
        disk[0]

    scenes = SyntheticScenes(split="train", size=24, length=4)          # rendered, not 8-bit: kept as float32
    bank = InMemory(scenes)
    assert all(torch.equal(bank[i][k], scenes[i][k]) for i in range(4) for k in ("ir", "vis", "mask"))
    assert bank[0]["mask"].dtype == torch.int64 and bank.has_masks and bank.class_names == scenes.class_names


def test_cache_filler_loads_ahead_in_worker_processes_what_the_loader_would(tmp_path: Path, caplog) -> None:
    from fusion.data import CacheFiller, InMemory, SyntheticScenes

    _pairs(tmp_path, "ir", "vi", ["a", "b", "c", "d"])
    disk = create_dataset("folder", tmp_path, "all")
    files, bank = InMemory(disk), InMemory(SyntheticScenes(split="train", size=24, length=5))
    files[1]                                                              # already held: left as it is
    held = files._samples[1]
    assert files.missing() == [0, 2, 3]
    assert CacheFiller([files, bank], workers=2).wait(timeout=60)
    assert files.missing() == [] and bank.missing() == [] and files._samples[1] is held
    assert files.nbytes == 4 * H * W * (1 + 3)                            # uint8, as the loader stores them
    for i in range(4):
        (tmp_path / "ir" / f"{'abcd'[i]}.png").unlink()                   # served from memory from now on
        assert not files._samples[i]["ir"].is_shared()                    # copied out of the workers' memory
    scenes = SyntheticScenes(split="train", size=24, length=5)
    assert all(torch.equal(bank[i][k], scenes[i][k]) for i in range(5) for k in ("ir", "vis", "mask"))
    with pytest.raises(ValueError, match="at least one worker"):
        CacheFiller([bank], workers=0)

    # a sample that fails to load stops the filler quietly; the loader then meets it and reports it
    _pairs(tmp_path / "bad", "ir", "vi", ["a", "b", "c"])
    broken = InMemory(create_dataset("folder", tmp_path / "bad", "all"))
    (tmp_path / "bad" / "vi" / "b.png").write_bytes(b"not a png")
    with caplog.at_level("INFO", logger="fusion.data.cache"):
        filler = CacheFiller([broken], workers=1)
        assert filler.wait(timeout=60)
    assert broken.missing() == [1, 2] and "cache filler stopped" in caplog.text
    with pytest.raises(ImagePairError):
        broken[1]
    filler.stop()                                                          # harmless once finished
