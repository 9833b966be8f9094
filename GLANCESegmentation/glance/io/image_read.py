"""Single-file images (NRRD, NIfTI, MetaImage) into a :class:`Volume`.

SimpleITK reads the header first; size, dimension and geometry are checked
before any pixel data is read or decompressed, so a header claiming a huge
volume (a gzip bomb) is refused without allocating. SimpleITK converts NIfTI's
RAS to LPS itself, so every Volume comes out in LPS.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from glance.errors import InputError
from glance.io.validate import (
    check_3d,
    check_direction,
    check_hu_plausible,
    check_spacing,
    check_voxel_budget,
    to_hu_int16,
)
from glance.volume import Volume

log = logging.getLogger(__name__)

# Longest suffix first so ".nii.gz" wins over ".gz".
IMAGE_SUFFIXES = {
    ".nii.gz": "nifti",
    ".nii": "nifti",
    ".nrrd": "nrrd",
    ".nhdr": "nrrd",
    ".mhd": "metaimage",
    ".mha": "metaimage",
}


def image_format(path: str | Path) -> str | None:
    """The format name for a supported image-file suffix, else None."""
    name = Path(path).name.lower()
    return next((fmt for suffix, fmt in IMAGE_SUFFIXES.items() if name.endswith(suffix)), None)


def read_image_file(path: str | Path, max_voxels: int | None = None) -> Volume:
    """Read a CT image file as int16 HU (float input rounded, NaN/Inf refused)."""
    image, fmt = _read_checked(Path(path), max_voxels)
    if image.GetPixelID() == sitk.sitkInt16:
        array = sitk.GetArrayFromImage(image)
    else:  # converted straight from a view: one output-sized copy only
        array = to_hu_int16(path, sitk.GetArrayViewFromImage(image))
    check_hu_plausible(path, array)
    return _volume(array, image, path, fmt)


def read_label_map(path: str | Path, max_voxels: int | None = None) -> Volume:
    """Read an integer label map (uint8, or uint16 above 255); no HU checks."""
    image, fmt = _read_checked(Path(path), max_voxels)
    values = sitk.GetArrayViewFromImage(image)
    if values.dtype.kind == "f" and not np.all(values == np.round(values)):
        raise InputError(f"{path}: a label map must hold whole numbers")
    low, high = values.min(), values.max()
    if low < 0 or high > np.iinfo(np.uint16).max:
        raise InputError(f"{path}: label values [{low}, {high}] outside 0..65535")
    array = values.astype(np.uint8 if high <= 255 else np.uint16)
    return _volume(array, image, path, fmt)


def _read_checked(path: Path, max_voxels: int | None) -> tuple[sitk.Image, str]:
    fmt = image_format(path)
    if fmt is None:
        raise InputError(f"{path}: unsupported file type (use DICOM, .nrrd, .nhdr, .nii, .nii.gz, .mhd, .mha)")
    if not path.is_file():
        raise InputError(f"{path}: no such file")
    reader = _checked_header(path, max_voxels)
    try:
        return reader.Execute(), fmt
    except RuntimeError as err:
        raise InputError(f"{path}: cannot read the image data ({itk_message(err)})") from err


def read_header(path: Path, problem: str = "cannot read the image header", image_io: str = "") -> sitk.ImageFileReader:
    """A SimpleITK reader of ``path`` that has read the header only; no pixel data is read yet.

    ``image_io`` names the ITK ImageIO to use (default: chosen by ITK from the file). A header
    ITK cannot read raises ``InputError("<path>: <problem> (<ITK's message>)")``.
    """
    reader = sitk.ImageFileReader()
    if image_io:
        reader.SetImageIO(image_io)
    reader.SetFileName(str(path))
    try:
        reader.ReadImageInformation()
    except RuntimeError as err:
        raise InputError(f"{path}: {problem} ({itk_message(err)})") from err
    return reader


def _checked_header(path: Path, max_voxels: int | None) -> sitk.ImageFileReader:
    """Header only; refuses what must not be loaded."""
    reader = read_header(path)
    size = reader.GetSize()
    check_3d(path, size)
    if reader.GetNumberOfComponents() != 1:
        raise InputError(f"{path}: {reader.GetNumberOfComponents()} values per voxel; a scalar image is needed")
    check_voxel_budget(path, size, max_voxels)
    check_spacing(path, reader.GetSpacing())
    check_direction(path, np.array(reader.GetDirection()).reshape(3, 3))
    if image_format(path) == "nifti":
        _check_nifti_length(path)
    return reader


def _check_nifti_length(path: Path) -> None:
    """Refuse a NIfTI file shorter than its header says: ITK would fill the missing voxels with 0.

    Runs after the voxel budget check, so the bytes counted (streamed, for .nii.gz) are bounded.
    """
    import gzip
    import struct
    import zlib

    compressed = path.name.lower().endswith(".gz")
    try:
        with (gzip.open if compressed else open)(path, "rb") as f:
            needed = _nifti_bytes(f.read(540))
            if needed is None:
                return  # ITK read the header, so this cannot happen; leave it to ITK
            have = path.stat().st_size if not compressed else 540
            while compressed and have < needed:
                block = f.read(min(1 << 24, needed - have))
                if not block:
                    break
                have += len(block)
    except (OSError, EOFError, struct.error, zlib.error) as err:
        raise InputError(f"{path}: cannot read the image data ({err})") from err
    if have < needed:
        raise InputError(f"{path}: cannot read the image data (truncated: the header needs {needed} bytes, "
                         f"the file holds {have})")


def _nifti_bytes(header: bytes) -> int | None:
    """Bytes a single-file NIfTI-1/-2 needs according to its header (offset + voxel data)."""
    import struct

    # NIfTI-1: sizeof_hdr 348, dim int16[8] at 40, bitpix at 72, vox_offset float32 at 108;
    # NIfTI-2: sizeof_hdr 540, bitpix at 14, dim int64[8] at 16, vox_offset int64 at 168.
    for order in "<>":
        version = struct.unpack(order + "i", header[:4])[0]
        if version == 348:
            dim, bitpix = struct.unpack(order + "8h", header[40:56]), struct.unpack(order + "h", header[72:74])[0]
            offset = int(struct.unpack(order + "f", header[108:112])[0])
            break
        if version == 540:
            dim, bitpix = struct.unpack(order + "8q", header[16:80]), struct.unpack(order + "h", header[14:16])[0]
            offset = struct.unpack(order + "q", header[168:176])[0]
            break
    else:
        return None
    n_dims = max(1, min(int(dim[0]), 7))
    return max(offset, version + 4) + int(np.prod(dim[1:n_dims + 1], dtype=object)) * bitpix // 8


def itk_message(err: Exception) -> str:
    """The informative line of a multi-line ITK exception."""
    lines = [ln.strip() for ln in str(err).splitlines() if ln.strip()]
    useful = [ln for ln in lines if "ITK ERROR" in ln] or lines[-1:]
    return (useful[0] if useful else type(err).__name__)[:300]


def _volume(array: np.ndarray, image: sitk.Image, path: str | Path, fmt: str) -> Volume:
    direction = np.array(image.GetDirection()).reshape(3, 3)
    metadata = {"source": str(path), "format": fmt, "pixel_type": image.GetPixelIDTypeAsString()}
    return Volume(array, image.GetSpacing(), image.GetOrigin(), direction, metadata)
