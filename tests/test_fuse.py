"""``fuse.py``'s inference controls: TC-MoA's intensity bias α/β (paper Eq. 8) reaches the net."""

from __future__ import annotations

from pathlib import Path

import torch

from experiments import fuse
from experiments.checkpoint import FORMAT, save_checkpoint
from fusion.image_io import read_image, save_image
from fusion.nets.registry import create_fusion_net


def _checkpoint(tmp_path: Path, name: str) -> Path:
    torch.manual_seed(0)
    net = create_fusion_net(name)
    ckpt = {"format": FORMAT, "config": {}, "net": {"name": name, "kwargs": dict(getattr(net, "config", {}))},
            "model": net.state_dict()}
    return save_checkpoint(tmp_path / f"{name}.pt", ckpt)


def _pair(tmp_path: Path) -> tuple[Path, Path]:
    g = torch.Generator().manual_seed(1)
    (tmp_path / "ir").mkdir()
    (tmp_path / "vi").mkdir()
    save_image(torch.rand(1, 48, 64, generator=g), tmp_path / "ir" / "a.png")
    save_image(torch.rand(3, 48, 64, generator=g), tmp_path / "vi" / "a.png")
    return tmp_path / "ir", tmp_path / "vi"


def test_bias_alpha_beta_change_tc_moa_output(tmp_path: Path) -> None:
    ckpt = _checkpoint(tmp_path, "tc_moa_tiny")
    ir, vi = _pair(tmp_path)
    outs = {}
    for tag, extra in (("plain", []), ("explicit_default", ["--bias-alpha", "1", "--bias-beta", "0"]),
                       ("biased", ["--bias-alpha", "3", "--bias-beta", "0.5"])):
        assert fuse.main(["--checkpoint", str(ckpt), "--ir", str(ir), "--vi", str(vi),
                          "--out", str(tmp_path / tag), *extra]) == 0
        outs[tag] = read_image(tmp_path / tag / "a.png")
    assert torch.equal(outs["plain"], outs["explicit_default"])      # α=1, β=0 is the identity of Eq. 8
    assert not torch.equal(outs["plain"], outs["biased"])


def test_bias_flags_on_a_net_without_them_are_an_error(tmp_path: Path, capsys) -> None:
    ckpt = _checkpoint(tmp_path, "bdl_tiny")
    ir, vi = _pair(tmp_path)
    code = fuse.main(["--checkpoint", str(ckpt), "--ir", str(ir), "--vi", str(vi), "--out", str(tmp_path / "o"),
                      "--bias-alpha", "2"])
    assert code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:") and "TC-MoA" in err[0]
    assert not (tmp_path / "o").exists()
