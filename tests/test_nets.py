"""Fusion-net zoo: registry behaviour, and per-net smoke / gradient / checkpoint tests over every tiny
variant."""

from __future__ import annotations

import io
import itertools
import warnings

import pytest
import torch

from bilevel.registry import UnknownNameError
from fusion.colour import luminance, to_image
from fusion.losses import create_fusion_loss
from fusion.nets import bdl as bdl_module
from fusion.nets import create_fusion_net, fused_output, list_fusion_nets, register_fusion_net
from fusion.nets import registry as registry_module
from fusion.nets.bdl import from_phases, to_phases
from fusion.nets.moe_fusion import NoisyTopKGate
from fusion.nets.tc_moa import (
    _shift_mask,
    apply_intensity_bias,
    blend_ramp,
    mae_key_map,
    moa_positions,
    tile_starts,
)

pytestmark = pytest.mark.filterwarnings("ignore:TC-MoA. no backbone_ckpt")

TINY = list_fusion_nets("*_tiny")
BASES = ("bdl", "moe_fusion", "tc_moa")
SIZES = [(48, 64), (64, 40)]


def _inputs(
    batch: int, size: tuple[int, int], device, vis_channels: int = 3
) -> tuple[torch.Tensor, torch.Tensor]:
    """A batch of deliberately different scenes (brightness, contrast, texture) so routing varies."""
    g = torch.Generator().manual_seed(1)
    h, w = size
    ir = torch.rand(batch, 1, h, w, generator=g)
    vis = torch.rand(batch, vis_channels, h, w, generator=g)
    scale = torch.linspace(0.2, 1.0, batch).view(-1, 1, 1, 1)
    return (ir * scale).to(device), (vis * scale.flip(0)).to(device)


def _route_everywhere(net: torch.nn.Module) -> None:
    for m in net.modules():
        if isinstance(m, NoisyTopKGate):
            m.k = m.num_experts


def _forward_all_tasks(net, ir, vis):
    """TC-MoA has one router per task: run each so every router is used; other nets run once."""
    tasks = getattr(net, "tasks", None)
    outs = [net(ir, vis, task=t) for t in tasks] if tasks else [net(ir, vis)]
    return [fused_output(o) for o in outs]


# ------------------------------------------------------------------------------------------------ registry
def test_registry_names():
    names = list_fusion_nets()
    for base in BASES:
        assert base in names and f"{base}_tiny" in names
    assert set(TINY) >= {f"{b}_tiny" for b in BASES}


def test_unknown_name_lists_valid():
    with pytest.raises(UnknownNameError, match="unknown fusion net 'no_such_net'.*bdl_tiny"):
        create_fusion_net("no_such_net")


def test_register_overwrite_warns():
    def factory(**kw):
        return torch.nn.Identity()

    try:
        register_fusion_net(factory, name="_test_dummy")
        with pytest.warns(UserWarning, match="already registered"):
            register_fusion_net(factory, name="_test_dummy")
    finally:
        registry_module._REGISTRY.pop("_test_dummy", None)


def test_none_kwargs_dropped_and_config_complete():
    net = create_fusion_net("bdl_tiny", out_act=None, features=None)
    assert net.config["out_act"] == "none" and net.config["features"] == 8
    assert net.name == "bdl_tiny"
    with pytest.raises(ValueError, match="out_act"):
        create_fusion_net("bdl_tiny", out_act="tanh")


def test_fused_output():
    t = torch.zeros(1, 1, 2, 2)
    assert fused_output(t)[0] is t and fused_output(t)[1] == {}
    raw, aux = fused_output({"fused": t, "aux_losses": {"a": torch.tensor(1.0)}})
    assert raw is t and set(aux) == {"a"}
    with pytest.raises(TypeError):
        fused_output({"image": t})


# -------------------------------------------------------------------------------------- every tiny variant
@pytest.mark.parametrize("name", TINY)
@pytest.mark.parametrize("size", SIZES)
def test_forward_backward_every_param(name, size, device):
    net = create_fusion_net(name).to(device).train()
    _route_everywhere(net)
    ir, vis = _inputs(2, size, device)
    total = 0.0
    for raw, aux in _forward_all_tasks(net, ir, vis):
        channels = 3 if net.out_space == "rgb" else 1
        assert raw.shape == (2, channels, *size)
        assert all(torch.isfinite(v) and v.dim() == 0 for v in aux.values())
        total = total + raw.square().mean() + sum(aux.values())
    total.backward()
    trainable = [(n, p) for n, p in net.named_parameters() if p.requires_grad]
    assert trainable
    missing = [n for n, p in trainable if p.grad is None or not torch.any(p.grad != 0)]
    assert not missing, f"parameters without gradient: {missing}"


