"""DICOM CT series: discovery in a folder and reading into a :class:`Volume`.

Discovery reads only the 132-byte preamble of each file and, for DICOM files,
a few header tags (no pixel data), so a large folder of other files answers
quickly. Files without the ``DICM`` preamble are not considered.

Reading sorts slices by their position along the slice normal (never by
InstanceNumber or file name), checks the geometry and the voxel budget from
the headers, and only then decodes pixel data slice by slice into int16 HU.
Duplicate files of the same SOP instance are ignored with a warning; two
different instances at the same position are refused.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue
from pydicom.uid import UID, MediaStorageDirectoryStorage

from glance.errors import InputError
from glance.io.validate import (
    INT16,
    SlicePlan,
    check_direction,
    check_hu_plausible,
    check_modality,
    check_spacing,
    check_voxel_budget,
    plan_slices,
)
from glance.volume import Volume

log = logging.getLogger(__name__)

_HEADER_TAGS = [
    "SeriesInstanceUID", "StudyInstanceUID", "SOPInstanceUID", "SOPClassUID", "Modality",
    "SeriesDescription", "SeriesNumber", "ImagePositionPatient", "ImageOrientationPatient",
    "PixelSpacing", "Rows", "Columns", "NumberOfFrames", "FrameOfReferenceUID", "PatientID",
    "PatientName", "StudyDate", "Manufacturer",
]
ORIENTATION_TOL = 1e-3
PADDING_OUT_HU = -1024


@dataclass
class SeriesInfo:
    """One series found in a folder (from headers only)."""

    uid: str
    modality: str
    n_files: int
    description: str = ""
    series_number: int | None = None
    study_uid: str = ""
    files: list[Path] = field(default_factory=list, repr=False)
    headers: list[Dataset] = field(default_factory=list, repr=False)

    def summary(self) -> str:
        return f"{self.uid} ({self.modality}, {self.n_files} files, '{self.description}')"


# ---------------------------------------------------------------- discovery


def list_series(folder: str | Path, recursive: bool = True) -> list[SeriesInfo]:
    """All DICOM series under ``folder``, CT first, then by number of files."""
    groups: dict[str, SeriesInfo] = {}
    for path in _dicom_files(Path(folder), recursive):
        ds = _read_header(path)
        if ds is None:
            continue
        uid = str(ds.SeriesInstanceUID)
        info = groups.get(uid) or groups.setdefault(uid, _new_series(uid, ds))
        info.files.append(path)
        info.headers.append(ds)
        info.n_files += 1
    return sorted(groups.values(), key=lambda s: (s.modality != "CT", -s.n_files, s.uid))


def _new_series(uid: str, ds: Dataset) -> SeriesInfo:
    try:
        number = int(header_number(Path(), ds, "SeriesNumber"))
    except InputError:  # informational only: a bad SeriesNumber does not rule out the series
        number = None
    return SeriesInfo(
        uid=uid,
        modality=str(ds.get("Modality", "")).upper(),
        n_files=0,
        description=str(ds.get("SeriesDescription", "")),
        series_number=number,
        study_uid=str(ds.get("StudyInstanceUID", "")),
    )


def _dicom_files(folder: Path, recursive: bool) -> Iterator[Path]:
    """Regular files with the DICOM preamble; symlink loops and unreadable folders skipped."""
    seen: set[tuple[int, int]] = set()

    def warn(err: OSError) -> None:
        log.warning("%s: skipped unreadable folder (%s)", err.filename, err.strerror)

    for root, dirs, files in os.walk(folder, followlinks=True, onerror=warn):
        try:
            st = os.stat(root)
        except OSError:
            dirs[:] = []
            continue
        if (st.st_dev, st.st_ino) in seen:  # reached again through a symlink
            dirs[:] = []
            continue
        seen.add((st.st_dev, st.st_ino))
        dirs.sort()
        for name in sorted(files):
            path = Path(root) / name
            if _has_dicom_preamble(path):
                yield path
        if not recursive:
            return


def _has_dicom_preamble(path: Path) -> bool:
    try:
        if not path.is_file():  # never open a FIFO or device
            return False
        with open(path, "rb") as f:
            head = f.read(132)
    except OSError as err:
        log.warning("%s: skipped unreadable file (%s)", path, err.strerror)
        return False
    return head[128:132] == b"DICM"


def _read_header(path: Path) -> Dataset | None:
    """The discovery tags of ``path``; None (with a warning) if unreadable or not an image."""
    ds, problem = _parse_header(path)
    if problem:
        log.warning("%s: skipped, %s", path, problem)
    return ds


def _parse_header(path: Path) -> tuple[Dataset | None, str | None]:
    """(header, None) for an image; (None, why not) otherwise; (None, None) for a DICOMDIR index."""
    try:
        ds = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=_HEADER_TAGS)
    except Exception as err:  # any parse failure only rules out this one file
        return None, f"not a readable DICOM file ({_reason(err)})"
    if "SeriesInstanceUID" in ds:
        try:
            str(ds.SeriesInstanceUID), str(ds.get("Modality", "")), str(ds.get("SeriesDescription", ""))
        except Exception as err:  # raw values are decoded on first access
            return None, f"unreadable identifying tags ({_reason(err)})"
        return ds, None
    if ds.file_meta.get("MediaStorageSOPClassUID") == MediaStorageDirectoryStorage:  # DICOMDIR is expected
        return None, None
    return None, "no SeriesInstanceUID (truncated file or not an image)"


def select_series(series: list[SeriesInfo], source: str | Path, series_uid: str | None = None) -> SeriesInfo:
    """The series ``series_uid``, or the CT series with the most files."""
    if not series:
        raise InputError(f"{source}: no DICOM series found")
    if series_uid is not None:
        for info in series:
            if info.uid == series_uid:
                return info
        listing = "; ".join(s.summary() for s in series)
        raise InputError(f"{source}: no series {series_uid}; available: {listing}")
    ct = [s for s in series if s.modality == "CT"]
    if not ct:
        found = ", ".join(sorted({s.modality or "?" for s in series}))
        raise InputError(f"{source}: no CT series (found modalities: {found})")
    chosen = max(ct, key=lambda s: s.n_files)
    others = [s for s in series if s is not chosen]
    if others:
        log.info(
            "%s: using CT series %s; also found %s; choose another with --series UID",
            source, chosen.summary(), "; ".join(s.summary() for s in others),
        )
    return chosen


# ------------------------------------------------------------------ reading


def read_dicom_series(
    folder: str | Path, series_uid: str | None = None, max_voxels: int | None = None, recursive: bool = True
) -> Volume:
    """Read one CT series from ``folder`` (see :func:`select_series`)."""
    folder = Path(folder)
    info = select_series(list_series(folder, recursive), folder, series_uid)
    return _read_series(info, folder, max_voxels)


def read_dicom_file(path: str | Path, max_voxels: int | None = None) -> Volume:
    """Read the series that the DICOM file ``path`` belongs to, from its folder."""
    path = Path(path)
    if not path.is_file():  # a FIFO or device would block or never end
        raise InputError(f"{path}: not a regular file")
    ds, problem = _parse_header(path)  # the reason goes into the one error line, not a warning before it
    if ds is None:
        raise InputError(f"{path}: neither a readable DICOM image nor a .nrrd/.nhdr/.nii/.nii.gz/.mhd/.mha file "
                         f"({problem or 'a DICOMDIR index'})")
    return read_dicom_series(path.parent, str(ds.SeriesInstanceUID), max_voxels, recursive=False)


def _read_series(info: SeriesInfo, source: Path, max_voxels: int | None) -> Volume:
    check_modality(source, info.modality)
    instances = _unique_instances(info)
    for path, ds in instances:
        if header_number(path, ds, "NumberOfFrames", default=1) > 1:
            raise InputError(f"{path}: multi-frame (enhanced) DICOM is not supported; export single-frame CT")
    row, col = _orientation(source, instances)
    positions = np.array([_position(path, ds) for path, ds in instances])
    plan = plan_slices(source, positions, row, col)
    rows, cols = (int(_same_value(source, instances, key)[0]) for key in ("Rows", "Columns"))
    check_voxel_budget(source, (cols, rows, plan.n_slices), max_voxels)
    pixel = _same_value(source, instances, "PixelSpacing", count=2)
    spacing = (pixel[1], pixel[0], plan.spacing)  # PixelSpacing is (row step, column step)
    check_spacing(source, spacing)
    array = np.empty((plan.n_slices, rows, cols), dtype=np.int16)
    for index, k in zip(plan.order, plan.grid_k):
        array[k] = _load_slice(instances[index][0], rows, cols)
    _fill_missing(array, plan)
    check_hu_plausible(source, array)
    direction = np.column_stack([row, col, np.cross(row, col)])
    return Volume(array, spacing, positions[plan.order[0]], direction, _metadata(source, info, instances, plan))


def _unique_instances(info: SeriesInfo) -> list[tuple[Path, Dataset]]:
    """One (path, header) per SOP instance: copies of the same instance are ignored."""
    seen: dict[str, Path] = {}
    unique = []
    for path, ds in zip(info.files, info.headers):
        uid = _text(ds, "SOPInstanceUID") or str(path)
        if uid in seen:
            log.warning("%s: same instance as %s; ignored", path, seen[uid])
            continue
        seen[uid] = path
        unique.append((path, ds))
    return unique


def _orientation(source: Path, instances: list[tuple[Path, Dataset]]) -> tuple[np.ndarray, np.ndarray]:
    """Row and column direction cosines shared by all slices."""
    iops = np.array([header_number(path, ds, "ImageOrientationPatient", count=6) for path, ds in instances])
    if np.abs(iops - iops[0]).max() > ORIENTATION_TOL:
        raise InputError(f"{source}: slices have different orientations (mixed orientations); select one series")
    row, col = iops[0, :3], iops[0, 3:]
    check_direction(source, np.column_stack([row, col, np.cross(row, col)]))
    return row, col


def _position(path: Path, ds: Dataset) -> list[float]:
    return header_number(path, ds, "ImagePositionPatient", count=3)


def _same_value(source: Path, instances: list[tuple[Path, Dataset]], keyword: str, count: int = 1) -> list[float]:
    """A numeric tag that every slice must carry with the same ``count`` positive values."""
    values = np.array([header_number(path, ds, keyword, count=count) for path, ds in instances]).reshape(-1, count)
    if np.abs(values - values[0]).max() > 1e-4:
        raise InputError(f"{source}: {keyword} differs between slices")
    if values.min() <= 0:
        raise InputError(f"{instances[0][0]}: {keyword} {values[0].tolist()} must be positive")
    return values[0].tolist()


def header_number(path: Path, ds: Dataset, keyword: str, default: float | None = None, count: int = 1):
    """``count`` finite numbers from a header tag (a float when ``count`` is 1), else one-line InputError.

    Header values are attacker-controlled: raw bytes are decoded here, on first
    access, and may be anything (text in a number, several values, NaN, none).
    """
    try:
        value = ds.get(keyword)
    except Exception as err:  # pydicom decodes raw values lazily
        raise InputError(f"{path}: {keyword} cannot be decoded ({_reason(err)})") from err
    values = list(value) if isinstance(value, (list, tuple, MultiValue)) else [value]
    if value is None or values == [] or values == [""]:
        if default is not None and count == 1:
            return default
        raise InputError(f"{path}: {keyword} missing")
    try:
        numbers = [float(v) for v in values]
    except (TypeError, ValueError):
        numbers = []
    if len(numbers) != count or not np.all(np.isfinite(numbers)):
        shown = str(value)[:60]
        raise InputError(f"{path}: {keyword} is {shown!r}; {count} finite number{'s' if count > 1 else ''} expected")
    return numbers[0] if count == 1 else numbers


def _text(ds: Dataset, keyword: str) -> str:
    """A header string, or '' when absent or undecodable."""
    try:
        return str(ds.get(keyword, "") or "")
    except Exception:  # pydicom decodes raw values lazily
        return ""


def _load_slice(path: Path, rows: int, cols: int) -> np.ndarray:
    """One slice as int16 HU (rescale applied, padding set to -1024 HU)."""
    try:
        ds = pydicom.dcmread(path)
    except Exception as err:
        raise InputError(f"{path}: cannot read DICOM file ({_reason(err)})") from err
    _check_pixel_format(path, ds, rows, cols)
    stored = _decode(path, ds)
    if stored.shape != (rows, cols):
        raise InputError(f"{path}: decoded pixel data has shape {stored.shape}, not {rows} x {cols}")
    return _stored_to_hu(path, ds, stored)


def _check_pixel_format(path: Path, ds: Dataset, rows: int, cols: int) -> None:
    if not ds.get("PixelData"):
        raise InputError(f"{path}: no pixel data")
    samples = header_number(path, ds, "SamplesPerPixel", default=1)
    if samples != 1 or _text(ds, "PhotometricInterpretation") != "MONOCHROME2":
        raise InputError(f"{path}: not a grayscale (MONOCHROME2) CT image")
    bits = int(header_number(path, ds, "BitsAllocated"))
    if bits not in (8, 16, 32):
        raise InputError(f"{path}: unsupported BitsAllocated {bits}")
    if header_number(path, ds, "PixelRepresentation", default=0) not in (0, 1):
        raise InputError(f"{path}: PixelRepresentation must be 0 or 1")
    if not _transfer_syntax(path, ds).is_compressed:
        expected = rows * cols * bits // 8
        if len(ds.PixelData) < expected:
            raise InputError(
                f"{path}: pixel data holds {len(ds.PixelData)} bytes, {expected} expected "
                f"for {rows} x {cols} x {bits} bits"
            )


def _decode(path: Path, ds: Dataset) -> np.ndarray:
    """Stored pixel values, decoding compressed transfer syntaxes with pydicom's plugins."""
    syntax = _transfer_syntax(path, ds)
    if syntax.is_compressed and not _decoder_available(syntax):
        raise InputError(f"{path}: no installed decoder for transfer syntax {syntax.name} ({syntax})")
    try:
        return ds.pixel_array
    except Exception as err:
        raise InputError(f"{path}: pixel data cannot be decoded ({syntax.name}): {_reason(err)}") from err


