"""Gradient checkpointing of the fusion nets (TC-MoA's ViT blocks, BDL's DRDBs): the same gradients (also over a
retained graph, as the bi-level step's per-row backward passes use it), less memory kept for the backward pass."""

from __future__ import annotations

import pytest
import torch

from fusion.nets import create_fusion_net
from fusion.nets.registry import fused_output


def _grads(name: str, checkpointing: bool, twice: bool = False) -> tuple[dict[str, torch.Tensor], int]:
    torch.manual_seed(0)
    net = create_fusion_net(name, grad_checkpointing=checkpointing).train()
    g = torch.Generator().manual_seed(1)
    ir, vis = torch.rand(2, 1, 32, 32, generator=g), torch.rand(2, 3, 32, 32, generator=g)
    torch.manual_seed(2)       # the routers' noise
    saved = 0

    def pack(t: torch.Tensor) -> torch.Tensor:
        nonlocal saved
        saved += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        raw, aux = fused_output(net(ir, vis))
        loss = raw.square().mean() + sum(aux.values())
    loss.backward(retain_graph=twice)
    if twice:
        loss.backward()
    return {n: p.grad.clone() for n, p in net.named_parameters() if p.grad is not None}, saved


@pytest.mark.parametrize("name", ["tc_moa_tiny", "bdl_tiny"])
def test_checkpointing_keeps_the_gradients_and_saves_memory(one_thread, name) -> None:
    plain, kept_plain = _grads(name, False)
    ckpt, kept_ckpt = _grads(name, True)
    assert plain.keys() == ckpt.keys() and plain
    for key in plain:
        torch.testing.assert_close(ckpt[key], plain[key], rtol=1e-5, atol=1e-7, msg=key)
    assert kept_ckpt < 0.7 * kept_plain
    twice, _ = _grads(name, True, twice=True)                      # a retained graph recomputes again
    for key in plain:
        torch.testing.assert_close(twice[key], 2 * plain[key], rtol=1e-5, atol=1e-7, msg=key)
