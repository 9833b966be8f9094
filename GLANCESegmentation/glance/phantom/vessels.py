"""Pulmonary vessel and airway trees, and how tubes are drawn onto the grid.

A tree grows from the hilum by splitting the lung's "territory" (random points
inside the lung) in two along its longest axis, again and again; each branch
heads part of the way toward the centre of its half. The radius follows
Murray's law (r^3 proportional to the territory a branch feeds), so vessels
taper from about 7 mm at the hilum to under a millimetre at the periphery,
where their cross-sections look most like small nodules. Bronchi run beside
the first generations of the arteries.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np

from glance.phantom.anatomy import Anatomy, Tissue
from glance.phantom.grid import Grid

log = logging.getLogger(__name__)


@dataclass
class Tubes:
    """Capsule segments p0 -> p1 (mm, LPS) with radius r0 at p0 and r1 at p1."""

    p0: np.ndarray  # (n, 3)
    p1: np.ndarray  # (n, 3)
    r0: np.ndarray  # (n,)
    r1: np.ndarray  # (n,)
    generation: np.ndarray  # (n,) int

    @classmethod
    def empty(cls) -> "Tubes":
        z = np.zeros((0, 3))
        return cls(z, z.copy(), np.zeros(0), np.zeros(0), np.zeros(0, int))

    @classmethod
    def concat(cls, parts: list["Tubes"]) -> "Tubes":
        parts = [p for p in parts if len(p)] or [cls.empty()]
        return cls(*(np.concatenate([getattr(p, f) for p in parts]) for f in ("p0", "p1", "r0", "r1", "generation")))

    def __len__(self) -> int:
        return len(self.r0)

    def distance(self, point: np.ndarray) -> np.ndarray:
        """Distance (mm) from ``point`` to each segment's axis, and the radius there."""
        d = self.p1 - self.p0
        u = np.clip(np.einsum("ij,ij->i", point - self.p0, d) / np.maximum(np.einsum("ij,ij->i", d, d), 1e-9), 0, 1)
        closest = self.p0 + u[:, None] * d
        return np.linalg.norm(point - closest, axis=1), self.r0 + u * (self.r1 - self.r0)


def lung_points(anatomy: Anatomy, side: int, n: int, rng: np.random.Generator) -> np.ndarray:
    """``n`` uniform random points (mm) inside the lung on ``side`` (-1 right, +1 left)."""
    lo = np.array([0.0 if side > 0 else -anatomy.a, -anatomy.b_ant, anatomy.z_lo])
    hi = np.array([anatomy.a if side > 0 else 0.0, anatomy.b_post, anatomy.z_lo + anatomy.height])
    found = []
    total = 0
    for _ in range(50):
        cand = rng.uniform(lo, hi, size=(4 * n, 3))
        keep = cand[anatomy.lung_mask(cand[:, 0], cand[:, 1], cand[:, 2])]
        found.append(keep)
        total += len(keep)
        if total >= n:
            break
    pts = np.concatenate(found)[:n]
    return pts


def grow_tree(root: np.ndarray, points: np.ndarray, root_radius: float, rng: np.random.Generator,
              min_radius: float = 0.45, reach: float = 0.55) -> Tubes:
    """A branching tree from ``root`` that fills the territory ``points`` (see module doc)."""
    p0, p1, r0, r1, gen = [], [], [], [], []
    n_total = len(points)
    stack = [(root, np.arange(n_total), root_radius, 0)]
    while stack:
        pos, idx, radius, g = stack.pop()
        pts = points[idx]
        if len(idx) <= 2 or radius < min_radius:
            tip = pts.mean(axis=0)
            p0.append(pos), p1.append(tip), r0.append(radius), r1.append(radius * 0.8), gen.append(g)
            continue
        centred = pts - pts.mean(axis=0)
        axis = np.linalg.eigh(centred.T @ centred)[1][:, -1]
        proj = centred @ axis
        halves = (idx[proj <= np.median(proj)], idx[proj > np.median(proj)])
        for half in halves:
            if len(half) == 0:
                continue
            target = points[half].mean(axis=0)
            step = target - pos
            child = pos + reach * step + rng.normal(0, 0.04 * np.linalg.norm(step) + 1e-6, 3)
            r_child = root_radius * (len(half) / n_total) ** (1 / 3)
            p0.append(pos), p1.append(child), r0.append(r_child), r1.append(r_child * 0.93), gen.append(g + 1)
            stack.append((child, half, r_child * 0.93, g + 1))
    return Tubes(np.array(p0), np.array(p1), np.array(r0), np.array(r1), np.array(gen))


@dataclass
class Airways:
    wall: Tubes  # outer surface of the airway walls
    lumen: Tubes


def build_vessels(anatomy: Anatomy, rng: np.random.Generator, n_points: int = 1500) -> tuple[Tubes, Tubes]:
    """(arteries, veins) of both lungs."""
    arteries, veins = [], []
    hx, hy, ht, _, hry, _ = anatomy.heart
    for side in (-1, 1):
        pts = lung_points(anatomy, side, n_points, rng)
        arteries.append(grow_tree(anatomy.hilum(side), pts, rng.uniform(6.0, 7.5), rng))
        atrium = np.array([side * 0.12 * anatomy.a + hx * 0.3, hy + 0.6 * hry,
                           anatomy.z_lo + (ht + 0.05) * anatomy.height])
        pts_v = lung_points(anatomy, side, n_points, rng)
        veins.append(grow_tree(atrium, pts_v, rng.uniform(5.5, 7.0), rng))
    return Tubes.concat(arteries), Tubes.concat(veins)


