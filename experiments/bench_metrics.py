"""Benchmark: the standard nine fusion metrics, batched torch vs a per-image NumPy/SciPy evaluator.

``python experiments/bench.py metrics [--pairs 8] [--size 480 640] [--device cpu|cuda] [--threads N]``

The baseline below is written the way the widely copied evaluator of MMIF-CDDFuse (``utils/Evaluator.py``)
is written: one image at a time, ``scipy.signal.convolve2d`` with explicit 2-D Gaussian windows for VIF,
NumPy histograms for MI, scikit-image ``structural_similarity`` for SSIM. It follows the ``cddfuse``
conventions (metrics notes §1), so our side runs ``profile="cddfuse"`` and the two sides must agree:
the table prints the largest relative difference per metric next to the timings.
"""

from __future__ import annotations

import math
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch
from scipy.signal import convolve2d

from experiments.cli import ArgumentParser, device_name, positive_int

STANDARD_NINE = ("EN", "SD", "SF", "AG", "MI", "SCD", "VIF", "Qabf", "SSIM")


# ---------------------------------------------------------------------------------------------------
# Baseline: per-image NumPy / SciPy / scikit-image, CDDFuse Evaluator style (inputs: float 0–255 grey).
# ---------------------------------------------------------------------------------------------------
def np_en(f: np.ndarray) -> float:
    hist = np.histogram(f, bins=256, range=(0, 255))[0]
    p = hist / hist.sum()
    p = p[p > 0]
    return float(-(p * np.log2(p)).sum())


def np_sd(f: np.ndarray) -> float:
    return float(np.std(f))


def np_sf(f: np.ndarray) -> float:
    return float(np.sqrt(np.mean((f[:, 1:] - f[:, :-1]) ** 2) + np.mean((f[1:, :] - f[:-1, :]) ** 2)))


def np_ag(f: np.ndarray) -> float:
    gx = np.zeros_like(f)
    gy = np.zeros_like(f)
    gx[:, 0] = f[:, 1] - f[:, 0]
    gx[:, -1] = f[:, -1] - f[:, -2]
    gx[:, 1:-1] = (f[:, 2:] - f[:, :-2]) / 2
    gy[0, :] = f[1, :] - f[0, :]
    gy[-1, :] = f[-1, :] - f[-2, :]
    gy[1:-1, :] = (f[2:, :] - f[:-2, :]) / 2
    return float(np.mean(np.sqrt((gx**2 + gy**2) / 2)))


def _np_mi(x: np.ndarray, f: np.ndarray) -> float:
    joint = np.histogram2d(x.ravel(), f.ravel(), bins=256, range=[[-0.5, 255.5], [-0.5, 255.5]])[0]
    pxy = joint / joint.sum()
    px = pxy.sum(1, keepdims=True)
    pf = pxy.sum(0, keepdims=True)
    nz = pxy > 0
    return float((pxy[nz] * np.log(pxy[nz] / (px @ pf)[nz])).sum())  # nats, like sklearn


def np_mi(f: np.ndarray, a: np.ndarray, b: np.ndarray) -> float:
    return _np_mi(a, f) + _np_mi(b, f)


def _np_corr(x: np.ndarray, y: np.ndarray) -> float:
    xc, yc = x - x.mean(), y - y.mean()
    return float((xc * yc).sum() / np.sqrt((xc**2).sum() * (yc**2).sum()))


def np_scd(f: np.ndarray, a: np.ndarray, b: np.ndarray) -> float:
    return _np_corr(f - b, a) + _np_corr(f - a, b)