def _decoder_available(syntax: UID) -> bool:
    """Whether an installed pydicom plugin (pylibjpeg, pyjpegls, Pillow, GDCM...) decodes ``syntax``."""
    try:
        from pydicom.pixels import get_decoder  # pydicom >= 3
    except ImportError:
        # pydicom 2.x (Slicer 5.10 ships 2.4.4) decodes through its pixel data handlers;
        # Dataset.pixel_array uses the first available one that supports the syntax.
        from pydicom import config

        return any(h.is_available() and h.supports_transfer_syntax(syntax) for h in config.pixel_data_handlers)
    try:
        return get_decoder(syntax).is_available
    except NotImplementedError:  # a syntax pydicom has no decoder for at all (e.g. MPEG2)
        return False


def _transfer_syntax(path: Path, ds: Dataset) -> UID:
    """The file's transfer syntax, if it is one pydicom knows (a private or unknown one is refused)."""
    syntax = UID(str(ds.file_meta.get("TransferSyntaxUID", "")))
    try:
        known = syntax.is_transfer_syntax
    except ValueError:  # pydicom 2.x raises for a private (or empty) UID where 3.x answers False
        known = False
    if not known:
        raise InputError(f"{path}: unknown transfer syntax {str(syntax)[:64]!r}")
    return syntax


