"""Step 2 of "Segment nodules": lung region, windowing and in-plane resampling.

Works on the canonical axial array (``glance.io.geometry``: axis 0 inferior ->
superior, rows anterior -> posterior, columns right -> left). The lung region
is found once on a coarse copy; the network input is then produced per batch
of slices in float32, so no float copy of the whole volume ever exists.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
from scipy import ndimage

log = logging.getLogger(__name__)

AIR_HU = -400  # lung parenchyma and air lie below, soft tissue above
COARSE_MM = 2.0  # in-plane pixel size of the lung-mask copy
MIN_LUNG_ML = 20.0  # air pockets smaller than this are not lung (bowel gas, noise)
MARGIN_MM = 10.0  # kept around the lungs: juxta-pleural nodules sit on their border
# Enclosed air pockets under this share of the largest are stomach or bowel gas, not lung: a lung holds
# litres of air, a gas bubble tens to hundreds of millilitres.
LUNG_SHARE = 0.1
FIND_LUNGS = "find"  # a ``lungs`` argument meaning: rule 8 finds the lungs in the CT itself


@dataclass(frozen=True)
class Crop:
    """Canonical index box [start, stop) per axis."""

    z: tuple[int, int]
    y: tuple[int, int]
    x: tuple[int, int]

    @property
    def slices(self) -> tuple[slice, slice, slice]:
        return slice(*self.z), slice(*self.y), slice(*self.x)

    @property
    def shape(self) -> tuple[int, int, int]:
        return self.z[1] - self.z[0], self.y[1] - self.y[0], self.x[1] - self.x[0]


def full_crop(shape: tuple[int, ...]) -> Crop:
    return Crop((0, shape[0]), (0, shape[1]), (0, shape[2]))


def lung_mask(hu: np.ndarray, spacing: tuple[float, float, float], coarse_mm: float | None = COARSE_MM,
              min_ml: float = MIN_LUNG_ML, fill_holes: bool = False) -> tuple[np.ndarray, int]:
    """Lung mask (air enclosed by the body) on an axial-first array, and its in-plane step.

    ``coarse_mm`` subsamples in-plane to about that pixel size (None: full resolution);
    ``fill_holes`` closes each slice's mask over vessels and nodules inside the lungs.
    """
    step = max(1, int(coarse_mm / min(spacing[1], spacing[2]))) if coarse_mm else 1
    coarse = hu[:, ::step, ::step] < AIR_HU
    # Air connected to the image border within a slice is outside the body (including FOV padding).
    per_slice = np.zeros((3, 3, 3), bool)
    per_slice[1] = ndimage.generate_binary_structure(2, 1)
    labels, _ = ndimage.label(coarse, structure=per_slice)
    border = np.unique(np.concatenate([labels[:, 0].ravel(), labels[:, -1].ravel(),
                                       labels[:, :, 0].ravel(), labels[:, :, -1].ravel()]))
    inside = coarse & ~np.isin(labels, border)
    labels, n = ndimage.label(inside)
    if n == 0:
        return inside, step
    voxel_ml = spacing[0] * spacing[1] * spacing[2] * step * step / 1000.0
    sizes = ndimage.sum_labels(inside, labels, index=np.arange(1, n + 1)) * voxel_ml
    mask = np.isin(labels, np.flatnonzero(sizes >= min_ml) + 1)
    if fill_holes:
        for k in range(mask.shape[0]):
            mask[k] = ndimage.binary_fill_holes(mask[k])
    return mask, step


@dataclass(frozen=True)
class LungMap:
    """The lung mask of ``lung_mask`` (coarse in-plane grid), for asking whether a finding lies
    against the lungs."""

    mask: np.ndarray  # bool (slices, rows / step, columns / step)
    step: int  # in-plane subsampling of ``mask``

    def touches(self, origin: np.ndarray, region: np.ndarray) -> bool:
        """Whether a boolean ``region`` placed at canonical index ``origin`` lies within one mask cell
        (about 2 mm in-plane) and one slice of the lungs."""
        kk, jj, ii = np.nonzero(region)
        if len(kk) == 0:
            return False
        cells = np.stack([kk + origin[0], (jj + origin[1]) // self.step, (ii + origin[2]) // self.step])
        lo = np.maximum(cells.min(axis=1) - 1, 0)
        hi = np.minimum(cells.max(axis=1) + 2, self.mask.shape)
        local = np.zeros(hi - lo, dtype=bool)
        local[tuple(cells - lo[:, None])] = True
        near = ndimage.binary_dilation(local, structure=np.ones((3, 3, 3), dtype=bool))
        return bool((near & self.mask[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]]).any())


def lung_map(hu: np.ndarray, spacing: tuple[float, float, float]) -> LungMap | None:
    """The lungs of an axial-first CT, or None when it holds none (a crop, a phantom without
    lungs, a non-chest scan): then no finding can be checked against them."""
    mask, step = lung_mask(hu, spacing)
    if not mask.any():
        log.info("no lung region found: findings are not checked for lung contact")
        return None
    labels, n = ndimage.label(mask)
    if n > 1:
        sizes = ndimage.sum_labels(mask, labels, index=np.arange(1, n + 1))
        mask = np.isin(labels, np.flatnonzero(sizes >= LUNG_SHARE * sizes.max()) + 1)
    return LungMap(mask, step)


def lung_crop(hu: np.ndarray, spacing: tuple[float, float, float]) -> Crop:
    """Bounding box of the lungs plus a margin; the whole volume when no lung is found."""
    mask, step = lung_mask(hu, spacing)
    if not mask.any():
        log.warning("no lung region found (no air enclosed by the body); processing the whole volume")
        return full_crop(hu.shape)
    zs, ys, xs = (np.flatnonzero(mask.any(axis=a)) for a in ((1, 2), (0, 2), (0, 1)))
    shape = hu.shape

    def box(idx: np.ndarray, axis: int, scale: int) -> tuple[int, int]:
        margin = int(np.ceil(MARGIN_MM / spacing[axis]))
        lo, hi = int(idx[0]) * scale - margin, (int(idx[-1]) + 1) * scale + margin
        return max(0, lo), min(shape[axis], hi)  # plain ints: callers write the box as JSON (glance bench)

    return Crop(box(zs, 0, 1), box(ys, 1, step), box(xs, 2, step))


def window(hu: np.ndarray, low: float, high: float) -> np.ndarray:
    """Clamp HU to [low, high] and rescale to [0, 1], float32."""
    out = hu.astype(np.float32)
    np.clip(out, low, high, out=out)
    out -= low
    out *= 1.0 / (high - low)
    return out


def slice_stack(hu: np.ndarray, z: np.ndarray, context: int, crop: Crop) -> np.ndarray:
    """(B, 2k+1, h, w) int16 stacks of neighbouring slices, clamped at the volume's ends."""
    offsets = np.arange(-context, context + 1)
    idx = np.clip(z[:, None] + offsets[None, :], 0, hu.shape[0] - 1)
    return hu[idx, crop.slices[1], crop.slices[2]]


def working_size(shape_yx: tuple[int, int], spacing_yx: tuple[float, float], target_mm: float) -> tuple[int, int]:
    """In-plane size after resampling to the model's pixel spacing."""
    return tuple(max(1, int(round(n * s / target_mm))) for n, s in zip(shape_yx, spacing_yx))
