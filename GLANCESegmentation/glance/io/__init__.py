"""Input/output: read any chest CT into a :class:`~glance.volume.Volume`, orient it, write atomically.

``read_volume`` is the one entry point for reading a CT: a DICOM folder, a
single DICOM file (its series is read from the same folder), or an NRRD,
NIfTI or MetaImage file. The result is always int16 HU with LPS geometry.
``read_seg_nrrd`` reads Slicer's segmentation files; ``place_on_grid`` puts an
instance label map onto a CT's grid.
"""

from __future__ import annotations

from pathlib import Path

from glance.errors import InputError
from glance.io.atomic import OutputFolder, atomic_path, atomic_write_bytes, atomic_write_text
from glance.io.dicom_read import SeriesInfo, list_series, read_dicom_file, read_dicom_series, select_series
from glance.io.geometry import CanonicalGrid, axial_axis, canonical_grid, to_canonical
from glance.io.image_read import image_format, read_image_file, read_label_map
from glance.io.image_write import to_sitk, write_image
from glance.io.seg_nrrd import Segment, SegNrrd, place_on_grid, read_seg_nrrd
from glance.io.validate import default_max_voxels
from glance.volume import Volume

__all__ = [
    "CanonicalGrid", "OutputFolder", "SegNrrd", "Segment", "SeriesInfo", "atomic_path", "atomic_write_bytes",
    "atomic_write_text", "axial_axis", "canonical_grid", "default_max_voxels", "list_series", "place_on_grid",
    "read_label_map", "read_seg_nrrd", "read_volume", "select_series", "to_canonical", "to_sitk", "write_image",
]


def read_volume(path: str | Path, series_uid: str | None = None, max_voxels: int | None = None) -> Volume:
    """Read a CT from a DICOM folder, a DICOM file, or an NRRD/NIfTI/MHD/MHA file.

    ``series_uid`` picks a series in a DICOM folder (default: the CT series
    with the most slices). ``max_voxels`` bounds the volume size, checked from
    the headers before pixel data is read (default: 1/8 of available RAM at
    2 bytes per voxel). Raises :class:`InputError` for anything unusable.
    """
    path = Path(path)
    if path.is_dir():
        return read_dicom_series(path, series_uid, max_voxels)
    if not path.exists():
        raise InputError(f"{path}: no such file or folder")
    if image_format(path) is not None:
        if series_uid is not None:
            raise InputError(f"{path}: --series applies to DICOM input only")
        return read_image_file(path, max_voxels)
    if series_uid is not None:
        return read_dicom_series(path.parent, series_uid, max_voxels, recursive=False)
    return read_dicom_file(path, max_voxels)
