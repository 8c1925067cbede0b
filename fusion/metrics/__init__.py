"""Image-fusion quality metrics: batched torch functions, a registry, and named profiles.

Every metric is ``fn(fused, a, b, *, profile="reference") -> Tensor (B,)`` on [0, 1] tensors
(``a`` = infrared, ``b`` = visible; sources may have batch 1 against B fused images). Profiles fix the
conventions of a toolbox (``reference``, ``vifb``, ``tang``, ``tang_legacy``, ``cddfuse``; see
:mod:`fusion.metrics.profiles`); a metric asked for a profile it does not reproduce raises
:class:`ProfileError`. Example::

    from fusion.metrics import compute_metrics, list_metrics
    values = compute_metrics(fused, ir, vis, ["EN", "SSIM", "Qabf"], profile="vifb")

Metrics named by the community but not implementable from a public description available to us are
registered and raise ``NotImplementedError`` (``list_metrics(implemented_only=False)`` shows them).
"""

from __future__ import annotations

from fusion.metrics import edges, information, perceptual, similarity, statistics, structural
from fusion.metrics.edges import nabf, qabf
from fusion.metrics.information import ce, en, mi, nmi
from fusion.metrics.perceptual import qcb, qcv
from fusion.metrics.profiles import PROFILES, Profile, ProfileError, get_profile, list_profiles, prepare
from fusion.metrics.registry import (
    CANONICAL_ORDER,
    FusionMetric,
    MetricSpec,
    compute_metrics,
    get_metric,
    higher_is_better,
    list_metrics,
    register_metric,
    register_unimplemented,
)
from fusion.metrics.similarity import cc, mse, psnr, rmse, scd
from fusion.metrics.statistics import ag, ei, sd, sf
from fusion.metrics.structural import mef_ssim, ms_ssim, q0, qe, qw, ssim, vif

_NOT_IMPLEMENTED = {
    "FMI_pixel": (True, "the Nelsen-bound joint-pdf weighting of Haghighat's fast FMI (2014) is not in our notes"),
    "FMI_dct": (True, "the Nelsen-bound joint-pdf weighting of Haghighat's fast FMI (2014) is not in our notes"),
    "FMI_wavelet": (True, "the Nelsen-bound joint-pdf weighting of Haghighat's fast FMI (2014) is not in our notes"),
    "VIFF": (True, "the VID/VIND expressions of Han et al. (2013) are not in our notes"),
    "Qy": (True, "window and constants of Yang et al. (2008) not verified"),
    "Qncie": (True, "Wang's nonlinear correlation information entropy formula is not in our notes"),
    "Qp": (True, "Zhao's phase-congruency metric (2007) formula is not in our notes"),
    "Qc": (True, "Cvejic's metric (2005) formula is not in our notes"),
    "TE": (True, "Tsallis entropy metric (Cvejic 2006): formula and order parameter are not in our notes"),
}
for _name, (_hib, _why) in _NOT_IMPLEMENTED.items():
    register_unimplemented(_name, higher_is_better=_hib, reason=_why)

__all__ = [
    "CANONICAL_ORDER",
    "PROFILES",
    "FusionMetric",
    "MetricSpec",
    "Profile",
    "ProfileError",
    "compute_metrics",
    "get_metric",
    "get_profile",
    "higher_is_better",
    "list_metrics",
    "list_profiles",
    "prepare",
    "register_metric",
    "register_unimplemented",
    # metric functions
    "ag",
    "cc",
    "ce",
    "ei",
    "en",
    "mef_ssim",
    "mi",
    "ms_ssim",
    "mse",
    "nabf",
    "nmi",
    "psnr",
    "q0",
    "qabf",
    "qcb",
    "qcv",
    "qe",
    "qw",
    "rmse",
    "scd",
    "sd",
    "sf",
    "ssim",
    "vif",
    # families
    "edges",
    "information",
    "perceptual",
    "similarity",
    "statistics",
    "structural",
]
