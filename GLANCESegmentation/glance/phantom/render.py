"""Turn the analytic anatomy into a tissue map and HU on the grid, a few slices at a time.

Tissue texture comes from one smooth random field defined on a coarse 3 mm
lattice in patient space (so it does not change with the voxel spacing) and
interpolated linearly onto the grid, separably, by small matrix products.
"""

from __future__ import annotations

import numpy as np
from scipy.ndimage import gaussian_filter

from glance.phantom.anatomy import Anatomy, Tissue
from glance.phantom.grid import Grid

CHUNK = 16  # slices per evaluation: bounds the temporaries to a few chunk-sized arrays
CELL_MM = 3.0

# Texture amplitude (HU per unit of the random field) per tissue.
_TEXTURE_HU = {Tissue.LUNG: 22.0, Tissue.FAT: 8.0, Tissue.MUSCLE: 6.0, Tissue.MEDIASTINUM: 8.0,
               Tissue.HEART: 5.0, Tissue.BONE_MARROW: 45.0, Tissue.ABDOMEN: 6.0}


class TextureField:
    """A smooth zero-mean, unit-variance random field over the grid's extent, sampled per chunk."""

    def __init__(self, grid: Grid, rng: np.random.Generator) -> None:
        self.grid = grid
        self.lo = [grid.origin[a] - 2 * CELL_MM for a in range(3)]
        n = [int(np.ceil(grid.shape[2 - a] * grid.spacing[a] / CELL_MM)) + 5 for a in range(3)]
        field = gaussian_filter(rng.standard_normal((n[2], n[1], n[0])).astype(np.float32), 1.0)
        self.field = field / max(float(field.std()), 1e-6)
        self.wx = self._weights(0, 0, grid.shape[2])
        self.wy = self._weights(1, 0, grid.shape[1])

    def _weights(self, axis: int, start: int, stop: int) -> np.ndarray:
        """Linear-interpolation matrix (grid samples x lattice nodes) along one axis."""
        pos = (self.grid.axis_mm(axis, start, stop) - self.lo[axis]) / CELL_MM
        n_nodes = self.field.shape[2 - axis]
        i0 = np.clip(np.floor(pos).astype(int), 0, n_nodes - 2)
        f = (pos - i0).astype(np.float32)
        w = np.zeros((len(pos), n_nodes), dtype=np.float32)
        w[np.arange(len(pos)), i0] = 1 - f
        w[np.arange(len(pos)), i0 + 1] = f
        return w

    def chunk(self, k0: int, k1: int) -> np.ndarray:
        # Plain 2D products: numpy's stacked matmul does not use BLAS and is 10x slower.
        wz = self._weights(2, k0, k1)
        nz, ly, lx = self.field.shape
        c = (wz @ self.field.reshape(nz, ly * lx)).reshape(-1, lx) @ self.wx.T  # (k*ly, i)
        k, ni = k1 - k0, self.wx.shape[0]
        c = self.wy @ c.reshape(k, ly, ni).transpose(1, 0, 2).reshape(ly, k * ni)  # (j, k*i)
        return np.ascontiguousarray(c.reshape(-1, k, ni).transpose(1, 0, 2))


def render_anatomy(grid: Grid, anatomy: Anatomy, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """(HU float32, tissue uint8) arrays of the anatomy on ``grid``, before vessels, nodules and scanner."""
    nk, nj, ni = grid.shape
    hu = np.empty(grid.shape, dtype=np.float32)
    tissue = np.empty(grid.shape, dtype=np.uint8)
    lut = np.zeros(256, dtype=np.float32)
    amp = np.zeros(256, dtype=np.float32)
    for t, v in anatomy.hu.items():
        lut[t] = v
    for t, v in _TEXTURE_HU.items():
        amp[t] = v
    texture = TextureField(grid, rng)
    y = grid.axis_mm(1)[None, :, None]
    x = grid.axis_mm(0)[None, None, :]
    # Dependent lung (the back, y > 0 when supine) is denser.
    gravity = (40.0 * np.clip((y + anatomy.b_ant) / (anatomy.b_ant + anatomy.b_post), 0, 1) - 20.0).astype(np.float32)
    cortex_extra = anatomy.hu[Tissue.BONE_CORTEX] - anatomy.hu[Tissue.BONE_MARROW]
    for k0 in range(0, nk, CHUNK):
        k1 = min(nk, k0 + CHUNK)
        z = grid.axis_mm(2, k0, k1)[:, None, None]
        t, shell = anatomy.tissue(x, y, z)
        h = lut[t]
        h += amp[t] * texture.chunk(k0, k1)
        h += np.where(t == Tissue.LUNG, gravity, np.float32(0))
        h += shell * np.float32(cortex_extra)
        hu[k0:k1] = h
        tissue[k0:k1] = t
    return hu, tissue
