"""Phase-congruency fusion metric Qp (Zhao, Laganière & Liu 2007) on Kovesi's phase congruency.

The phase congruency follows Z. Liu's ``myphasecong3`` (a revision of Kovesi's ``phasecong3``), which is
what MEFB runs: log-Gabor filters with 4 scales (minimum wavelength 3, multiplier 2.1, σ_on_f 0.55) and 6
orientations (angular σ = π/6/1.2), built on Kovesi's normalised frequency grid (odd sizes divide by n − 1)
and multiplied by a Butterworth low-pass (cut-off 0.45, order 15) whose grid is centred with ``fftshift``;
noise compensation from the median of the smallest-scale energy (k = 2, the PC₂ rescaling 1/1.7); frequency-
spread weighting (cut-off 0.5, gain 10); PC = Σ_o W·⌊E − T⌋ / (Σ_o Σ_s A + 10⁻⁴) and the maximum and minimum
moments M, m of the orientation covariance. All transforms run in float64 through full complex FFTs.
"""

from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F
from torch import Tensor

from fusion.metrics._utils import channel_mean, gaussian_1d, separable_filter
from fusion.metrics.profiles import per_source, prepare
from fusion.metrics.registry import register_metric

__all__ = ["phase_congruency", "qp"]

NSCALE, NORIENT, MIN_WAVELENGTH, MULT, SIGMA_ON_F, D_THETA_ON_SIGMA = 4, 6, 3.0, 2.1, 0.55, 1.2
K_NOISE, CUT_OFF, GAIN, EPS = 2.0, 0.5, 10.0, 1e-4
FEATURE_THRESHOLD = 0.1


