"""Feature mutual information (FMI) of Haghighat et al., in the fast form of Haghighat & Razian (2014).

For every 3×3 window w of the feature images X′ (a source) and F′ (the fused image), each window is min–max
normalised (a flat window becomes all ones) and divided by its sum, giving pdfs p, f over the 9 positions
(column-major order) and cdfs P, Φ. Their joint pdf is interpolated between the product p_i·f_j and a
Fréchet bound of the joint cdf — the upper bound min(Φ_i, P_j) when the Pearson correlation c of the two pdfs
is ≥ 0, the lower bound max(Φ_i + P_j − 1, 0) when c < 0 — with the weight c / corr(bound), where
corr(bound) = Σ_ij (bound_ij − Φ_i P_j) / (σ_f σ_p) and σ are the population standard deviations of the
positions 1..9 under f and p (weight 0 when c = 0 or a σ is 0). The joint entropy sums −j·log2|j| over the
non-zero cells (the reference code takes the real part of a complex log for negative cells), and
nfmi = 2·MI/(H(p) + H(f)) (0 when MI = 0; 1 when the raw windows are equal). FMI is the mean over the
'valid' windows of (nfmi_AF + nfmi_BF)/2.

Features: ``FMI`` uses MATLAB's ``edge(I)`` (Sobel, automatic threshold, thinning), the default feature of
Haghighat's code and therefore of MEFB; ``FMI_pixel`` the raw pixels; ``FMI_dct`` the orthonormal 2-D
DCT-II of the whole image. Binary edge windows take only 2⁹ patterns, so ``FMI`` looks the per-window value
up in a 512×512 table computed once by the same window routine.
"""

from __future__ import annotations

import functools

import torch
from torch import Tensor

from fusion.metrics._utils import channel_mean, sobel
from fusion.metrics.profiles import per_source, prepare
from fusion.metrics.registry import register_metric

__all__ = ["fmi", "fmi_dct", "fmi_pixel", "matlab_sobel_edges", "window_nfmi"]

MATLAB_EPS = 2.220446049250313e-16
_REF = "Haghighat, Aghagolzadeh & Seyedarabi, Comput. Electr. Eng. 37(5), 2011; fast FMI: Haghighat & Razian, AICT 2014"


def matlab_sobel_edges(x: Tensor) -> Tensor:
    """MATLAB ``edge(I)`` (default Sobel method) of (B, C, H, W) float images → bool edge map.

    Gradients bx, by: correlation with [1 0 −1; 2 0 −2; 1 0 −1]/8 and its transpose, replicated borders;
    b = bx² + by²; threshold cutoff = 4·mean(b); thinning keeps a pixel with b > cutoff that is a
    horizontal local maximum where |bx| ≥ |by| − 100·eps (b(r,c−1) ≤ b(r,c) > b(r,c+1)) or a vertical one
    where |by| ≥ |bx| − 100·eps (b(r−1,c) ≤ b(r,c) > b(r+1,c)); neighbours beyond the border always pass.
    """
    sx, sy = sobel(x.to(torch.float64), "replicate")
    bx, by = sx / 8, sy / 8
    b = bx * bx + by * by
    cutoff = 4 * b.mean(dim=(-2, -1), keepdim=True)
    bx, by = bx.abs(), by.abs()
    true_col = torch.ones_like(b[..., :, :1], dtype=torch.bool)
    true_row = torch.ones_like(b[..., :1, :], dtype=torch.bool)
    left = torch.cat([true_col, b[..., :, :-1] <= b[..., :, 1:]], dim=-1)
    right = torch.cat([b[..., :, :-1] > b[..., :, 1:], true_col], dim=-1)
    up = torch.cat([true_row, b[..., :-1, :] <= b[..., 1:, :]], dim=-2)
    down = torch.cat([b[..., :-1, :] > b[..., 1:, :], true_row], dim=-2)
    tol = 100 * MATLAB_EPS
    horizontal = (bx >= by - tol) & left & right
    vertical = (by >= bx - tol) & up & down
    return (b > cutoff) & (horizontal | vertical)


