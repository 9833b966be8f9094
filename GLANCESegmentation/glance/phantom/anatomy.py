"""Chest anatomy of the phantom as analytic shapes in LPS millimetres.

Every structure is a function of (x, y, z) in mm (x: patient left, y:
posterior, z: superior), so the same patient comes out on any grid, and
points off the grid (vessel tree, nodule placement) can ask "is this lung?".
In-plane the body is an ellipse; tissue layers (skin/fat, muscle, ribs) are
bands of radial depth below its outline; the thoracic cavity inside holds the
lungs, the mediastinum with the heart and great vessels, and the spine.
Along z a normalised height ``t`` runs from 0 (just below the lung bases) to
1 (lung apices); the diaphragm domes and the apices are functions of ``t``.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import IntEnum

import numpy as np


class Tissue(IntEnum):
    """Tissue classes of the phantom's tissue map (uint8)."""

    AIR = 0
    FAT = 1
    MUSCLE = 2
    LUNG = 3
    MEDIASTINUM = 4  # mediastinal fat
    HEART = 5
    GREAT_VESSEL = 6
    BONE_CORTEX = 7
    BONE_MARROW = 8
    CARTILAGE = 9
    ABDOMEN = 10
    AIRWAY = 11
    VESSEL = 12
    NODULE = 13
    TABLE = 14
    SKIN = 15
    AIRWAY_WALL = 16


# Mean HU per tissue; each phantom jitters them a little (see Anatomy.hu).
BASE_HU: dict[Tissue, float] = {
    Tissue.AIR: -1000.0, Tissue.FAT: -100.0, Tissue.MUSCLE: 45.0, Tissue.LUNG: -905.0,
    Tissue.MEDIASTINUM: -90.0, Tissue.HEART: 40.0, Tissue.GREAT_VESSEL: 42.0,
    Tissue.BONE_CORTEX: 950.0, Tissue.BONE_MARROW: 300.0, Tissue.CARTILAGE: 110.0,
    Tissue.ABDOMEN: 55.0, Tissue.AIRWAY: -990.0, Tissue.VESSEL: 40.0, Tissue.NODULE: 30.0,
    Tissue.TABLE: 250.0, Tissue.SKIN: 30.0, Tissue.AIRWAY_WALL: 0.0,
}