def _np_vifp(ref: np.ndarray, dist: np.ndarray) -> float:
    sigma_nsq, eps = 2.0, 1e-10
    num = den = 0.0
    for scale in range(1, 5):
        n = 2 ** (5 - scale) + 1
        r = (n - 1) / 2
        y, x = np.ogrid[-r : r + 1, -r : r + 1]
        win = np.exp(-(x * x + y * y) / (2 * (n / 5.0) ** 2))
        win /= win.sum()
        if scale > 1:
            ref = convolve2d(ref, np.rot90(win, 2), mode="valid")[::2, ::2]
            dist = convolve2d(dist, np.rot90(win, 2), mode="valid")[::2, ::2]
        mu1 = convolve2d(ref, np.rot90(win, 2), mode="valid")
        mu2 = convolve2d(dist, np.rot90(win, 2), mode="valid")
        s1 = convolve2d(ref * ref, np.rot90(win, 2), mode="valid") - mu1 * mu1
        s2 = convolve2d(dist * dist, np.rot90(win, 2), mode="valid") - mu2 * mu2
        s12 = convolve2d(ref * dist, np.rot90(win, 2), mode="valid") - mu1 * mu2
        s1[s1 < 0] = 0
        s2[s2 < 0] = 0
        g = s12 / (s1 + eps)
        sv = s2 - g * s12
        g[s1 < eps] = 0
        sv[s1 < eps] = s2[s1 < eps]
        s1[s1 < eps] = 0
        g[s2 < eps] = 0
        sv[s2 < eps] = 0
        sv[g < 0] = s2[g < 0]
        g[g < 0] = 0
        sv[sv <= eps] = eps
        num += np.sum(np.log10(1 + g * g * s1 / (sv + sigma_nsq)))
        den += np.sum(np.log10(1 + s1 / sigma_nsq))
    return float(num / den)


def np_vif(f: np.ndarray, a: np.ndarray, b: np.ndarray) -> float:
    return _np_vifp(a, f) + _np_vifp(b, f)