def _pdf(w: Tensor) -> Tensor:
    mx, mn = w.amax(-1, keepdim=True), w.amin(-1, keepdim=True)
    flat = mx == mn
    w = torch.where(flat, torch.ones_like(w), (w - mn) / torch.where(flat, torch.ones_like(mx), mx - mn))
    return w / w.sum(-1, keepdim=True)


def _entropy(p: Tensor) -> Tensor:
    nz = p != 0
    return -torch.where(nz, p * torch.log2(torch.where(nz, p.abs(), torch.ones_like(p))), torch.zeros_like(p)).sum(-1)


def window_nfmi(x: Tensor, f: Tensor) -> Tensor:
    """Normalised feature MI of windows: x, f (N, n) feature values (column-major windows) → (N,)."""
    x, f = x.to(torch.float64), f.to(torch.float64)
    equal = (x == f).all(-1)
    p, q = _pdf(x), _pdf(f)
    pc, qc = p.cumsum(-1), q.cumsum(-1)
    pt, qt = p - p.mean(-1, keepdim=True), q - q.mean(-1, keepdim=True)
    s = (pt * qt).sum(-1)
    c = torch.where(s == 0, torch.zeros_like(s), s / torch.sqrt((pt * pt).sum(-1) * (qt * qt).sum(-1)))
    pos = torch.arange(1, x.shape[-1] + 1, dtype=torch.float64, device=x.device)
    sd_p = torch.sqrt(((pos * pos) * p).sum(-1) - ((pos * p).sum(-1)) ** 2)
    sd_q = torch.sqrt(((pos * pos) * q).sum(-1) - ((pos * q).sum(-1)) ** 2)
    qi, pj = qc[:, :, None], pc[:, None, :]  # rows: fused positions i, columns: source positions j
    indep = qi * pj
    negative = (c < 0)[:, None, None]
    bound = torch.where(negative, (qi + pj - 1).clamp(min=0), torch.minimum(qi, pj))
    corr = (bound - indep).sum(dim=(-2, -1)) / (sd_q * sd_p)
    degenerate = (sd_p == 0) | (sd_q == 0) | (c == 0)
    weight = torch.where(degenerate, torch.zeros_like(c), c / torch.where(degenerate, torch.ones_like(corr), corr))
    jb = torch.diff(torch.diff(bound, dim=-2, prepend=torch.zeros_like(bound[:, :1])), dim=-1,
                    prepend=torch.zeros_like(bound[:, :, :1]))
    joint = weight[:, None, None] * jb + (1 - weight[:, None, None]) * q[:, :, None] * p[:, None, :]
    h_joint = _entropy(joint.flatten(1))
    h_p, h_q = _entropy(p), _entropy(q)
    mi = h_p + h_q - h_joint
    nfmi = torch.where(mi == 0, torch.zeros_like(mi), 2 * mi / torch.where(mi == 0, torch.ones_like(mi), h_p + h_q))
    return torch.where(equal, torch.ones_like(nfmi), nfmi)


def _windows(x: Tensor, size: int = 3) -> Tensor:
    """(H, W) → ((H−size+1)(W−size+1), size²) 'valid' windows flattened column-major."""
    u = x.unfold(0, size, 1).unfold(1, size, 1)  # (h, w, row, col)
    return u.transpose(-1, -2).reshape(-1, size * size)


def _fmi_map_mean(xf: Tensor, ff: Tensor, chunk: int = 1 << 15) -> Tensor:
    """Mean over windows of nfmi for one (H, W) source/fused feature pair."""
    xw, fw = _windows(xf), _windows(ff)
    total = torch.zeros((), dtype=torch.float64, device=xf.device)
    for i in range(0, xw.shape[0], chunk):
        total = total + window_nfmi(xw[i : i + chunk], fw[i : i + chunk]).sum()
    return total / xw.shape[0]


@functools.lru_cache(maxsize=4)
def _binary_table(device: str) -> Tensor:
    """nfmi of every pair of binary 3×3 patterns: table[source code, fused code] (bit t ↔ column-major t)."""
    codes = torch.arange(512, device=device)
    bits = ((codes[:, None] >> torch.arange(9, device=device)) & 1).to(torch.float64)
    src = bits.repeat_interleave(512, 0)
    fus = bits.repeat(512, 1)
    out = torch.cat([window_nfmi(src[i : i + 16384], fus[i : i + 16384]) for i in range(0, src.shape[0], 16384)])
    return out.reshape(512, 512)


