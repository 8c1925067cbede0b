"""Registry of fusion metrics: canonical names, direction, supported profiles.

A metric is a plain batched function ``fn(fused, a, b, *, profile="reference") -> Tensor (B,)`` on [0, 1]
tensors (``a`` = infrared, ``b`` = visible). :func:`register_metric` wraps it so that every call checks the
profile first; :func:`get_metric` finds it case-insensitively; metrics we could not implement from a
public description are registered as ``implemented=False`` and raise ``NotImplementedError`` with the
reason, so a table never contains a guessed value.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from bilevel.registry import lookup
from fusion.metrics.profiles import ProfileError, get_profile, shared_preparation, shared_sources

__all__ = [
    "CANONICAL_ORDER",
    "FusionMetric",
    "MetricSpec",
    "compute_metrics",
    "cpu_chunks",
    "get_metric",
    "higher_is_better",
    "list_metrics",
    "register_metric",
    "register_unimplemented",
]

MetricFn = Callable[..., Tensor]

CANONICAL_ORDER = ["EN", "SD", "SF", "AG", "EI", "MI", "NMI", "FMI", "FMI_pixel", "FMI_dct", "FMI_wavelet", "SCD", "CC", "PSNR", "MSE", "RMSE", "CE", "VIF", "VIFF", "Qabf", "Nabf", "SSIM", "MS_SSIM", "Qcb", "Qcv", "Q0", "Qw", "Qe", "Qy", "Qncie", "Qp", "Qc", "TE", "MEF_SSIM"]
"""The canonical metric order, used by :func:`list_metrics` and the evaluation tables."""


@dataclass(frozen=True)
class MetricSpec:
    """Everything known about one metric.

    Attributes:
        name: canonical name.
        fn: the profile-checking batched function.
        higher_is_better: direction used for "best" in tables.
        profiles: profiles the metric reproduces.
        implemented: False for metrics that raise NotImplementedError.
        reference: citation of the definition followed.
    """

    name: str
    fn: MetricFn
    higher_is_better: bool
    profiles: tuple[str, ...]
    implemented: bool = True
    reference: str = ""
    aliases: tuple[str, ...] = field(default_factory=tuple)

    def __call__(self, fused: Tensor, a: Tensor, b: Tensor, *, profile: str = "reference") -> Tensor:
        return self.fn(fused, a, b, profile=profile)


_REGISTRY: dict[str, MetricSpec] = {}
_LOOKUP: dict[str, str] = {}


def _add(spec: MetricSpec) -> None:
    for key in (spec.name, *spec.aliases):
        k = key.lower()
        if k in _LOOKUP and _LOOKUP[k] != spec.name:
            raise ValueError(f"metric name {key!r} already registered for {_LOOKUP[k]}")
        _LOOKUP[k] = spec.name
    _REGISTRY[spec.name] = spec


def register_metric(
    name: str,
    *,
    higher_is_better: bool,
    profiles: Sequence[str],
    reference: str = "",
    aliases: Sequence[str] = (),
) -> Callable[[MetricFn], MetricFn]:
    """Decorator: register ``fn`` under ``name``; the returned function checks the profile before running."""
    supported = tuple(get_profile(p).name for p in profiles)

    def deco(fn: MetricFn) -> MetricFn:
        @functools.wraps(fn)
        def wrapper(fused: Tensor, a: Tensor, b: Tensor, *, profile: str = "reference") -> Tensor:
            prof = get_profile(profile).name
            if prof not in supported:
                raise ProfileError(
                    f"metric {name} is not defined under profile {prof!r}; it supports {', '.join(supported)}"
                )
            return fn(fused, a, b, profile=prof)

        wrapper.higher_is_better = higher_is_better  # type: ignore[attr-defined]
        wrapper.profiles = supported  # type: ignore[attr-defined]
        _add(MetricSpec(name, wrapper, higher_is_better, supported, True, reference, tuple(aliases)))
        return wrapper

    return deco


def register_unimplemented(name: str, *, higher_is_better: bool, reason: str) -> None:
    """Register a known metric name that raises ``NotImplementedError(reason)`` when called."""

    def fn(fused: Tensor, a: Tensor, b: Tensor, *, profile: str = "reference") -> Tensor:
        raise NotImplementedError(f"metric {name} is not implemented: {reason}")

    fn.__name__ = name.lower()
    fn.__doc__ = f"Not implemented: {reason}"
    _add(MetricSpec(name, fn, higher_is_better, (), False, reason))


def get_metric(name: str) -> MetricSpec:
    """Metric by case-insensitive name; unknown names raise ``bilevel.registry.UnknownNameError``."""
    return lookup(_REGISTRY, "metric", _LOOKUP.get(str(name).lower(), name))


def higher_is_better(name: str) -> bool:
    """Direction of a metric (False for CE, MSE, RMSE, Nabf, Qcv)."""
    return get_metric(name).higher_is_better


def list_metrics(profile: str | None = None, *, implemented_only: bool = True) -> list[str]:
    """Canonical metric names in :data:`CANONICAL_ORDER` (a profile with its own order, e.g. ``mefb``, uses it).

    Args:
        profile: only metrics that support this profile.
        implemented_only: drop metrics that raise NotImplementedError.
    """
    prof = get_profile(profile) if profile is not None else None
    order = {n: i for i, n in enumerate(prof.order if prof is not None and prof.order else CANONICAL_ORDER)}
    prof = prof.name if prof is not None else None
    specs = sorted(_REGISTRY.values(), key=lambda s: order.get(s.name, len(order)))
    return [
        s.name
        for s in specs
        if (s.implemented or not implemented_only) and (prof is None or prof in s.profiles)
    ]


def compute_metrics(
    fused: Tensor,
    a: Tensor,
    b: Tensor,
    names: Iterable[str] | str | None = None,
    profile: str = "reference",
    failures: dict[str, str] | None = None,
) -> dict[str, Tensor]:
    """Evaluate several metrics on one batch.

    Args:
        fused: (B, C, H, W) fused images in [0, 1].
        a: infrared source(s), batch B or 1.
        b: visible source(s), batch B or 1.
        names: metric names (case-insensitive; a comma-separated string works too); ``None`` means every
            implemented metric that supports ``profile``.
        profile: metric profile.
        failures: when given, a metric that cannot run on these images (``ValueError`` or
            ``NotImplementedError``, e.g. windows larger than the image) gives NaN instead of raising, and its
            first reason is recorded here under its name — one bad metric does not cost a table the others.

    Returns:
        ``{canonical name: Tensor (B,)}`` in the order asked for.

    On CPU the batch is evaluated in cache-sized chunks (:func:`cpu_chunks`); values are per image, hence
    unchanged. Sources of batch 1 against several fused images have their own terms computed once
    (:func:`~fusion.metrics.profiles.shared_sources`), not once per chunk.
    """
    if names is None:
        names = list_metrics(profile)
    elif isinstance(names, str):
        names = [n.strip() for n in names.split(",") if n.strip()]
    specs = [get_metric(n) for n in names]
    parts = []
    with torch.no_grad(), shared_sources(fused, a, b):
        for chunk in cpu_chunks(fused, a, b):
            with shared_preparation():
                parts.append({s.name: _evaluate(s, chunk, profile, failures) for s in specs})
    return {n: torch.cat([p[n] for p in parts]) for n in parts[0]}


def _evaluate(spec: MetricSpec, chunk: tuple[Tensor, Tensor, Tensor], profile: str,
              failures: dict[str, str] | None) -> Tensor:
    try:
        return spec(*chunk, profile=profile)
    except (ValueError, NotImplementedError) as err:
        if failures is None:
            raise
        failures.setdefault(spec.name, str(err))
        fused = chunk[0]
        return torch.full((fused.shape[0] if fused.dim() == 4 else 1,), math.nan, dtype=torch.float64,
                          device=fused.device)


def cpu_chunks(fused: Tensor, a: Tensor, b: Tensor) -> Iterator[tuple[Tensor, Tensor, Tensor]]:
    """Split a metric batch so that each part's temporaries stay in cache (CPU only; one part elsewhere).

    B distinct pairs (all three inputs with batch B): chunks of about :data:`CPU_CHUNK_PIXELS` values per
    input, at least one pair (about 2× faster than one pass over a large batch). B fused images against one
    source pair (inputs with batch 1 stay whole in every chunk, their own terms computed once through
    :func:`~fusion.metrics.profiles.shared_sources`): chunks of about twice that many fused values.
    """
    batch = fused.shape[0] if fused.dim() == 4 else 1
    per_image = fused[0].numel() if fused.dim() == 4 else fused.numel()
    whole = [t.dim() != 4 or (t.shape[0] == 1 and batch > 1) for t in (fused, a, b)]  # broadcast, not split
    step = max(1, (2 if any(whole) else 1) * CPU_CHUNK_PIXELS // per_image)
    if fused.device.type != "cpu" or batch <= step:
        yield fused, a, b
        return
    for i in range(0, batch, step):
        yield tuple(t if keep else t[i : i + step] for t, keep in zip((fused, a, b), whole))


CPU_CHUNK_PIXELS = 1 << 19
"""The size of a chunk of distinct pairs in :func:`cpu_chunks`, in values per input."""


class FusionMetric(nn.Module):
    """Module wrapper around one registered metric (e.g. for ``nn.ModuleDict`` based evaluators).

    Args:
        name: metric name (case-insensitive).
        profile: profile used by every call.
    """

    def __init__(self, name: str, profile: str = "reference") -> None:
        super().__init__()
        self.spec = get_metric(name)
        self.profile = get_profile(profile).name
        if self.spec.implemented and self.profile not in self.spec.profiles:
            raise ProfileError(f"metric {self.spec.name} does not support profile {self.profile!r}")
        self.higher_is_better = self.spec.higher_is_better

    def forward(self, fused: Tensor, a: Tensor, b: Tensor) -> Tensor:
        return self.spec(fused, a, b, profile=self.profile)

    def extra_repr(self) -> str:
        return f"{self.spec.name}, profile={self.profile!r}"
