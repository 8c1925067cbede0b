"""experiments/import_weights.py: released BDL / TC-MoA parameter names → our nets.

Oracles: a forward pass written here with the released BDL net's names (conv1 → PReLU → 2 × DRDB → conv2 →
PReLU → conv21 → PReLU, from ``LiuZhu-CV/BDLFusion: model/fcos_fusion.py``) on our imported net; the released
detector's class order (Lamp, Car, Bus, Motorcycle, Truck, People); the released TC-MoA router and α tensors
stacked over tasks / modules; the old TC-MoA names translated as its ``main_predict_oldckp.py`` does. Round trips
through :func:`released_state_dict` cover every key of each map.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from experiments import import_weights as iw
from experiments.fuse import load_fusion_net
from fusion.nets import create_fusion_net
from tasks.det import M3FD_CLASSES, DetTask


def _tc_moa_tiny():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return create_fusion_net("tc_moa_tiny")


def _fcos(norm: str = "batch", decode: str = "exp") -> DetTask:
    return DetTask("fcos_resnet18_fpn", class_names=M3FD_CLASSES, fpn_channels=32, head_convs=1, norm=norm,
                   fcos_decode=decode)


def _randomised(state: dict[str, torch.Tensor], seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {k: torch.randn(v.shape, generator=g, dtype=torch.float64).to(v.dtype) if v.is_floating_point() else v
            for k, v in state.items()}


def _save(tmp_path: Path, name: str, state: dict) -> Path:
    path = tmp_path / name
    torch.save(state, path)
    return path


@pytest.mark.parametrize("kind", ["bdl_fusion", "tc_moa", "bdl_fcos"])
def test_round_trip_restores_every_tensor(kind, tmp_path) -> None:
    make = {"bdl_fusion": lambda: create_fusion_net("bdl_tiny"), "tc_moa": _tc_moa_tiny, "bdl_fcos": _fcos}[kind]
    src, dst = make(), make()
    target = iw.KINDS[kind].target
    target(src).load_state_dict(_randomised(target(src).state_dict()))
    released = iw.released_state_dict(kind, src)
    report = iw.import_weights(kind, _save(tmp_path, "released.pth", {"model": released}), dst)
    a, b = target(src).state_dict(), target(dst).state_dict()
    assert report.unexpected == [] and report.loaded == sorted(k for k in a if k not in report.missing)
    for key in a:
        if key == "head.classification_head.cls_logits.weight":    # background row: synthesised
            assert torch.equal(a[key][1:], b[key][1:]) and torch.equal(b[key][0], torch.zeros_like(b[key][0]))
        elif key == "head.classification_head.cls_logits.bias":
            assert torch.equal(a[key][1:], b[key][1:]) and b[key][0].item() == pytest.approx(-4.59511985)
        elif key.endswith("source_embed"):     # not in released TC-MoA checkpoints
            assert key in report.missing
        else:
            assert torch.equal(a[key], b[key]), key
    expected_missing = [k for k in a if k.endswith("source_embed")]
    assert report.missing == expected_missing


def _released_bdl(seed: int = 0) -> dict[str, torch.Tensor]:
    """The released ``Fusion_Network_IJ`` layout written out from its source (names and shapes)."""
    g = torch.Generator().manual_seed(seed)
    shapes = {"conv1": (64, 2), "conv2": (32, 64), "conv21": (1, 32)}
    for b in (1, 2):
        for i in range(5):
            shapes[f"DRDB{b}.Dcov{i + 1}"] = (32, 64 + 32 * i)
        shapes[f"DRDB{b}.conv"] = (64, 224)
    state = {}
    for name, (cout, cin) in shapes.items():
        k = 1 if name.endswith(".conv") else 3
        state[f"{name}.weight"] = 0.05 * torch.randn(cout, cin, k, k, generator=g, dtype=torch.float64)
        state[f"{name}.bias"] = 0.05 * torch.randn(cout, generator=g, dtype=torch.float64)
    state["relu.weight"] = torch.tensor([0.2], dtype=torch.float64)
    return state


def _released_bdl_forward(s: dict[str, torch.Tensor], ir: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    def conv(x, name, dilation=1):
        w = s[f"{name}.weight"]
        pad = 0 if w.shape[-1] == 1 else dilation
        return F.conv2d(x, w, s[f"{name}.bias"], padding=pad, dilation=dilation)

    def prelu(x):
        return F.prelu(x, s["relu.weight"])

    x = prelu(conv(torch.cat((ir, y), 1), "conv1"))
    for b in (1, 2):
        feats = x
        for i in range(1, 6):
            feats = torch.cat((feats, F.relu(conv(feats, f"DRDB{b}.Dcov{i}", dilation=2))), 1)
        x = x + F.relu(conv(feats, f"DRDB{b}.conv"))
    return prelu(conv(prelu(conv(x, "conv2")), "conv21"))


def test_bdl_fusion_import_reproduces_the_released_forward(tmp_path) -> None:
    released = _released_bdl()
    whole = {**{f"enhance_net.{k}": v for k, v in released.items()},
             "denoise_net.fcos_body.head.cls_logits.bias": torch.zeros(80),
             "discriminator.net.0.weight": torch.zeros(64, 1, 1, 1)}
    net = create_fusion_net("bdl").double()
    report = iw.import_weights("bdl_fusion", _save(tmp_path, "model_meta_50.pth", whole), net)
    assert report.missing == [] and report.unexpected == [] and len(report.loaded) == len(released)
    assert report.ignored == ["denoise_net.fcos_body.head.cls_logits.bias", "discriminator.net.0.weight"]
    g = torch.Generator().manual_seed(1)
    ir, y = torch.rand(2, 1, 13, 17, generator=g, dtype=torch.float64), torch.rand(2, 1, 13, 17, generator=g,
                                                                                    dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(net(ir, y), _released_bdl_forward(released, ir, y), rtol=1e-12, atol=1e-12)


def test_bdl_fusion_cli_writes_a_checkpoint_fuse_loads(tmp_path, capsys) -> None:
    src = _save(tmp_path, "released.pth", {k: v.float() for k, v in _released_bdl().items()})
    out = tmp_path / "ours.pt"
    assert iw.main(["--kind", "bdl_fusion", "--src", str(src), "--out", str(out)]) == 0
    assert "imported 31 tensors" in capsys.readouterr().out   # 2 + 2 × 12 + 2 + 2 + 1 (the shared PReLU)
    net = load_fusion_net(out)
    assert torch.equal(net.blocks[1].layers[4].weight, _released_bdl()["DRDB2.Dcov5.weight"].float())
    assert torch.equal(net.tail2.bias, _released_bdl()["conv21.bias"].float())
    assert iw.main(["--kind", "bdl_fusion", "--src", str(src), "--out", str(out)]) == 2     # no overwrite
    assert capsys.readouterr().err.startswith("error:")


def test_shape_mismatch_fails_with_an_error_line(tmp_path, capsys) -> None:
    tiny = iw.released_state_dict("bdl_fusion", create_fusion_net("bdl_tiny"))
    src = _save(tmp_path, "tiny.pth", tiny)
    with pytest.raises(iw.WeightImportError, match="shape mismatch"):
        iw.import_weights("bdl_fusion", src, create_fusion_net("bdl"))
    assert iw.main(["--kind", "bdl_fusion", "--src", str(src), "--out", str(tmp_path / "o.pt")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error:") and "conv1.weight (8, 2, 3, 3) → head.weight (64, 2, 3, 3)" in err
    assert not (tmp_path / "o.pt").exists()


def test_wrong_layout_and_unknown_kind(tmp_path) -> None:
    src = _save(tmp_path, "tc.pth", iw.released_state_dict("tc_moa", _tc_moa_tiny()))
    with pytest.raises(iw.WeightImportError, match="holds no bdl_fusion weights"):
        iw.import_weights("bdl_fusion", src, create_fusion_net("bdl_tiny"))
    with pytest.raises(ValueError, match="weight import kind"):
        iw.import_weights("bdl", src, create_fusion_net("bdl_tiny"))


def test_fcos_rows_follow_the_released_class_order(tmp_path) -> None:
    task = _fcos(norm="frozen")
    released = iw.released_state_dict("bdl_fcos", _fcos(norm="batch"))
    weight = released["head.cls_logits.weight"]
    # the released head has 80 rows (its default config); row j is filled with j
    released["head.cls_logits.weight"] = torch.arange(80.0).view(80, 1, 1, 1).expand(80, *weight.shape[1:]).clone()
    released["head.cls_logits.bias"] = torch.arange(80.0)
    released.update({f"head.scale_exp.{i}.scale": torch.tensor([0.5 + i]) for i in range(5)})
    report = iw.import_weights("bdl_fcos", _save(tmp_path, "fcos.pth", {
        f"denoise_net.fcos_body.{k}": v for k, v in released.items()}), task)
    state = task.detector.model.state_dict()
    released_row = {"Lamp": 0, "Car": 1, "Bus": 2, "Motorcycle": 3, "Truck": 4, "People": 5}
    bias = state["head.classification_head.cls_logits.bias"]
    assert bias[1:].tolist() == [released_row[c] for c in M3FD_CLASSES]     # torchvision row c + 1
    assert [float(state[f"head.regression_head.scale_exp.{i}"]) for i in range(5)] == [0.5 + i for i in range(5)]
    assert report.ignored and all(k.endswith("num_batches_tracked") for k in report.ignored)   # frozen BN
    assert report.unexpected == [] and report.missing == []


def test_fcos_scales_need_the_exp_decoding(tmp_path) -> None:
    src = _save(tmp_path, "fcos.pth", iw.released_state_dict("bdl_fcos", _fcos()))
    with pytest.raises(iw.WeightImportError, match="fcos_decode='exp'"):
        iw.import_weights("bdl_fcos", src, _fcos(decode="stride"))


def test_exp_decoding_gives_the_released_boxes() -> None:
    """Oracle: the released detector's geometry written out — cell centres x·s + ⌊s/2⌋ (its
    ``coords_fmap2orig``), distances exp(scale·t) in pixels (its ``ScaleExp``), box = centre ∓ l,t / ± r,b."""
    from torchvision.models.detection.image_list import ImageList

    torch.manual_seed(0)
    model = _fcos().detector.model.eval()
    head = model.head.regression_head
    with torch.no_grad():
        for i, scale in enumerate(head.scale_exp):
            scale.fill_(0.3 + 0.2 * i)
        head.bbox_reg.weight.normal_(std=0.05)
        images = torch.rand(1, 3, 128, 192)
        features = list(model.backbone(images).values())
        regression, _ = head(features)
        anchors = model.anchor_generator(ImageList(images, [(128, 192)]), features)[0]
        ours = model.head.box_coder.decode(regression[0], anchors)
        expected = []
        for feature, scale, stride in zip(features, head.scale_exp, (8, 16, 32, 64, 128)):
            ltrb = torch.exp(head.bbox_reg(head.conv(feature)) * scale)[0].permute(1, 2, 0).reshape(-1, 4)
            h, w = feature.shape[-2:]
            ys, xs = torch.meshgrid(torch.arange(h) * stride + stride // 2, torch.arange(w) * stride + stride // 2,
                                    indexing="ij")
            cx, cy = xs.reshape(-1).float(), ys.reshape(-1).float()
            expected.append(torch.stack((cx - ltrb[:, 0], cy - ltrb[:, 1], cx + ltrb[:, 2], cy + ltrb[:, 3]), 1))
    torch.testing.assert_close(ours, torch.cat(expected), rtol=1e-5, atol=1e-4)


def test_fcos_refuses_a_groupnorm_backbone(tmp_path) -> None:
    src = _save(tmp_path, "fcos.pth", iw.released_state_dict("bdl_fcos", _fcos()))
    with pytest.raises(iw.WeightImportError, match="norm='batch' or 'frozen'"):
        iw.import_weights("bdl_fcos", src, _fcos(norm="group"))


def test_tc_moa_routers_and_alpha_split_over_tasks_and_modules(tmp_path) -> None:
    src_net, net = _tc_moa_tiny(), _tc_moa_tiny()
    released = _randomised(iw.released_state_dict("tc_moa", src_net), seed=3)
    iw.import_weights("tc_moa", _save(tmp_path, "tc.pth", {"model": released, "epoch": 3}), net)
    keys = sorted(net.moa, key=int)
    for g, key in enumerate(keys):
        for t in range(len(net.tasks)):
            assert torch.equal(net.moa[key].routers[t].w_gate, released[f"blocks_MoA.{g}.MoA.w_gate"][t])
        assert net.moa[key].alpha.item() == released["Alpha_encoder"][g].item()
        assert torch.equal(net.moa[key].conv_fusion[1].weight, released[f"FusionLayer.{g}.conv2.weight"])
    assert torch.equal(net.decoder_rel_pos[0], released["de_relative_position.0.relative_position_bias_table"])


def test_tc_moa_old_names_are_translated(tmp_path) -> None:
    src_net = _tc_moa_tiny()
    released = _randomised(iw.released_state_dict("tc_moa", src_net), seed=4)
    old = {}
    for key, value in released.items():   # the inverse of the release's modelTrans renames
        new = key.replace("de_FusionLayer", "de_projAdapter").replace("FusionLayer", "en_projAdapter")
        if "blocks_MoA" in new:
            new = new.replace("blocks_MoA", "blocks_SSF_rgb").replace(".MoA.", ".mlp.").replace(
                "dimReduction", "SE_en_linear")
        old[new] = value
    old["cls_token"] = torch.zeros(1, 1, 64)
    assert any("blocks_SSF_rgb" in k for k in old) and not any("FusionLayer" in k for k in old)
    a, b = _tc_moa_tiny(), _tc_moa_tiny()
    iw.import_weights("tc_moa", _save(tmp_path, "new.pth", {"model": released}), a)
    report = iw.import_weights("tc_moa", _save(tmp_path, "old.pth", {"model": old}), b)
    assert report.unexpected == [] and report.ignored == ["cls_token"]
    sa, sb = a.state_dict(), b.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa if not k.endswith("source_embed"))