def _np_edges(img: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    h1 = np.array([[1, 2, 1], [0, 0, 0], [-1, -2, -1]], dtype=np.float64)
    h3 = np.array([[-1, 0, 1], [-2, 0, 2], [-1, 0, 1]], dtype=np.float64)
    sx = convolve2d(img, h3, mode="same")
    sy = convolve2d(img, h1, mode="same")
    g = np.sqrt(sx * sx + sy * sy)
    ang = np.full_like(img, math.pi / 2)
    nz = sx != 0
    ang[nz] = np.arctan(sy[nz] / sx[nz])
    return g, ang


def _np_qxf(gx: np.ndarray, ax: np.ndarray, gf: np.ndarray, af: np.ndarray) -> np.ndarray:
    gr = np.zeros_like(gx)
    gt, eq, lt = gx > gf, gx == gf, gx < gf
    gr[gt] = gf[gt] / gx[gt]
    gr[eq] = gf[eq]
    gr[lt] = gx[lt] / gf[lt]
    ar = 1 - np.abs(ax - af) / (math.pi / 2)
    return 0.9994 / (1 + np.exp(-15 * (gr - 0.5))) * (0.9879 / (1 + np.exp(-22 * (ar - 0.8))))


def np_qabf(f: np.ndarray, a: np.ndarray, b: np.ndarray) -> float:
    ga, aa = _np_edges(a)
    gb, ab = _np_edges(b)
    gf, af = _np_edges(f)
    num = np.sum(_np_qxf(ga, aa, gf, af) * ga + _np_qxf(gb, ab, gf, af) * gb)
    return float(num / np.sum(ga + gb))


def np_ssim(f: np.ndarray, a: np.ndarray, b: np.ndarray) -> float:
    from skimage.metrics import structural_similarity

    # scikit-image 0.19 defaults as CDDFuse calls them (float input ⇒ data_range 2)
    return float(structural_similarity(f, a, data_range=2) + structural_similarity(f, b, data_range=2))


BASELINE = {
    "EN": lambda f, a, b: np_en(f),
    "SD": lambda f, a, b: np_sd(f),
    "SF": lambda f, a, b: np_sf(f),
    "AG": lambda f, a, b: np_ag(f),
    "MI": np_mi,
    "SCD": np_scd,
    "VIF": np_vif,
    "Qabf": np_qabf,
    "SSIM": np_ssim,
}


# ---------------------------------------------------------------------------------------------------
# Data and timing
# ---------------------------------------------------------------------------------------------------
def _grey_u8(path: Path, size: tuple[int, int]) -> np.ndarray:
    from PIL import Image

    img = Image.open(path).convert("RGB").resize((size[1], size[0]), Image.BICUBIC)
    rgb = np.asarray(img, dtype=np.float32)
    return np.round(rgb[..., 0] * 0.299 + rgb[..., 1] * 0.587 + rgb[..., 2] * 0.114).astype(np.float64)


def load_pairs(n: int, size: tuple[int, int], seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray, str]:
    """(n, H, W) fused, IR, visible grey images on 0–255 (integers): VIFB pairs if present, else synthetic."""
    root = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "vifb"
    names = sorted(p.stem for p in (root / "ir").glob("*.jpg")) if root.exists() else []
    if names:
        names = (names * n)[:n]
        ir = np.stack([_grey_u8(root / "ir" / f"{s}.jpg", size) for s in names])
        vi = np.stack([_grey_u8(root / "vi" / f"{s}.jpg", size) for s in names])
        fu = np.stack([_grey_u8(root / "fused" / "ADF" / f"{s}.jpg", size) for s in names])
        return fu, ir, vi, f"VIFB pairs (ADF fused) resized to {size[1]}x{size[0]}"
    rng = np.random.default_rng(seed)

    def smooth() -> np.ndarray:
        x = rng.random((n, size[0] // 8, size[1] // 8))
        x = np.kron(x, np.ones((8, 8)))
        return np.round(255 * (0.7 * x + 0.3 * rng.random((n, *size))))

    ir, vi = smooth(), smooth()
    return np.round((ir + vi) / 2), ir, vi, f"synthetic smooth noise {size[1]}x{size[0]}"


def _time(fn, repeats: int) -> float:
    best = math.inf
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def main(argv: list[str] | None = None) -> None:
    parser = ArgumentParser(prog="bench.py metrics", description=__doc__.split("\n\n")[0])
    parser.add_argument("--pairs", type=positive_int, default=8, help="number of 640x480 pairs in the batch")
    parser.add_argument("--size", type=positive_int, nargs=2, default=(480, 640), metavar=("H", "W"))
    parser.add_argument("--device", type=device_name, default="cpu")
    parser.add_argument("--threads", type=positive_int, default=None,
                        help="torch intra-op threads (default: torch's)")
    parser.add_argument("--baseline-pairs", type=positive_int, default=2, help="pairs timed for the (slow) baseline")
    parser.add_argument("--repeats", type=positive_int, default=2)
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)

    from fusion.metrics import compute_metrics

    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    size = tuple(args.size)
    fu, ir, vi, source = load_pairs(args.pairs, size)
    to_t = lambda x: torch.from_numpy(x / 255.0)[:, None].to(device)
    tf, ta, tb = to_t(fu), to_t(ir), to_t(vi)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    def ours(names):
        def run():
            out = compute_metrics(tf, ta, tb, names, profile="cddfuse")
            sync()
            return out

        return run

    nb = min(args.baseline_pairs, args.pairs)
    print(f"data: {source}; batch of {args.pairs} pairs on {device} ({torch.get_num_threads()} threads); "
          f"baseline timed on {nb} pair(s); {platform.processor() or platform.machine()}")
    print(f"{'metric':<6} {'baseline ms/pair':>17} {'ours ms/pair':>13} {'speed-up':>9} {'max rel diff':>13}")
    total_base = total_ours = 0.0
    ours_values = ours(list(STANDARD_NINE))()
    for name in STANDARD_NINE:
        base_fn = BASELINE[name]
        base_vals = []

        def run_base(base_fn=base_fn, base_vals=base_vals):
            base_vals.clear()
            base_vals.extend(base_fn(fu[i], ir[i], vi[i]) for i in range(nb))

        tb_ = _time(run_base, args.repeats) / nb
        to_ = _time(ours([name]), args.repeats) / args.pairs
        total_base += tb_
        total_ours += to_
        ref = np.array(base_vals)
        got = ours_values[name][:nb].cpu().numpy()
        rel = float(np.max(np.abs(got - ref) / np.maximum(np.abs(ref), 1e-12)))
        print(f"{name:<6} {tb_ * 1e3:>17.1f} {to_ * 1e3:>13.2f} {tb_ / to_:>8.1f}x {rel:>13.2e}")
    shared = _time(ours(list(STANDARD_NINE)), args.repeats) / args.pairs
    print(f"{'sum':<6} {total_base * 1e3:>17.1f} {total_ours * 1e3:>13.2f} {total_base / total_ours:>8.1f}x")
    print(f"all nine in one compute_metrics call: {shared * 1e3:.2f} ms/pair "
          f"({total_base / shared:.1f}x the baseline)")


if __name__ == "__main__":
    main()
