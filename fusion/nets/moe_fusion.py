"""MoE-Fusion: a mixture of local experts (foreground/background) and a mixture of global experts decoder.

Paper: B. Cao, Y. Sun, P. Zhu, Q. Hu, "Multi-modal Gated Mixture of Local-to-Global Experts for Dynamic Image
Fusion", ICCV 2023. Code: ``SunYM2020/MoE-Fusion`` (``MoELocal`` = MoLE, ``DecMoE`` = MoGE); the method as
implemented: ``docs/methods.md``. Gating: N. Shazeer et al., "Outrageously Large Neural Networks: The
Sparsely-Gated Mixture-of-Experts Layer", ICLR 2017.

Differences from the released code (deliberate design choices):

- **Resolution-agnostic gates.** The original flattens a downsampled 640×480 map into one linear layer; here
  each gate sees global average pooling (``gate_pool="avgmax"`` adds global max pooling) → Linear(C, 4), so
  the net runs at any H×W. Routing stays per image.
- **Weighted-sum combination** Σ_i g_i·E_i(x), as the paper writes; ``combine="logspace"`` reproduces
  the code's log Σ g_i·exp(E_i(x)).
- **Attention source.** The original takes a foreground map from two jointly trained Faster R-CNN streams
  (detached). ``attention="learned"`` (default) uses a small saliency head on the two encoders' features,
  trained end-to-end by the fusion loss; ``attention="input"`` takes a map (B,1,H,W) from the caller
  (``forward(..., attention=map)``), e.g. a detector's map computed in ``experiments/``; it is detached, as in
  the original.

Inputs are grey: the visible image's BT.601 luminance and IR channel 0. The output is one unbounded grey
channel (``out_space = "grey"``). Every layer is a padded convolution, so any H×W works. The forward returns
``{"fused", "aux_losses", "gates", "attention"}``; ``aux_losses`` holds the load-balancing terms already
scaled by ``mole_balance`` (1e-2, each MoLE) and ``moge_balance`` (2e-2).
"""

from __future__ import annotations

import itertools

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fusion.colour import luminance
from fusion.losses import load_balance_loss
from fusion.nets.registry import build_net, register_fusion_net

__all__ = ["MoEFusionNet", "NoisyTopKGate", "combine_experts", "moe_fusion", "moe_fusion_tiny"]

COMBINES = ("sum", "logspace")