def build_airways(anatomy: Anatomy, arteries: Tubes, top_z: float, max_generation: int = 6) -> Airways:
    """Trachea, main bronchi, and bronchi beside the first arterial generations."""
    tx, ty = anatomy.trachea_xy
    carina = np.array([tx, ty, anatomy.z_lo + anatomy.carina_t * anatomy.height])
    lumen_p0 = [np.array([tx, ty, top_z + 10.0])]
    lumen_p1 = [carina]
    lumen_r = [8.5]
    for side in (-1, 1):
        lumen_p0.append(carina)
        lumen_p1.append(anatomy.hilum(side) + np.array([0, -6.0, 0]))
        lumen_r.append(5.5)
    sel = (arteries.generation <= max_generation) & (arteries.generation >= 1) & (arteries.r1 > 1.2)
    d = arteries.p1[sel] - arteries.p0[sel]
    ref = np.where(np.abs(d[:, 2:3]) > 0.9 * np.linalg.norm(d, axis=1, keepdims=True), [[1.0, 0, 0]], [[0, 0, 1.0]])
    off = np.cross(d, ref)
    off /= np.maximum(np.linalg.norm(off, axis=1, keepdims=True), 1e-9)
    off *= np.sign(off[:, 1:2] + 1e-9) * -1  # bronchi sit in front of their arteries
    lum = 0.75 * arteries.r0[sel]
    gap = (arteries.r0[sel] + lum * 1.3 + 0.5)[:, None]
    p0 = np.concatenate([np.array(lumen_p0), arteries.p0[sel] + off * gap])
    p1 = np.concatenate([np.array(lumen_p1), arteries.p1[sel] + off * gap])
    r = np.concatenate([np.array(lumen_r), lum])
    gen = np.concatenate([np.zeros(len(lumen_r), int), arteries.generation[sel]])
    lumen = Tubes(p0, p1, r, r * 0.95, gen)
    wall_r = r + 0.18 * r + 0.5
    wall = Tubes(p0, p1, wall_r, wall_r * 0.95, gen)
    return Airways(wall, lumen)


def draw_tubes(hu: np.ndarray, tissue: np.ndarray, grid: Grid, tubes: Tubes, value: float,
               allowed: tuple[Tissue, ...], mark: Tissue, blend: str = "replace") -> None:
    """Paint ``tubes`` with partial volume into ``hu`` where the tissue is one of ``allowed``.

    Occupancy per voxel is a linear ramp of the distance to the tube surface over
    the voxel's width in that direction, so thin vessels fade as on a real scan.
    ``blend="replace"`` moves HU toward ``value`` by the occupancy.
    """
    ok = np.zeros(256, dtype=bool)
    ok[list(allowed)] = True
    sp = np.asarray(grid.spacing)
    s0, s1, s2 = grid.spacing
    for n in range(len(tubes)):
        pa, pb = tubes.p0[n], tubes.p1[n]
        rmax = max(tubes.r0[n], tubes.r1[n])
        box = grid.box_around(np.minimum(pa, pb) - rmax - 1.5 * sp, np.maximum(pa, pb) + rmax + 1.5 * sp)
        if box is None:
            continue
        (k0, k1), (j0, j1), (i0, i1) = box
        z, y, x = grid.axes_mm(box)
        # Python floats keep the arithmetic in float32 (numpy scalars would promote it).
        a, d = pa.tolist(), (pb - pa).tolist()
        dd = max(d[0] ** 2 + d[1] ** 2 + d[2] ** 2, 1e-9)
        u = ((x - a[0]) * d[0] + (y - a[1]) * d[1] + (z - a[2]) * d[2]) / dd
        np.clip(u, 0, 1, out=u)
        vx, vy, vz = x - a[0] - u * d[0], y - a[1] - u * d[1], z - a[2] - u * d[2]
        dist = np.sqrt(vx * vx + vy * vy + vz * vz)
        width = np.sqrt((vx * s0) ** 2 + (vy * s1) ** 2 + (vz * s2) ** 2) / np.maximum(dist, 1e-6)
        width = np.where(dist < 1e-6, min(grid.spacing), width)
        radius = float(tubes.r0[n]) + u * float(tubes.r1[n] - tubes.r0[n])
        occ = np.clip(0.5 + (radius - dist) / width, 0, 1).astype(np.float32)
        t_box = tissue[k0:k1, j0:j1, i0:i1]
        occ *= ok[t_box]
        if not occ.any():
            continue
        h_box = hu[k0:k1, j0:j1, i0:i1]
        if blend == "max":
            np.maximum(h_box, h_box + occ * (value - h_box), out=h_box)
        else:
            h_box += occ * (value - h_box)
        t_box[occ >= 0.5] = mark
