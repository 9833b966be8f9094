"""Slicer's segmentation file (``.seg.nrrd``): its segments, and an instance label map on a CT grid.

Slicer stores a segmentation as an NRRD of label values on one or more *layers*: 3D
when every segment shares one layer, 4D with the layers on the first axis (kind
``list``) when segments overlap. Segment N is described by the header keys
``SegmentN_ID``, ``_Name``, ``_Layer``, ``_LabelValue`` and ``_Extent`` (the box of the
file's voxels, ``i0 i1 j0 j1 k0 k1`` inclusive, that the segment may occupy).

The file is read as Slicer's own reader (vtkMRMLSegmentationStorageNode) reads it:
segments are numbered from 0 for as long as ``SegmentN_ID`` exists; without
``_Layer`` a segment is on layer N (files before Slicer 4.11 held one layer per
segment), without ``_LabelValue`` its value is 1, without ``_Name`` it is named by
its ID, without ``_Extent`` it may occupy the whole file. A file with no segment keys
is a plain label map: one segment per value, per layer.

Geometry is LPS like every Volume: SimpleITK's NRRD reader converts the file's space
(``left-posterior-superior`` in current Slicer, ``right-anterior-superior`` in older
files, or ``left-anterior-superior``) to LPS, so no axis is flipped here; a file
without an anatomical space is refused.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from glance.errors import InputError
from glance.io.image_read import itk_message, read_header
from glance.io.validate import check_direction, check_spacing, check_voxel_budget
from glance.volume import Volume

log = logging.getLogger(__name__)

_SEGMENT_KEY = re.compile(r"Segment(\d+)_")
_LPS = "left-posterior-superior"  # what ITK reports once it has converted RAS or LAS

# Same tolerances as export's grid check: a DICOM reader comparing slice positions (mm) and cosines.
GRID_TOLERANCE_MM = 0.05
DIRECTION_TOLERANCE = 1e-4
SPACING_TOLERANCE_MM = 1e-4


@dataclass(frozen=True)
class Segment:
    """One segment of a segmentation file, from its ``SegmentN_*`` keys (``index`` is N)."""

    index: int
    id: str
    name: str
    layer: int
    label_value: int
    extent: tuple[int, int, int, int, int, int] | None = None  # (i0, i1, j0, j1, k0, k1) inclusive; None: whole


@dataclass
class SegNrrd:
    """A segmentation file read into memory: label values per layer on the file's grid (LPS)."""

    path: Path
    layers: np.ndarray  # (layer, k, j, i)
    spacing: tuple[float, float, float]
    origin: tuple[float, float, float]
    direction: np.ndarray  # columns: LPS unit vectors of i, j, k
    segments: list[Segment]

    def instance_map(self, label_of: Callable[[Segment], int] | None = None) -> Volume:
        """The segments as one uint16 instance map on the file's grid.

        Segment s gets value ``label_of(s)`` (default: its index + 1). Where segments
        overlap (different layers) the later segment wins.
        """
        out = np.zeros(self.layers.shape[1:], dtype=np.uint16)
        for segment in self.segments:
            value = segment.index + 1 if label_of is None else int(label_of(segment))
            box = _extent_box(segment.extent)
            region = out[box]  # a view: writing it writes ``out``
            region[self.layers[segment.layer][box] == segment.label_value] = value
        return Volume(out, self.spacing, self.origin, self.direction.copy(), {"source": str(self.path)})


