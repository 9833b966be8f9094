"""Step 5 of "Segment nodules": measure each labelled nodule.

Input: the uint16 instance map from ``glance.postprocess`` and the CT as a
``Volume`` in canonical order (array axis 0 = axial slices) whose geometry is
consistent with that order, so ``ct.ijk_to_lps`` maps the map's indices to LPS.
All indices in the result (centre_ijk, axial_slice, bbox) are on that grid.

Conventions:

- Lengths are between pixel *centres*: a 1-pixel-wide line of n pixels with
  spacing s has a long axis of (n - 1) * s and a short axis of 0. Outer-edge
  calipers would read about one pixel longer.
- Long axis: the maximal in-plane Feret diameter (exact, over the convex hull of
  the pixel centres, in mm) on the axial slice where the nodule's area is largest
  (ties: longer long axis, then lower slice).
- Short axis (RECIST 1.1 / Fleischner 2017: the longest diameter perpendicular to
  the long axis, on the same slice): the longest chord perpendicular to the long
  axis, taken over lines through each pixel centre; a pixel belongs to a line when
  its centre is within half the smaller pixel spacing of it (exact for axis-aligned
  axes, within a pixel otherwise).
- Type, from the HU inside the mask (see ``TypeConfig``).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import numpy as np
from scipy import ndimage
from scipy.spatial import ConvexHull, QhullError
from scipy.spatial.distance import pdist, squareform

from glance.nodule import Nodule
from glance.postprocess import Detections
from glance.volume import Volume

log = logging.getLogger(__name__)

_CHORD_BATCH = 256  # perpendicular lines evaluated per vectorised batch (bounds memory)


@dataclass
class TypeConfig:
    """Nodule type from the HU histogram inside the mask.

    Convention (Fleischner glossary; e.g. Kamiya et al. and the -300 HU solid
    cut-off common in volumetric part-solid studies): ground-glass attenuation is
    about -750..-300 HU, a solid component is above about -300 HU. Voxels below
    ``aerated_hu`` are aerated lung caught by partial volume at the margin and are
    left out, so a generous mask does not dilute the solid fraction.
    """

    solid_hu: float = -300.0
    aerated_hu: float = -750.0
    solid_min_fraction: float = 0.8  # >= this fraction of tissue voxels solid: solid
    ground_glass_max_fraction: float = 0.1  # < this fraction solid: pure ground-glass


@dataclass
class Calipers:
    """In-plane long and short axes of one slice; end points as (j, i) indices."""

    long_mm: float
    long_ends: np.ndarray  # (2, 2) float (j, i)
    short_mm: float
    short_ends: np.ndarray  # (2, 2) float (j, i)


def solid_fraction(values: np.ndarray, cfg: TypeConfig | None = None) -> float:
    """Fraction of non-aerated voxels above ``solid_hu`` (0.0 when all are aerated)."""
    cfg = cfg or TypeConfig()
    values = np.asarray(values)
    tissue = values[values >= cfg.aerated_hu]
    if tissue.size == 0:
        return 0.0
    return float(np.count_nonzero(tissue > cfg.solid_hu)) / tissue.size


def type_from_hu(values: np.ndarray, cfg: TypeConfig | None = None) -> str:
    """"solid", "part-solid" or "ground-glass" from the HU values of one nodule."""
    cfg = cfg or TypeConfig()
    if np.asarray(values).size == 0:
        raise ValueError("type_from_hu: no voxels")
    f = solid_fraction(values, cfg)
    if f >= cfg.solid_min_fraction:
        return "solid"
    if f < cfg.ground_glass_max_fraction:
        return "ground-glass"
    return "part-solid"


def in_plane_calipers(mask2d: np.ndarray, spacing_ji: tuple[float, float]) -> Calipers:
    """Long axis (max Feret) and perpendicular short axis of a 2D mask, in mm."""
    pts = np.argwhere(mask2d)
    if len(pts) == 0:
        raise ValueError("in_plane_calipers: empty mask")
    sp = np.asarray(spacing_ji, dtype=np.float64)
    mm = pts * sp
    p, q = _feret_ends(mm)
    long_mm = float(np.linalg.norm(q - p))
    if long_mm == 0.0:
        ends = np.stack([p, p]) / sp
        return Calipers(0.0, ends, 0.0, ends.copy())
    u = (q - p) / long_mm
    n = np.array([-u[1], u[0]])
    short_mm, s_ends = _perpendicular_chord(mm, u, n, 0.5 * (u @ (p + q)), 0.5 * sp.min())
    return Calipers(long_mm, np.stack([p, q]) / sp, short_mm, s_ends / sp)


def measure_nodules(
    labels: np.ndarray,
    ct: Volume,
    detections: Detections | None = None,
    cfg: TypeConfig | None = None,
) -> list[Nodule]:
    """One Nodule per label of ``labels`` (same grid as ``ct.array``), in label order.

    Confidence comes from ``detections`` (NaN for a label it does not list).
    """
    cfg = cfg or TypeConfig()
    if labels.shape != ct.shape:
        raise ValueError(f"label map {labels.shape} does not match the CT grid {ct.shape}")
    spacing_kji = tuple(reversed(ct.spacing))
    scores = {c.label: c for c in detections.candidates} if detections is not None else {}
    nodules = []
    for index, box in enumerate(ndimage.find_objects(labels)):
        if box is not None:
            cand = scores.get(index + 1)
            nodules.append(_measure_one(index + 1, box, labels, ct, spacing_kji, cand, cfg))
    return nodules


# --------------------------------------------------------------------------- internals


def _measure_one(label, box, labels, ct: Volume, spacing_kji, cand, cfg: TypeConfig) -> Nodule:
    mask = labels[box] == label
    origin = np.array([s.start for s in box])
    hu = ct.array[box][mask].astype(np.float64)  # the nodule's voxels only
    centre_kji = np.argwhere(mask).mean(axis=0) + origin
    centre_ijk = centre_kji[::-1]
    voxel_mm3 = float(np.prod(spacing_kji))
    volume_mm3 = float(mask.sum()) * voxel_mm3

    k_local, cal = _measurement_slice(mask, spacing_kji[1:])
    k = int(origin[0] + k_local)
    to_lps = _slice_to_lps(ct, k, origin[1:])
    extra = {
        "equivalent_diameter_mm": (6.0 * volume_mm3 / math.pi) ** (1.0 / 3.0),
        "solid_fraction": solid_fraction(hu, cfg),
        "max_area_mm2": float(mask[k_local].sum()) * spacing_kji[1] * spacing_kji[2],
        "axis_convention": "pixel centres",
    }
    if cand is not None:
        extra["detection_score"] = cand.detection_score
        extra["mean_probability"] = cand.mean_probability
    return Nodule(
        label=label,
        centre_lps=tuple(float(v) for v in ct.ijk_to_lps(centre_ijk)),
        centre_ijk=tuple(float(v) for v in centre_ijk),
        long_axis_mm=cal.long_mm,
        short_axis_mm=cal.short_mm,
        volume_mm3=volume_mm3,
        mean_hu=float(hu.mean()),
        median_hu=float(np.median(hu)),
        nodule_type=type_from_hu(hu, cfg),
        confidence=float(cand.confidence) if cand is not None else float("nan"),
        axial_slice=k,
        long_axis_lps=to_lps(cal.long_ends),
        short_axis_lps=to_lps(cal.short_ends),
        bbox=tuple(int(v) for v in (*origin, *(origin + np.array(mask.shape)))),
        extra=extra,
    )


def _measurement_slice(mask: np.ndarray, spacing_ji) -> tuple[int, Calipers]:
    """The slice of largest area (ties: longer long axis, then lower index) and its calipers."""
    area = mask.sum(axis=(1, 2))
    best = None
    for k in np.flatnonzero(area == area.max()):
        cal = in_plane_calipers(mask[k], spacing_ji)
        if best is None or cal.long_mm > best[1].long_mm:
            best = (int(k), cal)
    return best


def _slice_to_lps(ct: Volume, k: int, origin_ji):
    def convert(ends_ji: np.ndarray):
        ijk = np.column_stack([ends_ji[:, 1] + origin_ji[1], ends_ji[:, 0] + origin_ji[0], [k, k]])
        lps = ct.ijk_to_lps(ijk)
        return tuple(tuple(float(v) for v in row) for row in lps)

    return convert


def _feret_ends(mm: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The two points (mm) farthest apart; only convex hull vertices can be."""
    candidates = mm
    if len(mm) >= 3:
        try:
            candidates = mm[ConvexHull(mm).vertices]
        except QhullError:  # collinear points: brute force over all of them
            candidates = mm
    if len(candidates) == 1:
        return candidates[0], candidates[0]
    d = squareform(pdist(candidates))
    a, b = np.unravel_index(np.argmax(d), d.shape)
    return candidates[a], candidates[b]


def _perpendicular_chord(mm, u, n, mid, tol) -> tuple[float, np.ndarray]:
    """Longest chord along ``n`` over lines through each pixel centre (ties: nearest
    the long axis midpoint ``mid``); returns its length and end points in mm."""
    a = mm @ u
    b = mm @ n
    lines = np.unique(np.round(a, 9))
    lo = np.empty(len(lines))
    hi = np.empty(len(lines))
    for start in range(0, len(lines), _CHORD_BATCH):
        t = lines[start : start + _CHORD_BATCH, None]
        member = np.abs(a[None, :] - t) <= tol + 1e-9
        lo[start : start + len(t)] = np.where(member, b[None, :], np.inf).min(axis=1)
        hi[start : start + len(t)] = np.where(member, b[None, :], -np.inf).max(axis=1)
    width = hi - lo
    top = np.flatnonzero(width >= width.max() - 1e-9)
    best = top[np.argmin(np.abs(lines[top] - mid))]
    t = lines[best]
    ends = np.stack([t * u + lo[best] * n, t * u + hi[best] * n])
    return float(width[best]), ends