def _codes(e: Tensor) -> Tensor:
    """(…, H, W) bool edge maps → 9-bit codes of the 'valid' 3×3 windows (bit t = column-major position t)."""
    h, w = e.shape[-2:]
    e = e.to(torch.int64)
    code = torch.zeros(*e.shape[:-2], h - 2, w - 2, dtype=torch.int64, device=e.device)
    for dc in range(3):
        for dr in range(3):
            code = code | (e[..., dr : dr + h - 2, dc : dc + w - 2] << (dr + 3 * dc))
    return code


def _check_size(f: Tensor) -> None:
    if min(f.shape[-2:]) < 3:
        raise ValueError(f"FMI needs both image sides >= 3 pixels; got {tuple(f.shape[-2:])}")


@register_metric("FMI", higher_is_better=True, profiles=("reference", "mefb"), reference=_REF, aliases=("FMI_edge",))
def fmi(fused: Tensor, a: Tensor, b: Tensor, *, profile: str = "reference") -> Tensor:
    """FMI on MATLAB ``edge`` (Sobel) feature maps, 3×3 windows (MEFB's ``metricsFMI``), range 0–1.

    Per RGB channel and averaged under ``mefb``; the profile's grey image under ``reference``.
    """
    f, xa, xb = prepare(profile, fused, a, b)
    _check_size(f)
    table = _binary_table(str(f.device))
    cf = _codes(matlab_sobel_edges(f))
    ca, cb = (per_source(src, ("FMI", profile, x.shape), lambda x=x: _codes(matlab_sobel_edges(x)))
              for src, x in ((a, xa), (b, xb)))
    per_window = 0.5 * (table[ca, cf] + table[cb, cf])
    return channel_mean(per_window.mean(dim=(-2, -1)))


def _fmi_features(f: Tensor, xa: Tensor, xb: Tensor, feature) -> Tensor:
    f, xa, xb = torch.broadcast_tensors(f, xa, xb)
    out = torch.empty(f.shape[:2], dtype=torch.float64, device=f.device)
    for i in range(f.shape[0]):
        for c in range(f.shape[1]):
            ff = feature(f[i, c])
            out[i, c] = 0.5 * (_fmi_map_mean(feature(xa[i, c]), ff) + _fmi_map_mean(feature(xb[i, c]), ff))
    return channel_mean(out)


@register_metric("FMI_pixel", higher_is_better=True, profiles=("reference",), reference=_REF)
def fmi_pixel(fused: Tensor, a: Tensor, b: Tensor, *, profile: str = "reference") -> Tensor:
    """FMI on the raw pixels (Haghighat's feature ``'none'``), 3×3 windows, range 0–1."""
    f, xa, xb = prepare(profile, fused, a, b)
    _check_size(f)
    return _fmi_features(f, xa, xb, lambda t: t)


def dct2(x: Tensor) -> Tensor:
    """Orthonormal 2-D DCT-II of an (H, W) image (MATLAB ``dct2``), by two matrix products."""

    def basis(n: int) -> Tensor:
        k = torch.arange(n, dtype=torch.float64, device=x.device)
        m = torch.cos(torch.pi * (2 * k[None, :] + 1) * k[:, None] / (2 * n)) * (2.0 / n) ** 0.5
        m[0] /= 2**0.5
        return m

    return basis(x.shape[-2]) @ x.to(torch.float64) @ basis(x.shape[-1]).T


@register_metric("FMI_dct", higher_is_better=True, profiles=("reference",), reference=_REF)
def fmi_dct(fused: Tensor, a: Tensor, b: Tensor, *, profile: str = "reference") -> Tensor:
    """FMI on the orthonormal DCT-II coefficients of each whole image (feature ``'dct'``), 3×3 windows."""
    f, xa, xb = prepare(profile, fused, a, b)
    _check_size(f)
    return _fmi_features(f, xa, xb, dct2)