def read_seg_nrrd(path: str | Path, max_voxels: int | None = None) -> SegNrrd:
    """Read a Slicer ``.seg.nrrd`` (or a plain NRRD label map); anything unusable raises InputError.

    ``max_voxels`` bounds voxels x layers, checked from the header before any data is
    read (default: as :func:`glance.io.read_volume`).
    """
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: no such file")
    reader = _checked_header(path, max_voxels)
    try:
        image = reader.Execute()
    except RuntimeError as err:
        raise InputError(f"{path}: cannot read the segmentation data ({itk_message(err)})") from None
    values = sitk.GetArrayViewFromImage(image)
    if values.dtype.kind not in "iub":
        raise InputError(f"{path}: {values.dtype} voxels; a segmentation holds integer label values")
    # ITK puts the layer axis last, as vector components: (k, j, i[, layer]). One copy, layer first,
    # taken while ``image`` (which owns the viewed buffer) is alive.
    layers = np.array(values[None] if values.ndim == 3 else np.moveaxis(values, -1, 0), order="C")
    meta = {key: reader.GetMetaData(key) for key in reader.GetMetaDataKeys()}
    return SegNrrd(path, layers, tuple(image.GetSpacing()), tuple(image.GetOrigin()),
                   np.array(image.GetDirection(), dtype=np.float64).reshape(3, 3), _segments(path, meta, layers))


def _checked_header(path: Path, max_voxels: int | None) -> sitk.ImageFileReader:
    """Header only: dimensions, size and geometry are checked before pixel data is read."""
    reader = read_header(path, "not a readable NRRD segmentation", image_io="NrrdImageIO")
    size = reader.GetSize()
    if len(size) != 3:
        raise InputError(f"{path}: a {len(size)}D image; a segmentation is 3D, or 4D with the layers first")
    space = reader.GetMetaData("NRRD_space") if reader.HasMetaDataKey("NRRD_space") else None
    if space is None:
        raise InputError(f"{path}: no patient space (the 'space' / 'space directions' keys are missing)")
    if space != _LPS:
        raise InputError(f"{path}: space '{space}' is not a patient space (LPS, RAS or LAS)")
    check_voxel_budget(path, (*size, reader.GetNumberOfComponents()), max_voxels)
    check_spacing(path, reader.GetSpacing())
    check_direction(path, np.array(reader.GetDirection()).reshape(3, 3))
    return reader


def _segments(path: Path, meta: dict[str, str], layers: np.ndarray) -> list[Segment]:
    numbers = {int(m.group(1)) for key in meta if (m := _SEGMENT_KEY.match(key))}
    if not numbers:
        return _plain_segments(layers)
    segments = []
    while f"Segment{len(segments)}_ID" in meta:
        segments.append(_segment(path, meta, len(segments), len(layers)))
    orphans = sorted(numbers - set(range(len(segments))))
    if orphans:
        raise InputError(f"{path}: Segment{orphans[0]}_* keys without Segment{orphans[0]}_ID")
    seen: dict[tuple[int, int], Segment] = {}
    for s in segments:
        other = seen.setdefault((s.layer, s.label_value), s)
        if other is not s:
            raise InputError(f"{path}: segments {other.id!r} and {s.id!r} share layer {s.layer} "
                             f"and label value {s.label_value}")
    return segments


def _segment(path: Path, meta: dict[str, str], n: int, n_layers: int) -> Segment:
    key = f"Segment{n}_"
    segment_id = meta[key + "ID"]
    layer = _int_key(path, meta, key + "Layer", default=n)
    if not 0 <= layer < n_layers:
        missing = "" if key + "Layer" in meta else f" (no {key}Layer key: layer {n} assumed)"
        raise InputError(f"{path}: segment {segment_id!r} is on layer {layer}, the file has {n_layers}{missing}")
    value = _int_key(path, meta, key + "LabelValue", default=1)
    if value < 1:
        raise InputError(f"{path}: {key}LabelValue {value} must be positive")
    extent = None
    if key + "Extent" in meta:
        parts = meta[key + "Extent"].split()
        if len(parts) != 6 or not all(_is_int(p) for p in parts):
            raise InputError(f"{path}: {key}Extent '{meta[key + 'Extent']}' is not six whole numbers")
        extent = tuple(int(p) for p in parts)
    return Segment(n, segment_id, meta.get(key + "Name") or segment_id, layer, value, extent)


def _plain_segments(layers: np.ndarray) -> list[Segment]:
    """A label map without segment keys: one segment per value, as Slicer imports it (``Segment_<value>``)."""
    segments = []
    for layer, values in enumerate(layers):
        for value in np.unique(values):
            if value > 0:
                name = f"Segment_{int(value)}"
                segments.append(Segment(len(segments), name, name, layer, int(value)))
    return segments