def _reason(err: Exception) -> str:
    """The first line of a library's exception message (some span several lines)."""
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def _stored_to_hu(path: Path, ds: Dataset, stored: np.ndarray) -> np.ndarray:
    if "RescaleSlope" not in ds and "RescaleIntercept" not in ds and stored.min() >= 0:
        # Debug only: check_hu_plausible refuses such a series with this hint in its one
        # error line, and a warning per slice before it would bury that line.
        log.debug("%s: no RescaleSlope/Intercept and only non-negative values; read as HU", path)
    slope = header_number(path, ds, "RescaleSlope", default=1.0)
    intercept = header_number(path, ds, "RescaleIntercept", default=0.0)
    if slope == 0:
        raise InputError(f"{path}: RescaleSlope is 0")
    hu = np.rint(stored * slope + intercept)  # float64 for one slice only
    padding = _padding_mask(path, ds, stored)
    if padding is not None:
        hu[padding] = PADDING_OUT_HU
    if hu.min() < INT16.min or hu.max() > INT16.max:
        log.warning("%s: HU values [%s, %s] clipped to the int16 range", path, hu.min(), hu.max())
        np.clip(hu, INT16.min, INT16.max, out=hu)
    return hu.astype(np.int16)


def _padding_mask(path: Path, ds: Dataset, stored: np.ndarray) -> np.ndarray | None:
    """Pixels marked as padding by PixelPaddingValue (and PixelPaddingRangeLimit)."""
    if "PixelPaddingValue" not in ds:
        return None
    bits = int(header_number(path, ds, "BitsAllocated"))
    signed = header_number(path, ds, "PixelRepresentation", default=0) == 1

    def as_stored(keyword: str) -> int:
        # Written with VR US even for signed pixels (e.g. 63536 meaning -2000).
        value = int(header_number(path, ds, keyword))
        return value - (1 << bits) if signed and value >= 1 << (bits - 1) else value

    first = as_stored("PixelPaddingValue")
    last = as_stored("PixelPaddingRangeLimit") if "PixelPaddingRangeLimit" in ds else first
    return (stored >= min(first, last)) & (stored <= max(first, last))


