"""Mixture-of-experts balance losses: logged on every upper step, and they keep the gates balanced.

Oracle for the second test: the same tiny net trained from the same seed on the same batch with the auxiliary
losses weighted as the fusion loss weighs them (on) or at weight 0 (off); the balance terms at the end must be
clearly smaller with them on — what collapsed gates (all inputs routed to the same experts) show first.
"""

from __future__ import annotations

import csv
import math
from pathlib import Path

import pytest
import torch

from experiments import run
from fusion.losses import create_fusion_loss
from fusion.nets import create_fusion_net
from fusion.nets.registry import fused_output


# The tiny nets (same classes, smaller widths); tests/test_presets.py checks the full TC-MoA's aux at its size.
@pytest.mark.parametrize("net, keys", [("moe_fusion_tiny", ("balance_mole_fg", "balance_mole_bg", "balance_moge")),
                                       ("tc_moa_tiny", ("mir", "balance"))])
def test_every_upper_step_logs_each_aux_loss(tmp_path: Path, net: str, keys: tuple[str, ...]) -> None:
    result = run.main(["--smoke", "--fusion-net", net, "--task", "seg", "--crop", "48", "--out", str(tmp_path),
                       "--wandb", "disabled", "--set", "log.progress=False"])
    with open(result.run_dir / "metrics.csv", newline="") as f:
        rows = [r for r in csv.DictReader(f) if r.get("upper_step")]
    assert len(rows) == result.steps
    for row in rows:
        assert float(row["upper_step"]) == 1.0
        for key in keys:
            assert math.isfinite(float(row[f"loss/aux/{key}"])), (row["step"], key)


def _train(name: str, aux_weight: float, steps: int = 40) -> dict[str, float]:
    torch.manual_seed(0)
    net = create_fusion_net(name)
    loss_fn = create_fusion_loss("max_grad_ssim", aux_weight=aux_weight)
    g = torch.Generator().manual_seed(1)
    ir, vis = torch.rand(4, 1, 32, 32, generator=g), torch.rand(4, 3, 32, 32, generator=g)
    opt = torch.optim.Adam(net.parameters(), lr=3e-3)
    for _ in range(steps):
        raw, aux = fused_output(net(ir, vis))
        opt.zero_grad()
        loss_fn(raw, ir, vis, aux_losses=aux)["loss"].backward()
        opt.step()
    with torch.no_grad():
        return {k: float(v) for k, v in fused_output(net(ir, vis))[1].items()}


@pytest.mark.parametrize("name, balance, factor", [("moe_fusion_tiny", ("balance_mole_fg", "balance_mole_bg",
                                                                           "balance_moge"), 0.9),
                                                   ("tc_moa_tiny", ("balance",), 0.2)])
def test_balance_loss_keeps_the_gates_balanced(one_thread, name: str, balance: tuple[str, ...], factor: float) -> None:
    on, off = _train(name, 1.0), _train(name, 0.0)
    assert sum(on[k] for k in balance) < factor * sum(off[k] for k in balance), (on, off)
