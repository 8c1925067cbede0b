"""fusion.data.synthetic: determinism, label consistency, split disjointness and the physical cues it promises."""

from __future__ import annotations

import pytest
import torch

from fusion.data import M3FD_CLASSES, MSRS_CLASSES, RandomCropFlip, collate_pairs, create_dataset

# M3FD label → MSRS class its pixels carry (Lamp has no MSRS class)
SEG_OF_DET = {0: 2, 1: 1, 2: 1, 3: 3, 5: 1}
N = 24


@pytest.fixture(scope="module")
def samples() -> list[dict]:
    ds = create_dataset("synthetic", None, "train", size=(96, 128), length=N, seed=0)
    return [ds[i] for i in range(N)]


def test_shapes_dtypes_ranges_and_attributes(samples: list[dict]) -> None:
    ds = create_dataset("synthetic", split="val", size=40, length=3)
    assert ds.class_names == MSRS_CLASSES and ds.det_class_names == M3FD_CLASSES
    assert ds.has_masks and ds.has_boxes and ds.ignore_index == 255 and len(ds) == 3
    assert ds[0]["ir"].shape == (1, 40, 40)
    for s in samples:
        assert s["ir"].shape == (1, 96, 128) and s["vis"].shape == (3, 96, 128) and s["mask"].shape == (96, 128)
        assert s["ir"].dtype == s["vis"].dtype == torch.float32
        assert s["mask"].dtype == torch.int64 and s["labels"].dtype == torch.int64
        assert s["boxes"].dtype == torch.float32 and s["boxes"].shape == (len(s["labels"]), 4)
        for key in ("ir", "vis"):
            assert 0.0 <= s[key].min() and s[key].max() <= 1.0
        values = set(torch.unique(s["mask"]).tolist())
        assert values <= set(range(9)) | {255}
        assert set(s["labels"].tolist()) <= set(range(6))
    assert sum(len(s["labels"]) for s in samples) > N  # scenes are populated
    seen = set().union(*(torch.unique(s["mask"]).tolist() for s in samples))
    assert {0, 1, 2, 4} <= seen


def test_deterministic_regardless_of_access_order() -> None:
    a = create_dataset("synthetic", size=48, length=10, seed=3)
    b = create_dataset("synthetic", size=48, length=10, seed=3)
    _ = [b[i] for i in (9, 1, 7)]
    for i in (7, 2):
        sa, sb = a[i], b[i]
        assert sa["name"] == sb["name"]
        for key in ("ir", "vis", "mask", "boxes", "labels"):
            assert torch.equal(sa[key], sb[key])
    c = create_dataset("synthetic", size=48, length=10, seed=4)
    assert not torch.equal(a[2]["vis"], c[2]["vis"])


def test_boxes_enclose_their_class_pixels(samples: list[dict]) -> None:
    for s in samples:
        h, w = s["mask"].shape
        covered = torch.zeros(h, w, dtype=torch.bool)
        for box, label in zip(s["boxes"].tolist(), s["labels"].tolist(), strict=True):
            x0, y0, x1, y1 = box
            assert 0 <= x0 < x1 <= w and 0 <= y0 < y1 <= h
            assert all(float(v).is_integer() for v in box)  # tight pixel-edge boxes
            if label in SEG_OF_DET:
                region = s["mask"][int(y0):int(y1), int(x0):int(x1)]
                cls = SEG_OF_DET[label]
                assert (region == cls).any(), (s["name"], box, label)
                # tight: the box touches pixels of its class on every side
                assert (region[0] == cls).any() or (region[-1] == cls).any()
                covered[int(y0):int(y1), int(x0):int(x1)] |= s["mask"][int(y0):int(y1), int(x0):int(x1)] == cls
        # every person/car/bike pixel lies in a box of the matching label
        for cls in (1, 2, 3):
            assert not ((s["mask"] == cls) & ~covered).any(), (s["name"], cls)


def test_splits_disjoint() -> None:
    names, images = set(), []
    for split in ("train", "val", "test"):
        ds = create_dataset("synthetic", split=split, size=32, length=6, seed=0)
        for i in range(6):
            s = ds[i]
            names.add(s["name"])
            images.append(s["vis"])
    assert len(names) == 18
    for i in range(len(images)):
        for j in range(i + 1, len(images)):
            assert not torch.equal(images[i], images[j])
    with pytest.raises(ValueError, match="split"):
        create_dataset("synthetic", split="holdout")


def test_physics_people_hot_night_dark_visible_detail(samples: list[dict]) -> None:
    hot, night_mean, day_mean = [], [], []
    for s in samples:
        person, background = s["mask"] == 2, s["mask"] == 0
        if person.sum() > 20:
            hot.append(s["ir"][0][person].mean() - s["ir"][0][background].mean())
        (night_mean if s["name"].endswith("N") else day_mean).append(s["vis"].mean())
    assert len(hot) >= 5 and min(hot) > 0.1  # people are clearly hotter than the background in IR
    assert night_mean and day_mean and max(night_mean) < min(day_mean)  # night visible images are dark

    def grad_energy(x: torch.Tensor) -> float:
        return float((x[..., 1:, :] - x[..., :-1, :]).abs().mean() + (x[..., 1:] - x[..., :-1]).abs().mean())

    day = [s for s in samples if s["name"].endswith("D")]
    vis_detail = sum(grad_energy(s["vis"].mean(0)) for s in day)
    ir_detail = sum(grad_energy(s["ir"][0]) for s in day)
    assert vis_detail > ir_detail  # texture/colour detail lives in the visible image
    all_day = create_dataset("synthetic", size=32, length=4, night_fraction=0.0)
    assert all(all_day[i]["name"].endswith("D") for i in range(4))


def test_transform_and_collate() -> None:
    ds = create_dataset("synthetic", size=(64, 80), length=4, transform=RandomCropFlip(48))
    batch = collate_pairs([ds[(i, 11)] for i in range(4)])
    assert batch["ir"].shape == (4, 1, 48, 48) and batch["mask"].shape == (4, 48, 48)
    assert len(batch["boxes"]) == 4
    for boxes in batch["boxes"]:
        assert (boxes >= 0).all() and (boxes <= 48).all()
