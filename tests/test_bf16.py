"""bf16 autocast: every registered fusion net and task trains and infers under CPU autocast and under CUDA's
autocast policy, emulated on the CPU.

CUDA and CPU autocast disagree on which ops leave bf16: CUDA runs softmax, log_softmax, layer_norm,
group_norm, sum, exp, pow, ... in float32 where CPU autocast keeps bf16. Code that mixes the two dtypes
(scatter, index_add, index_put, in-place writes) then crashes on the GPU only, as the top-k gate of
MoE-Fusion and TC-MoA did (``scatter(): Expected self.dtype to be equal to src.dtype``).
:class:`CudaAutocastPolicy` gives CPU tests CUDA's dtypes at the Python API, so such code fails here first.
"""

from __future__ import annotations

import contextlib
import math

import pytest
import torch
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_map

from fusion.nets import create_fusion_net, fused_output, list_fusion_nets
from fusion.nets.moe_fusion import NoisyTopKGate
from tasks.registry import create_task, list_tasks

pytestmark = pytest.mark.filterwarnings("ignore:TC-MoA. no backbone_ckpt")

#: Ops that CUDA autocast runs in float32 (its "fp32" and "fp32_set_opt_dtype" lists,
#: torch/testing/_internal/autocast_test_lists.py), by their Python names.
CUDA_FP32_OPS = frozenset({
    "acos", "asin", "cosh", "erfinv", "exp", "expm1", "log", "log10", "log2", "log1p", "reciprocal", "rsqrt",
    "sinh", "tan", "pow", "__pow__", "__rpow__", "softmax", "log_softmax", "layer_norm", "rms_norm",
    "group_norm", "norm", "cosine_similarity", "poisson_nll_loss", "cosine_embedding_loss",
    "hinge_embedding_loss", "kl_div", "margin_ranking_loss", "triplet_margin_loss",
    "binary_cross_entropy_with_logits", "cumprod", "cumsum", "dist", "pdist", "cdist", "prod", "renorm",
    "sum", "logsumexp", "softplus", "nll_loss", "nll_loss2d", "l1_loss", "smooth_l1_loss", "huber_loss",
    "mse_loss", "cross_entropy", "multilabel_margin_loss", "soft_margin_loss", "multi_margin_loss",
})


class CudaAutocastPolicy(TorchFunctionMode):
    """Inside a CPU autocast region, run :data:`CUDA_FP32_OPS` on float32 copies of their bf16/fp16 tensor
    arguments, as CUDA autocast does (not when the call fixes ``dtype=``, as CUDA's policy)."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if (
            getattr(func, "__name__", "") in CUDA_FP32_OPS
            and torch.is_autocast_enabled("cpu")
            and kwargs.get("dtype") is None
        ):
            args, kwargs = tree_map(_to_float32, (args, kwargs))
        return func(*args, **kwargs)


def _to_float32(x):
    if isinstance(x, torch.Tensor) and x.dtype in (torch.bfloat16, torch.float16):
        return x.float()
    return x


POLICIES = ("cpu", "cuda_like")


@contextlib.contextmanager
def bf16_autocast(policy: str):
    """``torch.autocast("cpu", bfloat16)``, with CUDA's float32 ops when ``policy == "cuda_like"``."""
    with torch.autocast("cpu", dtype=torch.bfloat16):
        if policy == "cuda_like":
            with CudaAutocastPolicy():
                yield
        else:
            yield


def test_emulation_gives_cuda_dtypes():
    x = torch.randn(4, 8)
    with bf16_autocast("cuda_like"):
        logits = x @ torch.randn(8, 3)
        assert logits.dtype == torch.bfloat16  # matmul stays bf16, as on CUDA
        assert torch.softmax(logits, 1).dtype == torch.float32
        assert logits.softmax(1).dtype == torch.float32
        assert torch.nn.functional.layer_norm(logits, (3,)).dtype == torch.float32
        assert logits.sum().dtype == torch.float32 and (logits**2).dtype == torch.float32
        assert logits.sum(dtype=torch.bfloat16).dtype == torch.bfloat16
    with bf16_autocast("cpu"):
        assert torch.softmax(x @ torch.randn(8, 3), 1).dtype == torch.bfloat16  # why CPU tests passed


