"""Periodic full-resolution textures (collagen fibres, granularity, chromatin, fat, sensor noise).

Rendering looks these up by absolute slide pixel (modulo their period), so every pixel depends
only on its coordinates: a slide rendered strip by strip equals the same slide rendered at once.
Textures depend only on µm/px (never on the seed); slides vary them by seeded offsets.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np
from scipy import fft as sfft
from scipy import ndimage
from scipy.spatial import cKDTree

FIBRE_ANGLES_DEG = (0.0, 60.0, 120.0)


def _filtered_noise(rng: np.random.Generator, size: int, sig_along: float, sig_across: float,
                    angle_deg: float, warp: np.ndarray | None = None) -> np.ndarray:
    """Periodic Gaussian-filtered white noise, zero mean / unit sd; anisotropic if sigmas differ.

    `warp` (2, size, size) displaces the lookup: straight fibres become wavy.
    """
    white = rng.standard_normal((size, size), dtype=np.float32)
    fy = np.fft.fftfreq(size).astype(np.float32)[:, None]
    fx = np.fft.rfftfreq(size).astype(np.float32)[None, :]
    a = np.deg2rad(angle_deg)
    f_along = fx * np.float32(np.cos(a)) + fy * np.float32(np.sin(a))
    f_across = -fx * np.float32(np.sin(a)) + fy * np.float32(np.cos(a))
    gain = np.exp(np.float32(-2 * np.pi**2) * (f_along**2 * np.float32(sig_along**2)
                                                + f_across**2 * np.float32(sig_across**2)))
    out = sfft.irfft2(sfft.rfft2(white, workers=2) * gain, s=(size, size), workers=2)
    if warp is not None:
        out = ndimage.map_coordinates(out, warp, order=1, mode="grid-wrap")
    out -= out.mean()
    out /= out.std() + 1e-12
    return out.astype(np.float32)


def _fat_membranes(rng: np.random.Generator, size: int, cell_px: float,
                   width_px: float) -> np.ndarray:
    """Periodic Voronoi-cell borders (adipocyte membranes): 1 on a membrane, 0 inside a cell."""
    n_seeds = max(4, int(round(size**2 / cell_px**2)))
    step = 4  # compute the border distance at 1/4 resolution; it is piecewise linear
    small = size // step
    seeds = rng.random((n_seeds, 2)) * small
    tree = cKDTree(seeds, boxsize=small)
    yy, xx = np.mgrid[0:small, 0:small] + 0.5
    d, _ = tree.query(np.column_stack([yy.ravel(), xx.ravel()]), k=2)
    gap = ((d[:, 1] - d[:, 0]) * step).reshape(small, small).astype(np.float32)
    # periodic bilinear upsampling by `step`
    up = np.repeat(np.repeat(gap, step, axis=0), step, axis=1)
    up = 0.25 * (up + np.roll(up, step // 2, 0) + np.roll(up, step // 2, 1)
                 + np.roll(np.roll(up, step // 2, 0), step // 2, 1))
    return np.exp(-((up / max(width_px, 1.0)) ** 2)).astype(np.float32)


@dataclass(frozen=True)
class TextureBank:
    """All periodic textures for one µm/px. `period` differs per texture to hide repetition."""

    fibres: tuple[np.ndarray, ...]
    granular: np.ndarray
    chromatin: tuple[np.ndarray, ...]  # fine, medium, coarse
    fat: np.ndarray
    noise: np.ndarray  # sensor noise, int8-like float values


@lru_cache(maxsize=2)
def texture_bank(mpp: float) -> TextureBank:
    rng = np.random.default_rng(20240611)
    px = 1.0 / mpp  # pixels per µm
    fib_size = 1024
    warp = np.stack([_filtered_noise(rng, fib_size, 5.0 * px, 5.0 * px, 0.0) * 2.5 * px
                     for _ in range(2)])
    warp += np.indices((fib_size, fib_size), dtype=np.float32)
    fibres = tuple(
        _filtered_noise(rng, fib_size, 4.0 * px, 0.5 * px, ang, warp) for ang in FIBRE_ANGLES_DEG
    )
    granular = _filtered_noise(rng, 1000, 0.35 * px, 0.35 * px, 0.0)
    chromatin = tuple(
        _filtered_noise(rng, 512, s * px, s * px, 0.0) for s in (0.22, 0.40, 0.70)
    )
    fat = _fat_membranes(rng, 1024, 60.0 * px, 1.2 * px)
    noise = rng.standard_normal((509, 509)).astype(np.float32)
    return TextureBank(fibres, granular, chromatin, fat, noise)


def periodic_window(tex: np.ndarray, y0: int, x0: int, h: int, w: int) -> np.ndarray:
    """tex[(y0 + i) % P, (x0 + j) % Q] for a h x w window, without per-pixel gathers."""
    p, q = tex.shape
    ry = np.arange(y0, y0 + h) % p
    rows = tex[ry] if (y0 % p) + h > p else tex[y0 % p:y0 % p + h]
    xs = x0 % q
    if xs + w <= q:
        return rows[:, xs:xs + w]
    reps = (xs + w + q - 1) // q
    return np.tile(rows, (1, reps))[:, xs:xs + w]
