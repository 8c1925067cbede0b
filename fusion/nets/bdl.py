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
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from fusion.colour import luminance
from fusion.nets.registry import build_net, register_fusion_net

__all__ = ["DRDB", "BDLFusionNet", "bdl", "bdl_tiny"]

OUT_ACTS = ("none", "sigmoid", "clamp")


class DRDB(nn.Module):
    """Dilated residual dense block: ``num_layers`` × (3×3 conv, dilation 2, + ReLU) with dense concatenation,
    a 1×1 fusion conv + ReLU back to ``channels``, then a residual add of the block input."""

    def __init__(self, channels: int, growth: int, num_layers: int):
        super().__init__()
        self.layers = nn.ModuleList(
            nn.Conv2d(channels + i * growth, growth, 3, padding=2, dilation=2) for i in range(num_layers)
        )
        self.fuse = nn.Conv2d(channels + num_layers * growth, channels, 1)
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x: Tensor) -> Tensor:
        feats = x
        for conv in self.layers:
            feats = torch.cat((feats, self.relu(conv(feats))), dim=1)
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
        grad_checkpointing: bool = False,
    ):
        super().__init__()
        if out_act not in OUT_ACTS:
            raise ValueError(f"unknown out_act {out_act!r}; expected one of {OUT_ACTS}")
        self.out_act = out_act
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
        for block in self.blocks:
            x = checkpoint(block, x, use_reentrant=False) if self.grad_checkpointing and torch.is_grad_enabled() \
                else block(x)
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
