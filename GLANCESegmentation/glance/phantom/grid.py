"""The phantom's voxel grid: axis-aligned LPS, index (k, j, i), and mm <-> index helpers."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from glance.volume import Volume


@dataclass(frozen=True)
class Grid:
    shape: tuple[int, int, int]  # (nk, nj, ni)
    spacing: tuple[float, float, float]  # (si, sj, sk) mm
    origin: tuple[float, float, float]  # LPS of voxel (0, 0, 0)

    @classmethod
    def centred(cls, size_ijk: tuple[int, int, int], spacing: tuple[float, float, float],
                z_centre: float = -150.0) -> "Grid":
        """A grid whose in-plane centre is the LPS axis (x = y = 0) and whose z centre is ``z_centre``."""
        ni, nj, nk = (int(v) for v in size_ijk)
        si, sj, sk = (float(v) for v in spacing)
        origin = (-(ni - 1) * si / 2, -(nj - 1) * sj / 2, z_centre - (nk - 1) * sk / 2)
        return cls((nk, nj, ni), (si, sj, sk), origin)

    def axis_mm(self, axis: int, start: int = 0, stop: int | None = None) -> np.ndarray:
        """LPS coordinate (float32) of index axis ``axis`` (0 = i/x, 1 = j/y, 2 = k/z)."""
        n = self.shape[2 - axis]
        stop = n if stop is None else stop
        return (self.origin[axis] + np.arange(start, stop) * self.spacing[axis]).astype(np.float32)

    def axes_mm(self, box) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Broadcastable z (k,1,1), y (1,j,1), x (1,1,i) coordinates of a box ((k0,k1),(j0,j1),(i0,i1))."""
        (k0, k1), (j0, j1), (i0, i1) = box
        return (self.axis_mm(2, k0, k1)[:, None, None], self.axis_mm(1, j0, j1)[None, :, None],
                self.axis_mm(0, i0, i1)[None, None, :])

    def box_around(self, lo_mm, hi_mm):
        """Index box ((k0,k1),(j0,j1),(i0,i1)) covering the LPS box [lo, hi], clipped; None if empty."""
        lo = np.floor((np.asarray(lo_mm) - self.origin) / self.spacing).astype(int)
        hi = np.ceil((np.asarray(hi_mm) - self.origin) / self.spacing).astype(int) + 1
        box = []
        for axis in (2, 1, 0):
            a, b = max(lo[axis], 0), min(hi[axis], self.shape[2 - axis])
            if a >= b:
                return None
            box.append((int(a), int(b)))
        return tuple(box)

    def to_lps(self, ijk) -> np.ndarray:
        return np.asarray(self.origin) + np.asarray(ijk, dtype=float) * self.spacing

    def to_ijk(self, lps) -> np.ndarray:
        return (np.asarray(lps, dtype=float) - self.origin) / self.spacing

    def volume(self, array: np.ndarray) -> Volume:
        return Volume(array, self.spacing, self.origin, np.eye(3))

    @classmethod
    def of(cls, volume: Volume) -> "Grid":
        """The grid of an axis-aligned Volume (direction = identity)."""
        if not np.allclose(volume.direction, np.eye(3), atol=1e-4):
            raise ValueError("only axis-aligned volumes have a phantom Grid")
        return cls(volume.shape, volume.spacing, volume.origin)