def _kovesi_range(n: int, device) -> Tensor:
    k = torch.arange(n, dtype=torch.float64, device=device)
    return (k - (n - 1) / 2) / (n - 1) if n % 2 else (k - n // 2) / n


@functools.lru_cache(maxsize=4)
def _filters(rows: int, cols: int, device: str) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Filter bank (O, S, H, W) and per-orientation noise constants (EM_n, Σ An², Σ AiAj), cached per size."""
    y = _kovesi_range(rows, device)[:, None].expand(rows, cols)
    x = _kovesi_range(cols, device)[None, :].expand(rows, cols)
    radius = torch.sqrt(x * x + y * y)
    radius[rows // 2, cols // 2] = 1.0
    theta = torch.atan2(-y, x)
    radius, theta = torch.fft.ifftshift(radius), torch.fft.ifftshift(theta)
    lx = (torch.arange(1, cols + 1, dtype=torch.float64, device=device) - (cols // 2 + 1)) / cols
    ly = (torch.arange(1, rows + 1, dtype=torch.float64, device=device) - (rows // 2 + 1)) / rows
    lr = torch.sqrt(lx[None, :] ** 2 + ly[:, None] ** 2)
    lowpass = torch.fft.fftshift(1.0 / (1.0 + (lr / 0.45) ** 30))
    log_gabor = []
    for s in range(NSCALE):
        fo = 1.0 / (MIN_WAVELENGTH * MULT**s)
        g = torch.exp(-(torch.log(radius / fo) ** 2) / (2 * math.log(SIGMA_ON_F) ** 2)) * lowpass
        g[0, 0] = 0.0
        log_gabor.append(g)
    theta_sigma = math.pi / NORIENT / D_THETA_ON_SIGMA
    sin_t, cos_t = torch.sin(theta), torch.cos(theta)
    bank, em_n, sum_an2, sum_aiaj = [], [], [], []
    for o in range(NORIENT):
        angle = o * math.pi / NORIENT
        ds = sin_t * math.cos(angle) - cos_t * math.sin(angle)
        dc = cos_t * math.cos(angle) + sin_t * math.sin(angle)
        spread = torch.exp(-(torch.atan2(ds, dc).abs() ** 2) / (2 * theta_sigma**2))
        filt = torch.stack([g * spread for g in log_gabor])
        spatial = torch.fft.ifft2(filt).real * math.sqrt(rows * cols)
        bank.append(filt)
        em_n.append((filt[0] ** 2).sum())
        sum_an2.append((spatial**2).sum())
        total = spatial.sum(0)
        sum_aiaj.append(((total**2).sum() - (spatial**2).sum()) / 2)
    return torch.stack(bank), torch.stack(em_n), torch.stack(sum_an2), torch.stack(sum_aiaj)


def _matlab_median(v: Tensor) -> Tensor:
    """Median of a flat tensor, averaging the two middle values for even counts (MATLAB ``median``).

    The upper middle value of an even count is the k-th value again if it repeats, else the smallest
    value above it: one selection instead of two.
    """
    n = v.numel()
    k = (n + 1) // 2
    lo = torch.kthvalue(v, k).values
    if n % 2:
        return lo
    above = v > lo
    hi = torch.where(above, v, torch.full_like(v, float("inf"))).amin() if int(above.sum()) == n - k else lo
    return (lo + hi) / 2


def phase_congruency(im: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Phase congruency, maximum and minimum moments (PC, M, m) of one (H, W) image (``myphasecong3``)."""
    rows, cols = im.shape
    bank, em_n, sum_an2, sum_aiaj = _filters(rows, cols, str(im.device))
    spectrum = torch.fft.fft2(im.to(torch.float64))
    total_energy = torch.zeros(rows, cols, dtype=torch.float64, device=im.device)
    total_an = torch.zeros_like(total_energy)
    covx2, covy2, covxy = torch.zeros_like(total_energy), torch.zeros_like(total_energy), torch.zeros_like(total_energy)
    spectrum_ri = torch.view_as_real(spectrum)
    for o in range(NORIENT):
        # the bank is real: scale real and imaginary parts instead of promoting it to complex (same values)
        eo = torch.fft.ifft2(torch.view_as_complex(spectrum_ri * bank[o][..., None]))  # (S, H, W)
        even, odd = eo.real, eo.imag
        amp = eo.abs()
        sum_an = amp.sum(0)
        sum_e, sum_o = even.sum(0), odd.sum(0)
        max_an = amp.amax(0)
        x_energy = torch.sqrt(sum_e**2 + sum_o**2) + EPS
        mean_e, mean_o = sum_e / x_energy, sum_o / x_energy
        energy = (even * mean_e + odd * mean_o - (even * mean_o - odd * mean_e).abs()).sum(0)
        mean_e2n = -_matlab_median((amp[0] ** 2).flatten()) / math.log(0.5)
        noise_power = mean_e2n / em_n[o]
        tau = torch.sqrt((2 * noise_power * sum_an2[o] + 4 * noise_power * sum_aiaj[o]) / 2)
        threshold = (tau * math.sqrt(math.pi / 2) + K_NOISE * math.sqrt(2 - math.pi / 2) * tau) / 1.7
        energy = (energy - threshold).clamp(min=0)
        width = sum_an / (max_an + EPS) / NSCALE
        weight = 1.0 / (1 + torch.exp((CUT_OFF - width) * GAIN))
        weighted = weight * energy
        total_an = total_an + sum_an
        total_energy = total_energy + weighted
        pc_o = weighted / sum_an
        angle = o * math.pi / NORIENT
        cx, cy = pc_o * math.cos(angle), pc_o * math.sin(angle)
        covx2, covy2, covxy = covx2 + cx * cx, covy2 + cy * cy, covxy + cx * cy
    pc = total_energy / (total_an + EPS)
    covx2, covy2, covxy = covx2 / (NORIENT / 2), covy2 / (NORIENT / 2), covxy / NORIENT
    denom = torch.sqrt(covxy**2 + (covx2 - covy2) ** 2) + EPS
    return pc, (covy2 + covx2 + denom) / 2, (covy2 + covx2 - denom) / 2


def _feature_agreement(x1: Tensor, x2: Tensor, xmax: Tensor, xf: Tensor, masks: tuple[Tensor, Tensor, Tensor]) -> Tensor:
    """Zhao's masked local correlation of one feature map (Gaussian 11/1.5, 'same', C = 1e-4)."""
    m1, m2, m3 = masks
    x1, x2, xmax = x1 * m1, x2 * m2, xmax * m3
    win = gaussian_1d(11, 1.5, device=x1.device)
    stack = torch.stack([x1, x2, xmax, xf, x1 * x1, x2 * x2, xmax * xmax, xf * xf, x1 * xf, x2 * xf, xmax * xf])
    stack = F.pad(stack, (5, 5, 5, 5))  # 'same' with zero borders (filter2)
    mu1, mu2, mum, muf, e11, e22, emm, eff, e1f, e2f, emf = separable_filter(stack, win)
    var_f = eff - muf * muf
    c = 1e-4
    res = []
    for mu, exx, exf, mask in ((mu1, e11, e1f, m1), (mu2, e22, e2f, m2), (mum, emm, emf, m3)):
        var, cov = exx - mu * mu, exf - mu * muf
        val = (cov + c) / (torch.sqrt((var * var_f).abs()) + c)
        res.append(torch.where(mask, val, torch.zeros_like(val)))
    best = torch.maximum(torch.maximum(res[0], res[1]), res[2])
    return best.sum() / m3.sum()


def _qp_single(pa: tuple[Tensor, ...], pb: tuple[Tensor, ...], pf: tuple[Tensor, ...]) -> Tensor:
    pc1, pc2 = pa[0], pb[0]
    first = pc1 > pc2
    masks = (pc1 > FEATURE_THRESHOLD, pc2 > FEATURE_THRESHOLD, torch.where(first, pc1, pc2) > FEATURE_THRESHOLD)
    out = torch.ones((), dtype=torch.float64, device=pc1.device)
    for k in range(3):  # PC, maximum moment M, minimum moment m
        xmax = torch.where(first, pa[k], pb[k])
        out = out * _feature_agreement(pa[k], pb[k], xmax, pf[k], masks)
    return out


@register_metric(
    "Qp",
    higher_is_better=True,
    profiles=("reference", "mefb"),
    reference="Zhao, Laganière & Liu, Int. J. Innov. Comput. Inf. Control 3(6A), 2007; Kovesi, Videre 1(3), 1999",
)
def qp(fused: Tensor, a: Tensor, b: Tensor, *, profile: str = "reference") -> Tensor:
    """Phase-congruency metric Qp = P_PC · P_M · P_m (MEFB's ``metricsQp``), range ≤ 1.

    For each feature (PC and the moments M, m) of A, B and F: masks where PC_A, PC_B, max(PC_A, PC_B)
    exceed 0.1; the masked source maps (and the map of the source with the larger PC) are compared with the
    unmasked F by the local correlation (σ_XF + C)/(√|σ_X² σ_F²| + C), Gaussian 11/1.5 'same' windows,
    C = 1e-4, each zero outside its mask; P = Σ max of the three maps / #(max-PC mask). Inputs are 0–255
    without normalisation; ``mefb`` per RGB channel and averaged.
    """
    f, xa, xb = prepare(profile, fused, a, b)
    if min(f.shape[-2:]) < 2:
        raise ValueError(f"Qp needs both image sides >= 2 pixels; got {tuple(f.shape[-2:])}")
    chans = f.shape[1]

    def pcs(x: Tensor) -> list[list[tuple[Tensor, ...]]]:
        return [[phase_congruency(x[i, c]) for c in range(chans)] for i in range(x.shape[0])]

    # a source of batch 1 is analysed once, for every fused image (and every chunk of a method comparison)
    maps = [per_source(src, ("Qp", profile, x.shape), lambda x=x: pcs(x)) for src, x in ((a, xa), (b, xb))]
    maps.append(pcs(f))
    bsz = max(len(m) for m in maps)
    out = torch.empty(bsz, chans, dtype=torch.float64, device=f.device)
    for i in range(bsz):
        for c in range(chans):
            out[i, c] = _qp_single(*(m[min(i, len(m) - 1)][c] for m in maps))
    return channel_mean(out)
