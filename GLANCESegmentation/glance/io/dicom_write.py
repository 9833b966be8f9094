"""Write a Volume as a DICOM CT Image Storage series (one file per slice).

Geometry comes from the Volume: ImageOrientationPatient = the LPS directions of
the i (row direction) and j (column direction) axes, ImagePositionPatient = the
LPS position of each slice's first pixel, PixelSpacing = (spacing along j,
spacing along i), i.e. row spacing first, as DICOM orders it.
HU are stored as signed int16 with slope 1 / intercept 0, so nothing is lost.

UIDs are derived from ``uid_seed`` (pydicom ``generate_uid(entropy_srcs=...)``)
and dates are fixed, so the same volume and seed give the same bytes. The
series is written into a temporary folder beside ``out_dir`` and renamed into
place, so a reader never sees half a series.
"""

from __future__ import annotations

import inspect
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from glance.errors import InputError
from glance.volume import Volume

if TYPE_CHECKING:
    from pydicom.dataset import Dataset

log = logging.getLogger(__name__)

CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"


@dataclass
class DicomSeriesInfo:
    """Identity of the written series (patient, study, series) and per-slice UIDs."""

    patient_id: str = "GLANCE-PHANTOM"
    patient_name: str = "Phantom^GLANCE"
    study_description: str = "GLANCE synthetic chest CT"
    series_description: str = "GLANCE phantom"
    series_number: int = 1
    study_date: str = "20000101"
    study_time: str = "120000"
    slice_thickness: float | None = None  # default: the k spacing
    manufacturer: str = "GLANCE"
    kvp: float = 120.0
    convolution_kernel: str = "STANDARD"
    pixel_padding_value: int | None = None


@dataclass
class WrittenSeries:
    folder: Path
    files: list[Path]
    study_uid: str
    series_uid: str
    frame_of_reference_uid: str
    sop_instance_uids: list[str]