@pytest.mark.parametrize("name", TINY)
@pytest.mark.parametrize("vis_channels", [3, 1])
def test_to_image_range_and_shape(name, vis_channels, device):
    net = create_fusion_net(name).to(device).eval()
    ir, vis = _inputs(2, (40, 48), device, vis_channels)
    with torch.no_grad():
        raw, _ = fused_output(net(ir, vis))
    img = to_image(raw, net.out_space, vis)
    assert img.shape == (2, vis_channels, 40, 48)
    assert img.min() >= 0 and img.max() <= 1 and torch.isfinite(img).all()


@pytest.mark.parametrize("name", TINY)
def test_checkpoint_round_trip(name):
    net = create_fusion_net(name).eval()
    buf = io.BytesIO()
    torch.save({"net": {"name": net.name, "kwargs": net.config}, "model": net.state_dict()}, buf)
    buf.seek(0)
    ckpt = torch.load(buf, weights_only=True)
    rebuilt = create_fusion_net(ckpt["net"]["name"], **ckpt["net"]["kwargs"]).eval()
    rebuilt.load_state_dict(ckpt["model"], strict=True)
    ir, vis = _inputs(2, (32, 32), "cpu")
    with torch.no_grad():
        a, _ = fused_output(net(ir, vis))
        b, _ = fused_output(rebuilt(ir, vis))
    torch.testing.assert_close(a, b)


# --------------------------------------------------------------------------------------------------- BDL
def test_bdl_parameter_count_and_shared_prelu():
    net = create_fusion_net("bdl")
    assert sum(p.numel() for p in net.parameters()) == 417_730
    prelus = [m for m in net.modules() if isinstance(m, torch.nn.PReLU)]
    assert len(prelus) == 1 and prelus[0].weight.numel() == 1


@pytest.mark.parametrize("act,lo,hi", [("sigmoid", 0.0, 1.0), ("clamp", 0.0, 1.0)])
def test_bdl_out_act(act, lo, hi):
    net = create_fusion_net("bdl_tiny", out_act=act)
    with torch.no_grad():
        for p in net.tail2.parameters():
            p.mul_(50)  # push the raw output well outside [0, 1]
        y = net(*_inputs(2, (16, 16), "cpu"))
    assert y.min() >= lo and y.max() <= hi


@pytest.mark.parametrize("channels_last", [False, True])
def test_bdl_polyphase_components_round_trip(channels_last):
    x = torch.randn(2, 3, 6, 8, dtype=torch.float64)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    phases = to_phases(x)
    assert phases.shape == (8, 3, 3, 4)
    assert phases.is_contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    for k, (p, q) in enumerate(itertools.product((0, 1), (0, 1))):
        assert torch.equal(phases[2 * k : 2 * k + 2], x[..., p::2, q::2])
    assert torch.equal(from_phases(phases), x)


@pytest.mark.parametrize("size,checkpointing", [((12, 16), False), ((12, 16), True), ((13, 10), False)])
def test_bdl_polyphase_blocks_equal_the_dilated_ones(size, checkpointing):
    """The DRDBs on the 2×2 polyphase components compute the dilated convolutions' sums: the same output and
    parameter gradients in float64 (odd sizes take the dilated path)."""
    torch.manual_seed(0)
    dilated = create_fusion_net("bdl_tiny", polyphase=False, grad_checkpointing=checkpointing).double()
    phased = create_fusion_net("bdl_tiny", polyphase=True, grad_checkpointing=checkpointing).double()
    phased.load_state_dict(dilated.state_dict())
    ir, vis = (t.double() for t in _inputs(2, size, "cpu"))
    outs, grads = [], []
    for net in (dilated, phased):
        out = net(ir, vis)
        out.square().sum().backward()
        outs.append(out)
        grads.append([p.grad for p in net.parameters()])
    torch.testing.assert_close(outs[1], outs[0], rtol=1e-12, atol=1e-12)
    for g_phased, g_dilated in zip(grads[1], grads[0]):
        torch.testing.assert_close(g_phased, g_dilated, rtol=1e-10, atol=1e-12)


