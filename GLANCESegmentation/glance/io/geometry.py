"""Canonical axial orientation of a volume, by axis permutation and flips only.

The canonical array is the radiological axial display: axis 0 runs inferior
-> superior, axis 1 anterior -> posterior (image rows), axis 2 right -> left
(image columns), i.e. canonical axes follow LPS +S, +P, +L. Nothing is ever
resampled: each canonical axis takes the index axis whose direction is
closest to its LPS axis (the permutation that best matches all three), so for
an oblique scan the in-plane obliquity is kept, not removed;
``CanonicalGrid.obliquity_deg`` says how large it is. ``index_to_lps`` of the
grid maps canonical indices to the true LPS positions either way.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import numpy as np

from glance.volume import Volume

# LPS component that canonical axes 0, 1, 2 follow: S (z), P (y), L (x).
_CANONICAL_LPS = (2, 1, 0)


def _assign(direction: np.ndarray) -> tuple[tuple[int, int, int], tuple[bool, bool, bool], float]:
    """Index axis (0=i, 1=j, 2=k) for each canonical axis, its flip, and the largest obliquity."""
    d = np.asarray(direction, dtype=np.float64).reshape(3, 3)
    cos = np.abs(d[list(_CANONICAL_LPS), :])  # cos[t, n]: canonical axis t vs index axis n
    best = max(itertools.permutations(range(3)), key=lambda p: sum(cos[t, p[t]] for t in range(3)))
    flips = tuple(bool(d[_CANONICAL_LPS[t], best[t]] < 0) for t in range(3))
    worst = min(cos[t, best[t]] for t in range(3))
    return best, flips, float(np.degrees(np.arccos(np.clip(worst, 0.0, 1.0))))


def axial_axis(direction: np.ndarray) -> int:
    """Index axis (0=i, 1=j, 2=k) most aligned with LPS superior; the array axis is 2 minus it."""
    return _assign(direction)[0][0]


@dataclass(frozen=True, eq=False)
class CanonicalGrid:
    """How an original (k, j, i) array maps onto the canonical axial array."""

    axes: tuple[int, int, int]  # original array axis shown on canonical axis 0, 1, 2
    flips: tuple[bool, bool, bool]  # canonical axis runs against the original axis
    original_shape: tuple[int, int, int]
    canonical_spacing: tuple[float, float, float]  # mm along canonical axes 0, 1, 2
    original_index_to_lps: np.ndarray  # 4x4, homogeneous (i, j, k, 1) -> LPS mm
    obliquity_deg: float  # largest angle between an index axis and its LPS axis

    @property
    def canonical_shape(self) -> tuple[int, int, int]:
        return tuple(self.original_shape[a] for a in self.axes)

    @property
    def index_to_lps(self) -> np.ndarray:
        """4x4 matrix mapping homogeneous canonical (c0, c1, c2, 1) to LPS mm."""
        to_ijk = np.zeros((4, 4))
        to_ijk[3, 3] = 1.0
        for t, a in enumerate(self.axes):
            n = 2 - a  # index axis (i=0, j=1, k=2) of array axis a
            to_ijk[n, t] = -1.0 if self.flips[t] else 1.0
            to_ijk[n, 3] = self.original_shape[a] - 1 if self.flips[t] else 0.0
        return self.original_index_to_lps @ to_ijk

    def _flip(self, array: np.ndarray) -> np.ndarray:
        return array[tuple(slice(None, None, -1) if f else slice(None) for f in self.flips)]

    def to_canonical(self, array: np.ndarray) -> np.ndarray:
        """A view of an original-grid array in canonical order."""
        if tuple(array.shape) != tuple(self.original_shape):
            raise ValueError(f"array shape {array.shape} does not match the grid {self.original_shape}")
        return self._flip(np.transpose(array, self.axes))

    def to_original(self, array: np.ndarray) -> np.ndarray:
        """A view of a canonical-order array on the original grid (exact inverse)."""
        if tuple(array.shape) != self.canonical_shape:
            raise ValueError(f"array shape {array.shape} does not match the canonical grid {self.canonical_shape}")
        return np.transpose(self._flip(array), np.argsort(self.axes))


def canonical_grid(volume: Volume) -> CanonicalGrid:
    """The canonical mapping for ``volume``'s grid."""
    index_axes, flips, obliquity = _assign(volume.direction)
    axes = tuple(2 - n for n in index_axes)
    return CanonicalGrid(
        axes=axes,
        flips=flips,
        original_shape=tuple(volume.array.shape),
        canonical_spacing=tuple(volume.spacing[n] for n in index_axes),
        original_index_to_lps=volume.index_to_lps,
        obliquity_deg=obliquity,
    )


def to_canonical(volume: Volume) -> tuple[np.ndarray, CanonicalGrid]:
    """A view of ``volume.array`` in canonical axial order, and the grid to map back."""
    grid = canonical_grid(volume)
    return grid.to_canonical(volume.array), grid
