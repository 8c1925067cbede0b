"""Image-fusion quality metrics: batched torch functions, a registry, and named profiles.

Every metric is ``fn(fused, a, b, *, profile="reference") -> Tensor (B,)`` on [0, 1] tensors
(``a`` = infrared, ``b`` = visible; sources may have batch 1 against B fused images). Profiles fix the
conventions of a toolbox (``reference``, ``vifb``, ``tang``, ``tang_legacy``, ``cddfuse``, ``mefb``; see
:mod:`fusion.metrics.profiles`); a metric asked for a profile it does not reproduce raises
:class:`ProfileError`. Example::

    from fusion.metrics import compute_metrics, list_metrics
    values = compute_metrics(fused, ir, vis, ["EN", "SSIM", "Qabf"], profile="vifb")

Metrics named by the community but not implementable from a public description available to us are
registered and raise ``NotImplementedError`` (``list_metrics(implemented_only=False)`` shows them).
"""

from __future__ import annotations

from fusion.metrics import (
    edges,
    feature_mi,
    information,
    perceptual,
    phase,
    similarity,
    statistics,
    structural,
    windowed,
)
from fusion.metrics.edges import nabf, qabf
from fusion.metrics.feature_mi import fmi, fmi_dct, fmi_pixel
from fusion.metrics.information import ce, en, mi, nmi, qncie, te
from fusion.metrics.perceptual import qcb, qcv
from fusion.metrics.phase import qp
from fusion.metrics.profiles import (
    MEFB_METRICS,
    PROFILES,
    Profile,
    ProfileError,
    get_profile,
    list_profiles,
    prepare,
)
from fusion.metrics.registry import (
    CANONICAL_ORDER,
    FusionMetric,
    MetricSpec,
    compute_metrics,
    cpu_chunks,
    get_metric,
    higher_is_better,
    list_metrics,
    register_metric,
    register_unimplemented,
)
from fusion.metrics.similarity import cc, mse, psnr, rmse, scd
from fusion.metrics.statistics import ag, ei, sd, sf
from fusion.metrics.structural import mef_ssim, ms_ssim, q0, qe, qw, ssim, vif, viff
from fusion.metrics.windowed import qc, qy

_NOT_IMPLEMENTED = {
    "FMI_wavelet": (
        True,
        (
            "needs MATLAB's tabulated 102-tap discrete Meyer (dmey) filters for dwt2; the published FIR "
            "constructions of the Meyer wavelet reproduce them only to 4-5 digits (PyWavelets PR #311), and no "
            "wavelet package is a dependency"
        ),
    ),
}
for _name, (_hib, _why) in _NOT_IMPLEMENTED.items():
    register_unimplemented(_name, higher_is_better=_hib, reason=_why)

__all__ = [
    "CANONICAL_ORDER",
    "MEFB_METRICS",
    "PROFILES",
    "FusionMetric",
    "MetricSpec",
    "Profile",
    "ProfileError",
    # metric functions
    "ag",
    "cc",
    "ce",
    "compute_metrics",
    "cpu_chunks",
    # families
    "edges",
    "ei",
    "en",
    "feature_mi",
    "fmi",
    "fmi_dct",
    "fmi_pixel",
    "get_metric",
    "get_profile",
    "higher_is_better",
    "information",
    "list_metrics",
    "list_profiles",
    "mef_ssim",
    "mi",
    "ms_ssim",
    "mse",
    "nabf",
    "nmi",
    "perceptual",
    "phase",
    "prepare",
    "psnr",
    "q0",
    "qabf",
    "qc",
    "qcb",
    "qcv",
    "qe",
    "qncie",
    "qp",
    "qw",
    "qy",
    "register_metric",
    "register_unimplemented",
    "rmse",
    "scd",
    "sd",
    "sf",
    "similarity",
    "ssim",
    "statistics",
    "structural",
    "te",
    "vif",
    "viff",
    "windowed",
]