def test_bdl_polyphase_by_default_on_the_cpu_only(monkeypatch):
    """``polyphase=None`` takes the components on the CPU (where the dilated backward is slow), not elsewhere."""
    calls = []
    monkeypatch.setattr(bdl_module, "to_phases", lambda x: calls.append(x.shape) or to_phases(x))
    net = create_fusion_net("bdl_tiny")
    ir, vis = _inputs(2, (16, 16), "cpu")
    with torch.no_grad():
        net(ir, vis)
    assert calls == [(2, 8, 16, 16)]     # bdl_tiny: 8 channels after the head
    net.to("meta")(ir.to("meta"), vis.to("meta"))
    assert len(calls) == 1


# ------------------------------------------------------------------------------------------------ MoE gates
def test_noisy_topk_gate_matches_hand_computation():
    gate = NoisyTopKGate(3, num_experts=4, k=2).eval()
    with torch.no_grad():
        gate.w_gate.copy_(torch.tensor([[1.0, 0.0, 0.0, 2.0], [0.0, 1.0, 0.0, 0.0], [0.0, 0.0, 1.0, 0.0]]))
    x = torch.tensor([[1.0, 0.5, 0.0], [0.0, 0.0, 3.0]])
    gates, balance = gate(x)
    # row 0: logits (1, .5, 0, 2) → experts 3, 0; row 1: logits (0, 0, 3, 0) → expert 2 and one tie at 0
    e = torch.exp(torch.tensor(1.0))
    torch.testing.assert_close(gates[0], torch.tensor([1 / (1 + e), 0.0, 0.0, e / (1 + e)]))
    e3 = torch.exp(torch.tensor(3.0)).item()
    assert gates[1, 2].item() == pytest.approx(e3 / (1 + e3))
    assert (gates > 0).sum(1).tolist() == [2, 2]
    torch.testing.assert_close(gates.sum(1), torch.ones(2))
    assert torch.isfinite(balance)


def test_moe_gates_depend_on_input_and_balance_finite():
    net = create_fusion_net("moe_fusion_tiny", gate_init_std=1.0).eval()  # non-zero gates, as after training
    h = w = 32
    ramp = torch.linspace(0, 1, w).expand(1, 1, h, w)
    stripes = (torch.arange(w) % 4 < 2).float().expand(1, 1, h, w)
    ir = torch.cat((ramp * 0.1, stripes, 1 - ramp, torch.full((1, 1, h, w), 0.9)))
    vis = torch.cat(
        (
            stripes.expand(1, 3, h, w),
            ramp.expand(1, 3, h, w) * 0.2,
            torch.rand(1, 3, h, w),
            torch.zeros(1, 3, h, w),
        )
    )
    with torch.no_grad():
        out = net(ir, vis)
    for key, g in out["gates"].items():
        assert g.shape == (4, 4)
        assert (g > 0).sum(1).eq(2).all(), key
        assert not torch.allclose(g[0], g[1]) or not torch.allclose(g[2], g[3]), key
    chosen = {tuple(row.nonzero().flatten().tolist()) for g in out["gates"].values() for row in g}
    assert len(chosen) > 1, "every image was routed to the same experts"
    assert all(torch.isfinite(v) for v in out["aux_losses"].values())
    net.train()
    assert all(torch.isfinite(v) for v in net(ir, vis)["aux_losses"].values())


def test_moe_local_experts_see_one_modality():
    """Experts 0–1 of a MoLE read only the visible features, 2–3 only the IR ones."""
    net = create_fusion_net("moe_fusion_tiny").eval()
    seen = {}
    for i, expert in enumerate(net.mole_fg.experts):
        expert.register_forward_hook(lambda m, inp, out, i=i: seen.__setitem__(i, inp[0]))
    _route_everywhere(net)
    ir, vis = _inputs(2, (16, 16), "cpu")
    with torch.no_grad():
        net(ir, vis)
        fv, xv3 = net.enc_vis(luminance(vis))
        fi, xi3 = net.enc_ir(ir)
        att = torch.sigmoid(net.saliency(torch.cat((fv, fi), 1)))
    torch.testing.assert_close(seen[0], xv3 * att)
    torch.testing.assert_close(seen[1], xv3 * att)
    torch.testing.assert_close(seen[2], xi3 * att)
    torch.testing.assert_close(seen[3], xi3 * att)


