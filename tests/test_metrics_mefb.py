"""The MEFB metrics and the ``mefb`` profile: closed forms, properties and independent NumPy oracles.

Every oracle below is a plain, loop-level NumPy transcription of a metric's definition as MEFB's MATLAB code
states it (one window, one histogram cell at a time), written without the implementation under test, and
checked on small images where the loops are cheap.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy.signal import correlate2d

import fusion.metrics as M
from bilevel.registry import UnknownNameError
from fusion.metrics import feature_mi, phase
from tests.conftest import shared_data_dir


def textured(h: int = 48, w: int = 52, seed: int = 0, channels: int = 1) -> torch.Tensor:
    """Smooth random texture in [0.1, 0.9] (float64, quantised by the mefb profile)."""
    g = torch.Generator().manual_seed(seed)
    coarse = torch.rand(1, channels, h // 6 + 1, w // 6 + 1, generator=g, dtype=torch.float64)
    x = torch.nn.functional.interpolate(coarse, size=(h, w), mode="bilinear", align_corners=True)
    x = x + 0.2 * torch.rand(1, channels, h, w, generator=g, dtype=torch.float64)
    return 0.1 + 0.8 * (x - x.amin()) / (x.amax() - x.amin())


def u8(x: torch.Tensor) -> np.ndarray:
    """The uint8 levels (as float64) that the mefb profile works on, channel by channel."""
    return np.floor(x[0].numpy() * 255 + 0.5)


def value(name: str, f, a, b, profile: str = "mefb") -> float:
    return M.get_metric(name)(f, a, b, profile=profile)[0].item()


# ------------------------------------------------------------------------------------------ NumPy oracles
def np_normalize1(x: np.ndarray) -> np.ndarray:
    lo, hi = x.min(), x.max()
    return x if lo == hi == 0 else np.floor((x - lo) / (hi - lo) * 255 + 0.5)


def np_joint(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    h = np.zeros((256, 256))
    for u, v in zip(x.astype(int).ravel(), y.astype(int).ravel()):
        h[u, v] += 1  # rows: first image, columns: second image (as the MATLAB loops)
    return h / h.sum()


def np_entropy(p: np.ndarray) -> float:
    p = p[p > 0]
    return float(-(p * np.log2(p)).sum())


def np_mi_terms(x, y):
    h = np_joint(x, y)
    hx, hy = np_entropy(h.sum(1)), np_entropy(h.sum(0))
    return hx + hy - np_entropy(h.ravel()), hx, hy


def np_nmi(a, b, f):
    a, b, f = np_normalize1(a), np_normalize1(b), np_normalize1(f)
    ia, ha, hfa = np_mi_terms(a, f)
    ib, hb, hfb = np_mi_terms(b, f)
    return 2 * (ia / (ha + hfa) + ib / (hb + hfb))


def np_qncie(a, b, f):
    a, b, f = np_normalize1(a), np_normalize1(b), np_normalize1(f)
    ncc = lambda x, y: np_mi_terms(x, y)[0] / 8.0
    r = np.array([[1, ncc(a, b), ncc(a, f)], [ncc(a, b), 1, ncc(b, f)], [ncc(a, f), ncc(b, f), 1]])
    lam = np.linalg.eigvalsh(r) / 3
    return 1 + float(sum(v * math.log(v, 256) for v in lam if v > 0))


def np_tsallis_liu(x, y, q=1.85):
    """Z. Liu's ``tsallis``: h(i, j) = P(x = i, y = j); the 'marginals' are the column and row sums."""
    h = np_joint(x, y)
    m1 = h.sum(0)  # MATLAB sum(h): column sums, i.e. the marginal of y
    m2 = h.sum(1)  # sum(h'): row sums, the marginal of x
    total = 0.0
    for i in range(256):
        for j in range(256):
            buff = m1[i] * m2[j]
            if buff != 0:
                total += h[i, j] ** q / buff ** (q - 1)
    return (1 - total) / (1 - q)


def np_te(a, b, f):
    a, b, f = np_normalize1(a), np_normalize1(b), np_normalize1(f)
    return np_tsallis_liu(a, f) + np_tsallis_liu(b, f)


