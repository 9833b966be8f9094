"""glance.io readers: DICOM series and image files into int16 HU Volumes, and every refusal."""

from __future__ import annotations

import gzip
import logging
import os
import random
import time
from pathlib import Path

import numpy as np
import pydicom
import pytest
import SimpleITK as sitk
from pydicom.dataset import FileDataset, FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, RLELossless, generate_uid

from glance.errors import InputError
from glance.io import list_series, read_label_map, read_volume, write_image
from glance.io.dicom_write import save_dicom_file
from glance.volume import Volume

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
SHAPE = (8, 16, 16)  # (k, j, i)


def ramp_hu(n: int = SHAPE[0]) -> np.ndarray:
    """Air on the left half, a tissue ramp 10*k + j on the right: integer, so interpolation is exact."""
    k, j, i = np.meshgrid(np.arange(n), np.arange(SHAPE[1]), np.arange(SHAPE[2]), indexing="ij")
    return np.where(i < 8, -1000, 10 * k + j).astype(np.int16)


def ct_slice(hu: np.ndarray, position, series_uid: str, *, row=(1, 0, 0), col=(0, 1, 0), **tags) -> FileDataset:
    """A minimal single-frame CT Image Storage dataset, stored as hu + 1024 with intercept -1024."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = CTImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = FileDataset(None, {}, file_meta=meta, preamble=b"\0" * 128)
    ds.SOPClassUID = CTImageStorage
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.Modality = "CT"
    ds.PatientID = "TEST-1"
    ds.PatientName = "Test^Patient"
    ds.StudyInstanceUID = "1.2.3.4"
    ds.SeriesInstanceUID = series_uid
    ds.FrameOfReferenceUID = "1.2.3.5"
    ds.InstanceNumber = 1
    ds.ImagePositionPatient = [float(v) for v in position]
    ds.ImageOrientationPatient = [float(v) for v in (*row, *col)]
    ds.PixelSpacing = [0.5, 0.75]  # (row step = j spacing, column step = i spacing)
    ds.Rows, ds.Columns = hu.shape
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
    ds.RescaleSlope, ds.RescaleIntercept = 1, -1024
    ds.PixelData = (hu.astype(np.int32) + 1024).astype(np.int16).tobytes()
    for keyword, value in tags.items():
        setattr(ds, keyword, value)
    return ds


def write_series(folder: Path, hu: np.ndarray, *, uid=None, origin=(-10.0, 20.0, -100.0), step=2.5,
                 row=(1, 0, 0), col=(0, 1, 0), skip=(), **tags) -> list[FileDataset]:
    """Write ``hu`` slice by slice, shuffled, with misleading names and InstanceNumbers."""
    folder.mkdir(parents=True, exist_ok=True)
    uid = uid or generate_uid()
    normal = np.cross(row, col)
    order = [k for k in range(len(hu)) if k not in skip]
    random.Random(len(hu)).shuffle(order)
    written = []
    for n, k in enumerate(order):
        ds = ct_slice(hu[k], np.asarray(origin) + k * step * normal, uid, row=row, col=col, **tags)
        ds.InstanceNumber = 100 - n  # wrong on purpose
        save_dicom_file(ds, folder / f"{uid[-6:]}_{n:03d}.dcm")
        written.append(ds)
    return written


# --------------------------------------------------------------------- DICOM


def test_dicom_sorted_by_position_not_name_or_instance_number(tmp_path):
    hu = ramp_hu()
    written = write_series(tmp_path / "s", hu)
    v = read_volume(tmp_path / "s")
    assert v.array.dtype == np.int16 and np.array_equal(v.array, hu)
    assert v.spacing == (0.75, 0.5, 2.5)
    assert v.origin == (-10.0, 20.0, -100.0)
    assert np.array_equal(v.direction, np.eye(3))
    by_z = sorted(written, key=lambda ds: ds.ImagePositionPatient[2])
    assert v.metadata["sop_instance_uids"] == [ds.SOPInstanceUID for ds in by_z]
    assert [pydicom.dcmread(f).SOPInstanceUID for f in v.metadata["files"]] == v.metadata["sop_instance_uids"]
    meta = v.metadata
    assert (meta["format"], meta["modality"], meta["patient_id"], meta["study_uid"]) == (
        "dicom", "CT", "TEST-1", "1.2.3.4")
    assert meta["frame_of_reference_uid"] == "1.2.3.5" and meta["sop_class_uid"] == CTImageStorage
    assert meta["series_uid"] == written[0].SeriesInstanceUID and meta["source"] == str(tmp_path / "s")


@pytest.mark.parametrize(
    "row, col",
    [
        ((0, 1, 0), (1, 0, 0)),  # transposed in-plane axes: normal points inferior
        ((-1, 0, 0), (0, 0, -1)),  # coronal, flipped
        ((np.cos(0.5), np.sin(0.5), 0), (0, 0.6, -0.8)),  # oblique (col made orthogonal below)
    ],
)
def test_dicom_orientation_each_slice_lands_at_its_position(tmp_path, row, col):
    row = np.asarray(row, float)
    col = np.asarray(col, float)
    col = col - (col @ row) * row
    col /= np.linalg.norm(col)
    hu = ramp_hu()
    written = write_series(tmp_path, hu, row=row, col=col)
    v = read_volume(tmp_path)
    assert np.allclose(v.direction, np.column_stack([row, col, np.cross(row, col)]), atol=1e-6)
    for ds in written:
        # the slice's ImagePositionPatient must be voxel (0, 0, k) of the slice k holding its pixels
        i, j, k = v.lps_to_ijk(np.asarray(ds.ImagePositionPatient, float))
        assert np.allclose((i, j, k), (0, 0, round(k)), atol=1e-4)
        k = round(k)
        stored = np.frombuffer(ds.PixelData, np.int16).reshape(16, 16).astype(np.int32) - 1024
        assert np.array_equal(v.array[k], stored)


def test_two_series_picks_larger_ct_and_series_uid_picks_other(tmp_path, caplog):
    big, small, mr = "1.2.826.0.1.1", "1.2.826.0.1.2", "1.2.826.0.1.3"
    write_series(tmp_path, ramp_hu(), uid=big, SeriesDescription="big")
    write_series(tmp_path, ramp_hu(5), uid=small)
    write_series(tmp_path / "sub", ramp_hu(10), uid=mr, Modality="MR")  # more slices, not CT
    infos = list_series(tmp_path)
    assert [(s.uid, s.modality, s.n_files) for s in infos] == [(big, "CT", 8), (small, "CT", 5), (mr, "MR", 10)]
    with caplog.at_level(logging.INFO, logger="glance.io.dicom_read"):
        v = read_volume(tmp_path)
    assert v.metadata["series_uid"] == big and v.shape == (8, 16, 16)
    assert small in caplog.text and mr in caplog.text and "--series" in caplog.text
    assert read_volume(tmp_path, series_uid=small).shape == (5, 16, 16)
    with pytest.raises(InputError, match=f"{tmp_path}: no series 9.9.9; available: {big}"):
        read_volume(tmp_path, series_uid="9.9.9")
    with pytest.raises(InputError, match=f"{tmp_path}: modality MR is not CT"):
        read_volume(tmp_path, series_uid=mr)


def test_single_dcm_file_reads_its_own_series(tmp_path):
    write_series(tmp_path, ramp_hu(), uid="1.2.826.0.2.1")
    write_series(tmp_path, ramp_hu(5), uid="1.2.826.0.2.2")
    one = next(tmp_path.glob("*0.2.2_*.dcm"))
    v = read_volume(one)
    assert v.metadata["series_uid"] == "1.2.826.0.2.2" and np.array_equal(v.array, ramp_hu(5))


def test_missing_slice_is_interpolated_with_warning(tmp_path, caplog):
    hu = ramp_hu()
    write_series(tmp_path, hu, skip=(3,))
    with caplog.at_level(logging.WARNING):
        v = read_volume(tmp_path)
    assert np.array_equal(v.array, hu)  # the linear ramp is rebuilt exactly at k = 3
    assert v.spacing[2] == 2.5 and v.metadata["interpolated_slices"] == [3]
    assert v.metadata["sop_instance_uids"][3] is None and None not in v.metadata["files"][4:]
    assert "1 missing slice(s) at -92.50 mm" in caplog.text


def test_copy_of_same_instance_is_ignored(tmp_path, caplog):
    hu = ramp_hu()
    write_series(tmp_path, hu)
    first = sorted(tmp_path.iterdir())[0]
    (tmp_path / "copy.dcm").write_bytes(first.read_bytes())
    with caplog.at_level(logging.WARNING):
        assert np.array_equal(read_volume(tmp_path).array, hu)
    assert "same instance as" in caplog.text


def test_padding_value_becomes_minus_1024_and_rle_is_decoded(tmp_path):
    hu = ramp_hu()
    folder = tmp_path / "s"
    write_series(folder, hu)
    for path in folder.iterdir():
        ds = pydicom.dcmread(path)
        ds.add_new(0x00280120, "US", 63536)  # as in LIDC: VR US, meaning stored -2000 for signed pixels
        stored = ds.pixel_array.copy()
        stored[0, :4] = -2000
        ds.PixelData = stored.tobytes()
        ds.compress(RLELossless, stored)
        save_dicom_file(ds, path)
    v = read_volume(folder)
    assert pydicom.dcmread(next(folder.iterdir())).file_meta.TransferSyntaxUID == RLELossless
    expected = hu.copy()
    expected[:, 0, :4] = -1024
    assert np.array_equal(v.array, expected)


def _rewrite(folder: Path, pick, change) -> Path:
    """Apply ``change(ds)`` to the file(s) chosen by ``pick(sorted_paths)``; returns one of them."""
    paths = sorted(folder.iterdir(), key=lambda p: pydicom.dcmread(p).ImagePositionPatient[2])
    chosen = pick(paths)
    for path in chosen if isinstance(chosen, list) else [chosen]:
        ds = pydicom.dcmread(path)
        change(ds)
        save_dicom_file(ds, path)
    return chosen if not isinstance(chosen, list) else chosen[0]


def _set_position(z_index: int, z: float):
    def change(ds):
        ds.ImagePositionPatient = [ds.ImagePositionPatient[0], ds.ImagePositionPatient[1], z]
    return lambda paths: paths[z_index], change


def _tilt(ds):
    z = float(ds.ImagePositionPatient[2])
    ds.ImagePositionPatient = [ds.ImagePositionPatient[0], 20.0 + 0.5 * (z + 100.0), z]


def _mpeg2(ds):
    ds.file_meta.TransferSyntaxUID = "1.2.840.10008.1.2.4.100"
    ds.PixelData = encapsulate([ds.PixelData])


def _truncate(ds):
    ds.PixelData = ds.PixelData[:100]


REFUSALS = {
    "duplicate position": (_set_position(4, -92.5), "share the position -92.500 mm"),
    "irregular spacing": (_set_position(4, -89.1), "irregular slice spacing"),
    "gantry tilt": ((lambda paths: paths, _tilt), "gantry tilt"),
    "mixed orientation": (
        (lambda paths: paths[2], lambda ds: setattr(ds, "ImageOrientationPatient", [1, 0, 0, 0, 0, -1])),
        "different orientations",
    ),
    "not orthonormal": (
        (lambda paths: paths, lambda ds: setattr(ds, "ImageOrientationPatient", [1, 0, 0, 0.1, 1, 0])),
        "not orthonormal",
    ),
    "short pixel data": ((lambda paths: paths[5], _truncate), "pixel data holds 100 bytes, 512 expected"),
    "no decoder": (
        (lambda paths: paths[1], _mpeg2),
        "no installed decoder for transfer syntax MPEG2",
    ),
}


@pytest.mark.parametrize("case", sorted(REFUSALS))
def test_dicom_refusals_name_the_source(tmp_path, case):
    (pick, change), message = REFUSALS[case]
    write_series(tmp_path, ramp_hu())
    changed = _rewrite(tmp_path, pick, change)
    per_file = case in ("short pixel data", "no decoder")
    with pytest.raises(InputError, match=message) as err:
        read_volume(tmp_path)
    assert str(err.value).startswith(f"{changed if per_file else tmp_path}: ")


def test_single_slice_and_non_ct_refused(tmp_path):
    write_series(tmp_path / "one", ramp_hu(1))
    with pytest.raises(InputError, match=f"{tmp_path / 'one'}: a single slice"):
        read_volume(tmp_path / "one")
    write_series(tmp_path / "mr", ramp_hu(), Modality="MR")
    with pytest.raises(InputError, match=f"{tmp_path / 'mr'}: no CT series \\(found modalities: MR\\)"):
        read_volume(tmp_path / "mr")


def test_missing_rescale_with_offset_values_is_refused(tmp_path, caplog):
    folder = tmp_path / "s"
    write_series(folder, ramp_hu())
    _rewrite(folder, lambda paths: paths, lambda ds: (delattr(ds, "RescaleSlope"), delattr(ds, "RescaleIntercept")))
    # One line for the user: the refusal itself carries the hint, no per-slice warnings before it.
    with caplog.at_level(logging.WARNING), pytest.raises(
            InputError, match=rf"{folder}: does not look like CT in HU.*missing RescaleIntercept\?"):
        read_volume(folder)
    assert "RescaleSlope" not in caplog.text


def test_voxel_budget_checked_before_pixel_data(tmp_path):
    write_series(tmp_path, ramp_hu())
    _rewrite(tmp_path, lambda paths: paths, _truncate)  # loading any pixel data would fail differently
    with pytest.raises(InputError, match=f"{tmp_path}: volume of 16 x 16 x 8 = 2048 voxels exceeds the limit of 2047"):
        read_volume(tmp_path, max_voxels=2047)


def test_discovery_skips_junk_and_symlink_loops_quickly(tmp_path, caplog):
    write_series(tmp_path / "a" / "b", ramp_hu())
    junk = tmp_path / "junk"
    junk.mkdir()
    for n in range(3_000):
        (junk / f"f{n}.dcm").write_bytes(b"not dicom " * 20)
    (junk / "empty").touch()
    first = next((tmp_path / "a" / "b").iterdir())
    (junk / "broken.dcm").write_bytes(first.read_bytes()[:300])  # truncated inside the header
    os.symlink(tmp_path, tmp_path / "a" / "loop")
    start = time.perf_counter()
    with caplog.at_level(logging.WARNING):
        infos = list_series(tmp_path)
    assert time.perf_counter() - start < 5  # about 0.5 s for 10,000 files on the dev machine
    assert [s.n_files for s in infos] == [8]
    assert "broken.dcm: skipped" in caplog.text


def test_nonexistent_and_unsupported_paths(tmp_path):
    with pytest.raises(InputError, match="no such file or folder"):
        read_volume(tmp_path / "nope.nrrd")
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(InputError, match=f"{tmp_path / 'notes.txt'}: neither a readable DICOM"):
        read_volume(tmp_path / "notes.txt")
    with pytest.raises(InputError, match=f"{tmp_path}: no DICOM series found"):
        read_volume(tmp_path)


# --------------------------------------------------------------- image files


def _rotation(axis: int, angle: float) -> np.ndarray:
    c, s = np.cos(angle), np.sin(angle)
    a, b = [n for n in range(3) if n != axis]
    r = np.eye(3)
    r[a, a], r[a, b], r[b, a], r[b, b] = c, -s, s, c
    return r


DIRECTIONS = {
    "flipped": np.diag([-1.0, 1.0, -1.0]),
    "permuted": np.array([[0, 0, 1], [1, 0, 0], [0, 1, 0]], float),
    "oblique": _rotation(0, 0.3) @ _rotation(2, -0.7),
}


def _grid(direction: np.ndarray, array: np.ndarray | None = None) -> Volume:
    array = ramp_hu() if array is None else array
    return Volume(array, (0.75, 0.5, 2.5), (-12.5, 30.25, -200.0), direction)


@pytest.mark.parametrize("suffix", [".nrrd", ".nii", ".nii.gz", ".mha", ".mhd", ".nhdr"])
@pytest.mark.parametrize("name", sorted(DIRECTIONS))
def test_image_file_round_trip_exact(tmp_path, suffix, name):
    reference = _grid(DIRECTIONS[name], ramp_hu()[::-1])  # reversed slice order too
    path = tmp_path / f"ct{suffix}"
    if suffix in (".mhd", ".nhdr"):  # two-file formats: written with SimpleITK directly
        image = sitk.GetImageFromArray(reference.array)
        image.SetSpacing(reference.spacing)
        image.SetOrigin(reference.origin)
        image.SetDirection(reference.direction.ravel().tolist())
        sitk.WriteImage(image, str(path))
    else:
        write_image(reference, path)
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []
    v = read_volume(path)
    tol = 1e-5 if "nii" in suffix else 1e-9  # NIfTI stores geometry as float32
    assert v.array.dtype == np.int16 and np.array_equal(v.array, reference.array)
    assert np.allclose(v.spacing, reference.spacing, atol=tol) and np.allclose(v.origin, reference.origin, atol=tol)
    assert np.allclose(v.direction, reference.direction, atol=tol)
    assert v.metadata["source"] == str(path) and v.metadata["format"] in ("nrrd", "nifti", "metaimage")


def test_label_map_write_and_read(tmp_path):
    grid = _grid(DIRECTIONS["permuted"])
    labels = (np.arange(np.prod(SHAPE)).reshape(SHAPE) % 3).astype(np.uint8)
    write_image((labels, grid), tmp_path / "seg.nrrd")
    back = read_label_map(tmp_path / "seg.nrrd")
    assert back.array.dtype == np.uint8 and np.array_equal(back.array, labels)
    assert np.allclose(back.direction, grid.direction) and back.origin == grid.origin


def _write_array(path: Path, array: np.ndarray) -> Path:
    sitk.WriteImage(sitk.GetImageFromArray(array), str(path))
    return path


def test_float_input_rounded_with_warning(tmp_path, caplog):
    hu = ramp_hu().astype(np.float32)
    hu[0, 8, 8] = 12.4
    hu[1, 8, 8] = 12.6
    path = _write_array(tmp_path / "f.nrrd", hu)
    with caplog.at_level(logging.WARNING):
        v = read_volume(path)
    expected = ramp_hu()
    expected[0, 8, 8], expected[1, 8, 8] = 12, 13
    assert v.array.dtype == np.int16 and np.array_equal(v.array, expected)
    assert "rounded" in caplog.text


def test_out_of_range_integers_clipped_with_warning(tmp_path, caplog):
    hu = ramp_hu().astype(np.int32)
    hu[2, 10, 10] = 40_000
    path = _write_array(tmp_path / "big.mha", hu)
    with caplog.at_level(logging.WARNING):
        v = read_volume(path)
    assert v.array.dtype == np.int16 and v.array[2, 10, 10] == 32767
    assert np.array_equal(np.delete(v.array.ravel(), 2 * 256 + 10 * 16 + 10),
                          np.delete(ramp_hu().ravel(), 2 * 256 + 10 * 16 + 10))
    assert "clipped to the int16 range" in caplog.text


def test_nan_and_inf_refused_with_count(tmp_path):
    hu = ramp_hu().astype(np.float32)
    hu[0, 0, 0], hu[3, 2, 1], hu[4, 4, 4] = np.nan, np.inf, -np.inf
    path = _write_array(tmp_path / "f.nrrd", hu)
    with pytest.raises(InputError, match=f"{path}: 3 voxels are NaN or infinite"):
        read_volume(path)


@pytest.mark.parametrize(
    "array, message",
    [
        (np.zeros((16, 16), np.int16), "a 2D image"),
        (np.full((1, 16, 16), -1000, np.int16), "a single slice"),
        (np.random.default_rng(0).integers(0, 2000, SHAPE).astype(np.uint16), "does not look like CT in HU"),
        (ramp_hu() * 10, "does not look like CT in HU"),
    ],
    ids=["2d", "one-slice", "mr-like", "scaled"],
)
def test_image_refusals(tmp_path, array, message):
    path = _write_array(tmp_path / "x.nrrd", array)
    with pytest.raises(InputError, match=f"{path}: {message}"):
        read_volume(path)


def test_4d_image_refused(tmp_path):
    path = tmp_path / "x4.nrrd"
    header = "NRRD0004\ntype: int16\ndimension: 4\nsizes: 16 16 8 2\nencoding: raw\nendian: little\n\n"
    path.write_bytes(header.encode() + ramp_hu().tobytes() * 2)
    with pytest.raises(InputError, match=f"{path}: a 4D image"):
        read_volume(path)


def test_vector_image_refused(tmp_path):
    path = tmp_path / "rgb.mha"
    sitk.WriteImage(sitk.GetImageFromArray(np.zeros((*SHAPE, 3), np.int16), isVector=True), str(path))
    with pytest.raises(InputError, match=f"{path}: 3 values per voxel"):
        read_volume(path)


def test_gzip_bomb_refused_from_header(tmp_path):
    header = b"NRRD0004\ntype: int16\ndimension: 3\nsizes: 100000 100000 100000\nencoding: gzip\nendian: little\n\n"
    path = tmp_path / "bomb.nrrd"
    path.write_bytes(header + gzip.compress(b"\0" * 4096))
    start = time.perf_counter()
    with pytest.raises(InputError, match=f"{path}: volume of 100000 x 100000 x 100000 = 1000000000000000 voxels"):
        read_volume(path)
    assert time.perf_counter() - start < 1.0


@pytest.mark.parametrize("encoding", ["raw", "gzip"])
def test_header_claiming_more_data_than_file_holds(tmp_path, encoding):
    header = f"NRRD0004\ntype: int16\ndimension: 3\nsizes: 16 16 8\nencoding: {encoding}\nendian: little\n\n"
    body = b"\0" * 100
    path = tmp_path / "short.nrrd"
    path.write_bytes(header.encode() + (gzip.compress(body) if encoding == "gzip" else body))
    with pytest.raises(InputError, match=f"{path}: cannot read the image data"):
        read_volume(path)


def test_mhd_with_short_raw_file(tmp_path):
    path = _write_array(tmp_path / "x.mhd", ramp_hu())
    (tmp_path / "x.raw").write_bytes(b"\0" * 10)
    with pytest.raises(InputError, match=f"{path}: cannot read the image data"):
        read_volume(path)


# ------------------------------------------------------------------ real data


@pytest.mark.skipif(not (DATA / "LIDC-IDRI-0001").is_dir(), reason="shared LIDC-IDRI data not present")
def test_lidc_0001_dicom_matches_simpleitk_and_reference():
    folder = DATA / "LIDC-IDRI-0001"
    v = read_volume(folder)
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(reader.GetGDCMSeriesFileNames(str(folder)))
    image = reader.Execute()
    assert np.array_equal(v.array, sitk.GetArrayViewFromImage(image))
    assert v.shape == (133, 512, 512) and v.spacing == (0.703125, 0.703125, 2.5)
    assert np.allclose(v.origin, (-166.0, -171.7, -340.0), atol=1e-5)
    assert np.allclose(v.origin, image.GetOrigin()) and np.array_equal(v.direction, np.eye(3))
    assert v.metadata["series_uid"] == "1.3.6.1.4.1.14519.5.2.1.6279.6001.179049373636438705059720603192"
    assert v.metadata["patient_id"] == "LIDC-IDRI-0001" and len(set(v.metadata["sop_instance_uids"])) == 133


@pytest.mark.skipif(not (DATA / "scans" / "LIDC-IDRI-0003.nrrd").is_file(), reason="shared LIDC-IDRI data not present")
def test_lidc_0003_nrrd_matches_simpleitk_and_reference():
    path = DATA / "scans" / "LIDC-IDRI-0003.nrrd"
    v = read_volume(path)
    image = sitk.ReadImage(str(path))
    assert np.array_equal(v.array, sitk.GetArrayViewFromImage(image))
    assert v.shape == (140, 512, 512)
    assert np.allclose(v.spacing, (0.820312, 0.820312, 2.5)) and np.allclose(v.origin, (-228.8, -210.0, -379.0))
    assert np.array_equal(v.direction, np.eye(3))
