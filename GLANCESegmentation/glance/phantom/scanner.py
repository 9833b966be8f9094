"""What the scanner does to the ideal image: blur, slice profile, noise, and the FOV circle.

- In-plane point spread: a Gaussian of ``psf_mm`` sigma.
- Slice sensitivity: voxels already average over their own slab (the phantom
  is drawn with partial volume); a nominal slice thickness larger than the
  spacing adds a Gaussian along z with FWHM^2 = thickness^2 - spacing^2.
- Noise: per slice, white noise smoothed a little in-plane (CT noise is
  correlated over about a pixel), scaled to ``noise_hu`` standard deviation.
  Each slice has its own seed, so the result does not depend on chunking.
- Outside the reconstruction circle the scanner writes a padding value.

Everything works in place on the float32 image, a slab at a time, so memory
stays at one image plus a slab.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.ndimage import gaussian_filter, gaussian_filter1d

from glance.phantom.grid import Grid

_SLAB = 32
_FWHM = 2.0 * np.sqrt(2.0 * np.log(2.0))


@dataclass
class ScannerConfig:
    psf_mm: float = 0.45  # in-plane Gaussian sigma (a "standard" kernel)
    slice_thickness_mm: float | None = None  # None: equal to the slice spacing
    noise_hu: float = 18.0
    padding_hu: int | None = -2048  # outside the FOV circle; None: no circle
    noise_correlation_px: float = 0.7


def apply_scanner(hu: np.ndarray, grid: Grid, cfg: ScannerConfig, seed: int) -> np.ndarray:
    """Blur, add noise and pad ``hu`` (float32, modified in place); returns the int16 image."""
    si, sj, sk = grid.spacing
    nk, nj, ni = grid.shape
    sigma_xy = (cfg.psf_mm / sj, cfg.psf_mm / si)
    for k0 in range(0, nk, _SLAB):
        sl = hu[k0:k0 + _SLAB]
        sl[...] = gaussian_filter(sl, (0, *sigma_xy), mode="nearest")
    thickness = cfg.slice_thickness_mm or sk
    extra = np.sqrt(max(thickness**2 - sk**2, 0.0)) / _FWHM
    if extra > 0.05 * sk:
        for j0 in range(0, nj, _SLAB):
            block = hu[:, j0:j0 + _SLAB]
            block[...] = gaussian_filter1d(block, extra / sk, axis=0, mode="nearest")
    _add_noise(hu, cfg, seed)
    out = np.empty(hu.shape, dtype=np.int16)
    for k0 in range(0, nk, _SLAB):
        np.clip(np.rint(hu[k0:k0 + _SLAB]), -32768, 32767, out=hu[k0:k0 + _SLAB])
        out[k0:k0 + _SLAB] = hu[k0:k0 + _SLAB]
    if cfg.padding_hu is not None:
        out[:, ~fov_circle(grid)] = cfg.padding_hu
    return out


def _add_noise(hu: np.ndarray, cfg: ScannerConfig, seed: int) -> None:
    if cfg.noise_hu <= 0:
        return
    s = cfg.noise_correlation_px
    # Smoothing white noise by a Gaussian of sigma s (2D) divides its SD by 2 s sqrt(pi).
    gain = np.float32(cfg.noise_hu * (2.0 * s * np.sqrt(np.pi) if s > 0 else 1.0))
    for k in range(hu.shape[0]):
        rng = np.random.default_rng([seed, 0x5CA, k])
        n = rng.standard_normal(hu.shape[1:], dtype=np.float32)
        if s > 0:
            n = gaussian_filter(n, s, mode="wrap")
        hu[k] += gain * n


def fov_circle(grid: Grid) -> np.ndarray:
    """In-plane mask (j, i) of the reconstruction circle: the largest circle inside the grid."""
    y = grid.axis_mm(1)[:, None]
    x = grid.axis_mm(0)[None, :]
    cy, cx = y.mean(), x.mean()
    r = min(grid.shape[1] * grid.spacing[1], grid.shape[2] * grid.spacing[0]) / 2
    return (x - cx) ** 2 + (y - cy) ** 2 <= r * r