def np_gauss(n, sigma):
    r = np.arange(n) - (n - 1) / 2
    g = np.exp(-(r[:, None] ** 2 + r[None, :] ** 2) / (2 * sigma**2))
    return g / g.sum()


def np_ssim_map(x, y, n, sigma, c1, c2, mode="valid"):
    """Wang's ssim_index with a Gaussian window via ``filter2`` (2-D correlation), returning the moments too."""
    w = np_gauss(n, sigma)
    filt = lambda t: correlate2d(t, w, mode=mode)
    mx, my = filt(x), filt(y)
    vx, vy, vxy = filt(x * x) - mx * mx, filt(y * y) - my * my, filt(x * y) - mx * my
    s = ((2 * mx * my + c1) * (2 * vxy + c2)) / ((mx * mx + my * my + c1) * (vx + vy + c2))
    return s, vx, vy, vxy


def np_qc(a, b, f):
    sa, _, _, caf = np_ssim_map(a, f, 7, 1.5, 2e-16, 2e-16)
    sb, _, _, cbf = np_ssim_map(b, f, 7, 1.5, 2e-16, 2e-16)
    mu = caf / (caf + cbf)
    sim = mu * sa + (1 - mu) * sb
    sim[mu < 0] = 0
    sim[mu > 1] = 1
    return float(np.nanmean(sim))


def np_qy(a, b, f):
    sab, va, vb, _ = np_ssim_map(a, b, 7, 1.5, 2e-16, 2e-16)
    saf = np_ssim_map(a, f, 7, 1.5, 2e-16, 2e-16)[0]
    sbf = np_ssim_map(b, f, 7, 1.5, 2e-16, 2e-16)[0]
    binary = sab >= 0.75
    lam = va / (va + vb)
    q = (lam * saf + (1 - lam) * sbf) * binary + np.maximum(saf, sbf) * (~binary)
    return float(np.nanmean(q))


def np_qw_edge(a, b, f):
    k1 = np.array([[1, 0, -1], [1, 0, -1], [1, 0, -1]], float)

    def edge(x):
        gx, gy = correlate2d(x, k1, mode="same"), correlate2d(x, k1.T, mode="same")
        return np.sqrt(gx * gx + gy * gy)

    ea, eb, ef = edge(a), edge(b), edge(f)
    c1, c2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2
    _, va, vb, _ = np_ssim_map(ea, eb, 11, 1.5, c1, c2)
    zero = (va + vb) == 0
    va, vb = va + 0.5 * zero, vb + 0.5 * zero
    lam = va / (va + vb)
    sa = np_ssim_map(ef, ea, 11, 1.5, c1, c2)[0]
    sb = np_ssim_map(ef, eb, 11, 1.5, c1, c2)[0]
    cw = np.maximum(va, vb)
    return float((cw / cw.sum() * (lam * sa + (1 - lam) * sb)).sum())


def np_mef_ssim_level(seq, f):
    """Ma et al.'s mef_ssim patch loop (11×11 patches, Gaussian 11/1.5, K = 0.03)."""
    eps = np.finfo(float).eps
    n, bd = 11, 5
    win = np_gauss(11, 1.5).ravel(order="F")
    h, w = f.shape
    out = []
    for i in range(bd, h - bd):
        for j in range(bd, w - bd):
            vecs = [s[i - bd : i + bd + 1, j - bd : j + bd + 1].ravel(order="F") for s in seq]
            mus = [v.mean() for v in vecs]
            eds = [np.sqrt(max(n * n * (np.mean(v * v) - m * m), 0)) + 0.001 for v, m in zip(vecs, mus)]
            den = sum(np.linalg.norm(v - m) for v, m in zip(vecs, mus))
            tot = sum(vecs)
            r = (np.linalg.norm(tot - tot.mean()) + eps) / (den + eps)
            r = 1 - eps if r > 1 else max(r, eps)
            p = min(math.tan(math.pi / 2 * r), 10)
            wts = [(e / n) ** p + eps for e in eds]
            wts = [x / sum(wts) for x in wts]
            rb = sum(wk * (v - m) / e for wk, v, m, e in zip(wts, vecs, mus, eds))
            if np.linalg.norm(rb) > 0:
                rb = rb / np.linalg.norm(rb) * max(eds)
            fv = f[i - bd : i + bd + 1, j - bd : j + bd + 1].ravel(order="F")
            m1, m2 = (win * rb).sum(), (win * fv).sum()
            s1, s2 = (win * (rb - m1) ** 2).sum(), (win * (fv - m2) ** 2).sum()
            s12 = (win * (rb - m1) * (fv - m2)).sum()
            c = (0.03 * 255) ** 2
            out.append((2 * s12 + c) / (s1 + s2 + c))
    return float(np.mean(out))


