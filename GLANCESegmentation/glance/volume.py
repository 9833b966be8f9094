"""The one data type of the engine: a CT volume with its geometry in LPS.

Arrays are indexed (k, j, i) = (slice, row, column), as numpy sees a SimpleITK
image. Geometry follows ITK/DICOM: ``origin`` is the LPS position (mm) of voxel
(i, j, k) = (0, 0, 0); ``spacing`` is (si, sj, sk) in mm; column ``n`` of
``direction`` is the LPS unit vector of index axis n (i, j, k).
Slicer's RAS lives only at the MRML boundary (``glance.scene``).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


@dataclass
class Volume:
    array: np.ndarray
    spacing: tuple[float, float, float]
    origin: tuple[float, float, float] = (0.0, 0.0, 0.0)
    direction: np.ndarray = field(default_factory=lambda: np.eye(3))
    metadata: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.spacing = tuple(float(s) for s in self.spacing)
        self.origin = tuple(float(o) for o in self.origin)
        self.direction = np.asarray(self.direction, dtype=np.float64).reshape(3, 3)

    @property
    def shape(self) -> tuple[int, int, int]:
        """Array shape (k, j, i)."""
        return tuple(self.array.shape)

    @property
    def index_to_lps(self) -> np.ndarray:
        """4x4 matrix mapping homogeneous (i, j, k, 1) to LPS mm."""
        m = np.eye(4)
        m[:3, :3] = self.direction @ np.diag(self.spacing)
        m[:3, 3] = self.origin
        return m

    def ijk_to_lps(self, ijk: np.ndarray) -> np.ndarray:
        """Continuous (i, j, k) index (..., 3) to LPS mm (..., 3)."""
        ijk = np.asarray(ijk, dtype=np.float64)
        return ijk @ (self.direction @ np.diag(self.spacing)).T + np.asarray(self.origin)

    def lps_to_ijk(self, lps: np.ndarray) -> np.ndarray:
        """LPS mm (..., 3) to continuous (i, j, k) index (..., 3)."""
        lps = np.asarray(lps, dtype=np.float64)
        inv = np.linalg.inv(self.direction @ np.diag(self.spacing))
        return (lps - np.asarray(self.origin)) @ inv.T

    def with_array(self, array: np.ndarray) -> "Volume":
        """A volume on the same grid holding ``array`` (same shape)."""
        if array.shape != self.array.shape:
            raise ValueError(f"array shape {array.shape} does not match grid {self.array.shape}")
        return Volume(array, self.spacing, self.origin, self.direction.copy(), dict(self.metadata))