def _fill_missing(array: np.ndarray, plan: SlicePlan) -> None:
    """Linear interpolation along k for slices missing from the series."""
    for ka, kb in zip(plan.grid_k, plan.grid_k[1:]):
        below, above = array[ka].astype(np.float32), array[kb].astype(np.float32)
        for k in range(ka + 1, kb):
            t = (k - ka) / (kb - ka)
            array[k] = np.rint((1 - t) * below + t * above)


def _metadata(source: Path, info: SeriesInfo, instances: list[tuple[Path, Dataset]], plan: SlicePlan) -> dict:
    """Series identity for DICOM-SEG references; interpolated slices have no instance (None)."""
    sop_uids: list[str | None] = [None] * plan.n_slices
    files: list[str | None] = [None] * plan.n_slices
    for index, k in zip(plan.order, plan.grid_k):
        path, ds = instances[index]
        sop_uids[k], files[k] = _text(ds, "SOPInstanceUID"), str(path)
    first = instances[plan.order[0]][1]
    return {
        "source": str(source),
        "format": "dicom",
        "series_uid": info.uid,
        "study_uid": str(first.get("StudyInstanceUID", "")),
        "frame_of_reference_uid": str(first.get("FrameOfReferenceUID", "")),
        "patient_id": str(first.get("PatientID", "")),
        "patient_name": str(first.get("PatientName", "")),
        "modality": info.modality,
        "sop_class_uid": str(first.get("SOPClassUID", "")),
        "sop_instance_uids": sop_uids,
        "files": files,
        "series_description": info.description,
        "series_number": info.series_number,
        "study_date": str(first.get("StudyDate", "")),
        "manufacturer": str(first.get("Manufacturer", "")),
        "interpolated_slices": list(plan.missing_k),
    }