@dataclass
class Anatomy:
    """Random but plausible body dimensions (mm) for one phantom; evaluate with :meth:`tissue`."""

    z_lo: float  # z (mm) where t = 0
    height: float  # mm from t = 0 to t = 1
    a: float  # body half width (x)
    b_ant: float  # body half depth, anterior
    b_post: float  # body half depth, posterior
    fat: tuple[float, float, float]  # subcutaneous fat: mean, cos(2 theta) amplitude, phase
    muscle: float  # chest-wall muscle thickness
    rib_pitch: float
    rib_height: float
    rib_slope: float  # mm the rib drops from the spine to its front end
    rib_phase: float
    heart: tuple[float, float, float, float, float, float]  # cx, cy, t_centre, rx, ry, half-height (mm)
    dome_right: float  # diaphragm dome height (t) under the right lung
    dome_left: float
    hu: dict[Tissue, float]

    @classmethod
    def random(cls, rng: np.random.Generator, fov_half: float, z_lo: float, z_hi: float) -> "Anatomy":
        # The body must fit in the reconstruction circle with some air around it.
        a = min(rng.uniform(150.0, 172.0), 0.88 * fov_half)
        b = a * rng.uniform(0.62, 0.70)
        # The chest keeps its real height: a short grid shows a slab of it, centred.
        height = rng.uniform(270.0, 310.0)
        hu = {t: v + (rng.normal(0, 6) if t not in (Tissue.AIR, Tissue.AIRWAY) else 0.0) for t, v in BASE_HU.items()}
        hu[Tissue.LUNG] = BASE_HU[Tissue.LUNG] + rng.uniform(-25, 25)
        s = a / 160.0  # inner structures scale with the body
        return cls(
            z_lo=(z_lo + z_hi) / 2 - height / 2,
            height=height,
            a=a,
            b_ant=b * rng.uniform(0.95, 1.02),
            b_post=b * rng.uniform(0.98, 1.05),
            fat=(rng.uniform(8, 18) * s, rng.uniform(2, 6) * s, rng.uniform(-0.4, 0.4)),
            muscle=rng.uniform(8, 13) * s,
            rib_pitch=rng.uniform(26, 32),
            rib_height=rng.uniform(9, 12),
            rib_slope=rng.uniform(60, 90),
            rib_phase=rng.uniform(0, 30),
            heart=(rng.uniform(12, 24) * s, -rng.uniform(5, 15) * s, rng.uniform(0.28, 0.36),
                   rng.uniform(50, 60) * s, rng.uniform(40, 48) * s, rng.uniform(0.18, 0.22) * height),
            dome_right=rng.uniform(0.20, 0.26),
            dome_left=rng.uniform(0.14, 0.20),
            hu=hu,
        )

    # --- in-plane frame ---------------------------------------------------------

    def t_of(self, z):
        return (np.asarray(z, dtype=np.float32) - np.float32(self.z_lo)) / np.float32(self.height)

    def _depth(self, x, y):
        """Radial depth (mm) below the body outline and the polar angle (0 = patient left, pi/2 = back)."""
        theta = np.arctan2(y, x)
        b = np.where(y < 0, np.float32(self.b_ant), np.float32(self.b_post))
        c, s = np.cos(theta), np.sin(theta)
        outline = 1.0 / np.sqrt((c / self.a) ** 2 + (s / b) ** 2)
        return (outline - np.hypot(x, y)).astype(np.float32), theta.astype(np.float32)

    def _fat(self, theta):
        m, amp, ph = self.fat
        return m + amp * np.cos(2 * (theta - ph))

    def _muscle(self, theta, t):
        # Paraspinal muscles behind the ribs, pectorals in front of the upper chest.
        back = 34.0 * np.exp(-(((theta - np.pi / 2) / 0.32) ** 2))
        pect = 12.0 * np.clip((t - 0.45) / 0.3, 0, 1) * (
            np.exp(-(((theta + np.pi / 2 - 0.75) / 0.35) ** 2)) + np.exp(-(((theta + np.pi / 2 + 0.75) / 0.35) ** 2)))
        return self.muscle + back + pect

    # --- key landmarks (mm) -------------------------------------------------------

    @property
    def spine_y(self) -> float:
        """y of the vertebral body centre (it bulges into the back of the cavity)."""
        return self.b_post - self.fat[0] - self.muscle - 34.0 - 20.0

    @property
    def trachea_xy(self) -> tuple[float, float]:
        return (0.0, self.spine_y - 42.0)

    @property
    def carina_t(self) -> float:
        return 0.64

    def hilum(self, side: int) -> np.ndarray:
        """LPS point where the main bronchus and pulmonary artery of a lung (side -1 right, +1 left) enter."""
        tx, ty = self.trachea_xy
        return np.array([side * 0.24 * self.a, ty + 5.0, self.z_lo + 0.55 * self.height])

    # --- the tissue map -------------------------------------------------------------

    def tissue(self, x, y, z) -> tuple[np.ndarray, np.ndarray]:
        """Tissue class (uint8) and a bone "shell" weight in [0, 1] at broadcast points (x, y, z).

        In-plane quantities are computed on the broadcast of (x, y) only, so a
        slab of slices costs one 2D evaluation plus the z-dependent parts.
        """
        x, y, z = (np.asarray(v, dtype=np.float32) for v in (x, y, z))
        shape = np.broadcast_shapes(x.shape, y.shape, z.shape)
        t = self.t_of(z)
        depth, theta = self._depth(x, y)
        out = np.full(shape, Tissue.AIR, dtype=np.uint8)
        fat_t = self._fat(theta)
        wall = fat_t + self._muscle(theta, t)
        body = depth >= 0
        np.copyto(out, np.uint8(Tissue.FAT), where=body)
        np.copyto(out, np.uint8(Tissue.SKIN), where=body & (depth < 1.8))
        np.copyto(out, np.uint8(Tissue.MUSCLE), where=(depth >= fat_t) & (depth < wall))
        cavity = depth >= wall + 11.0
        np.copyto(out, np.uint8(Tissue.MEDIASTINUM), where=cavity)
        self._abdomen(out, x, y, t, cavity)
        lung = self.lung_mask(x, y, z, _pre=(t, depth, theta, wall))
        np.copyto(out, np.uint8(Tissue.LUNG), where=lung)
        self._mediastinum(out, x, y, t, cavity & ~lung)
        self._table(out, x, y)
        shell = np.zeros(shape, dtype=np.float32)
        self._ribs(out, shell, depth, theta, wall, z, t)
        self._sternum(out, shell, x, y, depth, wall, t)
        self._spine(out, shell, x, y, z)
        return out, shell

    def lung_mask(self, x, y, z, _pre=None) -> np.ndarray:
        """True inside either lung at broadcast points (x, y, z) mm."""
        x, y, z = (np.asarray(v, dtype=np.float32) for v in (x, y, z))
        if _pre is None:
            t = self.t_of(z)
            depth, theta = self._depth(x, y)
            wall = self._fat(theta) + self._muscle(theta, t)
        else:
            t, depth, theta, wall = _pre
        inside = depth >= wall + 11.0
        inside = inside & ~self._mediastinum_region(x, y, t)
        inside &= t > self._diaphragm(x, y)
        # Apices: each lung narrows to a dome above t = 0.45.
        side = np.sign(x)
        scale = np.sqrt(np.clip(1.0 - ((t - 0.45) / 0.55) ** 2, 0.0, 1.0))
        scale = np.where(t < 0.45, np.float32(1.0), scale)
        cx, cy = 0.45 * self.a, 0.1 * self.b_post
        ex = (x - side * cx) / (0.5 * self.a * scale + 1e-3)
        ey = (y - cy) / (1.0 * self.b_post * scale + 1e-3)
        inside &= ex * ex + ey * ey < 1.0
        return inside

    def _diaphragm(self, x, y):
        """Height t of the diaphragm under (x, y): a dome per side, lower at the back and sides."""
        dome = np.where(x < 0, np.float32(self.dome_right), np.float32(self.dome_left))
        cx = np.where(x < 0, -0.4 * self.a, 0.4 * self.a)
        r2 = ((x - cx) / (0.6 * self.a)) ** 2 + ((y + 0.1 * self.b_post) / (0.9 * self.b_post)) ** 2
        return dome - 0.16 * r2 - 0.06 * np.clip(y / self.b_post, 0, 1)

    def _mediastinum_region(self, x, y, t) -> np.ndarray:
        """Central soft-tissue column, heart, and the paravertebral block, where there is no lung."""
        hx, hy, ht, hrx, hry, hh = self.heart
        # A rounded column, narrow where the lungs meet in front (anterior junction).
        width = 30.0 + 10.0 * np.clip((0.62 - t) / 0.2, 0, 1)  # wider where the great vessels are
        y_front = -self.b_ant + 8.0
        yc = (y_front + self.spine_y) / 2
        hy = (self.spine_y - y_front) / 2
        column = np.abs((x - 4.0) / width) ** 2.5 + np.abs((y - yc) / hy) ** 2.5 < 1.0
        zt = (t - ht) * self.height / hh
        heart = self._heart_ellipse(x, y) + zt * zt < 1.0
        # The lungs wrap round the vertebral body into the gutters beside it.
        spine = (((x / 27.0) ** 2 + ((y - self.spine_y - 4.0) / 25.0) ** 2 < 1.0)
                 | ((np.abs(x) < 18.0) & (y > self.spine_y)))
        return column | heart | spine

    def _heart_ellipse(self, x, y):
        hx, hy, _, hrx, hry, _ = self.heart
        # The heart's long axis points to the left, forwards.
        c, s = np.cos(0.5), np.sin(0.5)
        u, v = (x - hx) * c + (y - hy) * s, -(x - hx) * s + (y - hy) * c
        return (u / hrx) ** 2 + (v / hry) ** 2

    def _abdomen(self, out, x, y, t, cavity) -> None:
        below = cavity & (t <= self._diaphragm(x, y) + 0.01)
        np.copyto(out, np.uint8(Tissue.ABDOMEN), where=below)

    def _mediastinum(self, out, x, y, t, region) -> None:
        hx, hy, ht, hrx, hry, hh = self.heart
        zt = (t - ht) * self.height / hh
        e = self._heart_ellipse(x, y) + zt * zt
        np.copyto(out, np.uint8(Tissue.HEART), where=region & (e < 0.82))
        sy = self.spine_y
        vessels = [  # (x, y, radius, t from, t to)
            (26.0, sy - 14.0, 11.0, -1.0, 0.80),  # descending aorta
            (6.0, hy - 20.0, 14.0, ht + 0.15, 0.80),  # ascending aorta
            (-22.0, hy - 12.0, 9.0, ht + 0.1, 1.2),  # superior vena cava
            (12.0, hy - 30.0, 13.0, ht + 0.12, ht + 0.24),  # pulmonary trunk
            (7.0, sy - 24.0, 6.0, -1.0, 1.2),  # oesophagus (soft tissue)
        ]
        for vx, vy, r, t0, t1 in vessels:
            sel = region & ((x - vx) ** 2 + (y - vy) ** 2 < r * r) & (t > t0) & (t < t1)
            np.copyto(out, np.uint8(Tissue.GREAT_VESSEL), where=sel)
        # Aortic arch: a band joining the ascending and descending aorta.
        arch = region & (t > 0.76) & (t < 0.84)
        p0, p1 = np.array([6.0, hy - 20.0]), np.array([26.0, sy - 14.0])
        d = p1 - p0
        u = np.clip(((x - p0[0]) * d[0] + (y - p0[1]) * d[1]) / (d @ d), 0, 1)
        dist2 = (x - p0[0] - u * d[0]) ** 2 + (y - p0[1] - u * d[1]) ** 2
        np.copyto(out, np.uint8(Tissue.GREAT_VESSEL), where=arch & (dist2 < 144.0))

    def _table(self, out, x, y) -> None:
        # The table is a shallow cradle under the back.
        top = self.b_post + 22.0 - 0.0012 * x * x
        sel = (y > top) & (y < top + 5.0) & (np.abs(x) < 0.95 * self.a)
        np.copyto(out, np.uint8(Tissue.TABLE), where=sel & (out == Tissue.AIR))

    def _ribs(self, out, shell, depth, theta, wall, z, t) -> None:
        # A rib runs around the chest from the spine (angle 0 from the back) to the
        # front, dropping rib_slope mm; on an axial slice it cuts an oval.
        from_back = np.abs(np.mod(theta - np.pi / 2 + np.pi, 2 * np.pi) - np.pi)  # 0 at the spine, pi in front
        phase = np.mod(z + self.rib_slope * from_back / np.pi + self.rib_phase, self.rib_pitch)
        zc = (phase - self.rib_height / 2) / (self.rib_height / 2)
        rc = (depth - (wall + 5.0)) / 4.0
        e = zc * zc + rc * rc
        in_arc = (from_back > 0.25) & (from_back < 2.55) & (t < 1.05) & (t > -0.25)
        rib = in_arc & (e < 1.0)
        cartilage = (from_back >= 2.55) & (from_back < 2.9) & (e < 1.0) & (t > 0.1)
        np.copyto(out, np.uint8(Tissue.CARTILAGE), where=cartilage)
        np.copyto(out, np.uint8(Tissue.BONE_MARROW), where=rib)
        np.copyto(shell, np.clip((e - 0.3) / 0.5, 0, 1), where=rib)

    def _sternum(self, out, shell, x, y, depth, wall, t) -> None:
        y0 = -self.b_ant + self.fat[0] + self.muscle * 0.5 + 8.0
        e = (x / 16.0) ** 2 + ((y - y0) / 7.0) ** 2
        sel = (e < 1.0) & (t > 0.3) & (t < 0.98)
        np.copyto(out, np.uint8(Tissue.BONE_MARROW), where=sel)
        np.copyto(shell, np.clip((e - 0.4) / 0.5, 0, 1), where=sel)

    def _spine(self, out, shell, x, y, z) -> None:
        sy = self.spine_y
        disc = np.mod(z - self.z_lo, 27.0) < 5.0
        e_body = (x / 19.0) ** 2 + ((y - sy) / 17.0) ** 2
        body = e_body < 1.0
        np.copyto(out, np.uint8(Tissue.CARTILAGE), where=body & disc)
        bone = body & ~disc
        # Posterior arch around the canal, and the spinous process.
        r_canal = np.hypot(x, y - (sy + 27.0))
        arch = (r_canal > 8.0) & (r_canal < 14.0) & (y > sy + 17.0)
        spinous = (np.abs(x) < 4.0) & (y > sy + 27.0) & (y < sy + 58.0)
        transverse = (np.abs(y - (sy + 22.0) + 0.15 * np.abs(x)) < 3.5) & (np.abs(x) < 30.0) & (np.abs(x) > 10.0)
        posterior = (arch | spinous | transverse) & (np.mod(z - self.z_lo + 9.0, 27.0) < 17.0)
        np.copyto(out, np.uint8(Tissue.BONE_MARROW), where=bone | posterior)
        np.copyto(shell, np.clip((e_body - 0.6) / 0.3, 0, 1), where=bone)
        np.copyto(shell, np.float32(0.7), where=posterior)
        np.copyto(out, np.uint8(Tissue.MUSCLE), where=(r_canal <= 8.0) & (y > sy + 17.0))  # cord and CSF: soft tissue
