"""BDL fusion net: the dilated residual dense network ("DRDB net") of Bi-level Dynamic Learning.

Paper: Z. Liu et al., "Bi-level Dynamic Learning for Jointly Multi-modality Image Fusion and Beyond", IJCAI
2023 (arXiv 2305.06720). Code: ``LiuZhu-CV/BDLFusion`` (``model/fcos_fusion.py``, MIT), whose layer table
this follows; the method as implemented: ``docs/methods.md``.

The net takes cat(ir, Y(vis)) and returns a fused luminance (``out_space = "y"``); the colour helper puts the
visible chroma back. One ``nn.PReLU()`` (a single slope) is shared by every PReLU stage, as in the code, and
the output is unbounded unless ``out_act`` says otherwise. All convolutions are padded to keep the size, so
any H×W works. With the defaults the net has exactly 417,730 parameters.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from fusion.colour import luminance
from fusion.nets.registry import build_net, register_fusion_net

__all__ = ["DRDB", "BDLFusionNet", "bdl", "bdl_tiny", "from_phases", "to_phases"]

OUT_ACTS = ("none", "sigmoid", "clamp")


def _memory_format(x: Tensor) -> torch.memory_format:
    """The layout to keep across the rearrangement (a channels_last net stays channels_last)."""
    channels_last = x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()
    return torch.channels_last if channels_last else torch.contiguous_format


def to_phases(x: Tensor) -> Tensor:
    """(N, C, H, W) with even H and W → (4N, C, H/2, W/2): the four 2×2 polyphase components x[..., p::2, q::2],
    component-major, in the memory format of ``x``.

    A 3×3 convolution with dilation 2 and zero padding 2 on x is an ordinary 3×3 convolution with zero padding 1
    on each component (its taps stay on one component, and the padding falls where the image's would).
    """
    n, c, h, w = x.shape
    out = torch.empty(4 * n, c, h // 2, w // 2, dtype=x.dtype, device=x.device,
                      memory_format=_memory_format(x))
    out.view(2, 2, n, c, h // 2, w // 2).copy_(x.view(n, c, h // 2, 2, w // 2, 2).permute(3, 5, 0, 1, 2, 4))
    return out


def from_phases(y: Tensor) -> Tensor:
    """Inverse of :func:`to_phases`."""
    n, c, h, w = y.shape[0] // 4, y.shape[1], 2 * y.shape[2], 2 * y.shape[3]
    out = torch.empty(n, c, h, w, dtype=y.dtype, device=y.device, memory_format=_memory_format(y))
    out.view(n, c, h // 2, 2, w // 2, 2).permute(3, 5, 0, 1, 2, 4).copy_(y.view(2, 2, n, c, h // 2, w // 2))
    return out


class DRDB(nn.Module):
    """Dilated residual dense block: ``num_layers`` × (3×3 conv, dilation 2, + ReLU) with dense concatenation,
    a 1×1 fusion conv + ReLU back to ``channels``, then a residual add of the block input.

    ``forward(x, phases=True)`` takes :func:`to_phases` components instead of the image and runs the dilated
    convolutions as ordinary ones on them (everything else in the block is pointwise or 1×1, so the block maps
    components to components): the same sums, and on the CPU a 1.3–1.5× faster convolution (forward +
    backward; the forward alone is no faster).
    """

    def __init__(self, channels: int, growth: int, num_layers: int):
        super().__init__()
        self.layers = nn.ModuleList(
            nn.Conv2d(channels + i * growth, growth, 3, padding=2, dilation=2) for i in range(num_layers)
        )
        self.fuse = nn.Conv2d(channels + num_layers * growth, channels, 1)
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x: Tensor, phases: bool = False) -> Tensor:
        feats = x
        for conv in self.layers:
            out = F.conv2d(feats, conv.weight, conv.bias, padding=1) if phases else conv(feats)
            feats = torch.cat((feats, self.relu(out)), dim=1)
        return self.relu(self.fuse(feats)) + x


class BDLFusionNet(nn.Module):
    """BDL's DRDB fusion net (the released code's layers and widths).

    Args:
        features: width of the head and of the DRDB trunk (64).
        growth: dense growth rate inside a DRDB (32).
        num_blocks: number of DRDBs (2).
        num_layers: dense layers per DRDB (5).
        tail_features: width of the first tail conv (32).
        out_act: "none" (the released code: unbounded output), "sigmoid" or "clamp" (to [0, 1]).
        polyphase: run the DRDBs on the 2×2 polyphase components of their input (:func:`to_phases`), where the
            dilated convolutions become ordinary ones — the same sums, so the same values to round-off. ``None``
            (default): on the CPU, whose dilated-convolution backward (oneDNN) is the slow part of training there
            (forward alone takes the same time either way; BENCHMARKS.md); GPUs keep the dilated convolutions
            (not measured there). Odd heights or widths always take the dilated path.
        grad_checkpointing: keep only each DRDB's input for the backward pass and recompute the block there.
            A DRDB's dense concatenations keep about 17× its input's channels alive for the backward pass
            (the five dense convolutions' inputs of 64…192 channels, the 224-channel fusion input and the ReLU
            outputs), which dominates training memory at full resolution; the price is one more forward of the
            blocks per backward pass (the bi-level step runs one backward per row when its aggregator reads
            the rows). Same gradients: the blocks draw no random numbers.
    """

    out_space = "y"

    def __init__(
        self,
        features: int = 64,
        growth: int = 32,
        num_blocks: int = 2,
        num_layers: int = 5,
        tail_features: int = 32,
        out_act: str = "none",
        polyphase: bool | None = None,
        grad_checkpointing: bool = False,
    ):
        super().__init__()
        if out_act not in OUT_ACTS:
            raise ValueError(f"unknown out_act {out_act!r}; expected one of {OUT_ACTS}")
        self.out_act = out_act
        self.polyphase = polyphase
        self.grad_checkpointing = grad_checkpointing
        self.act = nn.PReLU()  # one shared slope, as in the released code
        self.head = nn.Conv2d(2, features, 3, padding=1)
        self.blocks = nn.Sequential(*(DRDB(features, growth, num_layers) for _ in range(num_blocks)))
        self.tail1 = nn.Conv2d(features, tail_features, 3, padding=1)
        self.tail2 = nn.Conv2d(tail_features, 1, 3, padding=1)

    def forward(self, ir: Tensor, vis: Tensor) -> Tensor:
        """Fuse ``ir`` (B,1,H,W) with the luminance of ``vis`` (B,1|3,H,W); returns the fused Y (B,1,H,W)."""
        if ir.dim() != 4 or vis.dim() != 4 or ir.shape[-2:] != vis.shape[-2:]:
            raise ValueError(
                f"expected ir (B,1,H,W) and vis (B,C,H,W) of equal size, got {tuple(ir.shape)}, "
                f"{tuple(vis.shape)}"
            )
        x = self.act(self.head(torch.cat((ir[:, :1], luminance(vis)), dim=1)))
        wanted = x.device.type == "cpu" if self.polyphase is None else self.polyphase
        phases = wanted and x.shape[-2] % 2 == 0 and x.shape[-1] % 2 == 0
        if phases:
            x = to_phases(x)
        for block in self.blocks:
            x = checkpoint(block, x, phases, use_reentrant=False) \
                if self.grad_checkpointing and torch.is_grad_enabled() else block(x, phases)
        if phases:
            x = from_phases(x)
        y = self.act(self.tail2(self.act(self.tail1(x))))
        if self.out_act == "sigmoid":
            return torch.sigmoid(y)
        if self.out_act == "clamp":
            return y.clamp(0.0, 1.0)
        return y


@register_fusion_net
def bdl(**kwargs) -> BDLFusionNet:
    """BDL's DRDB net as released (417,730 parameters)."""
    return build_net(BDLFusionNet, {}, kwargs)


@register_fusion_net
def bdl_tiny(**kwargs) -> BDLFusionNet:
    """A small DRDB net for CPU tests (same topology, 8-channel trunk, 1 block of 2 layers)."""
    return build_net(
        BDLFusionNet, {"features": 8, "growth": 4, "num_blocks": 1, "num_layers": 2, "tail_features": 4}, kwargs
    )