def test_moe_input_attention_and_logspace():
    net = create_fusion_net("moe_fusion_tiny", attention="input", combine="logspace")
    ir, vis = _inputs(2, (24, 20), "cpu")
    with pytest.raises(ValueError, match="attention"):
        net(ir, vis)
    out = net(ir, vis, attention=torch.rand(2, 12, 10))  # resized to the input size
    assert out["attention"].shape == (2, 1, 24, 20) and torch.isfinite(out["fused"]).all()
    with pytest.raises(TypeError, match="learned"):
        create_fusion_net("moe_fusion_tiny")(ir, vis, attention=torch.rand(2, 1, 24, 20))


# ------------------------------------------------------------------------------------------------- TC-MoA
def test_tc_moa_insertion_rule():
    assert moa_positions(12, 4) == [1, 5, 9]
    assert moa_positions(8, 4) == [1, 5]
    assert moa_positions(24, 4) == [1, 5, 9, 13, 17, 21]
    net = create_fusion_net("tc_moa_tiny")  # τ = 2: encoder 1, 3; decoder 1
    assert list(net.moa) == ["1", "3"] and list(net.decoder_moa) == ["1"]


def test_tc_moa_frozen_backbone_and_real_parameters():
    net = create_fusion_net("tc_moa_tiny")
    assert not any(p.requires_grad for p in net.backbone.parameters())
    trainable = {n.split(".")[0] for n, p in net.named_parameters() if p.requires_grad}
    assert trainable == {"moa", "decoder_moa", "rel_pos", "decoder_rel_pos"}
    keys = net.state_dict().keys()
    assert "moa.1.source_embed" in keys and "moa.1.alpha" in keys  # saved, unlike the released code's list
    assert net.moa["1"].source_embed.shape == (3, 2, 64)
    assert create_fusion_net("tc_moa_tiny", tasks=("vif", "mef")).moa["1"].source_embed.shape[0] == 2
    unfrozen = create_fusion_net("tc_moa_tiny", freeze_backbone=False)
    assert all(p.requires_grad for p in unfrozen.backbone.parameters())


def _mae_checkpoint(src: torch.nn.Module, encoder_only: bool) -> dict:
    """An MAE checkpoint with the official key names: ``{"model": state}``, cls token and position tables
    included; the encoder-only release (MAE pre-training) has no decoder, and a classifier head here."""
    state = {k: v.clone() for k, v in src.backbone.state_dict().items()}
    state.update(cls_token=torch.zeros(1, 1, 64), pos_embed=torch.zeros(1, 65, 64))
    if encoder_only:
        state = {k: v for k, v in state.items() if not k.startswith("decoder_")}
        state["head.weight"] = torch.zeros(10, 64)
    else:
        state.update(mask_token=torch.zeros(1, 1, 32), decoder_pos_embed=torch.zeros(1, 65, 32))
    return {"model": state}


def test_tc_moa_loads_full_mae_checkpoint(tmp_path):
    with pytest.warns(UserWarning, match="randomly initialised"):
        src = create_fusion_net("tc_moa_tiny")
    ckpt = _mae_checkpoint(src, encoder_only=False)
    ckpt["model"] = {f"module.{k}": v for k, v in ckpt["model"].items()}  # a DDP-saved copy
    path = tmp_path / "mae_visualize.pth"
    torch.save(ckpt, path)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a complete checkpoint: no random-init, no missing-key warning
        net = create_fusion_net("tc_moa_tiny", backbone_ckpt=str(path))
    for (k, a), b in zip(src.backbone.state_dict().items(), net.backbone.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b, msg=k)
    assert set(mae_key_map(ckpt)) == set(src.backbone.state_dict())
    assert mae_key_map({"state_dict": {"norm.weight": torch.ones(1)}}) == {"norm.weight": torch.ones(1)}
    result = net.load_backbone(path)
    assert result.missing_keys == [] and result.unexpected_keys == []


