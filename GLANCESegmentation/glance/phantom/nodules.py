"""Synthetic nodules: shapes, types, placement in the lung, and drawing with partial volume.

A nodule is an implicit solid in mm around its centre: an ellipsoid, plus
lobes (spheres on its surface) for a lobulated one, plus tapering spicules
for a spiculated one. Part-solid nodules carry a solid core inside the
ground-glass. Occupancy of a voxel is the fraction of 3x3x3 sub-voxel points
inside the solid, so volumes and edges are right at any spacing.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import numpy as np

from glance.phantom.grid import Grid

log = logging.getLogger(__name__)

TYPES = ("solid", "part-solid", "ground-glass")
SHAPES = ("round", "ellipsoid", "lobulated", "spiculated")
ATTACHMENTS = ("isolated", "juxta-vascular", "juxta-pleural")

_SUB = (np.arange(3) - 1) / 3.0  # sub-voxel offsets (fraction of a voxel)


@dataclass
class NoduleShape:
    radii: np.ndarray  # ellipsoid semi-axes (mm)
    rotation: np.ndarray  # 3x3, columns = ellipsoid axes in LPS
    lobes: list[tuple[np.ndarray, float]] = field(default_factory=list)  # (offset mm, radius mm)
    spicules: list[tuple[np.ndarray, float, float]] = field(default_factory=list)  # (unit dir, length, base r)
    core: tuple[np.ndarray, float] | None = None  # part-solid: (offset mm, scale of the ellipsoid)

    @property
    def body_extent(self) -> float:
        """Radius (mm) of a sphere around the centre that holds the nodule without its spicules."""
        return max([float(self.radii.max())] + [float(np.linalg.norm(o)) + lr for o, lr in self.lobes])

    @property
    def extent(self) -> float:
        """Radius (mm) of a sphere around the centre that holds the whole nodule."""
        return max([self.body_extent] + [length for _, length, _ in self.spicules])

    def _ellipsoid(self, p: np.ndarray, scale: float = 1.0, offset=None) -> np.ndarray:
        q = (p - (0 if offset is None else offset)) @ self.rotation
        return np.sum((q / (self.radii * scale)) ** 2, axis=-1) < 1.0

    def inside(self, p: np.ndarray) -> np.ndarray:
        """Boolean: points ``p`` (..., 3), mm relative to the centre, inside the nodule."""
        out = self._ellipsoid(p)
        for offset, r in self.lobes:
            out |= np.sum((p - offset) ** 2, axis=-1) < r * r
        for direction, length, r0 in self.spicules:
            u = np.clip(p @ direction / length, 0, 1)
            d2 = np.sum((p - u[..., None] * length * direction) ** 2, axis=-1)
            r = r0 * (1 - u) + 0.25 * u
            out |= d2 < r * r
        return out

    def inside_core(self, p: np.ndarray) -> np.ndarray:
        if self.core is None:
            return np.zeros(p.shape[:-1], dtype=bool)
        offset, scale = self.core
        return self._ellipsoid(p, scale, offset)


@dataclass
class NoduleSpec:
    """A nodule to draw: where, what, and which HU."""

    centre: np.ndarray  # LPS mm
    diameter_mm: float
    nodule_type: str
    shape_name: str
    attachment: str
    shape: NoduleShape
    hu: float  # solid HU, or ground-glass HU
    core_hu: float | None = None


def random_shape(diameter: float, shape_name: str, nodule_type: str, rng: np.random.Generator) -> NoduleShape:
    r = diameter / 2
    rot = np.linalg.qr(rng.normal(size=(3, 3)))[0]
    if shape_name == "round":
        radii = r * rng.uniform(0.95, 1.05, 3)
    elif shape_name == "ellipsoid":
        radii = r * np.array([1.1, rng.uniform(0.8, 1.0), rng.uniform(0.65, 0.85)])
    else:
        radii = r * rng.uniform(0.8, 0.9, 3)
    shape = NoduleShape(radii, rot)
    if shape_name == "lobulated":
        for _ in range(rng.integers(3, 7)):
            d = _unit(rng)
            shape.lobes.append((d * r * rng.uniform(0.4, 0.55), r * rng.uniform(0.4, 0.55)))
    if shape_name == "spiculated":
        for _ in range(rng.integers(6, 15)):
            shape.spicules.append((_unit(rng), r * rng.uniform(1.4, 2.1), max(0.5, r * rng.uniform(0.1, 0.18))))
    if nodule_type == "part-solid":
        shape.core = (_unit(rng) * r * rng.uniform(0.0, 0.2), rng.uniform(0.35, 0.6))
    return shape


def _unit(rng: np.random.Generator) -> np.ndarray:
    v = rng.normal(size=3)
    return v / np.linalg.norm(v)


def random_hu(nodule_type: str, rng: np.random.Generator) -> tuple[float, float | None]:
    """(main HU, core HU) for a nodule type: solid 0..60 HU, ground glass -750..-300 HU."""
    if nodule_type == "solid":
        return float(rng.uniform(0, 60)), None
    ggo = float(rng.uniform(-700, -350))
    return ggo, (float(rng.uniform(0, 50)) if nodule_type == "part-solid" else None)


@dataclass
class Occupancy:
    """Partial-volume fractions of a nodule in a box of the grid."""

    box: tuple[tuple[int, int], tuple[int, int], tuple[int, int]]
    total: np.ndarray  # float32 in [0, 1]
    core: np.ndarray  # float32 in [0, 1] (zeros unless part-solid)


def occupancy(grid: Grid, centre: np.ndarray, shape: NoduleShape) -> Occupancy | None:
    """Fraction of each voxel inside the nodule (27 sub-voxel samples), on the box around it."""
    ext = shape.extent + 2 * max(grid.spacing)
    box = grid.box_around(centre - ext, centre + ext)
    if box is None:
        return None
    z, y, x = grid.axes_mm(box)
    z, y, x = (np.asarray(v, dtype=np.float64) - c for v, c in zip((z, y, x), centre[::-1]))
    total = np.zeros((z.shape[0], y.shape[1], x.shape[2]), dtype=np.float32)
    core = np.zeros_like(total)
    si, sj, sk = grid.spacing
    for dz in _SUB:
        for dy in _SUB:
            for dx in _SUB:
                p = np.stack(np.broadcast_arrays(x + dx * si, y + dy * sj, z + dz * sk), axis=-1)
                total += shape.inside(p)
                if shape.core is not None:
                    core += shape.inside_core(p)
    total /= len(_SUB) ** 3
    core /= len(_SUB) ** 3
    return Occupancy(box, total, core)


def draw_nodule(hu_box: np.ndarray, allowed_box: np.ndarray, occ: Occupancy, spec: NoduleSpec) -> np.ndarray:
    """Blend the nodule into ``hu_box`` (the CT on ``occ.box``, in place) where ``allowed_box``.

    Returns the occupancy actually drawn. Solid nodules replace what is there;
    ground glass only raises HU, so vessels running through it stay visible, as
    on real scans.
    """
    total = occ.total * allowed_box
    h = hu_box
    if spec.nodule_type == "solid":
        h += total * (spec.hu - h)
    else:
        np.maximum(h, h + total * (spec.hu - h), out=h)
        if spec.core_hu is not None:
            h += (occ.core * allowed_box) * (spec.core_hu - h)
    return total