class NoisyTopKGate(nn.Module):
    """Noisy top-k gating (Shazeer et al. 2017) over rows of ``x`` (images or tokens).

    logits = x·W_g + ε·(softplus(x·W_n) + ``noise_eps``), ε ~ N(0, 1) in training only; softmax over the k
    kept logits, zeros elsewhere; gates ≤ ``threshold`` are zeroed (TC-MoA uses 1e-4). ``k`` is a plain
    attribute so a test or an analysis can route to every expert by setting it to ``num_experts``.

    Args:
        in_features: size of each gate input row.
        num_experts: number of experts E.
        k: experts kept per row.
        noise_eps: floor of the noise standard deviation (0.01 in MoE-Fusion, 0.1 in TC-MoA).
        threshold: gates at or below this are set to zero.
        init_std: std of the normal init of W_g and W_n; 0 gives the zero init of the reference code.
    """

    def __init__(
        self,
        in_features: int,
        num_experts: int = 4,
        k: int = 2,
        *,
        noise_eps: float = 0.01,
        threshold: float = 0.0,
        init_std: float = 0.0,
    ):
        super().__init__()
        if not 1 <= k <= num_experts:
            raise ValueError(f"k must be in 1..{num_experts}, got {k}")
        self.num_experts, self.k, self.noise_eps, self.threshold = num_experts, k, noise_eps, threshold
        self.w_gate = nn.Parameter(torch.randn(in_features, num_experts) * init_std)
        self.w_noise = nn.Parameter(torch.randn(in_features, num_experts) * init_std)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Gate rows ``x`` (N, in_features) → (gates (N, E), balance loss CV²(importance) + CV²(load)).

        Routing runs with autocast off in at least float32 (float64 stays float64), whatever region the caller
        is in: top-k over bf16 logits ties and flips experts, and the autocast policies disagree (CUDA returns
        softmax in float32, CPU keeps bf16), so a gate computed under autocast mixes dtypes. Gates and the
        balance loss come back in that dtype; a bf16 ``x`` still receives its gradient through the cast.
        """
        dtype = torch.promote_types(x.dtype, torch.float32)
        with torch.autocast(x.device.type, enabled=False):
            return self._route(x.to(dtype))

    def _route(self, x: Tensor) -> tuple[Tensor, Tensor]:
        clean = x @ self.w_gate.to(x.dtype)
        noisy = self.training  # noise only while training; evaluation routes deterministically
        if noisy:
            std = F.softplus(x @ self.w_noise.to(x.dtype)) + self.noise_eps
            logits = clean + torch.randn_like(clean) * std
        else:
            logits = clean
        k = min(self.k, self.num_experts)
        top_logits, top_idx = logits.topk(min(k + 1, self.num_experts), dim=1)
        probs = torch.softmax(top_logits[:, :k], dim=1)
        gates = probs.new_zeros(logits.shape).scatter(1, top_idx[:, :k], probs)
        if self.threshold > 0:
            gates = gates * (gates > self.threshold)
        if noisy and k < self.num_experts:
            load = self._prob_in_top_k(clean, logits, std, top_logits, k).sum(0)
        else:
            load = (gates > 0).sum(0).to(gates.dtype)
        return gates, load_balance_loss(gates.sum(0), load)

    @staticmethod
    def _prob_in_top_k(clean: Tensor, noisy: Tensor, std: Tensor, top: Tensor, k: int) -> Tensor:
        """Smooth estimate of P(expert in top-k) under re-drawn noise (Shazeer et al. 2017, appendix A)."""
        normal = torch.distributions.Normal(clean.new_zeros(()), clean.new_ones(()))
        threshold_if_in = top[:, k : k + 1]  # the (k+1)-th logit: an expert stays in if it beats it
        threshold_if_out = top[:, k - 1 : k]  # the k-th logit: an expert gets in if it beats it
        is_in = noisy > threshold_if_in
        prob_if_in = normal.cdf((clean - threshold_if_in) / std)
        prob_if_out = normal.cdf((clean - threshold_if_out) / std)
        return torch.where(is_in, prob_if_in, prob_if_out)

    def extra_repr(self) -> str:
        return (
            f"in={self.w_gate.shape[0]}, experts={self.num_experts}, k={self.k}, noise_eps={self.noise_eps}"
        )


def combine_experts(
    gates: Tensor,
    experts: nn.ModuleList,
    inputs: list[Tensor],
    out_shape: tuple[int, ...],
    combine: str = "sum",
) -> Tensor:
    """Σ_i g_i·E_i(x_i) over the images each expert was routed to (sparse dispatch, per-image gates).

    ``combine="logspace"`` gives log Σ_i g_i·exp(E_i(x_i)) (the released code's form).
    """
    # accumulate in the wider of the gates' and the inputs' dtypes: under autocast the experts return bf16
    # while the gates are float32, and index_add needs one dtype
    out = inputs[0].new_zeros(out_shape, dtype=torch.promote_types(gates.dtype, inputs[0].dtype))
    for i, expert in enumerate(experts):
        idx = gates[:, i].nonzero().squeeze(1)
        if idx.numel() == 0:
            continue
        y = expert(inputs[i].index_select(0, idx))
        y = y.exp() if combine == "logspace" else y
        g = gates.index_select(0, idx)[:, i].view(-1, *([1] * (y.dim() - 1)))
        out = out.index_add(0, idx, (g * y).to(out.dtype))
    return out.clamp_min(torch.finfo(out.dtype).eps).log() if combine == "logspace" else out


def _pool(x: Tensor, mode: str) -> Tensor:
    avg = x.mean(dim=(-2, -1))
    return torch.cat((avg, x.amax(dim=(-2, -1))), 1) if mode == "avgmax" else avg


class DenseEncoder(nn.Module):
    """conv3×3 1→g + ReLU, then dense convs g→g, 2g→g, 3g→g (3×3, no activation) concatenated to 4g channels.

    Returns the 4g-channel features and x3, the g-channel output of the last dense conv.
    """

    def __init__(self, growth: int):
        super().__init__()
        self.stem = nn.Conv2d(1, growth, 3, padding=1)
        self.dense = nn.ModuleList(nn.Conv2d(growth * (i + 1), growth, 3, padding=1) for i in range(3))

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        feats = F.relu(self.stem(x))
        for conv in self.dense:
            x3 = conv(feats)
            feats = torch.cat((feats, x3), 1)
        return feats, x3


def _expert(cin: int, hidden: int, cout: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, hidden, 3, padding=1), nn.ReLU(inplace=True), nn.Conv2d(hidden, cout, 3, padding=1)
    )


class MoLE(nn.Module):
    """Mixture of local experts on masked features: experts 0–1 see only the visible, 2–3 only the IR
    features."""

    def __init__(self, growth: int, hidden: int, *, k: int, pool: str, combine: str, init_std: float):
        super().__init__()
        self.pool, self.combine = pool, combine
        gate_in = 2 * growth * (2 if pool == "avgmax" else 1)
        self.gate = NoisyTopKGate(gate_in, 4, k, noise_eps=0.01, init_std=init_std)
        self.experts = nn.ModuleList(_expert(growth, hidden, growth) for _ in range(4))

    def forward(self, xv: Tensor, xi: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        gates, balance = self.gate(_pool(torch.cat((xv, xi), 1), self.pool))
        out = combine_experts(gates, self.experts, [xv, xv, xi, xi], tuple(xv.shape), self.combine)
        return out, balance, gates


class MoGE(nn.Module):
    """Mixture of global experts: 4 decoders conv3×3 C→c1→c2→c3→1 (ReLU between, none at the end)."""

    def __init__(
        self, cin: int, channels: tuple[int, int, int], *, k: int, pool: str, combine: str, init_std: float
    ):
        super().__init__()
        self.pool, self.combine = pool, combine
        self.gate = NoisyTopKGate(
            cin * (2 if pool == "avgmax" else 1), 4, k, noise_eps=0.01, init_std=init_std
        )
        widths = (cin, *channels)

        def decoder() -> nn.Sequential:
            layers: list[nn.Module] = []
            for a, b in itertools.pairwise(widths):
                layers += [nn.Conv2d(a, b, 3, padding=1), nn.ReLU(inplace=True)]
            return nn.Sequential(*layers, nn.Conv2d(widths[-1], 1, 3, padding=1))

        self.experts = nn.ModuleList(decoder() for _ in range(4))

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        gates, balance = self.gate(_pool(x, self.pool))
        out = combine_experts(gates, self.experts, [x] * 4, (x.shape[0], 1, *x.shape[-2:]), self.combine)
        return out, balance, gates


class MoEFusionNet(nn.Module):
    """MoE-Fusion (Cao et al., ICCV 2023) with resolution-agnostic gates.

    Args:
        growth: encoder growth g (16); the encoder gives 4g channels per modality, the decoder sees 10g.
        expert_hidden: hidden width of a local expert (8).
        decoder_channels: widths of a global-expert decoder before the 1-channel output ((64, 32, 16)).
        top_k: experts kept per image in every gate (2 of 4).
        gate_pool: "avg" (GAP) or "avgmax" (GAP ‖ GMP) gate inputs.
        combine: "sum" (paper) or "logspace" (released code).
        attention: "learned" (saliency head) or "input" (``forward(..., attention=map)``).
        saliency_hidden: width of the learned saliency head.
        mole_balance: coefficient of each MoLE load-balancing loss (1e-2).
        moge_balance: coefficient of the MoGE load-balancing loss (2e-2).
        gate_init_std: std of the gates' normal init; 0 = the zero init of the reference code (every image is
            routed alike until the gates have trained).
    """

    out_space = "grey"

    def __init__(
        self,
        growth: int = 16,
        expert_hidden: int = 8,
        decoder_channels: tuple[int, int, int] = (64, 32, 16),
        top_k: int = 2,
        gate_pool: str = "avgmax",
        combine: str = "sum",
        attention: str = "learned",
        saliency_hidden: int = 16,
        mole_balance: float = 1e-2,
        moge_balance: float = 2e-2,
        gate_init_std: float = 0.0,
    ):
        super().__init__()
        if gate_pool not in ("avg", "avgmax"):
            raise ValueError(f"unknown gate_pool {gate_pool!r}; expected 'avg' or 'avgmax'")
        if combine not in COMBINES:
            raise ValueError(f"unknown combine {combine!r}; expected one of {COMBINES}")
        if attention not in ("learned", "input"):
            raise ValueError(f"unknown attention {attention!r}; expected 'learned' or 'input'")
        self.attention_mode = attention
        self.mole_balance, self.moge_balance = mole_balance, moge_balance
        self.enc_vis = DenseEncoder(growth)
        self.enc_ir = DenseEncoder(growth)
        self.saliency = (
            nn.Sequential(
                nn.Conv2d(8 * growth, saliency_hidden, 3, padding=1),
                nn.ReLU(inplace=True),
                nn.Conv2d(saliency_hidden, 1, 3, padding=1),
            )
            if attention == "learned"
            else None
        )
        opts = {"k": top_k, "pool": gate_pool, "combine": combine, "init_std": gate_init_std}
        self.mole_fg = MoLE(growth, expert_hidden, **opts)
        self.mole_bg = MoLE(growth, expert_hidden, **opts)
        self.moge = MoGE(10 * growth, tuple(decoder_channels), **opts)

    def _attention(self, fv: Tensor, fi: Tensor, attention: Tensor | None) -> Tensor:
        if self.saliency is not None:
            if attention is not None:
                raise TypeError(
                    "attention= was given but the net was built with attention='learned'; "
                    "build it with attention='input' to use an external map"
                )
            return torch.sigmoid(self.saliency(torch.cat((fv, fi), 1)))
        if attention is None:
            raise ValueError(
                "this net was built with attention='input': pass forward(ir, vis, attention=map)"
            )
        att = attention.unsqueeze(1) if attention.dim() == 3 else attention
        if att.dim() != 4 or att.shape[1] != 1 or att.shape[0] != fv.shape[0]:
            raise ValueError(
                f"attention must be (B,1,H,W) or (B,H,W) with B={fv.shape[0]}, got {tuple(attention.shape)}"
            )
        if att.shape[-2:] != fv.shape[-2:]:
            att = F.interpolate(att, size=fv.shape[-2:], mode="bilinear", align_corners=False)
        return att.detach().to(fv.dtype)

    def forward(self, ir: Tensor, vis: Tensor, attention: Tensor | None = None) -> dict:
        """Fuse IR channel 0 with the visible luminance.

        Args:
            ir: (B, 1, H, W); vis: (B, 1|3, H, W); attention: foreground map for ``attention="input"``.

        Returns:
            ``{"fused": (B,1,H,W), "aux_losses": {"balance_mole_fg", "balance_mole_bg", "balance_moge"},
            "gates": {"mole_fg", "mole_bg", "moge"}: (B, 4) each, "attention": (B,1,H,W)}``.
        """
        if ir.dim() != 4 or vis.dim() != 4 or ir.shape[-2:] != vis.shape[-2:]:
            raise ValueError(
                f"expected ir (B,1,H,W) and vis (B,C,H,W) of equal size, got {tuple(ir.shape)}, "
                f"{tuple(vis.shape)}"
            )
        fv, xv3 = self.enc_vis(luminance(vis))
        fi, xi3 = self.enc_ir(ir[:, :1])
        att = self._attention(fv, fi, attention)
        fg, bal_fg, g_fg = self.mole_fg(xv3 * att, xi3 * att)
        bg, bal_bg, g_bg = self.mole_bg(xv3 * (1 - att), xi3 * (1 - att))
        fused, bal_de, g_de = self.moge(torch.cat((fv, fi, fg, bg), 1))
        return {
            "fused": fused,
            "aux_losses": {
                "balance_mole_fg": self.mole_balance * bal_fg,
                "balance_mole_bg": self.mole_balance * bal_bg,
                "balance_moge": self.moge_balance * bal_de,
            },
            "gates": {"mole_fg": g_fg, "mole_bg": g_bg, "moge": g_de},
            "attention": att,
        }


@register_fusion_net
def moe_fusion(**kwargs) -> MoEFusionNet:
    """MoE-Fusion with the released widths (encoders 64 ch, decoder input 160 ch)."""
    return build_net(MoEFusionNet, {}, kwargs)


@register_fusion_net
def moe_fusion_tiny(**kwargs) -> MoEFusionNet:
    """A small MoE-Fusion for CPU tests (growth 4, expert width 4, decoder (8, 8, 4))."""
    return build_net(
        MoEFusionNet, {"growth": 4, "expert_hidden": 4, "decoder_channels": (8, 8, 4), "saliency_hidden": 4}, kwargs
    )
