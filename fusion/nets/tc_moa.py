"""TC-MoA: task-customized mixtures of adapters on a frozen ViT (MAE) backbone, for general image fusion.

Paper: P. Zhu, Y. Sun, B. Cao, Q. Hu, "Task-Customized Mixture of Adapters for General Image Fusion", CVPR
2024. Code: ``YangSun22/TC-MoA``; the implemented method and its deviations: ``docs/methods.md``. Backbone: K.
He et al., "Masked Autoencoders Are Scalable Vision Learners" (MAE), CVPR 2022; windows: Z. Liu et al., "Swin
Transformer", ICCV 2021.

Data flow. Both sources are made RGB (grey → 3 channels), ImageNet-normalised, upsampled ×``upsample``
(bilinear), padded (replicate) to a multiple of ``patch_size·window_size`` so the token grid tiles into
windows, and embedded by the *same* frozen encoder (siamese). Every block uses window attention with new
trainable relative-position-bias tables (one per pair of blocks) and, on odd blocks, windows shifted by half
a window with the Swin mask (``shift_mask=False`` reproduces the released code, which shifts without a mask).
A TC-MoA module follows block i when (i + ``moa_offset``) mod τ = τ − 1 (τ = 4, offset 2: blocks 1, 5, 9,
...) in the encoder and in the MAE decoder. The x-branch (the visible / first source) of the decoder goes
through the MAE pixel head, is unpatchified, cropped, resized bilinearly to H×W and de-normalised; the output
is unclipped RGB (``out_space = "rgb"``; :func:`fusion.colour.to_image` clamps it and makes it grey for a
grey visible image).

One TC-MoA module (C = stage width): Φ = LN(Linear_{2C→C/4}(LN(f_x ‖ f_y))); the router of the current task
(noisy top-2 of 4 per token, zero init) mixes 4 shared adapters C/4 → C/32 → C/4; the two halves of the
mixture give prompts p_x, p_y = sigmoid(channel mean); h = p⊙f + S (learnable source embeddings per task, real
parameters); f_TC = ConvFusion(h_x + h_y) (1×1, 3×3, 1×1, no bias); f′ = α·f_TC + (1 − α)·f with a learnable α
(init 0.5); decoder modules optionally re-standardise f′ to f's per-sample mean and std.

Runtime controls: ``forward(ir, vis, task=None|"vif"|"mef"|"mff"|an index, bias_alpha=None, bias_beta=None)``;
``task=None`` uses the net's default router ``task`` (a constructor argument, so a checkpoint keeps it; the
runner sets it from its data's task with :meth:`TCMoANet.select_task`, so ``fuse.py`` on the checkpoint uses
the router it was trained with).
The intensity-bias control is the paper's Eq. 8 with μ = 0.5, p′_x = μ + α(p_x − μ) + β, p′_y = μ + α(p_y −
μ) − β, applied to the prompts of every module (:func:`apply_intensity_bias`); α = 1, β = 0 is the identity.
The net's ``bias_alpha``/``bias_beta`` attributes (constructor arguments, so a checkpoint keeps them) are the
defaults, and the forward's arguments override them for one call. Passing another task's name swaps routers.
For MEF/MFF pass the two images as ``vis`` (x, decoded) and ``ir`` (y); either may have 1 or 3 channels.

Tiled inference: in eval mode an image is fused in overlapping tiles of at most ``tile_size`` pixels
(default 448, the paper's training crop and inference window: 4×4 attention windows after the ×2 upsampling),
so the position table is never stretched beyond the scale the net was trained at. Neighbouring tiles share at
least ``tile_overlap`` pixels and are blended with weights that ramp down towards each tile's edges and are
normalised to sum to one per pixel, so tiles that agree are reproduced to rounding (a constant stays that
constant). ``tile_size=0`` fuses the whole image at once. Training (``net.train()``) never tiles: crops are
the caller's choice.

Backbone weights: the toolkit runs offline. ``backbone_ckpt=None`` gives a random backbone (with a warning);
a local MAE checkpoint path is loaded by name through :func:`mae_key_map` (MAE's cls token, mask token and
position tables are dropped: positions are fixed sin-cos tables rebuilt here). Both the official full layout
(encoder, decoder and pixel head, as TC-MoA uses) and encoder-only checkpoints load; missing and unexpected
keys are reported (a warning, and :meth:`TCMoANet.load_backbone`'s return value), a shape mismatch is an
error.
``freeze_backbone`` freezes the backbone module, not names matched in a checkpoint.

Outputs: ``{"fused": (B,3,H,W), "aux_losses": {"mir", "balance"}, "prompts": [per module dict]}``. ``mir`` is
the mutual-information regularisation on the unbiased prompts (``mir="code"``: 0.75·MSE over encoder prompts +
0.25·MSE over decoder prompts; ``"paper"``: mean |p_x + p_y − 1|); ``balance`` is ``balance_weight`` (1e-3) ×
Σ_modules (CV²(importance) + CV²(load)) of the active routers (the code's division by epoch + 1 is left to the
trainer). A tiled forward averages the auxiliary losses over the tiles and tags each prompt dict with its
tile's ``(top, left)``.
"""