def _int_key(path: Path, meta: dict[str, str], key: str, default: int) -> int:
    text = meta.get(key, str(default)).strip()
    if not _is_int(text):
        raise InputError(f"{path}: {key} '{text}' is not a whole number")
    return int(text)


def _is_int(text: str) -> bool:
    return text.lstrip("+-").isdigit()


def _extent_box(extent: tuple[int, ...] | None) -> tuple[slice, slice, slice]:
    """The (k, j, i) slices of an inclusive (i0, i1, j0, j1, k0, k1) extent; an empty one selects nothing."""
    if extent is None:
        return (slice(None),) * 3
    i0, i1, j0, j1, k0, k1 = extent
    return tuple(slice(max(lo, 0), max(hi + 1, 0)) for lo, hi in ((k0, k1), (j0, j1), (i0, i1)))


# --- an instance map on another grid --------------------------------------------------


def place_on_grid(labels: Volume, grid: Volume, resample: bool = False) -> np.ndarray:
    """``labels`` (an instance map with its own geometry) on ``grid``'s voxels, as uint16 (k, j, i).

    A map on the same voxels (same spacing and orientation, origin on a voxel of
    ``grid``: the whole grid, or a box of it as Slicer crops a segmentation to its
    extent) is pasted exactly. Other maps are refused, or with ``resample``
    resampled nearest-neighbour. Labels outside ``grid`` are refused, or with
    ``resample`` dropped (with a warning).
    """
    source = labels.metadata.get("source", "label map")
    out = np.zeros(grid.shape, dtype=np.uint16)
    if not np.any(labels.array):
        return out  # nothing to place: an empty Slicer segmentation is a 1-voxel image anywhere
    offset = _voxel_offset(labels, grid)
    if offset is None:
        if not resample:
            raise InputError(f"{source}: not on the CT's voxels (spacing, orientation or origin differ)")
        return _resample(labels, grid)
    src, dst = [], []
    for start, n, limit in zip(offset, labels.shape, grid.shape):
        lo, hi = max(start, 0), min(start + n, limit)
        src.append(slice(lo - start, max(hi - start, lo - start)))
        dst.append(slice(lo, max(hi, lo)))
    out[tuple(dst)] = labels.array[tuple(src)]
    outside = int(np.count_nonzero(labels.array)) - int(np.count_nonzero(out))
    if outside:
        if not resample:
            raise InputError(f"{source}: {outside} labelled voxels lie outside the CT")
        log.warning("%s: %d labelled voxels outside the CT dropped", source, outside)
    return out


def _voxel_offset(labels: Volume, grid: Volume) -> tuple[int, int, int] | None:
    """(k, j, i) index in ``grid`` of ``labels``' first voxel, when their voxels coincide; else None."""
    if (np.abs(labels.direction - grid.direction).max() > DIRECTION_TOLERANCE
            or not np.allclose(labels.spacing, grid.spacing, atol=SPACING_TOLERANCE_MM)):
        return None
    ijk = grid.lps_to_ijk(np.asarray(labels.origin, dtype=np.float64))
    rounded = np.rint(ijk)
    if np.abs(ijk - rounded).max() * min(grid.spacing) > GRID_TOLERANCE_MM:
        return None
    i, j, k = (int(v) for v in rounded)
    return k, j, i


def _resample(labels: Volume, grid: Volume) -> np.ndarray:
    from glance.io.image_write import to_sitk

    moving = to_sitk(np.asarray(labels.array, dtype=np.uint16), labels)
    # An empty reference image carries the grid without copying the CT.
    reference = sitk.Image([int(s) for s in grid.shape[::-1]], sitk.sitkUInt8)
    reference.SetSpacing(grid.spacing)
    reference.SetOrigin(grid.origin)
    reference.SetDirection(grid.direction.ravel().tolist())
    out = sitk.Resample(moving, reference, sitk.Transform(), sitk.sitkNearestNeighbor, 0, sitk.sitkUInt16)
    return sitk.GetArrayFromImage(out)