def test_tc_moa_loads_encoder_only_checkpoint_and_reports_keys(tmp_path):
    src = create_fusion_net("tc_moa_tiny")
    path = tmp_path / "mae_pretrain.pth"
    torch.save(_mae_checkpoint(src, encoder_only=True), path)
    torch.manual_seed(7)
    fresh = create_fusion_net("tc_moa_tiny")  # the decoder a checkpoint-less build gets with this seed
    torch.manual_seed(7)
    reported = r"missing keys.*decoder_blocks\.\*\.attn\.qkv\.weight.*unexpected.*head\.weight"
    with pytest.warns(UserWarning, match=reported):
        net = create_fusion_net("tc_moa_tiny", backbone_ckpt=str(path))
    loaded, kept = net.backbone.state_dict(), fresh.backbone.state_dict()
    for k, v in src.backbone.state_dict().items():
        expected = kept[k] if k.startswith("decoder_") else v
        torch.testing.assert_close(loaded[k], expected, msg=k)
    with pytest.warns(UserWarning):
        result = net.load_backbone(path)
    decoder_keys = {k for k in loaded if k.startswith("decoder_")}
    assert set(result.missing_keys) == decoder_keys and result.unexpected_keys == ["head.weight"]


def test_tc_moa_checkpoint_shape_mismatch_fails(tmp_path):
    src = create_fusion_net("tc_moa_tiny")
    ckpt = _mae_checkpoint(src, encoder_only=False)
    ckpt["model"]["blocks.0.mlp.fc1.weight"] = torch.zeros(3, 64)
    path = tmp_path / "other.pth"
    torch.save(ckpt, path)
    with pytest.raises(ValueError, match=r"blocks\.0\.mlp\.fc1\.weight: checkpoint \(3, 64\)"):
        create_fusion_net("tc_moa_tiny", backbone_ckpt=str(path))
    with pytest.raises(FileNotFoundError, match="backbone_ckpt=None"):
        create_fusion_net("tc_moa_tiny", backbone_ckpt=str(tmp_path / "absent.pth"))


def test_intensity_bias_is_eq8():
    px, py = torch.tensor([0.2, 0.9]), torch.tensor([0.7, 0.4])
    qx, qy = apply_intensity_bias(px, py, 0.5, 0.1)
    torch.testing.assert_close(qx, torch.tensor([0.5 + 0.5 * -0.3 + 0.1, 0.5 + 0.5 * 0.4 + 0.1]))
    torch.testing.assert_close(qy, torch.tensor([0.5 + 0.5 * 0.2 - 0.1, 0.5 + 0.5 * -0.1 - 0.1]))


def test_tc_moa_bias_control_transforms_prompts_and_output():
    net = create_fusion_net("tc_moa_tiny").eval()
    ir, vis = _inputs(2, (32, 48), "cpu")
    with torch.no_grad():
        base = net(ir, vis, task="vif")
        biased = net(ir, vis, task="vif", bias_alpha=0.5, bias_beta=0.1)
    for q in base["prompts"]:
        torch.testing.assert_close(q["p_x"], q["p_x_raw"])
    for q in biased["prompts"]:
        torch.testing.assert_close(q["p_x"], 0.5 + 0.5 * (q["p_x_raw"] - 0.5) + 0.1)
        torch.testing.assert_close(q["p_y"], 0.5 + 0.5 * (q["p_y_raw"] - 0.5) - 0.1)
    # the first module's raw prompts do not depend on the control, so the transform is the only change there
    torch.testing.assert_close(base["prompts"][0]["p_x_raw"], biased["prompts"][0]["p_x_raw"])
    assert (base["fused"] - biased["fused"]).abs().max() > 1e-4
    # routers are per task: another task's router changes the output once its router differs
    with torch.no_grad():
        for m in net.moa.values():
            m.routers[1].w_gate.normal_()
        other = net(ir, vis, task="mef")
    assert (other["fused"] - base["fused"]).abs().max() > 1e-6