def np_halve(x):
    p = np.pad(x, ((0, 1), (0, 1)), mode="symmetric")  # imfilter 'symmetric' with the 2×2 mean
    d = (p[:-1, :-1] + p[1:, :-1] + p[:-1, 1:] + p[1:, 1:]) / 4
    return d[::2, ::2]


def np_mef_ms_ssim(a, b, f):
    wts = np.array([0.0448, 0.2856, 0.3001])
    wts = wts / wts.sum()
    seq, q = [a, b], 1.0
    for level in range(3):
        if level:
            seq, f = [np_halve(s) for s in seq], np_halve(f)
        q *= np_mef_ssim_level(seq, f) ** wts[level]
    return q


def np_viff(a, b, f):
    """Han et al.'s VIFF with the VIF channel model (Gaussian windows, 'valid' filter2, decimation)."""
    sq, c = 0.005 * 255 * 255, 1e-7
    p = np.array([1, 0, 0.15, 1]) / 2.15

    def channel(ref, dist):
        gs, nums, dens = [], [], []
        for scale in range(1, 5):
            n = 2 ** (4 - scale + 1) + 1
            win = np_gauss(n, n / 5)
            if scale > 1:
                ref = correlate2d(ref, win, mode="valid")[::2, ::2]
                dist = correlate2d(dist, win, mode="valid")[::2, ::2]
            filt = lambda t, w=win: correlate2d(t, w, mode="valid")
            mu1, mu2 = filt(ref), filt(dist)
            s1 = np.maximum(filt(ref * ref) - mu1 * mu1, 0)
            s2 = np.maximum(filt(dist * dist) - mu2 * mu2, 0)
            s12 = filt(ref * dist) - mu1 * mu2
            g = s12 / (s1 + 1e-10)
            sv = s2 - g * s12
            low1 = s1 < 1e-10
            g[low1], sv[low1], s1[low1] = 0, s2[low1], 0
            low2 = s2 < 1e-10
            g[low2], sv[low2] = 0, 0
            neg = g < 0
            sv[neg], g[neg] = s2[neg], 0
            sv[sv <= 1e-10] = 1e-10
            gs.append(g)
            nums.append(np.log10(1 + g**2 * s1 / (sv + sq)))
            dens.append(np.log10(1 + s1 / sq))
        return gs, nums, dens

    ga, na, da = channel(a, f)
    gb, nb, db = channel(b, f)
    total = 0.0
    for i in range(4):
        pick = ga[i] < gb[i]
        vid, vind = np.where(pick, na[i], nb[i]), np.where(pick, da[i], db[i])
        total += p[i] * (vid + c).sum() / (vind + c).sum()
    return total


def np_matlab_edge(x):
    """MATLAB ``edge(I)`` (Sobel, automatic threshold, thinning), pixel by pixel."""
    k = np.array([[1, 2, 1], [0, 0, 0], [-1, -2, -1]], float) / 8
    p = np.pad(x, 1, mode="edge")
    bx = correlate2d(p, k.T, mode="valid")
    by = correlate2d(p, k, mode="valid")
    b = bx * bx + by * by
    cutoff = 4 * b.mean()
    bx, by = np.abs(bx), np.abs(by)
    m, n = b.shape
    e = np.zeros_like(b, dtype=bool)
    tol = 100 * np.finfo(float).eps
    for r in range(m):
        for c in range(n):
            b1 = c == 0 or b[r, c - 1] <= b[r, c]
            b2 = c == n - 1 or b[r, c] > b[r, c + 1]
            b3 = r == 0 or b[r - 1, c] <= b[r, c]
            b4 = r == m - 1 or b[r, c] > b[r + 1, c]
            e[r, c] = b[r, c] > cutoff and ((bx[r, c] >= by[r, c] - tol and b1 and b2) or
                                            (by[r, c] >= bx[r, c] - tol and b3 and b4))
    return e.astype(float)