from __future__ import annotations

import math
import re
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from fusion.colour import as_rgb
from fusion.losses import mir_loss
from fusion.nets.moe_fusion import NoisyTopKGate
from fusion.nets.registry import build_net, register_fusion_net

__all__ = [
    "TCMoAModule",
    "TCMoANet",
    "apply_intensity_bias",
    "blend_ramp",
    "mae_key_map",
    "moa_positions",
    "sincos_pos_embed",
    "tc_moa",
    "tc_moa_large",
    "tc_moa_tiny",
    "tile_starts",
]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
TASKS = ("vif", "mef", "mff")
MAE_IGNORED_KEYS = ("cls_token", "pos_embed", "mask_token", "decoder_pos_embed")


# ----------------------------------------------------------------------------------------------- helpers
def sincos_pos_embed(dim: int, grid_h: int, grid_w: int) -> Tensor:
    """MAE's fixed 2-D sine-cosine position table, (grid_h·grid_w, dim), half the channels per axis."""
    if dim % 4:
        raise ValueError(f"sin-cos position embedding needs dim divisible by 4, got {dim}")
    omega = 1.0 / 10000 ** (torch.arange(dim // 4, dtype=torch.float64) / (dim / 4))

    def embed_1d(pos: Tensor) -> Tensor:
        out = pos.reshape(-1, 1).double() * omega
        return torch.cat((out.sin(), out.cos()), 1)

    gw, gh = torch.meshgrid(torch.arange(grid_w), torch.arange(grid_h), indexing="xy")
    return torch.cat((embed_1d(gw), embed_1d(gh)), 1).float()


def moa_positions(depth: int, tau: int, offset: int = 2) -> list[int]:
    """Blocks followed by a TC-MoA module: (i + offset) mod τ = τ − 1 (τ = 4, offset 2 → 1, 5, 9, ...)."""
    return [i for i in range(depth) if (i + offset) % tau == tau - 1]


def apply_intensity_bias(
    p_x: Tensor, p_y: Tensor, alpha: float | Tensor = 1.0, beta: float | Tensor = 0.0, mu: float = 0.5
) -> tuple[Tensor, Tensor]:
    """TC-MoA Eq. 8: p′_x = μ + α(p_x − μ) + β, p′_y = μ + α(p_y − μ) − β.

    α scales the prompts' deviation from μ (the strength of the dominant source); β shifts intensity towards x
    (β > 0) or y. ``alpha``/``beta`` may be floats or per-sample tensors (B,), broadcast over the tokens.
    """
    if isinstance(alpha, Tensor) and alpha.dim() == 1:
        alpha = alpha.view(-1, *([1] * (p_x.dim() - 1)))
    if isinstance(beta, Tensor) and beta.dim() == 1:
        beta = beta.view(-1, *([1] * (p_x.dim() - 1)))
    return mu + alpha * (p_x - mu) + beta, mu + alpha * (p_y - mu) - beta


def mae_key_map(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """Map an MAE checkpoint's state dict onto :class:`MAEBackbone` keys.

    Accepts ``{"model": state}`` (the official release) and ``{"state_dict": state}`` wrappers, strips
    ``module.`` prefixes, and drops the keys this backbone rebuilds itself (:data:`MAE_IGNORED_KEYS`). Other
    keys pass unchanged: MAE's names are the backbone's, so a key that does not match is reported by the
    loader.
    """
    for wrapper in ("model", "state_dict"):
        if isinstance(state.get(wrapper), dict):
            state = state[wrapper]
            break
    out = {}
    for key, value in state.items():
        key = key.removeprefix("module.")
        if key in MAE_IGNORED_KEYS:
            continue
        out[key] = value
    return out


def tile_starts(length: int, tile: int, overlap: int) -> list[int]:
    """Start offsets of the fewest tiles of ``min(tile, length)`` pixels that cover ``[0, length)`` with at
    least ``overlap`` pixels shared by neighbours, spread evenly (the first at 0, the last flush with the
    end)."""
    if length <= tile:
        return [0]
    n = math.ceil((length - overlap) / (tile - overlap))
    return [round(i * (length - tile) / (n - 1)) for i in range(n)]


def blend_ramp(n: int, overlap: int) -> Tensor:
    """1-D blending weights of a tile of ``n`` pixels: 1 inside, falling linearly over the ``overlap``
    pixels next to each edge, never 0 (so every pixel of the image gets a positive total weight)."""
    i = torch.arange(n, dtype=torch.float64)
    return (torch.minimum(i + 1, n - i).clamp(max=overlap + 1) / (overlap + 1)).float()


def _window_partition(x: Tensor, w: int) -> Tensor:
    b, h, wd, c = x.shape
    return x.view(b, h // w, w, wd // w, w, c).permute(0, 1, 3, 2, 4, 5).reshape(-1, w * w, c)


def _window_reverse(windows: Tensor, w: int, b: int, h: int, wd: int) -> Tensor:
    c = windows.shape[-1]
    return windows.view(b, h // w, wd // w, w, w, c).permute(0, 1, 3, 2, 4, 5).reshape(b, h, wd, c)


def _relative_position_index(w: int) -> Tensor:
    coords = torch.stack(torch.meshgrid(torch.arange(w), torch.arange(w), indexing="ij")).flatten(1)
    rel = (coords[:, :, None] - coords[:, None, :]).permute(1, 2, 0) + (w - 1)
    return rel[..., 0] * (2 * w - 1) + rel[..., 1]  # (w², w²)


def _shift_mask(h: int, wd: int, w: int, s: int, device: torch.device) -> Tensor:
    """Swin's mask for shifted windows: −100 between tokens that came from different image regions. (nW, N,
    N)."""
    img = torch.zeros(1, h, wd, 1, device=device)
    cnt = 0
    for hs in (slice(0, -w), slice(-w, -s), slice(-s, None)):
        for ws in (slice(0, -w), slice(-w, -s), slice(-s, None)):
            img[:, hs, ws, :] = cnt
            cnt += 1
    win = _window_partition(img, w).squeeze(-1)
    diff = win[:, None, :] - win[:, :, None]
    return torch.zeros_like(diff).masked_fill(diff != 0, -100.0)


# ------------------------------------------------------------------------------------------------ blocks
class Attention(nn.Module):
    """Multi-head self-attention with an additive bias (MAE/timm key names ``qkv``, ``proj``)."""

    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, dim * 3)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: Tensor, bias: Tensor) -> Tensor:
        b, n, c = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, self.num_heads, c // self.num_heads).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)
        return self.proj(out.transpose(1, 2).reshape(b, n, c))


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
    """A pre-norm ViT block (MAE key names) applied with (shifted) window attention on a (B, H, W, C) token
    map."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, num_heads)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))

    def forward(self, x: Tensor, window: int, shift: int, rel_bias: Tensor, mask: Tensor | None) -> Tensor:
        b, h, wd, _ = x.shape
        y = self.norm1(x)
        if shift:
            y = torch.roll(y, (-shift, -shift), (1, 2))
        windows = _window_partition(y, window)  # (B·nW, N, C)
        bias = rel_bias.unsqueeze(0)  # (1, heads, N, N)
        if mask is not None:  # (nW, N, N) → per window, repeated over the batch
            bias = (bias + mask.unsqueeze(1)).repeat(b, 1, 1, 1)
        y = _window_reverse(self.attn(windows, bias.to(y.dtype)), window, b, h, wd)
        if shift:
            y = torch.roll(y, (shift, shift), (1, 2))
        x = x + y
        return x + self.mlp(self.norm2(x))


class PatchEmbed(nn.Module):
    def __init__(self, patch_size: int, dim: int):
        super().__init__()
        self.proj = nn.Conv2d(3, dim, patch_size, stride=patch_size)

    def forward(self, x: Tensor) -> Tensor:
        return self.proj(x).permute(0, 2, 3, 1)  # (B, Gh, Gw, C)


class MAEBackbone(nn.Module):
    """The MAE encoder + decoder + pixel head, with MAE's state-dict key names (minus cls/mask/position
    keys)."""

    def __init__(
        self,
        patch_size: int,
        embed_dim: int,
        depth: int,
        num_heads: int,
        decoder_dim: int,
        decoder_depth: int,
        decoder_heads: int,
        mlp_ratio: float,
    ):
        super().__init__()
        self.patch_embed = PatchEmbed(patch_size, embed_dim)
        self.blocks = nn.ModuleList(Block(embed_dim, num_heads, mlp_ratio) for _ in range(depth))
        self.norm = nn.LayerNorm(embed_dim, eps=1e-6)
        self.decoder_embed = nn.Linear(embed_dim, decoder_dim)
        self.decoder_blocks = nn.ModuleList(
            Block(decoder_dim, decoder_heads, mlp_ratio) for _ in range(decoder_depth)
        )
        self.decoder_norm = nn.LayerNorm(decoder_dim, eps=1e-6)
        self.decoder_pred = nn.Linear(decoder_dim, patch_size**2 * 3)
        self.apply(self._init)

    @staticmethod
    def _init(
        m: nn.Module,
    ) -> None:  # MAE's initialisation, so a random backbone behaves like MAE's untrained one
        if isinstance(m, nn.Linear):
            nn.init.xavier_uniform_(m.weight)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Conv2d):
            nn.init.xavier_uniform_(m.weight.view(m.weight.shape[0], -1))
            nn.init.zeros_(m.bias)


class TCMoAModule(nn.Module):
    """One task-customized mixture of adapters (TC-MoA paper §3, Fig. 3) acting on two (B, H, W, C) token
    maps.

    Args:
        dim: stage width C (divisible by 32).
        num_tasks: number of per-task routers (and source-embedding pairs).
        num_experts: shared adapters (4).
        top_k: adapters kept per token (2).
        combine: "sum" (Σ g·A(Φ)) or "logspace" (log Σ g·exp(A(Φ)), the code's form).
        restandardize: re-standardise the mixed features to the pre-mix per-sample mean/std (decoder, code
        2025).
    """

    def __init__(
        self,
        dim: int,
        num_tasks: int,
        num_experts: int = 4,
        top_k: int = 2,
        combine: str = "sum",
        restandardize: bool = False,
    ):
        super().__init__()
        if dim % 32:
            raise ValueError(f"TC-MoA modules need a width divisible by 32, got {dim}")
        r = dim // 4
        self.combine, self.restandardize = combine, restandardize
        self.norm_in = nn.LayerNorm(2 * dim)
        self.reduce = nn.Linear(2 * dim, r, bias=False)
        self.norm_out = nn.LayerNorm(r)
        self.routers = nn.ModuleList(
            NoisyTopKGate(r, num_experts, top_k, noise_eps=0.1, threshold=1e-4) for _ in range(num_tasks)
        )
        self.adapters = nn.ModuleList(
            nn.Sequential(nn.Linear(r, dim // 32), nn.ReLU(inplace=True), nn.Linear(dim // 32, r))
            for _ in range(num_experts)
        )
        self.source_embed = nn.Parameter(torch.randn(num_tasks, 2, dim) * 0.02)
        self.conv_fusion = nn.Sequential(
            nn.Conv2d(dim, r, 1, bias=False),
            nn.Conv2d(r, r, 3, padding=1, bias=False),
            nn.Conv2d(r, dim, 1, bias=False),
        )
        self.alpha = nn.Parameter(torch.tensor(0.5))

    def forward(
        self,
        fx: Tensor,
        fy: Tensor,
        task: int,
        bias_alpha: float | Tensor = 1.0,
        bias_beta: float | Tensor = 0.0,
    ) -> tuple[Tensor, Tensor, dict]:
        """Mix (B, H, W, C) maps ``fx``, ``fy``; returns the new maps and ``{p_x, p_y, p_x_raw, p_y_raw,
        balance}``."""
        b, h, w, c = fx.shape
        phi = self.norm_out(self.reduce(self.norm_in(torch.cat((fx, fy), -1)))).reshape(-1, c // 4)
        gates, balance = self.routers[task](phi)
        outs = torch.stack([adapter(phi) for adapter in self.adapters], 1)  # (N, E, C/4)
        if self.combine == "logspace":
            mixed = (gates.unsqueeze(-1) * outs.exp()).sum(1).clamp_min(torch.finfo(outs.dtype).eps).log()
        else:
            mixed = (gates.unsqueeze(-1) * outs).sum(1)
        half = c // 8
        px_raw = torch.sigmoid(mixed[:, :half].mean(-1)).view(b, h, w)
        py_raw = torch.sigmoid(mixed[:, half:].mean(-1)).view(b, h, w)
        px, py = apply_intensity_bias(px_raw, py_raw, bias_alpha, bias_beta)
        hx = px.unsqueeze(-1) * fx + self.source_embed[task, 0]
        hy = py.unsqueeze(-1) * fy + self.source_embed[task, 1]
        f_tc = self.conv_fusion((hx + hy).permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
        new_x = self.alpha * f_tc + (1 - self.alpha) * fx
        new_y = self.alpha * f_tc + (1 - self.alpha) * fy
        if self.restandardize:
            new_x, new_y = _restandardize(new_x, fx), _restandardize(new_y, fy)
        return new_x, new_y, {"p_x": px, "p_y": py, "p_x_raw": px_raw, "p_y_raw": py_raw, "balance": balance}


def _restandardize(x: Tensor, ref: Tensor, eps: float = 1e-6) -> Tensor:
    dims = tuple(range(1, x.dim()))
    mu, sd = x.mean(dims, keepdim=True), x.std(dims, keepdim=True)
    return (x - mu) / (sd + eps) * ref.std(dims, keepdim=True) + ref.mean(dims, keepdim=True)


# ----------------------------------------------------------------------------------------------------- net
class TCMoANet(nn.Module):
    """TC-MoA (Zhu et al., CVPR 2024) on an MAE ViT backbone with window attention.

    Args:
        patch_size: ViT patch size (16).
        embed_dim, depth, num_heads: encoder width, blocks, heads (ViT-B: 768, 12, 12).
        decoder_dim, decoder_depth, decoder_heads: MAE decoder (512, 8, 16).
        mlp_ratio: MLP hidden ratio (4).
        window_size: attention window in tokens (14).
        shift_windows: shift odd blocks' windows by half a window.
        shift_mask: apply the Swin mask to shifted windows (``False`` = the released code).
        pos_grid: side of MAE's fixed position table (14 = 224/16), bicubically resized to the token grid.
        upsample: bilinear input upsampling factor (2) before patching.
        tau, moa_offset: insertion rule (i + offset) mod τ = τ − 1.
        tasks: router names (one router per task; the count is free).
        task: the default router, used when ``forward`` gets no ``task`` (one of ``tasks``).
        num_experts, top_k: shared adapters and adapters kept per token (4, 2).
        combine: "sum" or "logspace" adapter mixing.
        decoder_restandardize: re-standardise decoder modules' outputs (code 2025; not in the paper).
        mir: "code" (0.75/0.25 MSE, encoder/decoder) or "paper" (mean |p_x + p_y − 1|).
        balance_weight: coefficient of the routers' balance loss (1e-3).
        backbone_ckpt: local MAE checkpoint path (full or encoder-only), or ``None`` for a random backbone
            (warns).
        freeze_backbone: freeze the backbone module (default; the paper trains only the TC-MoA parts and the
            relative-position tables).
        bias_alpha, bias_beta: default α, β of the intensity-bias control (Eq. 8; 1, 0 = off).
        tile_size: largest tile side (pixels) of tiled inference in eval mode (448); 0 = never tile.
        tile_overlap: least overlap (pixels) of neighbouring tiles (112).
        grad_checkpointing: recompute each ViT block's activations in the backward pass instead of keeping
            them (``torch.utils.checkpoint``): with the ×2-upsampled token grid they are the bulk of training
            memory. Same gradients, at the cost of one more forward of the blocks.
    """

    out_space = "rgb"

    def __init__(
        self,
        patch_size: int = 16,
        embed_dim: int = 768,
        depth: int = 12,
        num_heads: int = 12,
        decoder_dim: int = 512,
        decoder_depth: int = 8,
        decoder_heads: int = 16,
        mlp_ratio: float = 4.0,
        window_size: int = 14,
        shift_windows: bool = True,
        shift_mask: bool = True,
        pos_grid: int = 14,
        upsample: int = 2,
        tau: int = 4,
        moa_offset: int = 2,
        tasks: tuple[str, ...] = TASKS,
        task: str = "vif",
        num_experts: int = 4,
        top_k: int = 2,
        combine: str = "sum",
        decoder_restandardize: bool = True,
        mir: str = "code",
        balance_weight: float = 1e-3,
        backbone_ckpt: str | None = None,
        freeze_backbone: bool = True,
        bias_alpha: float = 1.0,
        bias_beta: float = 0.0,
        tile_size: int = 448,
        tile_overlap: int = 112,
        grad_checkpointing: bool = False,
    ):
        super().__init__()
        if combine not in ("sum", "logspace"):
            raise ValueError(f"unknown combine {combine!r}; expected 'sum' or 'logspace'")
        if mir not in ("code", "paper"):
            raise ValueError(f"unknown mir {mir!r}; expected 'code' or 'paper'")
        if tile_size < 0 or (tile_size and not 0 <= tile_overlap < tile_size):
            raise ValueError(
                f"need tile_size >= 0 and 0 <= tile_overlap < tile_size, got {tile_size}, {tile_overlap}"
            )
        self.bias_alpha, self.bias_beta = bias_alpha, bias_beta
        self.tile_size, self.tile_overlap = tile_size, tile_overlap
        self.grad_checkpointing = grad_checkpointing
        self.patch_size, self.window_size, self.upsample = patch_size, window_size, upsample
        self.shift_windows, self.shift_mask, self.pos_grid = shift_windows, shift_mask, pos_grid
        self.tasks, self.mir, self.balance_weight = tuple(tasks), mir, balance_weight
        self.task = self.tasks[self._task_index(task)]
        self.backbone = MAEBackbone(
            patch_size, embed_dim, depth, num_heads, decoder_dim, decoder_depth, decoder_heads, mlp_ratio
        )
        self.register_buffer("pos_embed", sincos_pos_embed(embed_dim, pos_grid, pos_grid), persistent=False)
        self.register_buffer(
            "decoder_pos_embed", sincos_pos_embed(decoder_dim, pos_grid, pos_grid), persistent=False
        )
        self.register_buffer("rel_index", _relative_position_index(window_size), persistent=False)
        self.register_buffer("pixel_mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("pixel_std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)
        table = (2 * window_size - 1) ** 2
        self.rel_pos = nn.ParameterList(
            nn.Parameter(nn.init.trunc_normal_(torch.empty(table, num_heads), std=0.02))
            for _ in range(math.ceil(depth / 2))
        )
        self.decoder_rel_pos = nn.ParameterList(
            nn.Parameter(nn.init.trunc_normal_(torch.empty(table, decoder_heads), std=0.02))
            for _ in range(math.ceil(decoder_depth / 2))
        )
        opts = {"num_tasks": len(self.tasks), "num_experts": num_experts, "top_k": top_k, "combine": combine}
        self.moa = nn.ModuleDict(
            {str(i): TCMoAModule(embed_dim, **opts) for i in moa_positions(depth, tau, moa_offset)}
        )
        self.decoder_moa = nn.ModuleDict(
            {
                str(i): TCMoAModule(decoder_dim, restandardize=decoder_restandardize, **opts)
                for i in moa_positions(decoder_depth, tau, moa_offset)
            }
        )
        if backbone_ckpt is None:
            warnings.warn(
                "TC-MoA: no backbone_ckpt given, the ViT backbone is randomly initialised (fine for tests; "
                "load a local MAE checkpoint for real fusion, or ignore if a full state dict follows)",
                stacklevel=3,
            )
        else:
            self.load_backbone(backbone_ckpt)
        if freeze_backbone:
            self.backbone.requires_grad_(False)

    def load_backbone(self, path: str | Path) -> nn.modules.module._IncompatibleKeys:
        """Load a local MAE checkpoint (``{"model": state}``, ``{"state_dict": state}`` or a bare state dict)
        into the backbone by name.

        The official full layout (encoder, decoder, pixel head) fills the whole backbone; an encoder-only
        checkpoint (MAE's pre-training release) leaves the decoder and pixel head at their initialisation.
        Missing and unexpected keys are not errors (they are warned about, block indices collapsed to ``*``,
        and returned as ``(missing_keys, unexpected_keys)``); a tensor whose shape differs from the
        backbone's is: it means a checkpoint of another architecture.

        Raises:
            FileNotFoundError: no file at ``path``.
            ValueError: shape mismatches, all listed.
        """
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(
                f"backbone_ckpt {str(path)!r} does not exist (when rebuilding a saved net, "
                f"pass backbone_ckpt=None: its weights come from the checkpoint's state dict)"
            )
        state = mae_key_map(torch.load(path, map_location="cpu", weights_only=True))
        own = self.backbone.state_dict()
        mismatched = [
            f"{k}: checkpoint {tuple(v.shape)}, backbone {tuple(own[k].shape)}"
            for k, v in state.items()
            if k in own and v.shape != own[k].shape
        ]
        if mismatched:
            raise ValueError(f"{path}: shapes differ from this backbone: " + "; ".join(mismatched))
        result = self.backbone.load_state_dict(state, strict=False)

        def collapse(keys: list[str]) -> str:
            return ", ".join(sorted({re.sub(r"\.\d+\.", ".*.", k) for k in keys}))

        if result.missing_keys or result.unexpected_keys:
            warnings.warn(
                f"TC-MoA backbone from {path}: {len(result.missing_keys)} missing keys kept at their "
                f"initialisation ({collapse(result.missing_keys) or '-'}); {len(result.unexpected_keys)} "
                f"unexpected keys ignored ({collapse(result.unexpected_keys) or '-'})",
                stacklevel=2,
            )
        return result

    def select_task(self, task: str) -> None:
        """Make ``task`` the default router, also in ``.config`` so that a checkpoint rebuilds the net with it.

        Raises:
            ValueError: the net has no router named ``task``.
        """
        self.task = self.tasks[self._task_index(task)]
        if isinstance(getattr(self, "config", None), dict):
            self.config["task"] = self.task

    def _task_index(self, task: str | int) -> int:
        if isinstance(task, int):
            if not 0 <= task < len(self.tasks):
                raise ValueError(f"task index {task} out of range for tasks {self.tasks}")
            return task
        if task not in self.tasks:
            raise ValueError(f"unknown task {task!r}; this net has routers for {self.tasks}")
        return self.tasks.index(task)

    def _pos(self, table: Tensor, gh: int, gw: int) -> Tensor:
        g = self.pos_grid
        if (gh, gw) == (g, g):
            return table.view(g, g, -1)
        grid = table.view(1, g, g, -1).permute(0, 3, 1, 2)
        return F.interpolate(grid, size=(gh, gw), mode="bicubic", align_corners=False)[0].permute(1, 2, 0)

    def _stage(
        self,
        fx: Tensor,
        fy: Tensor,
        blocks: nn.ModuleList,
        tables: nn.ParameterList,
        moa: nn.ModuleDict,
        stage: str,
        task: int,
        bias_alpha,
        bias_beta,
        prompts: list,
    ) -> tuple[Tensor, Tensor, Tensor]:
        _, gh, gw, _ = fx.shape
        w = self.window_size
        shift = w // 2 if self.shift_windows else 0
        mask = _shift_mask(gh, gw, w, shift, fx.device) if shift and self.shift_mask else None
        n = w * w
        balance = fx.new_zeros(())
        # the decoder's y branch only feeds the decoder modules: stop it after the last one
        y_until = len(blocks) if stage == "encoder" else max((int(k) for k in moa), default=-1)
        if self.grad_checkpointing and torch.is_grad_enabled():
            def run(blk, *args):    # the blocks draw no random numbers: recomputing them is exact
                return checkpoint(blk, *args, use_reentrant=False)
        else:
            def run(blk, *args):
                return blk(*args)
        for i, block in enumerate(blocks):
            rel = tables[i // 2][self.rel_index.view(-1)].view(n, n, -1).permute(2, 0, 1)
            s = shift if i % 2 else 0
            m = mask if s else None
            fx = run(block, fx, w, s, rel, m)
            if i <= y_until:
                fy = run(block, fy, w, s, rel, m)
            if str(i) in moa:
                fx, fy, info = moa[str(i)](fx, fy, task, bias_alpha, bias_beta)
                balance = balance + info.pop("balance")
                prompts.append({"stage": stage, "block": i, **info})
        return fx, fy, balance

    def forward(
        self,
        ir: Tensor,
        vis: Tensor,
        task: str | int | None = None,
        bias_alpha: float | Tensor | None = None,
        bias_beta: float | Tensor | None = None,
    ) -> dict:
        """Fuse two images; see the module docstring for the controls.

        Args:
            ir: (B, 1|3, H, W), the y source (IR, or the second exposure/focus image).
            vis: (B, 1|3, H, W), the x source, decoded into the output.
            task: router to use ("vif", "mef", "mff", or an index); ``None``: the net's ``task``.
            bias_alpha, bias_beta: α, β of Eq. 8 for this call (floats or per-sample (B,) tensors); ``None``
                uses the net's ``bias_alpha``/``bias_beta`` attributes.

        Returns:
            ``{"fused": (B, 3, H, W) unclipped RGB, "aux_losses": {"mir", "balance"}, "prompts": [...]}``.
        """
        if ir.dim() != 4 or vis.dim() != 4 or ir.shape[-2:] != vis.shape[-2:] or ir.shape[0] != vis.shape[0]:
            raise ValueError(
                f"expected ir and vis (B, 1|3, H, W) of equal size, got {tuple(ir.shape)}, {tuple(vis.shape)}"
            )
        t = self._task_index(self.task if task is None else task)
        alpha = self.bias_alpha if bias_alpha is None else bias_alpha
        beta = self.bias_beta if bias_beta is None else bias_beta
        if self.training or not self.tile_size:
            return self._fuse(ir, vis, t, alpha, beta)
        return self._fuse_tiled(ir, vis, t, alpha, beta)

    def _fuse_tiled(
        self, ir: Tensor, vis: Tensor, t: int, alpha: float | Tensor, beta: float | Tensor
    ) -> dict:
        """Fuse overlapping tiles (:func:`tile_starts`) and blend them with normalised :func:`blend_ramp`
        weights; the auxiliary losses are the tiles' mean."""
        h, w = vis.shape[-2:]
        th, tw = min(self.tile_size, h), min(self.tile_size, w)
        ov = self.tile_overlap
        weight = (blend_ramp(th, ov)[:, None] * blend_ramp(tw, ov)[None, :]).to(vis.device)
        fused = total = None
        aux: dict[str, Tensor] = {}
        prompts: list[dict] = []
        tiles = [(y, x) for y in tile_starts(h, th, ov) for x in tile_starts(w, tw, ov)]
        for top, left in tiles:
            window = (..., slice(top, top + th), slice(left, left + tw))
            out = self._fuse(ir[window], vis[window], t, alpha, beta)
            if fused is None:
                dtype = torch.promote_types(out["fused"].dtype, weight.dtype)
                fused = out["fused"].new_zeros(*out["fused"].shape[:2], h, w, dtype=dtype)
                total = weight.new_zeros(h, w)
            fused[window] += out["fused"] * weight
            total[window] += weight
            for k, v in out["aux_losses"].items():
                aux[k] = aux.get(k, 0) + v / len(tiles)
            prompts += [{**q, "tile": (top, left)} for q in out["prompts"]]
        return {"fused": fused / total, "aux_losses": aux, "prompts": prompts}

    def _fuse(
        self, ir: Tensor, vis: Tensor, t: int, bias_alpha: float | Tensor, bias_beta: float | Tensor
    ) -> dict:
        """The untiled forward on one (B, ·, H, W) pair, task index ``t``."""
        h, w = vis.shape[-2:]
        x = (as_rgb(vis) - self.pixel_mean) / self.pixel_std
        y = (as_rgb(ir) - self.pixel_mean) / self.pixel_std
        uh, uw = h * self.upsample, w * self.upsample
        if self.upsample != 1:
            x = F.interpolate(x, size=(uh, uw), mode="bilinear", align_corners=False)
            y = F.interpolate(y, size=(uh, uw), mode="bilinear", align_corners=False)
        unit = self.patch_size * self.window_size
        ph, pw = -uh % unit, -uw % unit
        if ph or pw:
            x = F.pad(x, (0, pw, 0, ph), mode="replicate")
            y = F.pad(y, (0, pw, 0, ph), mode="replicate")

        bb = self.backbone
        fx, fy = bb.patch_embed(x), bb.patch_embed(y)
        gh, gw = fx.shape[1:3]
        pos = self._pos(self.pos_embed, gh, gw)
        prompts: list[dict] = []
        fx, fy, bal_enc = self._stage(
            fx + pos,
            fy + pos,
            bb.blocks,
            self.rel_pos,
            self.moa,
            "encoder",
            t,
            bias_alpha,
            bias_beta,
            prompts,
        )
        fx, fy = bb.decoder_embed(bb.norm(fx)), bb.decoder_embed(bb.norm(fy))
        dpos = self._pos(self.decoder_pos_embed, gh, gw)
        fx, _, bal_dec = self._stage(
            fx + dpos,
            fy + dpos,
            bb.decoder_blocks,
            self.decoder_rel_pos,
            self.decoder_moa,
            "decoder",
            t,
            bias_alpha,
            bias_beta,
            prompts,
        )
        pred = bb.decoder_pred(bb.decoder_norm(fx))  # (B, gh, gw, p·p·3)
        p = self.patch_size
        img = (
            pred.view(-1, gh, gw, p, p, 3)
            .permute(0, 5, 1, 3, 2, 4)
            .reshape(-1, 3, gh * p, gw * p)[..., :uh, :uw]
        )
        if self.upsample != 1:
            img = F.interpolate(img, size=(h, w), mode="bilinear", align_corners=False)
        fused = img * self.pixel_std + self.pixel_mean
        return {
            "fused": fused,
            "aux_losses": {"mir": self._mir(prompts), "balance": self.balance_weight * (bal_enc + bal_dec)},
            "prompts": prompts,
        }

    def _mir(self, prompts: list[dict]) -> Tensor:
        def mean_over(stage: str) -> Tensor | None:
            terms = [mir_loss(q["p_x_raw"], q["p_y_raw"], self.mir) for q in prompts if q["stage"] == stage]
            return torch.stack(terms).mean() if terms else None

        if self.mir == "paper":
            return torch.stack([mir_loss(q["p_x_raw"], q["p_y_raw"], "paper") for q in prompts]).mean()
        enc, dec = mean_over("encoder"), mean_over("decoder")
        if (
            enc is None or dec is None
        ):  # a config without modules in one stage puts all the weight on the other
            return enc if dec is None else dec
        return 0.75 * enc + 0.25 * dec


# -------------------------------------------------------------------------------------------- variants
@register_fusion_net
def tc_moa(**kwargs) -> TCMoANet:
    """TC-MoA on a ViT-B/16 MAE (encoder 12×768, decoder 8×512): modules after encoder blocks 1, 5, 9 and
    decoder
    blocks 1, 5."""
    return build_net(TCMoANet, {}, kwargs)


@register_fusion_net
def tc_moa_large(**kwargs) -> TCMoANet:
    """TC-MoA on a ViT-L/16 MAE (encoder 24×1024, 16 heads), the paper's configuration."""
    return build_net(TCMoANet, {"embed_dim": 1024, "depth": 24, "num_heads": 16}, kwargs)


@register_fusion_net
def tc_moa_tiny(**kwargs) -> TCMoANet:
    """A small TC-MoA for CPU tests: patch 8, encoder 4×64 (4 heads), decoder 2×32 (4 heads), window 4, τ =
    2."""
    return build_net(
        TCMoANet,
        {
            "patch_size": 8,
            "embed_dim": 64,
            "depth": 4,
            "num_heads": 4,
            "decoder_dim": 32,
            "decoder_depth": 2,
            "decoder_heads": 4,
            "window_size": 4,
            "pos_grid": 8,
            "tau": 2,
            "tile_size": 64,
            "tile_overlap": 16,
        },
        kwargs,
    )