def test_tc_moa_bias_defaults_from_kwargs_and_per_sample():
    """α, β set at construction are the forward's defaults (and kept in the config); the call overrides them,
    and (B,) tensors give each image its own control."""
    plain = create_fusion_net("tc_moa_tiny").eval()
    biased = create_fusion_net("tc_moa_tiny", bias_alpha=0.5, bias_beta=0.1).eval()
    biased.load_state_dict(plain.state_dict())
    assert (biased.config["bias_alpha"], biased.config["bias_beta"]) == (0.5, 0.1)
    ir, vis = _inputs(2, (32, 48), "cpu")
    with torch.no_grad():
        explicit = plain(ir, vis, bias_alpha=0.5, bias_beta=0.1)["fused"]
        torch.testing.assert_close(biased(ir, vis)["fused"], explicit)
        reset = biased(ir, vis, bias_alpha=1.0, bias_beta=0.0)["fused"]
        torch.testing.assert_close(reset, plain(ir, vis)["fused"])
        alphas, betas = torch.tensor([1.0, 0.5]), torch.tensor([0.0, 0.1])
        mixed = plain(ir, vis, bias_alpha=alphas, bias_beta=betas)["fused"]
    torch.testing.assert_close(mixed[0], plain(ir, vis)["fused"][0])
    torch.testing.assert_close(mixed[1], explicit[1])


def test_tile_starts_cover_with_overlap_and_are_fewest():
    for length, tile, overlap in [(100, 40, 10), (64, 32, 8), (33, 32, 8), (1000, 448, 112), (30, 40, 10)]:
        starts = tile_starts(length, tile, overlap)
        size = min(tile, length)
        assert starts[0] == 0 and starts[-1] + size == length
        assert all(0 < b - a <= size - overlap for a, b in itertools.pairwise(starts))
        n = len(starts)
        assert n == 1 or (n - 2) * (tile - overlap) + tile < length  # one tile fewer could not cover
    ramp = blend_ramp(10, 3)
    torch.testing.assert_close(ramp, torch.tensor([1, 2, 3, 4, 4, 4, 4, 3, 2, 1]) / 4.0)


def test_tc_moa_tiled_blend_is_a_partition_of_unity(monkeypatch):
    """When every tile returns the same function of its pixels (here 2·vis + ir), the blend is that function
    of the whole image to rounding: the overlapping weights sum to one everywhere (a constant stays put)."""
    net = create_fusion_net("tc_moa_tiny", tile_size=32, tile_overlap=8).eval()
    seen = []

    def fake_fuse(ir, vis, t, alpha, beta):
        seen.append(tuple(vis.shape[-2:]))
        return {"fused": vis * 2 + ir, "aux_losses": {"mir": vis.mean()}, "prompts": [{"stage": "encoder"}]}

    monkeypatch.setattr(net, "_fuse", fake_fuse)
    ir, vis = _inputs(2, (50, 70), "cpu")
    out = net(ir, vis)
    torch.testing.assert_close(out["fused"], vis * 2 + ir)
    assert len(seen) == 2 * 3 and set(seen) == {(32, 32)}  # 50 → 2 rows, 70 → 3 columns of 32 px tiles
    tiles = [(y, x) for y in tile_starts(50, 32, 8) for x in tile_starts(70, 32, 8)]
    expected_mir = torch.stack([vis[..., y : y + 32, x : x + 32].mean() for y, x in tiles]).mean()
    torch.testing.assert_close(out["aux_losses"]["mir"], expected_mir)
    assert [q["tile"] for q in out["prompts"]] == tiles
    constant = torch.full((1, 3, 50, 70), 0.3)
    torch.testing.assert_close(net(constant[:, :1], constant)["fused"], torch.full((1, 3, 50, 70), 0.9))


def test_tc_moa_tiled_inference():
    """Where the image fits one tile, tiled = untiled; a larger image runs tile by tile; training never
    tiles."""
    net = create_fusion_net("tc_moa_tiny").eval()  # tile_size 64
    whole = create_fusion_net("tc_moa_tiny", tile_size=0).eval()
    whole.load_state_dict(net.state_dict())
    ir, vis = _inputs(2, (48, 40), "cpu")
    with torch.no_grad():
        a, b = net(ir, vis), whole(ir, vis)
    torch.testing.assert_close(a["fused"], b["fused"])
    for key in ("mir", "balance"):
        torch.testing.assert_close(a["aux_losses"][key], b["aux_losses"][key])
    ir, vis = _inputs(1, (80, 150), "cpu")  # 2 × 3 tiles of 64 px
    with torch.no_grad():
        out = net(ir, vis)
        untiled = whole(ir, vis)["fused"]
    assert out["fused"].shape == (1, 3, 80, 150) and torch.isfinite(out["fused"]).all()
    assert len({q["tile"] for q in out["prompts"]}) == 6
    assert (out["fused"] - untiled).abs().max() > 1e-6  # the tiles really saw other context
    net.train()
    assert all("tile" not in q for q in net(ir, vis)["prompts"])
    with pytest.raises(ValueError, match="tile_overlap"):
        create_fusion_net("tc_moa_tiny", tile_size=32, tile_overlap=32)


