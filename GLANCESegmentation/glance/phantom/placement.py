"""Where synthetic nodules go: isolated, beside a vessel, or on the chest wall.

Placement asks the analytic anatomy whether points are lung (no voxel maps
needed), so it is cheap and the same at any spacing. Every nodule's body keeps
clear of bone and of the airway walls: it is drawn only in lung and vessel, so
anything else cutting into it would leave a labelled fragment that is not the
nodule its size and kind describe.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np

from glance.phantom.anatomy import Anatomy, Tissue
from glance.phantom.grid import Grid
from glance.phantom.nodules import ATTACHMENTS, SHAPES, TYPES, NoduleSpec, random_hu, random_shape
from glance.phantom.vessels import Tubes

log = logging.getLogger(__name__)

_TRIES = 300
_CLEARANCE_MM = 2.0  # between a nodule and bone or an airway wall (the label's neighbours must be lung or vessel)
_BONE = (Tissue.BONE_CORTEX, Tissue.BONE_MARROW, Tissue.CARTILAGE)
_WALL = (Tissue.FAT, Tissue.MUSCLE, *_BONE, Tissue.SKIN)


@dataclass
class NoduleMix:
    """How random nodules are drawn."""

    diameter_mm: tuple[float, float] = (4.0, 25.0)  # log-uniform
    type_weights: tuple[float, float, float] = (0.5, 0.2, 0.3)  # solid, part-solid, ground-glass
    shape_weights: tuple[float, float, float, float] = (0.3, 0.2, 0.25, 0.25)  # round, ellipsoid, lobulated, spiculated
    attachment_weights: tuple[float, float, float] = (0.5, 0.25, 0.25)  # isolated, juxta-vascular, juxta-pleural


def _sphere_dirs(n: int = 96) -> np.ndarray:
    """Near-uniform unit vectors (Fibonacci sphere)."""
    i = np.arange(n) + 0.5
    phi = np.arccos(1 - 2 * i / n)
    theta = np.pi * (1 + 5**0.5) * i
    return np.stack([np.cos(theta) * np.sin(phi), np.sin(theta) * np.sin(phi), np.cos(phi)], axis=1)


SPHERE_DIRS = _sphere_dirs()


class Placer:
    def __init__(self, grid: Grid, anatomy: Anatomy, vessels: Tubes, airways: Tubes | None = None) -> None:
        self.grid, self.anatomy, self.vessels = grid, anatomy, vessels
        self.airways = airways if airways is not None else Tubes.empty()  # outer surfaces of the airway walls
        nk, nj, ni = grid.shape
        self.lo = np.asarray(grid.origin)
        self.hi = grid.to_lps([ni - 1, nj - 1, nk - 1])
        self.placed: list[tuple[np.ndarray, float]] = []

    def lung(self, p: np.ndarray) -> np.ndarray:
        p = np.atleast_2d(p)
        return self.anatomy.lung_mask(p[:, 0], p[:, 1], p[:, 2])

    def _free(self, c: np.ndarray, ext: float) -> bool:
        in_grid = np.all(c - ext >= self.lo) and np.all(c + ext <= self.hi)
        return bool(in_grid) and all(np.linalg.norm(c - q) > ext + e + 3.0 for q, e in self.placed)

    def clear(self, c: np.ndarray, extent: float, attachment: str) -> bool:
        """Whether a nodule body reaching ``extent`` mm from ``c`` keeps clear of bone and of the airways.

        A nodule is drawn only where there is lung or vessel, so a vertebra or a bronchus cutting into it
        would leave a fragment whose label no longer matches its stated size and kind, and that no reader
        would call a nodule. A juxta-pleural nodule's side beyond the pleura is not drawn, so for it only
        bone inside the lung mask counts (the spine's processes reach into it), not the chest wall's ribs.
        """
        reach = extent + _CLEARANCE_MM
        points = np.vstack([c[None], c + SPHERE_DIRS * (0.5 * reach), c + SPHERE_DIRS * reach])
        tissue, _ = self.anatomy.tissue(points[:, 0], points[:, 1], points[:, 2])
        bone = np.isin(tissue, _BONE)
        if attachment == "juxta-pleural":
            bone &= self.lung(points)
        if bone.any():
            return False
        if not len(self.airways):
            return True
        dist, r_wall = self.airways.distance(c)
        return not np.any(dist - r_wall < reach)

    def _random_lung_point(self, rng: np.random.Generator, margin: float) -> np.ndarray | None:
        lo, hi = self.lo + margin, self.hi - margin
        if np.any(lo >= hi):
            return None
        cand = rng.uniform(lo, hi, size=(64, 3))
        inside = cand[self.lung(cand)]
        return inside[0] if len(inside) else None

    def isolated(self, ext: float, radius: float, rng: np.random.Generator) -> np.ndarray | None:
        # The body needs lung all round it; spicules may reach further (they are cut at the lung edge).
        c = self._random_lung_point(rng, ext)
        if c is None or not self._free(c, ext) or not self.lung(c + SPHERE_DIRS * (radius + 1.5)).all():
            return None
        dist, r_vessel = self.vessels.distance(c)
        big = r_vessel > 1.0
        return c if not np.any(dist[big] - r_vessel[big] < radius + 1.0) else None

    def juxta_vascular(self, ext: float, radius: float, rng: np.random.Generator) -> np.ndarray | None:
        v = self.vessels
        mid = (v.p0 + v.p1) / 2
        ok = (v.r0 > 0.8) & (v.r0 < 3.5) & np.all((mid > self.lo + ext) & (mid < self.hi - ext), axis=1)
        idx = np.flatnonzero(ok)
        if not len(idx):
            return None
        s = int(rng.choice(idx))
        q = v.p0[s] + rng.uniform(0.2, 0.8) * (v.p1[s] - v.p0[s])
        d = v.p1[s] - v.p0[s]
        n = np.cross(d, rng.normal(size=3))
        n /= np.linalg.norm(n) + 1e-12
        # The vessel axis runs just inside the nodule's edge: attached, not engulfed.
        c = q + n * (0.8 * radius + 0.5 * v.r0[s])
        if not self._free(c, ext) or self.lung(c + SPHERE_DIRS * (ext + 1.0)).mean() < 0.97:
            return None
        return c

    def juxta_pleural(self, ext: float, radius: float, rng: np.random.Generator) -> np.ndarray | None:
        p = self._random_lung_point(rng, ext)
        if p is None:
            return None
        # March outwards (away from the midline) to the costal pleura.
        ang = np.arctan2(p[1], p[0]) + rng.uniform(-0.5, 0.5)
        d = np.array([np.cos(ang), np.sin(ang), 0.0])
        steps = p + np.arange(1, 300)[:, None] * 0.5 * d
        out = np.flatnonzero(~self.lung(steps))
        if not len(out):
            return None
        edge = steps[out[0]]
        beyond = edge + 3.0 * d
        t, _ = self.anatomy.tissue(beyond[0], beyond[1], beyond[2])
        if Tissue(int(t)) not in _WALL:
            return None
        c = edge - d * (0.55 * radius)
        if not self._free(c, ext) or self.lung(c + SPHERE_DIRS * radius * 0.9).mean() < 0.5:
            return None
        return c


def place_nodules(n: int, grid: Grid, anatomy: Anatomy, vessels: Tubes, rng: np.random.Generator,
                  mix: NoduleMix | None = None, airways: Tubes | None = None) -> list[NoduleSpec]:
    """``n`` random nodules that fit in the lungs of ``grid`` (fewer, with a warning, if they do not fit),
    clear of bone and of the ``airways`` (their walls' outer surfaces)."""
    mix = mix or NoduleMix()
    placer = Placer(grid, anatomy, vessels, airways)
    specs: list[NoduleSpec] = []
    for index in range(n):
        sub = np.random.default_rng(rng.integers(2**63))
        spec = _one(placer, mix, sub)
        if spec is None:
            log.warning("nodule %d: no room found in the lungs of this grid; skipped", index + 1)
            continue
        placer.placed.append((spec.centre, spec.shape.extent))
        specs.append(spec)
    return specs


def pick(options, weights, rng) -> str:
    w = np.asarray(weights, dtype=float)
    return str(options[rng.choice(len(options), p=w / w.sum())])


def _one(placer: Placer, mix: NoduleMix, rng: np.random.Generator) -> NoduleSpec | None:
    lo, hi = mix.diameter_mm
    diameter = float(np.exp(rng.uniform(np.log(lo), np.log(hi))))
    ntype = pick(TYPES, mix.type_weights, rng)
    shape_name = pick(SHAPES, mix.shape_weights, rng)
    if diameter < 6.0:
        shape_name = "round"  # lobes and spicules do not resolve on a few voxels
    attachment = pick(ATTACHMENTS, mix.attachment_weights, rng)
    shape = random_shape(diameter, shape_name, ntype, rng)
    hu, core_hu = random_hu(ntype, rng)
    ext = shape.extent
    for _ in range(_TRIES):
        if attachment == "juxta-vascular":
            c = placer.juxta_vascular(ext, diameter / 2, rng)
        elif attachment == "juxta-pleural":
            c = placer.juxta_pleural(ext, diameter / 2, rng)
        else:
            c = placer.isolated(ext, diameter / 2, rng)
        # Spicules may end against a bronchus or a rib (they are cut there, as real ones are); the body may not.
        if c is not None and placer.clear(c, shape.body_extent, attachment):
            return NoduleSpec(c, diameter, ntype, shape_name, attachment, shape, hu, core_hu)
    return None