def write_dicom_series(volume: Volume, out_dir: str | Path, uid_seed: str,
                       info: DicomSeriesInfo | None = None) -> WrittenSeries:
    """Write ``volume`` (HU) as CT slices ``out_dir/IM00001.dcm ...``; replaces ``out_dir``."""
    from pydicom.uid import generate_uid

    info = info or DicomSeriesInfo()
    out_dir = Path(out_dir)
    hu = _as_int16(volume.array, out_dir)
    uid = lambda tag: generate_uid(entropy_srcs=[uid_seed, tag])  # noqa: E731
    study, series, frame = uid("study"), uid("series"), uid("frame-of-reference")
    sops = [uid(f"sop-{k}") for k in range(hu.shape[0])]

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    try:
        files = []
        for k in range(hu.shape[0]):
            ds = _slice_dataset(volume, hu[k], k, info, study, series, frame, sops[k])
            name = f"IM{k + 1:05d}.dcm"
            save_dicom_file(ds, tmp / name)
            files.append(out_dir / name)
        _replace_dir(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log.info("wrote %d DICOM slices to %s", len(files), out_dir)
    return WrittenSeries(out_dir, files, study, series, frame, sops)


def save_dicom_file(ds: Dataset, path: str | Path) -> None:
    """Write ``ds`` as a DICOM Part 10 file: preamble, then file meta checked and completed by pydicom.

    The file meta's TransferSyntaxUID decides how the data set is encoded, as in
    pydicom 3. Works on pydicom 2.4 (Slicer 5.10 ships 2.4.4) and 3.x.
    """
    if "enforce_file_format" in inspect.signature(ds.save_as).parameters:  # pydicom >= 3
        ds.save_as(path, enforce_file_format=True)
        return
    # pydicom 2.x: write_like_original=False writes the same format, but it would rewrite the
    # TransferSyntaxUID from is_implicit_VR / is_little_endian (True, True for a new FileDataset,
    # or as read), so those follow the file meta first.
    from pydicom.uid import UID

    meta = getattr(ds, "file_meta", None)
    syntax = UID(str(meta.get("TransferSyntaxUID", ""))) if meta is not None else UID("")
    if not syntax.is_private and syntax.is_transfer_syntax:  # 2.x raises on a private UID
        ds.is_implicit_VR, ds.is_little_endian = syntax.is_implicit_VR, syntax.is_little_endian
    ds.save_as(path, write_like_original=False)


def _as_int16(array: np.ndarray, out_dir: Path) -> np.ndarray:
    if array.ndim != 3:
        raise InputError(f"{out_dir}: can only write a 3D volume as a DICOM series")
    if array.dtype == np.int16:
        return array
    return np.clip(np.rint(array), -32768, 32767).astype(np.int16)


def _slice_dataset(volume: Volume, pixels: np.ndarray, k: int, info: DicomSeriesInfo,
                   study: str, series: str, frame: str, sop: str):
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, PYDICOM_IMPLEMENTATION_UID

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = CT_IMAGE_STORAGE
    meta.MediaStorageSOPInstanceUID = sop
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID

    ds = Dataset()
    ds.file_meta = meta
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
    ds.SOPClassUID = CT_IMAGE_STORAGE
    ds.SOPInstanceUID = sop
    ds.StudyDate = ds.SeriesDate = ds.ContentDate = ds.AcquisitionDate = info.study_date
    ds.StudyTime = ds.SeriesTime = ds.ContentTime = ds.AcquisitionTime = info.study_time
    ds.AccessionNumber = ""
    ds.Modality = "CT"
    ds.Manufacturer = info.manufacturer
    ds.ReferringPhysicianName = ""
    ds.StudyDescription = info.study_description
    ds.SeriesDescription = info.series_description
    ds.PatientName = info.patient_name
    ds.PatientID = info.patient_id
    ds.PatientBirthDate = ""
    ds.PatientSex = "O"
    ds.BodyPartExamined = "CHEST"
    ds.SliceThickness = _ds(info.slice_thickness or volume.spacing[2])
    ds.KVP = _ds(info.kvp)
    ds.SpacingBetweenSlices = _ds(volume.spacing[2])
    ds.ConvolutionKernel = info.convolution_kernel
    ds.PatientPosition = "FFS"
    ds.StudyInstanceUID = study
    ds.SeriesInstanceUID = series
    ds.StudyID = "1"
    ds.SeriesNumber = info.series_number
    ds.AcquisitionNumber = 1
    ds.InstanceNumber = k + 1
    position = volume.ijk_to_lps(np.array([0.0, 0.0, float(k)]))
    ds.ImagePositionPatient = [_ds(v) for v in position]
    d = volume.direction
    ds.ImageOrientationPatient = [_ds(v, 8) for v in (*d[:, 0], *d[:, 1])]
    ds.FrameOfReferenceUID = frame
    ds.PositionReferenceIndicator = ""
    ds.SliceLocation = _ds(float(position @ np.cross(d[:, 0], d[:, 1])))
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows, ds.Columns = int(pixels.shape[0]), int(pixels.shape[1])
    ds.PixelSpacing = [_ds(volume.spacing[1]), _ds(volume.spacing[0])]
    ds.BitsAllocated = 16
    ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 1
    if info.pixel_padding_value is not None:
        ds.PixelPaddingValue = int(info.pixel_padding_value)
    ds.WindowCenter = "-600"
    ds.WindowWidth = "1500"
    ds.RescaleIntercept = "0"
    ds.RescaleSlope = "1"
    ds.RescaleType = "HU"
    ds.PixelData = np.ascontiguousarray(pixels, dtype="<i2").tobytes()
    return ds


def _ds(value: float, digits: int = 6) -> str:
    """A DICOM decimal string (at most 16 characters)."""
    text = f"{float(value):.{digits}f}".rstrip("0").rstrip(".")
    text = "0" if text in ("-0", "") else text
    return text[:16]


def _replace_dir(tmp: Path, out_dir: Path) -> None:
    """Move ``tmp`` to ``out_dir``, replacing an old series there in one rename."""
    if not out_dir.exists():
        os.replace(tmp, out_dir)
        return
    if not out_dir.is_dir():
        raise InputError(f"{out_dir}: exists and is not a folder")
    old = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.old.", dir=out_dir.parent))
    os.replace(out_dir, old / "series")
    os.replace(tmp, out_dir)
    shutil.rmtree(old, ignore_errors=True)