def test_moe_input_attention_trains():
    """``attention="input"`` builds and trains: every parameter gets a gradient and the loss falls."""
    net = create_fusion_net("moe_fusion_tiny", attention="input").train()
    assert net.saliency is None and net.config["attention"] == "input"
    _route_everywhere(net)
    ir, vis = _inputs(2, (32, 32), "cpu")
    boxes = torch.zeros(2, 1, 32, 32)
    boxes[0, :, 4:20, 6:18] = 1
    boxes[1, :, 10:30, 2:12] = 1
    loss_fn = create_fusion_loss("moe")
    opt = torch.optim.Adam(net.parameters(), lr=3e-3)
    losses = []
    for _ in range(6):
        raw, aux = fused_output(net(ir, vis, attention=boxes))
        loss = loss_fn(raw, ir, vis, mask=boxes, aux_losses=aux)["loss"]
        opt.zero_grad()
        loss.backward()
        if not losses:
            missing = [n for n, p in net.named_parameters() if p.grad is None or not torch.any(p.grad != 0)]
            assert not missing, f"parameters without gradient: {missing}"
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]


def test_tc_moa_shift_mask_structure():
    mask = _shift_mask(8, 8, 4, 2, torch.device("cpu"))  # 4 windows of 16 tokens
    assert mask.shape == (4, 16, 16)
    assert torch.all(mask[0] == 0)  # the top-left window holds no wrapped tokens
    assert torch.all(mask[3] == mask[3].t()) and (mask[3] < 0).any()
    assert torch.all(mask.diagonal(dim1=1, dim2=2) == 0)
    net_masked = create_fusion_net("tc_moa_tiny").eval()
    net_plain = create_fusion_net("tc_moa_tiny", shift_mask=False).eval()
    net_plain.load_state_dict(net_masked.state_dict())
    ir, vis = _inputs(1, (32, 32), "cpu")
    with torch.no_grad():
        assert not torch.allclose(net_masked(ir, vis)["fused"], net_plain(ir, vis)["fused"])


def test_tc_moa_mir_variants():
    ir, vis = _inputs(2, (32, 32), "cpu")
    for mir in ("code", "paper"):
        net = create_fusion_net("tc_moa_tiny", mir=mir).eval()
        with torch.no_grad():
            out = net(ir, vis)
        d = [q["p_x_raw"] + q["p_y_raw"] - 1 for q in out["prompts"]]
        if mir == "paper":
            expected = torch.stack([x.abs().mean() for x in d]).mean()
        else:
            enc = torch.stack(
                [x.square().mean() for x, q in zip(d, out["prompts"], strict=True) if q["stage"] == "encoder"]
            ).mean()
            dec = torch.stack(
                [x.square().mean() for x, q in zip(d, out["prompts"], strict=True) if q["stage"] == "decoder"]
            ).mean()
            expected = 0.75 * enc + 0.25 * dec
        torch.testing.assert_close(out["aux_losses"]["mir"], expected)


def test_bench_counts_bdl_macs_from_the_layer_table():
    """MACs per pixel by hand from architectures.md §1: head 2·64·9, 2 × (9·32·(64+96+128+160+192) + 224·64),
    tails 64·32·9 + 32·9 = 417,184 (≈ 128 GMAC at 640×480)."""
    from experiments.bench_nets import count

    row = count("bdl", (16, 16), "cpu")
    assert row["params"] == row["trainable"] == 417_730
    assert row["macs_per_px"] == 2 * 64 * 9 + 2 * (9 * 32 * 640 + 224 * 64) + 64 * 32 * 9 + 32 * 9
    assert (
        count("tc_moa_tiny", (32, 32), "cpu")["trainable"] < count("tc_moa_tiny", (32, 32), "cpu")["params"]
    )
