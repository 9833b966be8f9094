"""Checks shared by the DICOM and image-file readers.

Every check raises :class:`InputError` with one line ``"<source>: <problem>"``.
Size checks run on header values, before any pixel data is loaded, so a
malicious or broken header cannot make the reader allocate or decompress.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from glance.errors import InputError

log = logging.getLogger(__name__)

# A volume read into memory may use at most this share of the available RAM.
# The pipeline keeps the int16 volume plus a few same-sized uint8/float16 maps
# and per-batch float32 work, so 1/8 leaves room for the rest of the run.
RAM_SHARE = 8
# Used when the available RAM cannot be read (non-Linux without sysconf).
FALLBACK_MAX_VOXELS = 1024**3

# HU plausibility. Values below PADDING_HU are outside the reconstruction
# circle (scanners store -2000, -2048, -3024 or -32768 there) and are ignored.
PADDING_HU = -1100
MAX_P99_HU = 3100
AIR_HU = -500  # air and lung lie below this
TISSUE_HU = (-200, 300)  # fat, water, soft tissue
MIN_SHARE = 0.001  # share of voxels needed for "contains air" / "contains tissue"
HU_SAMPLE = 2_000_000  # voxels sampled for the plausibility statistics

ORTHO_TOL = 1e-3
INT16 = np.iinfo(np.int16)


def default_max_voxels(bytes_per_voxel: int = 2) -> int:
    """Largest volume (voxels of ``bytes_per_voxel``) allowed: 1/8 of MemAvailable."""
    available = _available_ram_bytes()
    if available is None:
        return FALLBACK_MAX_VOXELS
    return max(1, available // RAM_SHARE // bytes_per_voxel)


def _available_ram_bytes() -> int | None:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def check_voxel_budget(source: str | Path, size: tuple[int, ...], max_voxels: int | None) -> None:
    """Refuse a volume of ``size`` voxels (any axis order) larger than ``max_voxels``."""
    limit = default_max_voxels() if max_voxels is None else int(max_voxels)
    needed = int(np.prod([int(s) for s in size], dtype=object))  # exact, no int64 overflow
    if needed > limit:
        raise InputError(
            f"{source}: volume of {' x '.join(str(int(s)) for s in size)} = {needed} voxels "
            f"exceeds the limit of {limit} voxels (max_voxels; default 1/{RAM_SHARE} of available RAM)"
        )


def check_3d(source: str | Path, size: tuple[int, ...]) -> None:
    """Require a 3D image (size in (i, j, k) order) with at least two slices."""
    if len(size) != 3:
        raise InputError(f"{source}: a {len(size)}D image; a 3D CT volume is needed")
    if min(size) < 1:
        raise InputError(f"{source}: empty image of size {tuple(size)}")
    if size[2] < 2:
        raise InputError(f"{source}: a single slice; a 3D CT volume with at least 2 slices is needed")


def check_spacing(source: str | Path, spacing: tuple[float, ...]) -> None:
    if not all(np.isfinite(s) and s > 0 for s in spacing):
        raise InputError(f"{source}: voxel spacing {tuple(spacing)} must be positive and finite")


def check_direction(source: str | Path, direction: np.ndarray) -> None:
    """Require an orthonormal direction matrix (within 1e-3)."""
    d = np.asarray(direction, dtype=np.float64).reshape(3, 3)
    if not np.all(np.isfinite(d)) or np.abs(d.T @ d - np.eye(3)).max() > ORTHO_TOL:
        raise InputError(f"{source}: direction matrix {d.round(4).tolist()} is not orthonormal")


def check_modality(source: str | Path, modality: str | None) -> None:
    if (modality or "").upper() != "CT":
        raise InputError(f"{source}: modality {modality or 'missing'} is not CT; GLANCE reads CT only")


def to_hu_int16(source: str | Path, array: np.ndarray) -> np.ndarray:
    """The array as int16 HU; float input is rounded, out-of-range values clipped (with a warning)."""
    if array.dtype == np.int16:
        return array
    if array.dtype.kind == "f":
        bad = int(array.size - np.count_nonzero(np.isfinite(array)))
        if bad:
            raise InputError(f"{source}: {bad} voxels are NaN or infinite")
        if np.any(array != np.round(array)):
            log.warning("%s: non-integer values rounded to whole HU", source)
        array = np.round(array)
    elif array.dtype.kind not in "iub":
        raise InputError(f"{source}: unsupported pixel type {array.dtype}")
    lo, hi = array.min(), array.max()
    if lo < INT16.min or hi > INT16.max:
        log.warning("%s: values [%s, %s] clipped to the int16 range", source, lo, hi)
        array = np.clip(array, INT16.min, INT16.max)
    return array.astype(np.int16)


def check_hu_plausible(source: str | Path, array: np.ndarray) -> None:
    """Refuse a volume whose values do not look like CT in Hounsfield units."""
    values = _sample(array)
    inside = values[values >= PADDING_HU]
    if inside.size < 0.01 * values.size:
        raise InputError(f"{source}: almost all values are below {PADDING_HU}; does not look like CT in HU")
    p1, p99 = np.percentile(inside, [1, 99])
    air = np.count_nonzero(inside <= AIR_HU) / inside.size
    tissue = np.count_nonzero((inside >= TISSUE_HU[0]) & (inside <= TISSUE_HU[1])) / inside.size
    if p99 > MAX_P99_HU or air < MIN_SHARE or tissue < MIN_SHARE:
        hint = " (values look unsigned with an offset: missing RescaleIntercept?)" if values.min() >= 0 else ""
        raise InputError(
            f"{source}: does not look like CT in HU (1st-99th percentile [{p1:.0f}, {p99:.0f}], "
            f"{air:.1%} air-like, {tissue:.1%} tissue-like values){hint}"
        )


def _sample(array: np.ndarray) -> np.ndarray:
    """A strided sample of at most about HU_SAMPLE voxels (no full copy)."""
    flat = array.reshape(-1)
    step = max(1, flat.size // HU_SAMPLE)
    return np.asarray(flat[::step])


@dataclass
class SlicePlan:
    """How sorted source slices fill a uniform grid along the slice normal."""

    order: list[int]  # source slice indices, sorted by position along the normal
    grid_k: list[int]  # output k of each slice in ``order``
    n_slices: int  # output slices, including interpolated ones
    spacing: float  # mm between output slices
    missing_k: list[int] = field(default_factory=list)  # output k with no source slice


# Slice positions may differ from the usual spacing by this share (DICOM
# positions are rounded decimal strings) and still count as uniform.
SPACING_TOL = 0.01
MAX_GAP_SLICES = 4  # at most this many consecutive missing slices are interpolated
MAX_MISSING_SHARE = 0.1  # ... and in all at most this share of the series (or MAX_GAP_SLICES)


def plan_slices(
    source: str | Path, positions: np.ndarray, row: np.ndarray, col: np.ndarray
) -> SlicePlan:
    """Sort slices along the normal of (row, col) and check their spacing.

    Refuses a gantry tilt (positions not along the normal), duplicate
    positions and irregular spacing; one or a few missing slices (gaps that
    are whole multiples of the usual spacing) are planned for interpolation.
    """
    positions = np.asarray(positions, dtype=np.float64)
    if len(positions) < 2:
        raise InputError(f"{source}: a single slice; a 3D CT volume with at least 2 slices is needed")
    normal = np.cross(row, col)
    dist = positions @ normal
    order = [int(i) for i in np.argsort(dist, kind="stable")]
    dist = dist[order]
    steps = np.diff(dist)
    if np.any(steps < 1e-3):
        k = int(np.argmax(steps < 1e-3))
        raise InputError(f"{source}: two slices share the position {dist[k]:.3f} mm along the slice normal")
    usual = float(np.median(steps))
    _check_no_tilt(source, positions[order], row, col, usual)
    multiples = np.rint(steps / usual).astype(int)
    if np.any(np.abs(steps - multiples * usual) > SPACING_TOL * usual):
        raise InputError(
            f"{source}: irregular slice spacing (steps from {steps.min():.3f} to {steps.max():.3f} mm); "
            "resample the series to uniform spacing first"
        )
    return _uniform_plan(source, order, dist, multiples)


def _check_no_tilt(source, positions: np.ndarray, row, col, step: float) -> None:
    """Slice origins must move along the normal only (no gantry tilt / shear).

    Over the whole stack the in-plane drift may reach a tenth of the slice
    spacing (DICOM positions are rounded decimal strings); more is a tilt.
    """
    offsets = positions - positions[0]
    in_plane = float(np.abs(np.stack([offsets @ row, offsets @ col], axis=1)).max())
    if in_plane > max(0.1 * abs(step), 1e-2):
        raise InputError(
            f"{source}: slice positions shift in-plane by up to {in_plane:.2f} mm (gantry tilt or sheared "
            "stack); resample to an orthogonal grid first"
        )


def _uniform_plan(source, order: list[int], dist: np.ndarray, multiples: np.ndarray) -> SlicePlan:
    grid_k = [0, *np.cumsum(multiples).tolist()]
    n_slices = grid_k[-1] + 1
    missing = sorted(set(range(n_slices)) - set(grid_k))
    spacing = float(dist[-1] - dist[0]) / (n_slices - 1)
    if missing:
        if multiples.max() - 1 > MAX_GAP_SLICES or len(missing) > max(MAX_GAP_SLICES, MAX_MISSING_SHARE * n_slices):
            raise InputError(
                f"{source}: {len(missing)} slices missing (gaps up to {multiples.max() - 1} slices); "
                "too many to interpolate"
            )
        where = ", ".join(f"{dist[0] + k * spacing:.2f}" for k in missing)
        log.warning(
            "%s: %d missing slice(s) at %s mm along the slice normal; filled by linear interpolation",
            source, len(missing), where,
        )
    return SlicePlan(order, [int(k) for k in grid_k], n_slices, spacing, missing)