# ------------------------------------------------------------------------------------------ the gate
def test_topk_gate_with_cuda_softmax_dtypes(monkeypatch):
    """Regression (issue 12): under CUDA autocast the gate's logits were bf16 and their softmax float32, and
    scattering one into zeros of the other raised ``scatter(): Expected self.dtype to be equal to src.dtype``.
    The gate now routes in float32 whatever autocast does: the same gates as without autocast."""
    gate = NoisyTopKGate(8, num_experts=4, k=2, init_std=1.0).eval()
    x = torch.randn(6, 8)
    ref_gates, ref_balance = gate(x)
    softmax = torch.softmax
    monkeypatch.setattr(torch, "softmax", lambda t, dim, **kw: softmax(t, dim, **kw).float())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        gates, balance = gate(x)
        bf16_gates, _ = gate(x.bfloat16())  # a bf16 input, as the pooled features of a bf16 conv
    assert gates.dtype == bf16_gates.dtype == balance.dtype == torch.float32
    torch.testing.assert_close(gates, ref_gates, rtol=0, atol=0)
    torch.testing.assert_close(balance, ref_balance, rtol=0, atol=0)
    torch.testing.assert_close(bf16_gates, gate(x.bfloat16().float())[0], rtol=0, atol=0)
    gate.train()  # the noisy path (softplus, normal cdf) too, with a gradient back to a bf16 input
    xb = x.bfloat16().requires_grad_(True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        gates, balance = gate(xb)
    (gates.square().sum() + balance).backward()
    assert xb.grad.dtype == torch.bfloat16 and torch.isfinite(xb.grad.float()).all()
    assert gate.w_gate.grad.abs().sum() > 0 and gate.w_noise.grad.abs().sum() > 0


# ------------------------------------------------------------------------------------------ fusion nets
#: Full-size TC-MoA variants keep their widths, heads and patch size but run two blocks per stage (one TC-MoA
#: module each) on 4×4-token windows: the dtype paths are the same in every block and at any window size, and
#: on a CPU without native bf16 (AVX2 only: PyTorch then multiplies bf16 matrices in a scalar loop) 24 ViT-L
#: blocks, or the 224 px padding that 14-token windows need, cost minutes per case.
SHRINK = {name: {"depth": 2, "decoder_depth": 2, "window_size": 4} for name in ("tc_moa", "tc_moa_large")}
NETS = [(name, {}) for name in list_fusion_nets()] + [("moe_fusion_tiny", {"attention": "input"})]
NET_IDS = [name + "".join(f"-{v}" for v in kwargs.values()) for name, kwargs in NETS]


def _route_everywhere(net: torch.nn.Module) -> None:
    for m in net.modules():
        if isinstance(m, NoisyTopKGate):
            m.k = m.num_experts


def _net_inputs(batch: int = 2, size: tuple[int, int] = (32, 40)) -> tuple[torch.Tensor, torch.Tensor, dict]:
    g = torch.Generator().manual_seed(3)
    ir = torch.rand(batch, 1, *size, generator=g)
    vis = torch.rand(batch, 3, *size, generator=g) * torch.linspace(0.3, 1.0, batch).view(-1, 1, 1, 1)
    return ir, vis, {"attention": torch.rand(batch, 1, *size, generator=g)}


@pytest.mark.parametrize("policy", POLICIES)
@pytest.mark.parametrize("name, kwargs", NETS, ids=NET_IDS)
def test_fusion_net_trains_and_infers_in_bf16(name, kwargs, policy, one_thread):
    net = create_fusion_net(name, **SHRINK.get(name, {}), **kwargs)
    _route_everywhere(net)  # every expert and adapter takes part, so every parameter must get a gradient
    # TC-MoA routes tokens, not images: one image of 4×4 tokens (one window; shifted, four masked regions)
    ir, vis, extra = _net_inputs(batch=1, size=(32, 32)) if name in SHRINK else _net_inputs()
    extra = extra if kwargs.get("attention") == "input" else {}
    tasks = [{"task": t} for t in getattr(net, "tasks", ())] or [{}]  # TC-MoA: every task's router
    net.train()
    loss = 0
    with bf16_autocast(policy):
        for task in tasks:
            raw, aux = fused_output(net(ir, vis, **extra, **task))
            loss = loss + raw.float().square().mean() + sum(aux.values())
    loss.backward()
    assert raw.shape[-2:] == ir.shape[-2:] and torch.isfinite(loss)
    trainable = {n: p for n, p in net.named_parameters() if p.requires_grad}
    assert trainable
    bad = [n for n, p in trainable.items() if p.grad is None or not torch.isfinite(p.grad).all()]
    assert not bad, f"parameters without a finite gradient: {bad}"
    assert sum(p.grad.abs().sum() for p in trainable.values()) > 0

    net.eval()
    with torch.no_grad():
        reference, _ = fused_output(net(ir, vis, **extra))
        with bf16_autocast(policy):
            out, aux = fused_output(net(ir, vis, **extra))
    assert out.shape == reference.shape and torch.isfinite(out).all()
    assert all(torch.isfinite(v) for v in aux.values())
    # bf16 keeps ~3 significant digits; a dtype bug (e.g. a loss in bf16 or lost routing) gives far more
    scale = reference.abs().max().clamp_min(1e-3)
    assert (out.float() - reference).abs().max() <= 0.1 * scale


# ------------------------------------------------------------------------------------------ tasks
#: 96 px, not 64: at 64 px FCOS's P7 comes from a 1×1 P6, and oneDNN's bf16 weight gradient of a stride-2
#: convolution on a 1×1 input returns garbage (1e23 or NaN, at random) on the CPU, which no code of ours can
#: avoid.
SIZE = 96
TASK_KWARGS = {"det": {"min_size": SIZE, "max_size": SIZE}, "det_tiny": {"min_size": SIZE, "max_size": SIZE}}


def _task_batch() -> tuple[torch.Tensor, dict]:
    """Two scenes with segmentation labels (255 = ignore) and three boxes, and a fused image."""
    g = torch.Generator().manual_seed(5)
    ir = torch.rand(2, 1, SIZE, SIZE, generator=g)
    vis = torch.rand(2, 3, SIZE, SIZE, generator=g)
    mask = torch.randint(0, 9, (2, SIZE, SIZE), generator=g)
    mask[:, :4] = 255
    batch = {
        "ir": ir,
        "vis": vis,
        "mask": mask,
        "boxes": [torch.tensor([[8.0, 8.0, 40.0, 36.0]]), torch.tensor([[4.0, 20.0, 30.0, 60.0],
                                                                        [30.0, 2.0, 62.0, 28.0]])],
        "labels": [torch.tensor([1]), torch.tensor([0, 2])],
    }
    return (0.5 * ir + 0.5 * vis).clamp(0, 1), batch


@pytest.mark.parametrize("policy", POLICIES)
@pytest.mark.parametrize("name", list_tasks())
def test_task_trains_and_infers_in_bf16(name, policy, one_thread):
    task = create_task(name, **TASK_KWARGS.get(name, {})).train()
    fused, batch = _task_batch()
    with bf16_autocast(policy):
        lower = task.lower_loss(fused, batch)["loss"]
    lower.backward()
    assert torch.isfinite(lower)
    grads = {n: p.grad for n, p in task.named_parameters() if p.requires_grad}
    bad = [n for n, g in grads.items() if g is None or not torch.isfinite(g).all()]
    assert not bad, f"parameters without a finite gradient: {bad}"
    assert sum(g.abs().sum() for g in grads.values()) > 0

    fused = fused.clone().requires_grad_(True)
    with bf16_autocast(policy):
        upper = task.upper_loss(fused, batch)["loss"]
    (grad,) = torch.autograd.grad(upper, fused)
    assert torch.isfinite(upper) and torch.isfinite(grad).all() and grad.abs().sum() > 0

    with bf16_autocast(policy):
        metrics = task.evaluate([(fused.detach(), batch)])
    assert metrics and all(isinstance(v, float) for v in metrics.values())
    headline = {"critic": "gap", "seg": "mIoU", "det": "mAP50"}[task.name]
    assert math.isfinite(metrics[headline])
