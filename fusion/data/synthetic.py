"""Procedural RGB-T road scenes with segmentation masks and detection boxes: the toolkit's embedded data.

The scenes imitate what makes infrared/visible fusion non-trivial on MSRS/M3FD-like street data:

- **Geometry**: a pinhole camera 1.2–1.8 m above a flat road; every object is placed at a depth Z and scaled
  by f/Z, so far objects are small and sit near the horizon.
- **Infrared** is emitted heat: people (≈ 0.8–0.95) and engines/tyres are hot, glass and the sky are cold,
  sun-heated asphalt is warm by day; the image is blurred (lower optical resolution), with column
  fixed-pattern noise and vignetting like an uncooled microbolometer. Paint, signs and colours are invisible.
- **Visible** is reflected light: colours, road markings, kerb tiles, signs, windows. At night the scene is lit
  by ambient light (5–15 %) plus street-lamp pools, car and window lights, so dark-clothed pedestrians are
  nearly invisible, and photon/read noise is much stronger than by day.
- **Labels**: the MSRS 9-class mask (unlabelled, car, person, bike, curve, car_stop, guardrail, color_cone,
  bump) and M3FD boxes (People, Car, Bus, Motorcycle, Lamp, Truck). Boxes are the tight extent of the
  object's visible pixels; an object occluded to less than 30 % of its drawn area gets no box and its
  remaining pixels become ``ignore_index`` (255), so mask and boxes never contradict each other.

Each sample is a pure function of ``(seed, split, index)``: the same scene whatever the access order, and
train/val/test use disjoint seed streams.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from fusion.data.base import FusionDataset
from fusion.data.labels import IGNORE_INDEX, M3FD_CLASSES, MSRS_CLASSES
from fusion.data.registry import register_dataset
from fusion.data.transforms import Transform

__all__ = ["SPLITS", "SyntheticScenes", "render_scene"]

SPLITS = {"train": 0, "val": 1, "test": 2}
F32 = np.float32
# seg class / det label indices
CAR, PERSON, BIKE, CURVE, CAR_STOP, GUARDRAIL, CONE, BUMP = 1, 2, 3, 4, 5, 6, 7, 8
PEOPLE, DCAR, BUS, MOTORCYCLE, LAMP, TRUCK = range(6)


class _Canvas:
    """Albedo, emission, infrared, class and instance layers painted object by object (far to near)."""

    def __init__(self, height: int, width: int, rng: np.random.Generator) -> None:
        self.h, self.w, self.rng = height, width, rng
        self.alb = np.zeros((3, height, width), F32)
        self.emit = np.zeros((3, height, width), F32)
        self.ir = np.zeros((height, width), F32)
        self.seg = np.zeros((height, width), np.uint8)
        self.inst = np.zeros((height, width), np.int16)
        self.objects: list[dict[str, Any]] = []  # detection objects: label, window, drawn pixel count

    def window(self, x0: float, y0: float, x1: float, y1: float):
        """Integer slices of a float box clipped to the image, and normalised coordinates U (1, w), V (h, 1)."""
        ix0, iy0 = max(math.floor(x0), 0), max(math.floor(y0), 0)
        ix1, iy1 = min(math.ceil(x1), self.w), min(math.ceil(y1), self.h)
        if ix1 <= ix0 or iy1 <= iy0 or x1 - x0 < 1e-3 or y1 - y0 < 1e-3:
            return None
        u = ((np.arange(ix0, ix1, dtype=F32) + 0.5 - x0) / (x1 - x0))[None, :]
        v = ((np.arange(iy0, iy1, dtype=F32) + 0.5 - y0) / (y1 - y0))[:, None]
        return (slice(iy0, iy1), slice(ix0, ix1)), u, v

    def paint(self, sl, mask: np.ndarray, colour: Sequence[float], ir: float | np.ndarray,
              seg: int = 0, inst: int = 0, shade: np.ndarray | None = None) -> int:
        """Paint one part: it occludes everything below, so class and instance are always overwritten
        (0 = unlabelled / no instance). Returns the number of pixels painted."""
        sy, sx = sl
        shape = (sy.stop - sy.start, sx.stop - sx.start)
        mask = np.broadcast_to(mask, shape)
        if not mask.any():
            return 0
        for c in range(3):
            np.copyto(self.alb[c, sy, sx], colour[c] if shade is None else colour[c] * shade, where=mask)
        np.copyto(self.ir[sy, sx], ir, where=mask)
        np.copyto(self.seg[sy, sx], seg, where=mask)
        np.copyto(self.inst[sy, sx], inst, where=mask)
        return int(mask.sum())

    def light(self, sl, mask: np.ndarray, colour: Sequence[float]) -> None:
        sy, sx = sl
        mask = np.broadcast_to(mask, (sy.stop - sy.start, sx.stop - sx.start))
        for c in range(3):
            np.copyto(self.emit[c, sy, sx], colour[c], where=mask)

    def glow(self, cx: float, cy: float, radius: float, colour: Sequence[float]) -> None:
        """Additive Gaussian halo (lens flare / scattering around a light at night)."""
        radius = max(radius, 0.7)
        win = self.window(cx - 3 * radius, cy - 3 * radius, cx + 3 * radius, cy + 3 * radius)
        if win is None:
            return
        (sy, sx), u, v = win
        g = np.exp(-(((u - 0.5) * 6) ** 2 + ((v - 0.5) * 6) ** 2) / 2).astype(F32)
        for c in range(3):
            self.emit[c, sy, sx] += colour[c] * g

    def new_object(self, label: int, seg: int, sl) -> int:
        self.objects.append({"label": label, "seg": seg, "sl": sl, "drawn": 0})
        return len(self.objects)  # instance ids start at 1


def _lowfreq(rng: np.random.Generator, height: int, width: int, cells: int) -> np.ndarray:
    """Smooth noise in about [-1, 1]: a coarse random grid upsampled bicubically."""
    gh, gw = max(2, cells * height // max(height, width) + 1), max(2, cells * width // max(height, width) + 1)
    grid = torch.from_numpy(rng.standard_normal((1, 1, gh, gw), dtype=F32))
    return F.interpolate(grid, size=(height, width), mode="bicubic", align_corners=False)[0, 0].numpy()


def _blur(image: np.ndarray) -> np.ndarray:
    """[1, 2, 1]/4 separable blur with edge replication (σ ≈ 0.7 px)."""
    p = np.pad(image, 1, mode="edge")
    rows = 0.25 * p[:-2] + 0.5 * p[1:-1] + 0.25 * p[2:]
    return 0.25 * rows[:, :-2] + 0.5 * rows[:, 1:-1] + 0.25 * rows[:, 2:]


class _Scene:
    """One scene: camera, ground, background and objects, then the two sensors."""

    def __init__(self, height: int, width: int, rng: np.random.Generator, night: bool) -> None:
        self.h, self.w, self.rng, self.night = height, width, rng, night
        self.c = _Canvas(height, width, rng)
        self.h0 = height * rng.uniform(0.3, 0.45)  # horizon row
        self.vx = width * rng.uniform(0.35, 0.65)  # vanishing point column
        self.cam_h = rng.uniform(1.2, 1.8)  # camera height (m)
        self.f = 0.9 * width  # focal length (px)
        self.road_c = rng.uniform(-1.5, 1.5)  # lateral road centre (m, camera at 0)
        self.road_half = rng.uniform(3.5, 7.0)
        self.walk = rng.uniform(2.0, 4.0)  # sidewalk width (m)
        self.t_amb = rng.uniform(0.45, 0.58) if not night else rng.uniform(0.28, 0.4)  # road temperature
        self.pools: list[tuple[float, float, float]] = []  # night light pools (x, y, radius px)

    # ---------------------------------------------------------------------------------- geometry
    def ppm(self, z: float) -> float:
        return self.f / z

    def project(self, z: float, x: float, width_m: float, height_m: float, lift_m: float = 0.0):
        """Image box (x0, y0, x1, y1) of an upright object of the given size at depth z, lateral x."""
        s = self.ppm(z)
        xc, yb = self.vx + x * s, self.h0 + (self.cam_h - lift_m) * s
        return xc - width_m * s / 2, yb - height_m * s, xc + width_m * s / 2, yb

    def random_depth(self, near: float = 0.97) -> float:
        """Depth whose ground row lies between just below the horizon and ``near`` of the image height."""
        yb = self.h0 + (self.h * near - self.h0) * self.rng.uniform(0.06, 1.0) ** 1.3
        return self.f * self.cam_h / max(yb - self.h0, 0.5)

    # ---------------------------------------------------------------------------------- background
    def sky_and_ground(self) -> None:
        rng, c, h, w = self.rng, self.c, self.h, self.w
        hr = min(max(math.ceil(self.h0), 1), h)
        t = (np.arange(hr, dtype=F32) / max(self.h0, 1.0))[:, None]
        top, bottom = np.array([0.3, 0.5, 0.85], F32), np.array([0.78, 0.84, 0.9], F32)
        clouds = np.clip(_lowfreq(rng, hr, w, 6) * 0.5 + rng.uniform(-0.4, 0.3), 0, 1)
        for ch in range(3):
            c.alb[ch, :hr] = (top[ch] + (bottom[ch] - top[ch]) * t) * (1 - clouds) + 0.9 * clouds
        c.ir[:hr] = (0.04 if self.night else 0.1) + 0.12 * t + 0.06 * clouds

        gy = slice(hr, h)
        rows = np.arange(hr, h, dtype=F32)[:, None] + 0.5
        g = np.maximum(rows - self.h0, 0.05) / self.cam_h  # px per metre of each ground row
        z = self.f / g
        x = (np.arange(w, dtype=F32)[None, :] + 0.5 - self.vx) / g - self.road_c
        ax = np.abs(x)
        fine = rng.standard_normal((h - hr, w), dtype=F32)
        blotch = _lowfreq(rng, h - hr, w, 10)
        road = ax < self.road_half
        kerb = (ax >= self.road_half) & (ax < self.road_half + 0.25)
        walk = (ax >= self.road_half + 0.25) & (ax < self.road_half + 0.25 + self.walk)
        grass = ~(road | kerb | walk)
        asphalt = rng.uniform(0.28, 0.42)
        grey = asphalt + 0.04 * blotch + 0.03 * fine
        tiles = ((np.mod(x, 0.6) < 0.04) | (np.mod(z, 0.6) < 0.04 * z / 8)) & walk
        walk_tone = rng.uniform(0.5, 0.65) - 0.15 * tiles
        green = np.array([rng.uniform(0.2, 0.3), rng.uniform(0.38, 0.5), rng.uniform(0.12, 0.2)], F32)
        grey_zones = np.where(road, grey, np.where(kerb, F32(0.7), walk_tone + 0.02 * fine))
        texture = 1 + 0.25 * blotch + 0.1 * fine
        for ch in range(3):
            c.alb[ch, gy] = np.where(grass, green[ch] * texture, grey_zones)
        # paint: centre dashes + edge lines; nearly invisible in IR (emissivity of paint ≈ asphalt)
        lane = (np.abs(x) < 0.07) & (np.mod(z, 9.0) < 4.0)
        edge = np.abs(ax - (self.road_half - 0.3)) < 0.07
        paint = lane | edge
        if rng.random() < 0.35:  # zebra crossing
            z0 = rng.uniform(6, 25)
            paint |= road & (z > z0) & (z < z0 + 4) & (np.mod(x, 1.0) < 0.5)
        yellow = rng.random() < 0.3
        for ch, val in enumerate((0.85, 0.75, 0.2) if yellow else (0.9, 0.9, 0.9)):
            np.copyto(c.alb[ch, gy], val, where=paint)
        ir = np.where(road, self.t_amb, np.where(kerb, self.t_amb + 0.04, np.where(
            walk, self.t_amb - 0.05, self.t_amb - 0.13 + 0.03 * blotch)))
        c.ir[gy] = ir - 0.012 * paint + 0.015 * blotch
        c.seg[gy] = np.where(kerb & (rng.random() < 0.85), CURVE, 0)
        if rng.random() < 0.4:  # speed bump across the road
            zb = rng.uniform(5, 30)
            bump = road & (z > zb) & (z < zb + 0.4)
            stripes = np.mod(x, 0.5) < 0.25
            for ch, (a, b) in enumerate(((0.9, 0.1), (0.75, 0.1), (0.1, 0.1))):
                np.copyto(c.alb[ch, gy], np.where(stripes, a, b).astype(F32), where=bump)
            c.ir[gy] += 0.025 * bump
            np.copyto(c.seg[gy], BUMP, where=bump)

    def buildings(self) -> None:
        rng, c = self.rng, self.c
        x = 0.0
        top_limit = max(int(self.h0 - self.h * 0.3), 0)
        while x < self.w:
            bw = self.w * rng.uniform(0.05, 0.2)
            if rng.random() < 0.8:
                bh = self.h * rng.uniform(0.04, 0.3)
                win = c.window(x, max(self.h0 - bh, top_limit), x + bw, self.h0 + 1)
                if win is not None:
                    sl, u, v = win
                    colour = rng.uniform(0.3, 0.75, 3).astype(F32) * rng.uniform(0.7, 1.0)
                    nx, ny = rng.integers(3, 8), rng.integers(3, 10)
                    windows = (np.mod(u * nx, 1.0) < 0.55) & (np.mod(v * ny, 1.0) < 0.5) & (v < 0.9)
                    c.paint(sl, np.ones_like(windows), colour, rng.uniform(0.28, 0.4))
                    c.paint(sl, windows, (0.15, 0.2, 0.3), rng.uniform(0.22, 0.3) + 0.08 * self.night)
                    if self.night:
                        lit = windows & (_lowfreq(rng, *windows.shape, 4) > 0.3)
                        c.light(sl, lit, (0.9, 0.75, 0.4))
            x += bw

    def guardrail(self) -> None:
        """A W-beam rail on one road side, 0.8 m high, drawn column by column from its depth."""
        c = self.c
        side = 1 if self.rng.random() < 0.5 else -1
        x_rail = self.road_c + side * (self.road_half + 0.4)
        cols = np.arange(self.w, dtype=F32) + 0.5
        dx = (cols - self.vx) * side
        valid = dx > 0.5
        z = np.where(valid, self.f * abs(x_rail) / np.maximum(dx, 0.5), np.inf)
        if side * x_rail <= 0:  # the rail is on the other side of the camera: not visible this way
            return
        z0, z1 = self.rng.uniform(2, 8), self.rng.uniform(25, 120)
        valid &= (z > z0) & (z < z1)
        bottom = self.h0 + self.cam_h * self.f / z
        top = self.h0 + (self.cam_h - 0.8) * self.f / z
        rows = np.arange(self.h, dtype=F32)[:, None] + 0.5
        mask = valid[None, :] & (rows >= top[None, :]) & (rows < bottom[None, :])
        frac = (rows - top[None, :]) / np.maximum(bottom - top, 1e-3)[None, :]
        beam = (frac < 0.45) & (np.mod(frac, 0.15) < 0.1)
        post = np.mod(np.where(valid, z, 0), 4.0)[None, :] < 0.25
        shade = np.where(beam | post, 1.0, 0.7).astype(F32)
        sl = (slice(0, self.h), slice(0, self.w))
        c.paint(sl, mask, (0.7, 0.72, 0.75), (0.22 if self.night else 0.47) + 0.03 * beam, seg=GUARDRAIL,
                shade=shade)

    # ---------------------------------------------------------------------------------- objects
    def person(self, z: float, x: float, height: float | None = None, lift: float = 0.0) -> None:
        rng, c = self.rng, self.c
        h = height or rng.uniform(1.55, 1.9)
        win = c.window(*self.project(z, x, 0.5 * h / 1.75, h, lift))
        if win is None:
            return
        sl, u, v = win
        k = c.new_object(PEOPLE, PERSON, sl)
        stride = rng.uniform(-0.12, 0.12)
        head = ((u - 0.5) / 0.2) ** 2 + ((v - 0.075) / 0.07) ** 2 < 1
        torso = ((np.abs(u - 0.5) < 0.36) & (v > 0.15) & (v < 0.55)) | (
            ((u - 0.5) / 0.45) ** 2 + ((v - 0.25) / 0.1) ** 2 < 1)
        arms = ((np.abs(u - 0.08 - stride * (v - 0.2)) < 0.08) | (np.abs(u - 0.92 + stride * (v - 0.2)) < 0.08)) & (
            v > 0.18) & (v < 0.55)
        t = np.clip((v - 0.52) / 0.48, 0, 1)
        legs = (v > 0.52) & ((np.abs(u - 0.34 - stride * t) < 0.13) | (np.abs(u - 0.66 + stride * t) < 0.13))
        dark = 0.35 if self.night and rng.random() < 0.7 else 1.0  # night clothes are mostly dark
        shirt = rng.uniform(0.05, 0.9, 3).astype(F32) * dark
        pants = rng.uniform(0.05, 0.5, 3).astype(F32) * dark
        skin = np.array([0.85, 0.65, 0.52], F32) * rng.uniform(0.5, 1.0)
        body_t = rng.uniform(0.78, 0.88)
        o = c.objects[k - 1]
        o["drawn"] += c.paint(sl, legs, pants, body_t - 0.03, PERSON, k)
        o["drawn"] += c.paint(sl, torso, shirt, body_t, PERSON, k, shade=1.0 - 0.2 * v)
        o["drawn"] += c.paint(sl, arms, shirt * 0.9, body_t + 0.04, PERSON, k)
        o["drawn"] += c.paint(sl, head, skin, rng.uniform(0.9, 0.97), PERSON, k)

    def vehicle(self, z: float, x: float) -> None:
        rng, c = self.rng, self.c
        kind = rng.choice([DCAR, BUS, TRUCK], p=[0.75, 0.12, 0.13])
        w, h = {DCAR: (rng.uniform(1.7, 1.95), rng.uniform(1.35, 1.6)), BUS: (2.5, rng.uniform(2.9, 3.2)),
                TRUCK: (2.4, rng.uniform(3.0, 3.6))}[kind]
        win = c.window(*self.project(z, x, w, h))
        if win is None:
            return
        sl, u, v = win
        k = c.new_object(int(kind), CAR, sl)
        o = c.objects[k - 1]
        paint_col = rng.uniform(0.05, 0.95, 3).astype(F32)
        warm = 0.08 if not self.night else 0.0  # sun-heated bodywork by day
        wheels = (v > 0.86) & ((np.abs(u - 0.14) < 0.09) | (np.abs(u - 0.86) < 0.09))
        if kind == DCAR:
            body = (v > 0.42) & (v < 0.9) & (np.abs(u - 0.5) < 0.5 - 0.04 * (v > 0.8))
            cabin = (v >= 0.05) & (v <= 0.42) & (np.abs(u - 0.5) < 0.36 + 0.12 * (v - 0.05) / 0.37)
            glass = (v > 0.12) & (v < 0.38) & (np.abs(u - 0.5) < 0.3 + 0.08 * (v - 0.12) / 0.26)
            lights = (v > 0.48) & (v < 0.58) & (np.abs(np.abs(u - 0.5) - 0.4) < 0.07)
        elif kind == BUS:
            body = (v > 0.0) & (v < 0.92)
            cabin = np.zeros_like(body)
            glass = (v > 0.12) & (v < 0.45) & (np.abs(u - 0.5) < 0.44) & (np.mod(u * 4, 1.0) > 0.08)
            lights = (v > 0.75) & (v < 0.82) & (np.abs(np.abs(u - 0.5) - 0.42) < 0.05)
        else:  # truck: cargo box above the chassis
            body = (v > 0.0) & (v < 0.78)
            cabin = (v >= 0.78) & (v < 0.9) & (np.abs(u - 0.5) < 0.45)
            glass = np.zeros_like(body)
            lights = (v > 0.8) & (v < 0.86) & (np.abs(np.abs(u - 0.5) - 0.42) < 0.05)
        plate = (v > 0.66) & (v < 0.74) & (np.abs(u - 0.5) < 0.12) if kind == DCAR else (
            (v > 0.84) & (v < 0.9) & (np.abs(u - 0.5) < 0.1))
        exhaust = ((u - 0.25) / 0.1) ** 2 + ((v - 0.93) / 0.06) ** 2 < 1
        cargo_t = rng.uniform(0.36, 0.46) if kind == TRUCK else rng.uniform(0.46, 0.56)
        o["drawn"] += c.paint(sl, body, paint_col, cargo_t + warm, CAR, k, shade=1.0 - 0.25 * v)
        o["drawn"] += c.paint(sl, cabin, paint_col * 0.9, 0.45 + warm, CAR, k)
        c.paint(sl, glass, (0.12, 0.15, 0.2), 0.22, CAR, k)
        o["drawn"] += c.paint(sl, wheels, (0.05, 0.05, 0.05), rng.uniform(0.7, 0.8), CAR, k)
        c.paint(sl, exhaust & (v > 0.86), (0.1, 0.1, 0.1), rng.uniform(0.85, 0.95), CAR, k)
        c.paint(sl, lights, (0.7, 0.05, 0.05), 0.6, CAR, k)
        c.paint(sl, plate, (0.95, 0.95, 0.9), cargo_t, CAR, k)
        if self.night:
            c.light(sl, lights, (1.0, 0.1, 0.05))
            box = self.project(z, x, w, h)
            for side in (0.1, 0.9):
                c.glow(box[0] + side * (box[2] - box[0]), box[1] + 0.53 * (box[3] - box[1]),
                       0.06 * (box[2] - box[0]), (0.6, 0.05, 0.02))

    def motorcycle(self, z: float, x: float) -> None:
        rng, c = self.rng, self.c
        w, h = 1.9, 1.1
        box = self.project(z, x, w, h)
        win = c.window(*box)
        if win is None:
            return
        sl, u, v = win
        k = c.new_object(MOTORCYCLE, BIKE, sl)
        ry = 0.3 / h
        rx = 0.3 / w
        wheel = np.zeros(np.broadcast_shapes(u.shape, v.shape), bool)
        for cu in (0.18, 0.82):
            r = ((u - cu) / rx) ** 2 + ((v - (1 - ry)) / ry) ** 2
            wheel |= (r < 1) & ((r > 0.45) | (r < 0.08))
        frame = ((v > 0.38) & (v < 0.68) & (np.abs(u - 0.5) < 0.25)) | (
            (np.abs(u - 0.2 - 0.1 * v) < 0.03) & (v > 0.1) & (v < 0.7))
        seat = (v > 0.3) & (v < 0.4) & (u > 0.45) & (u < 0.78)
        engine = ((u - 0.5) / 0.12) ** 2 + ((v - 0.6) / 0.1) ** 2 < 1
        col = rng.uniform(0.1, 0.9, 3).astype(F32)
        o = c.objects[k - 1]
        o["drawn"] += c.paint(sl, wheel, (0.06, 0.06, 0.06), 0.62, BIKE, k)
        o["drawn"] += c.paint(sl, frame, col, self.t_amb + 0.05, BIKE, k)
        o["drawn"] += c.paint(sl, seat, (0.08, 0.06, 0.05), self.t_amb, BIKE, k)
        c.paint(sl, engine, (0.3, 0.3, 0.32), rng.uniform(0.8, 0.92), BIKE, k)
        if rng.random() < 0.6:  # rider: a seated person, its own People box
            self.person(z - 0.05, x + 0.1 * w * (1 if rng.random() < 0.5 else -1), height=1.25, lift=0.45)

    def lamp(self, z: float, side: int) -> None:
        rng, c = self.rng, self.c
        x = self.road_c + side * (self.road_half + rng.uniform(0.5, 1.5))
        pole_h = rng.uniform(6.0, 8.0)
        win = c.window(*self.project(z, x, 0.16, pole_h))
        if win is not None:
            c.paint(win[0], np.ones((1, 1), bool), (0.4, 0.4, 0.42), self.t_amb - 0.06, seg=0)
        arm = 1.4
        head_box = self.project(z, x - side * arm, 0.7, 0.28, lift_m=pole_h - 0.28)
        arm_box = self.project(z, x - side * arm / 2, arm, 0.08, lift_m=pole_h - 0.12)
        win = c.window(*arm_box)
        if win is not None:
            c.paint(win[0], np.ones((1, 1), bool), (0.4, 0.4, 0.42), self.t_amb - 0.06, seg=0)
        win = c.window(*head_box)
        if win is None:
            return
        sl, u, v = win
        k = c.new_object(LAMP, 0, sl)
        head = ((u - 0.5) / 0.5) ** 2 + ((v - 0.5) / 0.5) ** 2 < 1
        c.objects[k - 1]["drawn"] += c.paint(sl, head, (0.8, 0.8, 0.75), 0.72 if self.night else 0.45, 0, k)
        if self.night:
            c.light(sl, head, (1.0, 0.92, 0.7))
            cx, cy = (head_box[0] + head_box[2]) / 2, (head_box[1] + head_box[3]) / 2
            c.glow(cx, cy, 0.8 * (head_box[2] - head_box[0]), (0.6, 0.5, 0.3))
            s = self.ppm(z)
            self.pools.append((cx, self.h0 + self.cam_h * s, 4.0 * s))

    def cone(self, z: float, x: float) -> None:
        rng, c = self.rng, self.c
        h = rng.uniform(0.5, 0.75)
        win = c.window(*self.project(z, x, 0.4, h))
        if win is None:
            return
        sl, u, v = win
        body = (np.abs(u - 0.5) < 0.12 + 0.33 * v) & (v < 0.92) | ((v >= 0.92) & (np.abs(u - 0.5) < 0.5))
        band = (v > 0.4) & (v < 0.58)
        c.paint(sl, body, (0.95, 0.4, 0.05), self.t_amb - 0.04, CONE)
        c.paint(sl, body & band, (0.95, 0.95, 0.95), self.t_amb - 0.045, CONE)

    def car_stop(self, z: float, x: float) -> None:
        rng, c = self.rng, self.c
        win = c.window(*self.project(z, x, rng.uniform(0.8, 1.6), rng.uniform(0.12, 0.2)))
        if win is None:
            return
        sl, u, v = win
        col = (0.85, 0.75, 0.1) if rng.random() < 0.5 else (0.6, 0.6, 0.58)
        c.paint(sl, (v > 0.25 * np.abs(2 * u - 1) ** 4), col, self.t_amb - 0.03, CAR_STOP, shade=1.0 - 0.3 * v)

    def sign_or_tree(self, z: float, x: float) -> None:
        """Roadside clutter: a coloured traffic sign (visible-only detail) or a tree."""
        rng, c = self.rng, self.c
        if rng.random() < 0.5:
            win = c.window(*self.project(z, x, 0.08, 2.6))
            if win is not None:
                c.paint(win[0], np.ones((1, 1), bool), (0.5, 0.5, 0.5), self.t_amb - 0.05, seg=0)
            win = c.window(*self.project(z, x, 0.7, 0.7, lift_m=1.9))
            if win is None:
                return
            sl, u, v = win
            r = ((u - 0.5) / 0.5) ** 2 + ((v - 0.5) / 0.5) ** 2
            outer = (0.85, 0.1, 0.1) if rng.random() < 0.6 else (0.1, 0.25, 0.8)
            c.paint(sl, r < 1, outer, self.t_amb - 0.05, seg=0)
            c.paint(sl, (r < 0.5) & (np.abs(v - 0.5) < 0.12 + 0.2 * (outer[2] > 0.5)), (0.95, 0.95, 0.95),
                    self.t_amb - 0.05, seg=0)
        else:
            height = rng.uniform(3.0, 7.0)
            win = c.window(*self.project(z, x, 0.3, height * 0.4))
            if win is not None:
                c.paint(win[0], np.ones((1, 1), bool), (0.3, 0.2, 0.12), self.t_amb - 0.1, seg=0)
            win = c.window(*self.project(z, x, height * 0.6, height * 0.75, lift_m=height * 0.25))
            if win is None:
                return
            sl, u, v = win
            leaves = _lowfreq(rng, sl[0].stop - sl[0].start, sl[1].stop - sl[1].start, 6)
            canopy = ((u - 0.5) / 0.5) ** 2 + ((v - 0.5) / 0.5) ** 2 < 1 + 0.3 * leaves
            green = np.array([0.15, 0.35, 0.1], F32) * rng.uniform(0.7, 1.2)
            c.paint(sl, canopy, green, self.t_amb - 0.15 + 0.02 * leaves, seg=0, shade=1 + 0.3 * leaves)

    def objects(self) -> None:
        rng = self.rng
        items: list[tuple[float, Any, tuple]] = []
        rh, wk = self.road_half, self.walk
        for _ in range(rng.integers(1, 5) if rng.random() < 0.9 else 0):  # pedestrians, road or sidewalk
            items.append((self.random_depth(), self.person, (self.road_c + rng.uniform(-rh - wk, rh + wk),)))
        for _ in range(rng.integers(0, 4)):
            lane = rng.choice([-1.75, 1.75, -5.0, 5.0]) if rh > 5.5 else rng.choice([-1.75, 1.75])
            items.append((self.random_depth(0.9), self.vehicle, (self.road_c + lane + rng.uniform(-0.4, 0.4),)))
        if rng.random() < 0.35:
            items.append((self.random_depth(0.9), self.motorcycle, (self.road_c + rng.uniform(-rh + 1, rh - 1),)))
        for side in (-1, 1):
            if rng.random() < 0.6:
                z0, gap = rng.uniform(6, 15), rng.uniform(15, 30)
                items += [(z0 + i * gap, self.lamp, (side,)) for i in range(3)]
        for _ in range(rng.integers(0, 5)):
            edge = rng.choice([-1, 1]) * (rh - rng.uniform(0.3, 1.0))
            items.append((self.random_depth(), self.cone, (self.road_c + edge,)))
        for _ in range(rng.integers(0, 3)):
            edge = rng.choice([-1, 1]) * (rh + rng.uniform(0.6, 1.2))
            items.append((self.random_depth(), self.car_stop, (self.road_c + edge,)))
        for _ in range(rng.integers(1, 6)):
            edge = rng.choice([-1, 1]) * (rh + 0.25 + wk + rng.uniform(0.3, 4.0))
            items.append((self.random_depth(), self.sign_or_tree, (self.road_c + edge,)))
        if rng.random() < 0.5:
            self.guardrail()
        for z, draw, args in sorted(items, key=lambda item: -item[0]):  # far to near (painter's algorithm)
            draw(z, *args)

    # ---------------------------------------------------------------------------------- sensors
    def labels(self) -> tuple[np.ndarray, np.ndarray]:
        boxes, labels = [], []
        c = self.c
        for k, obj in enumerate(c.objects, start=1):
            sy, sx = obj["sl"]
            mine = c.inst[sy, sx] == k
            count = int(mine.sum())
            if count and count >= 0.3 * obj["drawn"]:
                ys, xs = np.nonzero(mine.any(axis=1))[0], np.nonzero(mine.any(axis=0))[0]
                x0, x1, y0, y1 = sx.start + xs[0], sx.start + xs[-1] + 1, sy.start + ys[0], sy.start + ys[-1] + 1
                if x1 - x0 >= 2 and y1 - y0 >= 2:
                    boxes.append((x0, y0, x1, y1))
                    labels.append(obj["label"])
                    continue
            if count and obj["seg"]:  # a sliver of an object without a box: leave it out of the loss
                np.copyto(c.seg[sy, sx], IGNORE_INDEX, where=mine)
        return np.asarray(boxes, F32).reshape(-1, 4), np.asarray(labels, np.int64)

    def visible(self) -> np.ndarray:
        rng, c = self.rng, self.c
        if self.night:
            illum = np.full((self.h, self.w), rng.uniform(0.05, 0.15), F32)
            for cx, cy, radius in self.pools:
                win = c.window(cx - 2 * radius, cy - radius, cx + 2 * radius, cy + radius)
                if win is not None:
                    sl, u, v = win
                    illum[sl] += 0.8 * np.exp(-(((u - 0.5) * 4) ** 2 + ((v - 0.5) * 4) ** 2) / 2).astype(F32)
            vis = c.alb * illum + c.emit
            read, shot = 0.02, 0.006
        else:
            vis = c.alb * rng.uniform(0.8, 1.1)
            read, shot = 0.005, 0.0015
        np.clip(vis, 0.0, 1.0, out=vis)
        noise = rng.standard_normal(vis.shape, dtype=F32)
        noise *= np.sqrt(shot * vis + read * read)
        vis += noise
        return np.clip(vis, 0.0, 1.0, out=vis)

    def infrared(self) -> np.ndarray:
        rng = self.rng
        ir = _blur(_blur(self.c.ir))  # thermal optics resolve less detail
        rows = (np.arange(self.h, dtype=F32)[:, None] + 0.5) / self.h - 0.5
        cols = (np.arange(self.w, dtype=F32)[None, :] + 0.5) / self.w - 0.5
        vignette = 1.0 - rng.uniform(0.03, 0.1) * (rows ** 2 + cols ** 2) * 2
        fpn = rng.normal(0, 0.008, (1, self.w)).astype(F32)  # column fixed-pattern noise
        ir = (ir * vignette + rng.uniform(-0.04, 0.04) + fpn
              + rng.uniform(0.008, 0.015) * rng.standard_normal((self.h, self.w), dtype=F32))
        return np.clip(ir, 0.0, 1.0)


def render_scene(size: int | Sequence[int], rng: np.random.Generator, night: bool) -> dict[str, np.ndarray]:
    """Render one scene.

    Args:
        size: (H, W) or an int for a square image.
        rng: the scene's random generator (all randomness comes from it).
        night: night scene (dark visible image lit by lamps) or day.

    Returns:
        numpy arrays ``ir`` (H, W) and ``vis`` (3, H, W) float32 in [0, 1], ``mask`` (H, W) uint8 (MSRS classes,
        255 = ignore), ``boxes`` (N, 4) float32 xyxy, ``labels`` (N,) int64 (M3FD classes).
    """
    height, width = (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))
    if height < 8 or width < 8:
        raise ValueError(f"synthetic scenes need at least 8x8 pixels, got {width}x{height}")
    scene = _Scene(height, width, rng, night)
    scene.sky_and_ground()
    scene.buildings()
    scene.objects()
    boxes, labels = scene.labels()
    return {"ir": scene.infrared(), "vis": scene.visible(), "mask": scene.c.seg, "boxes": boxes,
            "labels": labels}


@register_dataset("synthetic")
class SyntheticScenes(FusionDataset):
    """Procedural aligned IR/visible road scenes with MSRS masks and M3FD boxes (see the module docstring).

    Args:
        root: unused (the data is generated); accepted for the registry signature.
        split: "train", "val" or "test"; each has its own seed stream, so splits never share a scene.
        size: image size, int or (H, W).
        length: number of samples.
        seed: dataset seed; sample ``i`` depends only on ``(seed, split, i)``.
        night_fraction: probability that a scene is at night.
        transform: callable ``(sample, generator) -> sample``.
    """

    class_names = MSRS_CLASSES
    det_class_names = M3FD_CLASSES
    has_masks = True
    has_boxes = True
    ignore_index = IGNORE_INDEX

    def __init__(self, root: Any = None, split: str | None = "train", *, size: int | Sequence[int] = 128,
                 length: int = 512, seed: int = 0, night_fraction: float = 0.5,
                 transform: Transform | None = None) -> None:
        super().__init__(transform)
        split = "train" if split is None else split
        if split not in SPLITS:
            raise ValueError(f"unknown synthetic split {split!r}; valid: {list(SPLITS)}")
        if length <= 0:
            raise ValueError(f"length must be positive, got {length}")
        if not 0.0 <= night_fraction <= 1.0:
            raise ValueError(f"night_fraction must lie in [0, 1], got {night_fraction}")
        self.split, self.length, self.seed, self.night_fraction = split, int(length), int(seed), night_fraction
        self.size = (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))

    def __len__(self) -> int:
        return self.length

    def load(self, index: int) -> dict[str, Any]:
        rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence([self.seed, SPLITS[self.split], index])))
        night = bool(rng.random() < self.night_fraction)
        scene = render_scene(self.size, rng, night)
        return {
            "name": f"synthetic_{self.split}_{index:06d}{'N' if night else 'D'}",
            "ir": torch.from_numpy(scene["ir"][None]),
            "vis": torch.from_numpy(scene["vis"]),
            "mask": torch.from_numpy(scene["mask"].astype(np.int64)),
            "boxes": torch.from_numpy(scene["boxes"]),
            "labels": torch.from_numpy(scene["labels"]),
        }

    def __repr__(self) -> str:
        return (f"SyntheticScenes(split={self.split!r}, size={self.size}, length={self.length}, seed={self.seed}, "
                f"night_fraction={self.night_fraction})")
