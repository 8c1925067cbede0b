"""Adversarial constraint: a critic that tells fused images from a "real" target image.

BDL (Liu et al., "Bi-level Dynamic Learning for Jointly Multi-modality Image Fusion and Beyond", IJCAI 2023;
``LiuZhu-CV/BDLFusion``) uses pix2pix's 1×1 "PixelGAN" discriminator as a WGAN critic on the fused luminance:
conv1×1 1→64 (bias) + LeakyReLU(0.2), conv1×1 64→128 (no bias) + BatchNorm + LeakyReLU(0.2),
conv1×1 128→1 (no bias), 8,704 parameters, critic loss ½(mean D(F) − mean D(T)) and generator term −mean D(F), no
gradient penalty, no clipping. Its "real" sample is the saliency target T = m⊙ir + (1−m)⊙Y_vis, not a source image.

Besides that faithful setting, this module offers pix2pix's PatchGAN (``arch="patch"``), LSGAN and hinge losses,
an optional gradient penalty and weight clipping, other "real" samples, and ``norm ∈ {batch, none, group}``:
BatchNorm couples the images of a batch, which matters inside hypergradient computations.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fusion.colour import as_rgb, luminance
from fusion.losses import SALIENCY_SOURCES, saliency_map
from tasks.base import Task, eval_mode, normalize_input

__all__ = [
    "CRITIC_ARCHS",
    "CRITIC_NORMS",
    "GAN_LOSSES",
    "REAL_SAMPLES",
    "SALIENCY_SOURCES",
    "CriticTask",
    "PatchCritic",
    "PixelCritic",
    "critic_loss",
    "generator_loss",
]

CRITIC_ARCHS = ("pixel", "patch")
GAN_LOSSES = ("wgan", "lsgan", "hinge")
REAL_SAMPLES = ("saliency", "max", "vis")
CRITIC_NORMS = ("batch", "none", "group")


def _norm(kind: str, channels: int, groups: int) -> nn.Module:
    if kind == "batch":
        return nn.BatchNorm2d(channels)
    if kind == "group":
        return nn.GroupNorm(math.gcd(groups, channels), channels)
    if kind == "none":
        return nn.Identity()
    raise ValueError(f"unknown critic norm {kind!r}; expected one of {CRITIC_NORMS}")


class PixelCritic(nn.Module):
    """pix2pix PixelGAN / BDL critic: three 1×1 convolutions, one score per pixel.

    Args:
        in_channels: 1 for the luminance (BDL), 3 for RGB.
        ndf: width of the first layer (64 in BDL; the second layer has 2·ndf).
        norm: ``"batch"`` (BDL), ``"group"`` or ``"none"``. Without a norm the middle conv gets a bias, since
            nothing else would absorb the offset.
        groups: GroupNorm groups (reduced to a divisor of the width).
    """

    def __init__(self, in_channels: int = 1, ndf: int = 64, norm: str = "batch", groups: int = 32) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(in_channels, ndf, 1, bias=True),
            nn.LeakyReLU(0.2),
            nn.Conv2d(ndf, 2 * ndf, 1, bias=norm == "none"),
            _norm(norm, 2 * ndf, groups),
            nn.LeakyReLU(0.2),
            nn.Conv2d(2 * ndf, 1, 1, bias=False),
        )

    def forward(self, x: Tensor) -> Tensor:
        """(B, C, H, W) → per-pixel scores (B, 1, H, W)."""
        return self.net(x)


class PatchCritic(nn.Module):
    """pix2pix PatchGAN (``NLayerDiscriminator``): 4×4 convolutions, one score per overlapping patch.

    Args:
        in_channels: 1 (luminance) or 3 (RGB).
        ndf: width of the first layer; it doubles per layer up to 8·ndf.
        n_layers: stride-2 layers (3 gives pix2pix's 70×70 receptive field).
        norm: ``"batch"``, ``"group"`` or ``"none"`` (the first layer is never normalised, as in pix2pix).
        groups: GroupNorm groups.
    """

    def __init__(self, in_channels: int = 1, ndf: int = 64, n_layers: int = 3, norm: str = "batch",
                 groups: int = 32) -> None:
        super().__init__()
        if n_layers < 1:
            raise ValueError(f"n_layers must be >= 1, got {n_layers}")
        bias = norm == "none"
        layers: list[nn.Module] = [nn.Conv2d(in_channels, ndf, 4, stride=2, padding=1), nn.LeakyReLU(0.2)]
        width = ndf
        for n in range(1, n_layers + 1):
            prev, width = width, ndf * min(2 ** n, 8)
            stride = 2 if n < n_layers else 1
            layers += [nn.Conv2d(prev, width, 4, stride=stride, padding=1, bias=bias), _norm(norm, width, groups),
                       nn.LeakyReLU(0.2)]
        layers.append(nn.Conv2d(width, 1, 4, stride=1, padding=1))
        self.net = nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        """(B, C, H, W) → patch scores (B, 1, H', W')."""
        return self.net(x)


def critic_loss(d_real: Tensor, d_fake: Tensor, kind: str) -> Tensor:
    """Critic (discriminator) objective, minimised by the critic.

    * ``wgan``: ½(mean D(F) − mean D(T)) — BDL's form; the ½ only rescales the critic's step size.
    * ``lsgan``: ½ mean (D(T) − 1)² + ½ mean D(F)² (Mao et al. 2017, a = 0, b = c = 1).
    * ``hinge``: mean ReLU(1 − D(T)) + mean ReLU(1 + D(F)).
    """
    if kind == "wgan":
        return 0.5 * (d_fake.mean() - d_real.mean())
    if kind == "lsgan":
        return 0.5 * ((d_real - 1).pow(2).mean() + d_fake.pow(2).mean())
    if kind == "hinge":
        return F.relu(1 - d_real).mean() + F.relu(1 + d_fake).mean()
    raise ValueError(f"unknown GAN loss {kind!r}; expected one of {GAN_LOSSES}")


def generator_loss(d_fake: Tensor, kind: str) -> Tensor:
    """Term the fusion net minimises: −mean D(F) (wgan, hinge) or ½ mean (D(F) − 1)² (lsgan)."""
    if kind in ("wgan", "hinge"):
        return -d_fake.mean()
    if kind == "lsgan":
        return 0.5 * (d_fake - 1).pow(2).mean()
    raise ValueError(f"unknown GAN loss {kind!r}; expected one of {GAN_LOSSES}")


class CriticTask(Task):
    """Adversarial constraint task (lower level: the critic; upper level: the generator term).

    Args:
        arch: ``"pixel"`` (BDL's 1×1 critic) or ``"patch"`` (PatchGAN).
        loss: ``"wgan"`` (BDL), ``"lsgan"`` or ``"hinge"``.
        real: the "real" sample T: ``"saliency"`` (BDL: m⊙ir + (1−m)⊙vis), ``"max"`` (pixelwise max of ir and
            vis) or ``"vis"`` (the visible image).
        space: ``"y"`` (BDL: the critic sees luminance, 1 channel) or ``"rgb"`` (3 channels; grey is repeated).
        norm: critic normalisation, ``"batch"`` (BDL), ``"none"`` or ``"group"``.
        ndf: critic width (64 in BDL).
        n_layers: PatchGAN depth (``arch="patch"`` only).
        groups: GroupNorm groups (``norm="group"`` only).
        gp_weight: weight of the WGAN-GP gradient penalty E[(‖∇D(x̂)‖₂ − 1)²] on random interpolates of T and F
            (0 = off, BDL). Gulrajani et al. advise against BatchNorm with it.
        clip_value: WGAN weight clipping to [−c, c] (``None`` = off, BDL). Applied in place at the start of every
            :meth:`lower_loss`, i.e. before each critic update, which equals clipping after each update except the
            last; call :meth:`clip_weights_` from an optimiser step hook for the strict form. Do not combine with
            hypergradient estimators that perturb the critic's weights in place (finite differences).
        saliency_source: where m comes from for ``real="saliency"`` (``fusion.losses.saliency_map``, the map the
            runner also gives the fusion loss): ``"auto"`` (``batch["saliency"]``, else ``batch["mask"] > 0``
            without ignored pixels, else the box mask of ``batch["boxes"]``, else the IR fallback "ir_saliency":
            blurred IR, min–max normalised per image), or one of them forced: ``"saliency"``, ``"mask"``,
            ``"boxes"``, ``"ir"``.
        saliency_sigma: Gaussian σ (pixels) of the IR fallback.
        ignore_index: mask value excluded from the mask-derived saliency.
        input_norm: normalisation of critic inputs (``"none"``: the [0, 1] image as BDL; ``"instance"``;
            ``"imagenet"`` needs ``space="rgb"``).
    """

    name = "critic"
    needs = frozenset({"ir", "vis"})  # plus "saliency"/"mask"/"boxes" on instances that force that source

    def __init__(self, arch: str = "pixel", loss: str = "wgan", real: str = "saliency", *, space: str = "y",
                 norm: str = "batch", ndf: int = 64, n_layers: int = 3, groups: int = 32, gp_weight: float = 0.0,
                 clip_value: float | None = None, saliency_source: str = "auto", saliency_sigma: float = 3.0,
                 ignore_index: int = 255, input_norm: str = "none") -> None:
        super().__init__(input_norm=input_norm)
        for value, valid, what in ((arch, CRITIC_ARCHS, "arch"), (loss, GAN_LOSSES, "loss"),
                                   (real, REAL_SAMPLES, "real"), (space, ("y", "rgb"), "space"),
                                   (norm, CRITIC_NORMS, "norm"), (saliency_source, SALIENCY_SOURCES,
                                                                  "saliency_source")):
            if value not in valid:
                raise ValueError(f"unknown critic {what} {value!r}; expected one of {valid}")
        if space == "y" and input_norm == "imagenet":
            raise ValueError("input_norm='imagenet' needs space='rgb' (the luminance critic has one channel)")
        if gp_weight < 0:
            raise ValueError(f"gp_weight must be >= 0, got {gp_weight}")
        if clip_value is not None and clip_value <= 0:
            raise ValueError(f"clip_value must be > 0 or None, got {clip_value}")
        self.arch, self.loss_kind, self.real, self.space = arch, loss, real, space
        self.gp_weight, self.clip_value = float(gp_weight), clip_value
        self.saliency_source, self.saliency_sigma, self.ignore_index = saliency_source, saliency_sigma, ignore_index
        in_channels = 1 if space == "y" else 3
        if arch == "pixel":
            self.critic = PixelCritic(in_channels, ndf=ndf, norm=norm, groups=groups)
        else:
            self.critic = PatchCritic(in_channels, ndf=ndf, n_layers=n_layers, norm=norm, groups=groups)
        if real == "saliency" and saliency_source in ("saliency", "mask", "boxes"):
            self.needs = CriticTask.needs | {saliency_source}

    def _space(self, image: Tensor) -> Tensor:
        return luminance(image) if self.space == "y" else as_rgb(image)

    def prepare(self, fused: Tensor) -> Tensor:
        """Fused image → critic input: luminance (``space="y"``) or RGB, then ``input_norm``."""
        self.check_fused(fused)
        return normalize_input(self._space(fused), self.input_norm)

    def forward(self, fused: Tensor) -> Tensor:
        """Critic scores of a fused (or real) image in [0, 1]: (B, 1, H, W) for pixel, (B, 1, H', W') for patch."""
        return self.critic(self.prepare(fused))

    @property
    def saliency_options(self) -> dict[str, Any]:
        """The keyword arguments of ``fusion.losses.saliency_map`` this critic uses: a trainer passes the same
        ones for the fusion loss's mask, so both weigh the sources with one map."""
        return {"source": self.saliency_source, "sigma": self.saliency_sigma, "ignore_index": self.ignore_index}

    def saliency(self, batch: Mapping[str, Any], like: Tensor) -> Tensor:
        """The weight map m (B, 1, H, W) in [0, 1] for ``real="saliency"``: ``fusion.losses.saliency_map`` with
        :attr:`saliency_options`."""
        return saliency_map(batch, like, **self.saliency_options)

    def real_sample(self, batch: Mapping[str, Any], like: Tensor) -> Tensor:
        """The "real" image T in [0, 1] in the critic's space, on ``like``'s device and dtype (no gradient)."""
        ir = batch["ir"].to(like)
        vis = batch["vis"].to(like)
        if ir.shape[0] != like.shape[0] or ir.shape[-2:] != like.shape[-2:] or vis.shape[-2:] != like.shape[-2:]:
            raise ValueError(f"ir {tuple(ir.shape)} / vis {tuple(vis.shape)} do not match fused {tuple(like.shape)}")
        ir, vis = self._space(ir), self._space(vis)
        if self.real == "vis":
            return vis
        if self.real == "max":
            return torch.maximum(ir, vis)
        m = self.saliency(batch, like)
        return m * ir + (1 - m) * vis

    @torch.no_grad()
    def clip_weights_(self) -> None:
        """Clamps every critic parameter into [−clip_value, clip_value] in place (no-op when clipping is off)."""
        if self.clip_value is None:
            return
        for p in self.critic.parameters():
            if p.is_leaf:
                p.clamp_(-self.clip_value, self.clip_value)

    def gradient_penalty(self, real: Tensor, fake: Tensor) -> Tensor:
        """WGAN-GP term E[(‖∇_x D(x̂)‖₂ − 1)²], x̂ = ε·T + (1 − ε)·F, ε ~ U(0, 1) per image (inputs in critic space)."""
        eps = torch.rand(real.shape[0], 1, 1, 1, device=real.device, dtype=real.dtype)
        mixed = (eps * real + (1 - eps) * fake).detach().requires_grad_(True)
        scores = self.critic(normalize_input(mixed, self.input_norm))
        (grad,) = torch.autograd.grad(scores.sum(), mixed, create_graph=True)
        return (grad.flatten(1).norm(dim=1) - 1).pow(2).mean()

    def lower_loss(self, fused: Tensor, batch: Mapping[str, Any]) -> dict[str, Tensor]:
        """Critic loss on (real T, fused F): ``{"loss", "adv", ["gp"], "d_real", "d_fake"}`` (the last two detached)."""
        self.check_fused(fused)
        self.check_batch(batch, fused)
        self.clip_weights_()
        real = self.real_sample(batch, fused)
        fake = self._space(fused)
        d_real = self.critic(normalize_input(real, self.input_norm))
        d_fake = self.critic(normalize_input(fake, self.input_norm))
        adv = critic_loss(d_real, d_fake, self.loss_kind)
        out = {"loss": adv, "adv": adv}
        if self.gp_weight > 0:
            gp = self.gradient_penalty(real, fake)
            out["gp"] = gp
            out["loss"] = adv + self.gp_weight * gp
        out["d_real"] = d_real.mean().detach()
        out["d_fake"] = d_fake.mean().detach()
        return out

    def upper_loss(self, fused: Tensor, batch: Mapping[str, Any]) -> dict[str, Tensor]:
        """Generator term on F: ``{"loss", "d_fake"}``; −mean D(F) for wgan/hinge, ½ mean (D(F) − 1)² for lsgan."""
        self.check_fused(fused)
        self.check_batch(batch, fused)
        d_fake = self(fused)
        return {"loss": generator_loss(d_fake, self.loss_kind), "d_fake": d_fake.mean().detach()}

    @torch.no_grad()
    def evaluate(self, pairs: Iterable[tuple[Tensor, Mapping[str, Any]]]) -> dict[str, float]:
        """Mean critic scores over all images: ``d_real``, ``d_fake`` and ``gap`` = d_real − d_fake.

        For a WGAN critic the gap estimates the Wasserstein-1 distance between T and F (up to the critic's
        Lipschitz constant); it shrinks as the fused images become indistinguishable from the target.
        """
        sums = {"d_real": 0.0, "d_fake": 0.0}
        n = 0
        with eval_mode(self):
            for fused, batch in pairs:
                self.check_fused(fused)
                self.check_batch(batch, fused)
                real = self.real_sample(batch, fused)
                b = fused.shape[0]
                sums["d_real"] += float(self.critic(normalize_input(real, self.input_norm)).mean()) * b
                sums["d_fake"] += float(self(fused).mean()) * b
                n += b
        if n == 0:
            raise ValueError("evaluate() received no (fused, batch) pairs")
        out = {k: v / n for k, v in sums.items()}
        out["gap"] = out["d_real"] - out["d_fake"]
        return out

    def extra_repr(self) -> str:
        return (f"arch={self.arch!r}, loss={self.loss_kind!r}, real={self.real!r}, space={self.space!r}, "
                f"gp_weight={self.gp_weight}, clip_value={self.clip_value}, input_norm={self.input_norm!r}")
