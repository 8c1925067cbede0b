"""Metric profiles: the named conventions under which a metric value means one precise thing.

The same metric name is computed differently by every toolbox (colour handling, 0–255 vs [0, 1],
quantisation, log base, window shapes; see the project's metrics notes §1). A *profile* fixes all of that.
Each metric function receives [0, 1] tensors plus a profile name; :func:`prepare` turns the inputs into the
float64 0–255 working images the profile prescribes, and the metric applies its profile-specific rules.
A metric asked for a profile whose conventions it cannot reproduce raises :class:`ProfileError` instead of
silently returning a number from another convention.

Profiles:

* ``reference`` — the toolkit default. Colour inputs are reduced to BT.601 luma
  (0.299 R + 0.587 G + 0.114 B, the constant of the whole toolkit), values ×255 in float64, no
  quantisation (histogram metrics round to the nearest of 256 levels).
* ``vifb`` — reproduces the VIFB MATLAB toolbox (Zhang et al., CVPRW 2020), which reads uint8 JPEGs:
  inputs are quantised to uint8 levels, every metric is computed per RGB channel and averaged, grey
  images are replicated to three channels (VIFB's ``b1 == 1`` branch does the same for a grey infrared).
* ``tang`` — Linfeng-Tang's MATLAB evaluation: uint8 inputs, MATLAB ``rgb2gray``
  (0.298936 R + 0.587043 G + 0.114021 B, rounded).
* ``tang_legacy`` — the older variant behind ``Metric_TNO.xlsx`` (same colour handling as ``tang``).
* ``cddfuse`` — MMIF-CDDFuse ``utils/Evaluator.py``: OpenCV BGR→GRAY on float32, then ``np.round``
  (halves to even).
* ``mefb`` — the MEFB MATLAB toolbox (Zhang, Information Fusion 2021), which reads uint8 images: like
  ``vifb``, metrics run per RGB channel and average, except where a metric's MEFB code converts with
  ``rgb2gray`` (MEF-SSIM; see each metric); grey images are replicated to three channels. (MEFB's wrappers
  would instead score grey sources against the first channel of a colour fused image; MEF/MFF benchmarks
  are colour throughout.) :data:`MEFB_METRICS` is its column order.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from typing import TypeVar

import torch
from torch import Tensor

from bilevel.registry import lookup

__all__ = [
    "MEFB_METRICS",
    "PROFILES",
    "Profile",
    "ProfileError",
    "get_profile",
    "list_profiles",
    "matlab_rgb2gray",
    "per_source",
    "prepare",
    "shared_preparation",
    "shared_sources",
]

T = TypeVar("T")


class ProfileError(ValueError):
    """A metric was asked for a profile whose conventions it does not reproduce."""


@dataclass(frozen=True)
class Profile:
    """How a profile turns [0, 1] tensors into its working images.

    Attributes:
        name: profile name.
        colour: ``"luma"`` (BT.601, float), ``"rgb"`` (per channel), ``"matlab_gray"`` or ``"opencv_gray"``.
        quantise: round the inputs to uint8 levels first (codes that read uint8 files).
        description: one line for tables and ``meta.json``.
        order: the toolbox's own metric order, used by ``list_metrics(profile)`` (empty: canonical order).
    """

    name: str
    colour: str
    quantise: bool
    description: str
    order: tuple[str, ...] = ()


MEFB_METRICS = (
    "CE", "EN", "FMI", "NMI", "PSNR", "Qncie", "TE", "AG", "EI", "Qabf",
    "Qp", "SD", "SF", "Qc", "Qw", "Qy", "MEF_SSIM", "Qcb", "Qcv", "VIFF",
)  # fmt: skip
"""MEFB's 20 metrics in its table order. MEFB's column "VIF" is VIFF (Han et al. 2013), not VIF-P."""


PROFILES: dict[str, Profile] = {
    p.name: p
    for p in (
        Profile("reference", "luma", False, "toolkit default: BT.601 grey, float64, 0-255"),
        Profile("vifb", "rgb", True, "VIFB MATLAB toolbox: uint8, per RGB channel then averaged"),
        Profile("tang", "matlab_gray", True, "Linfeng-Tang MATLAB evaluation: rgb2gray uint8"),
        Profile("tang_legacy", "matlab_gray", True, "Tang Metric_TNO.xlsx legacy variant"),
        Profile("cddfuse", "opencv_gray", True, "MMIF-CDDFuse utils/Evaluator.py: cv2 grey, rounded"),
        Profile("mefb", "rgb", True, "MEFB MATLAB toolbox: uint8, per RGB channel then averaged", MEFB_METRICS),
    )
}

_MATLAB_GRAY = (0.298936021293775, 0.587043074451121, 0.114020904255103)
_BT601 = (0.299, 0.587, 0.114)


def list_profiles() -> list[str]:
    """Names of all profiles."""
    return list(PROFILES)


def get_profile(name: str | Profile) -> Profile:
    """Profile by (case-insensitive) name; unknown names raise ``bilevel.registry.UnknownNameError``."""
    if isinstance(name, Profile):
        return name
    key = str(name).lower()
    return lookup(PROFILES, "metric profile", key if key in PROFILES else name)


def _as_4d(x: Tensor, what: str) -> Tensor:
    if not isinstance(x, Tensor):
        raise TypeError(f"{what} must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() == 2:
        x = x[None, None]
    elif x.dim() == 3:
        x = x[None]
    if x.dim() != 4 or x.shape[1] not in (1, 3):
        raise ValueError(f"{what} must be (B, 1|3, H, W) (or (C, H, W), (H, W)); got {tuple(x.shape)}")
    return x


def _grey(x: Tensor, weights: tuple[float, float, float]) -> Tensor:
    r, g, b = x.unbind(dim=1)
    return (weights[0] * r + weights[1] * g + weights[2] * b)[:, None]


_CACHE: ContextVar[dict | None] = ContextVar("fusion_metrics_prepare_cache", default=None)


@contextmanager
def shared_preparation() -> Iterator[None]:
    """Within this block, :func:`prepare` reuses its result for the same input tensors and profile.

    :func:`fusion.metrics.compute_metrics` uses it so that ten metrics on one batch convert, quantise
    and grey-scale the inputs once. The inputs stay referenced by the cache, so their ids are unique.
    """
    token = _CACHE.set({})
    try:
        yield
    finally:
        _CACHE.reset(token)


_SOURCES: ContextVar[tuple[dict, dict] | None] = ContextVar("fusion_metrics_source_cache", default=None)


@contextmanager
def shared_sources(fused: Tensor, *sources: Tensor) -> Iterator[None]:
    """Within this block, :func:`per_source` computes each source's own terms once for the whole batch.

    A method comparison scores B fused images against one source pair, in chunks on the CPU
    (:func:`fusion.metrics.cpu_chunks`), and every chunk would redo the sources' share of each metric (half
    of Qcb's filtering). Only sources of batch 1 against a larger fused batch are kept: they reach every chunk
    as the same tensor, while distinct pairs are sliced per chunk and share nothing.
    """
    batch = fused.shape[0] if fused.dim() == 4 else 1
    shared = {id(x): x for x in sources if batch > 1 and (x.dim() != 4 or x.shape[0] == 1)}
    token = _SOURCES.set((shared, {}) if shared else None)
    try:
        yield
    finally:
        _SOURCES.reset(token)


def per_source(sources: Tensor | tuple[Tensor, ...], key: Hashable, compute: Callable[[], T]) -> T:
    """``compute()``, computed once per ``(sources, key)`` inside :func:`shared_sources` when every one of
    ``sources`` is shared (a term of both sources, such as their SSIM map, passes both).

    ``sources`` are the caller's input tensors (not prepared copies); ``key`` names everything else the
    result depends on (metric, profile, working shape). Callers must not modify the result in place.
    """
    state = _SOURCES.get()
    ids = tuple(id(x) for x in (sources if isinstance(sources, tuple) else (sources,)))
    if state is None or not all(i in state[0] for i in ids):
        return compute()
    values = state[1]
    slot = (ids, key)
    if slot not in values:
        values[slot] = compute()
    return values[slot]


def _quantise_(x: Tensor) -> Tensor:
    """uint8 conversion of 0–255 data in place (callers pass fresh tensors): clamp, round halves up."""
    return x.clamp_(0, 255).add_(0.5).floor_()


def matlab_rgb2gray(x: Tensor) -> Tensor:
    """MATLAB ``rgb2gray`` of a uint8 image on the 0–255 scale: weighted sum, rounded to uint8; grey stays."""
    return _quantise_(_grey(x, _MATLAB_GRAY)) if x.shape[1] == 3 else x


def prepare(profile: str | Profile, *images: Tensor) -> tuple[Tensor, ...]:
    """Turn [0, 1] images into the profile's float64 0–255 working images.

    Args:
        profile: profile name or object.
        *images: tensors (B, C, H, W) with C ∈ {1, 3}, conventionally ``fused, a, b``; batch sizes must
            broadcast (sources may have batch 1 against B fused images), spatial sizes must agree.

    Returns:
        One float64 tensor per input with values on the 0–255 scale; grey profiles give C = 1, ``vifb``
        gives C = 3 whenever any input is RGB.
    """
    prof = get_profile(profile)
    cache = _CACHE.get()
    if cache is None:
        return _prepare(prof, images)
    key = (prof.name, tuple(id(x) for x in images))
    if key not in cache:
        cache[key] = (images, _prepare(prof, images))
    return cache[key][1]


def _prepare(prof: Profile, images: tuple[Tensor, ...]) -> tuple[Tensor, ...]:
    xs = [_as_4d(x, f"image {i}") for i, x in enumerate(images)]
    sizes = {tuple(x.shape[-2:]) for x in xs}
    if len(sizes) != 1:
        raise ValueError(f"all images must share one spatial size; got {sorted(sizes)}")
    batches = {x.shape[0] for x in xs} - {1}
    if len(batches) > 1:
        raise ValueError(f"batch sizes must be equal or 1; got {[x.shape[0] for x in xs]}")
    device = xs[0].device
    out = []
    for x in xs:
        x = x.to(device=device, dtype=torch.float64) * 255.0
        if prof.quantise:
            x = _quantise_(x)
        out.append(x)
    if prof.colour == "rgb":
        if any(x.shape[1] == 3 for x in out):
            out = [x.expand(-1, 3, -1, -1) if x.shape[1] == 1 else x for x in out]
        return tuple(out)
    res = []
    for x in out:
        if x.shape[1] == 3:
            if prof.colour == "luma":
                x = _grey(x, _BT601)
            elif prof.colour == "matlab_gray":
                x = matlab_rgb2gray(x)
            else:  # OpenCV on float32, then numpy rounding (halves to even)
                x = torch.round(_grey(x.to(torch.float32), _BT601)).to(torch.float64)
        res.append(x)
    return tuple(res)
