"""experiments.fuse.Fuser: the inference options never change what the plain path computes beyond bf16 rounding."""

from __future__ import annotations

import pytest
import torch

from experiments.fuse import Fuser, fuse_batch
from fusion.nets import create_fusion_net


@pytest.fixture(scope="module")
def pair():
    g = torch.Generator().manual_seed(0)
    return torch.rand(2, 1, 40, 52, generator=g), torch.rand(2, 3, 40, 52, generator=g)


@pytest.mark.parametrize("name", ["bdl", "moe_fusion_tiny", "tc_moa_tiny"])
def test_plain_fuser_equals_fuse_batch(name, pair) -> None:
    torch.manual_seed(0)
    net = create_fusion_net(name).eval()
    ir, vis = pair
    assert torch.equal(Fuser(net)(ir, vis), fuse_batch(net, ir, vis))


def test_channels_last_and_compiled_fuser_match_eager(pair) -> None:
    torch.manual_seed(0)
    net = create_fusion_net("bdl").eval()
    ir, vis = pair
    expected = fuse_batch(net, ir, vis)
    torch.testing.assert_close(Fuser(net, channels_last=True)(ir, vis), expected, rtol=1e-5, atol=1e-5)
    compiled = Fuser(create_fusion_net("bdl").eval(), compile="default", backend="aot_eager")
    compiled.net.load_state_dict(net.state_dict())
    torch.testing.assert_close(compiled(ir, vis), expected, rtol=1e-5, atol=1e-5)
    bf16 = Fuser(net, amp="bf16")(ir, vis)
    assert bf16.dtype == torch.float32 and (bf16 - expected).abs().max() < 0.05


def test_bad_options_are_refused() -> None:
    net = create_fusion_net("bdl_tiny")
    with pytest.raises(ValueError, match="amp"):
        Fuser(net, amp="fp16")
    with pytest.raises(ValueError, match="compile"):
        Fuser(net, compile="fast")


def test_inference_benchmark_runs_on_the_cpu(capsys) -> None:
    """``bench.py infer`` times each asked-for configuration and prints one row each, ratios to the first."""
    from experiments import bench_infer

    configs = ["eager fp32", "eager channels_last"]
    rows = bench_infer.main(["--device", "cpu", "--net", "bdl_tiny", "--size", "32x40", "--iters", "2",
                             "--warmup", "0", "--configs", ",".join(configs)])
    assert [r["config"] for r in rows] == configs and all(r["seconds"] > 0 for r in rows)
    table = capsys.readouterr().out
    assert "× eager fp32" in table and all(f"| {c} |" in table for c in configs)


def test_inference_benchmark_polyphase_switch(capsys) -> None:
    """``--polyphase on|off`` picks the BDL blocks' layout (for a side-by-side GPU run); other nets refuse it."""
    from experiments import bench_infer

    bench_infer.main(["--device", "cpu", "--net", "bdl_tiny", "--size", "32x40", "--iters", "1", "--warmup", "0",
                      "--configs", "eager fp32", "--polyphase", "off"])
    assert capsys.readouterr().out.startswith("bdl_tiny (polyphase off) at 32x40")
    with pytest.raises(SystemExit) as exit_info:
        bench_infer.main(["--device", "cpu", "--net", "moe_fusion_tiny", "--polyphase", "on"])
    assert exit_info.value.code == 2
    assert "--polyphase: net 'moe_fusion_tiny' has no dilated blocks" in capsys.readouterr().err
