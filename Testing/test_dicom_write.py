"""DICOM CT series writer: geometry, pixel values, UIDs, validity (dciodvfy), atomic replace."""

from __future__ import annotations

import json
import shutil
import subprocess

import numpy as np
import pydicom
import pytest
import SimpleITK as sitk

from glance.io.dicom_write import CT_IMAGE_STORAGE, DicomSeriesInfo, write_dicom_series
from glance.volume import Volume


def _rotation(deg: float) -> np.ndarray:
    a = np.deg2rad(deg)
    return np.array([[np.cos(a), -np.sin(a), 0], [np.sin(a), np.cos(a), 0], [0, 0, 1.0]])


def _volume(direction=np.eye(3)) -> Volume:
    rng = np.random.default_rng(0)
    arr = rng.integers(-1024, 1500, size=(6, 20, 30)).astype(np.int16)
    arr[0, 0, 0], arr[0, 0, 1] = -2048, 3071
    return Volume(arr, (0.7, 0.9, 2.5), (-120.5, -80.25, -300.0), direction)


def _read_sitk(folder):
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(reader.GetGDCMSeriesFileNames(str(folder)))
    return reader.Execute()


@pytest.mark.parametrize("direction", [np.eye(3), _rotation(20.0)])
def test_reads_back_with_simpleitk(tmp_path, direction):
    vol = _volume(direction)
    written = write_dicom_series(vol, tmp_path / "ct", "seed-1")
    img = _read_sitk(written.folder)
    assert img.GetSize() == (30, 20, 6)
    assert np.allclose(img.GetSpacing(), (0.7, 0.9, 2.5))
    assert np.allclose(img.GetOrigin(), vol.origin, atol=1e-4)
    assert np.allclose(np.array(img.GetDirection()).reshape(3, 3), direction, atol=1e-6)
    assert np.array_equal(sitk.GetArrayFromImage(img), vol.array)
    # A world point maps the same way in both.
    ijk = (12.5, 7.25, 3.0)
    assert np.allclose(img.TransformContinuousIndexToPhysicalPoint(ijk), vol.ijk_to_lps(np.array(ijk)), atol=1e-4)


def test_pydicom_attributes(tmp_path):
    vol = _volume()
    info = DicomSeriesInfo(slice_thickness=2.0)
    written = write_dicom_series(vol, tmp_path / "ct", "seed-1", info)
    dss = [pydicom.dcmread(f) for f in written.files]
    ds = dss[0]
    assert ds.SOPClassUID == CT_IMAGE_STORAGE and ds.Modality == "CT"
    assert [float(v) for v in ds.PixelSpacing] == [0.9, 0.7]  # row spacing (along j) first
    assert float(ds.SliceThickness) == 2.0 and float(ds.SpacingBetweenSlices) == 2.5
    assert ds.PixelRepresentation == 1 and ds.BitsAllocated == 16
    assert float(ds.RescaleSlope) == 1 and float(ds.RescaleIntercept) == 0
    assert [float(v) for v in ds.ImageOrientationPatient] == [1, 0, 0, 0, 1, 0]
    assert np.array_equal(ds.pixel_array, vol.array[0])
    assert len({d.SeriesInstanceUID for d in dss}) == 1 and len({d.SOPInstanceUID for d in dss}) == 6
    assert {d.StudyInstanceUID for d in dss} == {written.study_uid}
    assert {d.FrameOfReferenceUID for d in dss} == {written.frame_of_reference_uid}
    for k, d in enumerate(dss):
        assert np.allclose([float(v) for v in d.ImagePositionPatient], vol.ijk_to_lps(np.array([0, 0, k])))


def test_uids_are_deterministic_per_seed(tmp_path):
    vol = _volume()
    a = write_dicom_series(vol, tmp_path / "a", "seed-1")
    b = write_dicom_series(vol, tmp_path / "b", "seed-1")
    c = write_dicom_series(vol, tmp_path / "c", "seed-2")
    assert a.series_uid == b.series_uid and a.sop_instance_uids == b.sop_instance_uids
    assert a.files[0].read_bytes() == b.files[0].read_bytes()
    assert c.series_uid != a.series_uid and c.study_uid != a.study_uid


def test_replaces_existing_series_atomically(tmp_path):
    out = tmp_path / "ct"
    write_dicom_series(_volume(), out, "seed-1")
    small = Volume(np.zeros((2, 4, 4), np.int16), (1, 1, 1))
    write_dicom_series(small, out, "seed-9")
    assert sorted(p.name for p in out.iterdir()) == ["IM00001.dcm", "IM00002.dcm"]
    assert [p.name for p in tmp_path.iterdir()] == ["ct"]  # no temporary folders left


@pytest.mark.skipif(shutil.which("dciodvfy") is None, reason="dciodvfy (dicom3tools) not installed")
def test_dciodvfy_reports_no_errors(tmp_path):
    written = write_dicom_series(_volume(), tmp_path / "ct", "seed-1", DicomSeriesInfo(pixel_padding_value=-2048))
    res = subprocess.run(["dciodvfy", str(written.files[2])], capture_output=True, text=True, timeout=60)
    report = res.stdout + res.stderr
    assert "CTImage" in report
    assert "Error" not in report, report


def test_phantom_dicom_geometry_matches_json(tmp_path):
    from glance.cli import main

    out = tmp_path / "ph"
    assert main(["phantom", "--out", str(out), "--shape", "96x80x20", "--spacing", "3x3.2x3.5", "--nodules", "2",
                 "--diameter", "9-14", "--format", "dicom", "--seed", "3"]) == 0
    img = _read_sitk(out / "ct")
    assert img.GetSize() == (96, 80, 20) and np.allclose(img.GetSpacing(), (3, 3.2, 3.5))
    doc = json.loads((out / "nodules.json").read_text())
    assert np.allclose(img.GetOrigin(), doc["grid"]["origin"], atol=1e-4)
    labels = sitk.GetArrayFromImage(sitk.ReadImage(str(out / "labels.nrrd")))
    assert doc["nodules"], "expected nodules"
    for n in doc["nodules"]:
        world = img.TransformContinuousIndexToPhysicalPoint(n["centre_ijk"])
        assert np.allclose(world, n["centre_lps"], atol=0.01)
        assert (labels == n["id"]).sum() == n["label_voxels"]
    ds = pydicom.dcmread(next((out / "ct").iterdir()))
    assert [float(v) for v in ds.PixelSpacing] == [3.2, 3.0]
    # glance's own reader agrees on the geometry.
    from glance.io import read_volume

    vol = read_volume(out / "ct")
    assert np.allclose(vol.spacing, (3, 3.2, 3.5)) and np.allclose(vol.origin, img.GetOrigin(), atol=1e-4)