def np_nfmi(a_sub, f_sub):
    """One window of Haghighat's fast FMI, with the explicit corner / boundary / wall loops of the paper."""
    if np.array_equal(a_sub, f_sub):
        return 1.0

    def pdf(s):
        s = np.ones_like(s) if s.max() == s.min() else (s - s.min()) / (s.max() - s.min())
        v = s.ravel(order="F")
        return v / v.sum()

    ap, fp = pdf(a_sub), pdf(f_sub)
    ac, fc = np.cumsum(ap), np.cumsum(fp)
    at, ft = ap - ap.mean(), fp - fp.mean()
    c = 0.0 if (at * ft).sum() == 0 else (at * ft).sum() / math.sqrt((at * at).sum() * (ft * ft).sum())
    idx = np.arange(1, 10)
    asd = math.sqrt(max((idx**2 * ap).sum() - (idx * ap).sum() ** 2, 0))
    fsd = math.sqrt(max((idx**2 * fp).sum() - (idx * fp).sum() ** 2, 0))
    upper = lambda u, v: 0.5 * (u + v - abs(u - v))
    lower = lambda u, v: 0.5 * (u + v - 1 + abs(u + v - 1))
    bound = upper if c >= 0 else lower
    if c == 0 or asd == 0 or fsd == 0:
        wt = 0.0
    else:
        cov = sum(bound(fc[i], ac[j]) - fc[i] * ac[j] for i in range(9) for j in range(9))
        wt = c / (cov / (fsd * asd))
    joint = 0.0
    for i in range(9):
        for j in range(9):
            cell = bound(fc[i], ac[j])
            if i:
                cell -= bound(fc[i - 1], ac[j])
            if j:
                cell -= bound(fc[i], ac[j - 1])
            if i and j:
                cell += bound(fc[i - 1], ac[j - 1])
            jp = wt * cell + (1 - wt) * fp[i] * ap[j]
            if jp != 0:
                joint += -jp * math.log2(abs(jp))
    ha, hf = np_entropy(ap), np_entropy(fp)
    mi = ha + hf - joint
    return 0.0 if mi == 0 else 2 * mi / (ha + hf)


def np_fmi(a, b, f, feature):
    fa, fb, ff = feature(a), feature(b), feature(f)
    h, w = f.shape
    vals = [
        0.5 * (np_nfmi(fa[p - 1 : p + 2, q - 1 : q + 2], ff[p - 1 : p + 2, q - 1 : q + 2])
               + np_nfmi(fb[p - 1 : p + 2, q - 1 : q + 2], ff[p - 1 : p + 2, q - 1 : q + 2]))
        for p in range(1, h - 1)
        for q in range(1, w - 1)
    ]
    return float(np.mean(vals))


def per_channel(fn, f, a, b):
    return float(np.mean([fn(u8(a)[c], u8(b)[c], u8(f)[c]) for c in range(f.shape[1])]))


# -------------------------------------------------------------------------------------------- registry
def test_mefb_profile_order_and_unknown_names():
    assert M.list_metrics("mefb") == list(M.MEFB_METRICS)
    assert len(M.MEFB_METRICS) == 20 and M.MEFB_METRICS[-1] == "VIFF"
    with pytest.raises(UnknownNameError, match="mefb"):
        M.get_profile("mefbb")
    with pytest.raises(UnknownNameError, match="Qncie"):
        M.get_metric("Qnice")
    with pytest.raises(M.ProfileError):
        M.vif(textured(), textured(), textured(), profile="mefb")  # MEFB's "VIF" column is VIFF


# ------------------------------------------------------------------------------------------- goldens
@pytest.fixture(scope="module")
def triple():
    a, b = textured(seed=1, channels=3), textured(seed=2, channels=3)
    f = 0.6 * a + 0.4 * b.flip(-1)
    return f, a, b


@pytest.mark.parametrize(
    "name, oracle, tol",
    [
        ("NMI", np_nmi, 1e-10),
        ("Qncie", np_qncie, 1e-10),
        ("TE", np_te, 1e-9),
        ("Qc", np_qc, 1e-9),
        ("Qy", np_qy, 1e-9),
        ("Qw", np_qw_edge, 1e-9),
    ],
)
def test_mefb_golden_against_numpy(triple, name, oracle, tol):
    f, a, b = triple
    assert value(name, f, a, b) == pytest.approx(per_channel(oracle, f, a, b), rel=tol, abs=tol)


def test_viff_golden(triple):
    f, a, b = (torch.nn.functional.interpolate(t, size=(72, 70), mode="bilinear") for t in triple)
    assert value("VIFF", f, a, b) == pytest.approx(per_channel(np_viff, f, a, b), rel=1e-9)


def test_mef_ssim_golden(triple):
    f, a, b = triple

    def grey(x):  # MATLAB rgb2gray of uint8, rounded
        v = u8(x)
        return np.floor(0.298936021293775 * v[0] + 0.587043074451121 * v[1] + 0.114020904255103 * v[2] + 0.5)

    expected = np_mef_ms_ssim(grey(a), grey(b), grey(f))
    assert value("MEF_SSIM", f, a, b) == pytest.approx(expected, rel=1e-9)


def test_matlab_edge_golden():
    x = u8(textured(20, 23, seed=4))[0]
    ours = feature_mi.matlab_sobel_edges(torch.from_numpy(x)[None, None])[0, 0].numpy()
    np.testing.assert_array_equal(ours, np_matlab_edge(x).astype(bool))


def test_fmi_golden():
    a, b = textured(14, 15, seed=5), textured(14, 15, seed=6)
    f = 0.5 * (a + b)
    args = (u8(a)[0], u8(b)[0], u8(f)[0])
    assert value("FMI", f, a, b) == pytest.approx(np_fmi(*args, np_matlab_edge), rel=1e-10)
    raw = (a[0, 0].numpy() * 255, b[0, 0].numpy() * 255, f[0, 0].numpy() * 255)  # reference: float, unrounded
    assert value("FMI_pixel", f, a, b, "reference") == pytest.approx(np_fmi(*raw, lambda t: t), rel=1e-9)


def test_fmi_dct_feature_is_orthonormal_dct2():
    from scipy.fft import dctn

    x = torch.rand(7, 9, dtype=torch.float64)
    np.testing.assert_allclose(feature_mi.dct2(x).numpy(), dctn(x.numpy(), norm="ortho"), atol=1e-12)


def test_fmi_hand_window():
    """A 3×3 window by hand: the source is a single bright pixel, the fused window flat.

    The source pdf is a delta (σ = 0), the fused pdf uniform (1/9 each); the Pearson correlation of the
    pdfs is 0 (the uniform pdf has no deviation), so the joint pdf is the product: H(joint) = log2 9 =
    H(a) + H(f) and MI = 0, hence nfmi = 0. Equal raw windows score 1.
    """
    a = torch.zeros(1, 9, dtype=torch.float64)
    a[0, 4] = 1
    flat = torch.ones(1, 9, dtype=torch.float64)
    assert feature_mi.window_nfmi(a, flat).item() == 0.0
    assert feature_mi.window_nfmi(flat, flat).item() == 1.0


# -------------------------------------------------------------------------------------- phase congruency
def np_phasecong(im):
    """Kovesi/Liu myphasecong3 in NumPy (default parameters), returning PC, M, m."""
    rows, cols = im.shape
    rng = lambda n: (np.arange(n) - (n - 1) / 2) / (n - 1) if n % 2 else (np.arange(n) - n // 2) / n
    x, y = np.meshgrid(rng(cols), rng(rows))
    radius = np.sqrt(x**2 + y**2)
    radius[rows // 2, cols // 2] = 1
    theta = np.arctan2(-y, x)
    radius, theta = np.fft.ifftshift(radius), np.fft.ifftshift(theta)
    lx = (np.ones((rows, 1)) * np.arange(1, cols + 1) - (cols // 2 + 1)) / cols
    ly = (np.arange(1, rows + 1)[:, None] * np.ones((1, cols)) - (rows // 2 + 1)) / rows
    lp = np.fft.fftshift(1 / (1 + (np.sqrt(lx**2 + ly**2) / 0.45) ** 30))
    log_gabor = []
    for s in range(4):
        fo = 1 / (3 * 2.1**s)
        g = np.exp(-(np.log(radius / fo) ** 2) / (2 * np.log(0.55) ** 2)) * lp
        g[0, 0] = 0
        log_gabor.append(g)
    spec = np.fft.fft2(im)
    eps, ts = 1e-4, np.pi / 6 / 1.2
    tot_e, tot_a = np.zeros_like(im), np.zeros_like(im)
    cx2, cy2, cxy = np.zeros_like(im), np.zeros_like(im), np.zeros_like(im)
    for o in range(6):
        ang = o * np.pi / 6
        ds = np.sin(theta) * np.cos(ang) - np.cos(theta) * np.sin(ang)
        dc = np.cos(theta) * np.cos(ang) + np.sin(theta) * np.sin(ang)
        spread = np.exp(-(np.abs(np.arctan2(ds, dc)) ** 2) / (2 * ts**2))
        eos, iffts = [], []
        for s in range(4):
            filt = log_gabor[s] * spread
            iffts.append(np.real(np.fft.ifft2(filt)) * np.sqrt(rows * cols))
            eos.append(np.fft.ifft2(spec * filt))
            if s == 0:
                em_n = (filt**2).sum()
        sum_an = sum(np.abs(e) for e in eos)
        sum_e, sum_o = sum(e.real for e in eos), sum(e.imag for e in eos)
        max_an = np.max([np.abs(e) for e in eos], axis=0)
        xe = np.sqrt(sum_e**2 + sum_o**2) + eps
        me, mo = sum_e / xe, sum_o / xe
        energy = sum(e.real * me + e.imag * mo - np.abs(e.real * mo - e.imag * me) for e in eos)
        noise = -np.median(np.abs(eos[0]) ** 2) / np.log(0.5) / em_n
        an2 = sum((f**2).sum() for f in iffts)
        aiaj = sum((iffts[i] * iffts[j]).sum() for i in range(4) for j in range(i + 1, 4))
        tau = np.sqrt((2 * noise * an2 + 4 * noise * aiaj) / 2)
        t = (tau * np.sqrt(np.pi / 2) + 2 * np.sqrt((2 - np.pi / 2) * tau**2)) / 1.7
        energy = np.maximum(energy - t, 0)
        weight = 1 / (1 + np.exp((0.5 - sum_an / (max_an + eps) / 4) * 10))
        tot_a += sum_an
        tot_e += weight * energy
        pc = weight * energy / sum_an
        cx2 += (pc * np.cos(ang)) ** 2
        cy2 += (pc * np.sin(ang)) ** 2
        cxy += pc * np.cos(ang) * pc * np.sin(ang)
    cx2, cy2, cxy = cx2 / 3, cy2 / 3, cxy / 6
    denom = np.sqrt(cxy**2 + (cx2 - cy2) ** 2) + eps
    return tot_e / (tot_a + eps), (cy2 + cx2 + denom) / 2, (cy2 + cx2 - denom) / 2


def np_qp(a, b, f):
    pa, pb, pf = np_phasecong(a), np_phasecong(b), np_phasecong(f)
    first = pa[0] > pb[0]
    m1, m2 = pa[0] > 0.1, pb[0] > 0.1
    m3 = np.where(first, pa[0], pb[0]) > 0.1
    out = 1.0
    for k in range(3):
        x1, x2, xm, xf = pa[k] * m1, pb[k] * m2, np.where(first, pa[k], pb[k]) * m3, pf[k]
        res = []
        for x, m in ((x1, m1), (x2, m2), (xm, m3)):
            s = np_ssim_map(x, xf, 11, 1.5, 0, 0, mode="same")
            val = (s[3] + 1e-4) / (np.sqrt(np.abs(s[1] * s[2])) + 1e-4)
            res.append(np.where(m, val, 0))
        out *= np.max(res, axis=0).sum() / m3.sum()
    return out


@pytest.mark.parametrize("size", [(24, 30), (25, 27)])
def test_phase_congruency_golden(size):
    x = u8(textured(*size, seed=7))[0]
    for ours, ref in zip(phase.phase_congruency(torch.from_numpy(x)), np_phasecong(x)):
        np.testing.assert_allclose(ours.numpy(), ref, rtol=1e-9, atol=1e-12)


def test_qp_golden():
    a, b = textured(30, 32, seed=8), textured(30, 32, seed=9)
    f = 0.5 * (a + b)
    assert value("Qp", f, a, b) == pytest.approx(np_qp(u8(a)[0], u8(b)[0], u8(f)[0]), rel=1e-9)


# ------------------------------------------------------------------------------------------ properties
MEFB_NEW = ["FMI", "NMI", "Qncie", "TE", "Qp", "Qc", "Qw", "Qy", "MEF_SSIM", "VIFF"]


@pytest.fixture(scope="module")
def big():
    a, b = textured(72, 76, seed=11), textured(72, 76, seed=12)
    return a, b, 0.5 * (a + b)


@pytest.mark.parametrize(
    "name, expected", [("FMI", 1.0), ("NMI", 2.0), ("Qc", 1.0), ("Qw", 1.0), ("Qy", 1.0), ("MEF_SSIM", 1.0),
                       ("VIFF", 1.0)]
)
def test_identical_inputs(big, name, expected):
    a = big[0]
    assert value(name, a, a, a) == pytest.approx(expected, abs=1e-9)


@pytest.mark.parametrize("name", ["FMI", "NMI", "Qncie", "TE", "Qw", "Qy", "MEF_SSIM"])
def test_symmetric_in_sources(big, name):
    """Qc is not symmetric as coded: swapping A and B maps μ to 1 − μ, and its clip rules (0 below 0,
    1 above 1) then differ; Qp's and VIFF's tie rules prefer one source."""
    a, b, f = big
    assert value(name, f, a, b) == pytest.approx(value(name, f, b, a), rel=1e-12, abs=1e-12)


@pytest.mark.parametrize("name, lo, hi", [("FMI", 0, 1), ("NMI", 0, 2), ("Qncie", 0, 1), ("Qc", -1, 1),
                                          ("Qy", -1, 1), ("Qw", -1, 1), ("MEF_SSIM", 0, 1), ("VIFF", 0, 1.5),
                                          ("Qp", -1, 1)])
def test_ranges(big, name, lo, hi):
    a, b, f = big
    v = value(name, f, a, b)
    assert lo <= v <= hi
    noisy = (f + 0.2 * torch.rand(f.shape, generator=torch.Generator().manual_seed(3), dtype=f.dtype)).clamp(0, 1)
    if name not in ("NMI", "Qncie"):  # histogram MI on 5,472 pixels is biased upward by noise
        assert value(name, noisy, a, b) < v


def test_closed_forms_for_identical_images():
    """A = B = F with k equally likely grey levels (a uniform histogram) gives closed forms.

    NMI = 2·[H/(2H)]·2 = 2. Every NCC is H/8 = log2(k)/8 = r, so R has eigenvalues 1 + 2r, 1 − r, 1 − r and
    Q_NCIE = 1 + Σ (λ/3)·log_256(λ/3). TE (reference, untransposed): I_q(X;X) = (1 − Σ_i p_i^q/p_i^(2q−2))/(1 − q)
    = (1 − k^(q−1))/(1 − q) for p_i = 1/k, twice.
    """
    k = 16
    levels = torch.arange(k, dtype=torch.float64).repeat_interleave(4) * 17 / 255  # 0, 17, …, 255 (normalize1-fixed)
    x = levels.reshape(8, 8)[None, None]
    assert value("NMI", x, x, x) == pytest.approx(2.0, abs=1e-12)
    r = math.log2(k) / 8
    lam = [(1 + 2 * r) / 3, (1 - r) / 3, (1 - r) / 3]
    assert value("Qncie", x, x, x) == pytest.approx(1 + sum(v * math.log(v, 256) for v in lam), abs=1e-12)
    q = 1.85
    assert value("TE", x, x, x, "reference") == pytest.approx(2 * (1 - k ** (q - 1)) / (1 - q), rel=1e-12)
    assert value("TE", x, x, x, "mefb") == pytest.approx(2 * (1 - k ** (q - 1)) / (1 - q), rel=1e-12)


def test_te_profiles_differ_by_the_transposed_marginals(big):
    """MEFB's TE transposes the marginal product; the reference profile follows Cvejic's definition."""
    a, b, f = big
    ref = value("TE", f, a, b, "reference")
    oracle = 0.0
    for x in (u8(a)[0], u8(b)[0]):
        h = np_joint(x, u8(f)[0])
        px, pf = h.sum(1), h.sum(0)
        prod = px[:, None] * pf[None, :]
        ok = prod > 0
        oracle += (1 - (h[ok] ** 1.85 / prod[ok] ** 0.85).sum()) / (1 - 1.85)
    # reference uses the profile's luma levels; a grey input is the same image
    assert ref == pytest.approx(oracle, rel=1e-10)
    assert value("TE", f, a, b, "mefb") != pytest.approx(ref, rel=1e-3)


def test_mefb_per_channel_equals_grey_on_replicated_input(big):
    a, b, f = big
    rgb = [t.expand(-1, 3, -1, -1) for t in (f, a, b)]
    for name in MEFB_NEW:
        assert value(name, *rgb) == pytest.approx(value(name, f, a, b), rel=1e-12), name


def test_batch_of_fused_against_one_pair(big):
    a, b, f = big
    fused = torch.cat([f, a, 0.3 * a + 0.7 * b])
    for name in MEFB_NEW:
        batched = M.get_metric(name)(fused, a, b, profile="mefb")
        single = [value(name, fused[i : i + 1], a, b) for i in range(3)]
        assert batched.tolist() == pytest.approx(single, rel=1e-12), name


def test_sf_mefb_is_per_channel_mean():
    x = textured(20, 22, seed=3, channels=3)
    v = u8(x)
    sfs = [math.sqrt(((c[:, 1:] - c[:, :-1]) ** 2).sum() / c.size + ((c[1:] - c[:-1]) ** 2).sum() / c.size) for c in v]
    assert value("SF", x, x, x) == pytest.approx(float(np.mean(sfs)), rel=1e-12)


def test_mefb_on_a_real_pair():
    """One MEF pair of ../shared/data/mef, downscaled: all 20 MEFB metrics are finite."""
    from fusion.image_io import read_image

    scene = shared_data_dir("mef", "Arno")
    a, b = (read_image(next(scene.glob(f"Arno_{s}.*")))[None].double() for s in "AB")
    a, b = (torch.nn.functional.interpolate(t, size=(96, 128), mode="area") for t in (a, b))
    out = M.compute_metrics(0.5 * (a + b), a, b, profile="mefb")
    assert list(out) == list(M.MEFB_METRICS)
    assert all(torch.isfinite(v).all() for v in out.values()), out


@pytest.mark.parametrize("values", [[3.0, 1.0, 2.0], [4.0, 1.0, 3.0, 2.0], [2.0, 2.0, 1.0, 5.0], [7.0, 7.0, 7.0, 7.0],
                                    [1.0, 9.0, 9.0, 9.0, 0.0, 3.0]])
def test_matlab_median_is_numpy_median(values):
    """Qp's noise estimate: the one-selection median (even counts: the upper middle found from the lower one)
    equals NumPy's median, repeated middle values included."""
    v = torch.tensor(values, dtype=torch.float64)
    assert phase._matlab_median(v).item() == np.median(values)
