"""Training data sets: each format read from small files written here in that exact format,
LIDC-IDRI on the real scans of shared/data, the real crop sets, and patient-level splits."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from glance.errors import InputError
from glance.volume import Volume
from glance_training.datasets import (
    RESERVED_TEST_PATIENTS,
    SplitConfig,
    assign_split,
    check_disjoint,
    lidc_cases,
    lidc_series_patients,
    lndb_cases,
    local_cases,
    luna_cases,
    maxslice_crop_cases,
    nodule_crop_cases,
    split_patients,
    split_source,
    tianchi_cases,
)

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
LIDC_0001 = DATA / "LIDC-IDRI-0001"
SERIES_0001 = "1.3.6.1.4.1.14519.5.2.1.6279.6001.179049373636438705059720603192"


def needs(path: Path):
    return pytest.mark.skipif(not path.exists(), reason=f"{path} not present (shared test data)")


# --- writing small files -----------------------------------------------------------------


def ct_array(shape, blobs=()) -> np.ndarray:
    """Lung-like background (-800 HU) with a soft-tissue border, and 60 HU blobs at given slices."""
    a = np.full(shape, -800, np.int16)
    a[:, :2, :] = 40
    for sl in blobs:
        a[sl] = 60
    return a


def write_image(path: Path, array: np.ndarray, spacing, origin, direction=np.eye(3)) -> None:
    img = sitk.GetImageFromArray(array)
    img.SetSpacing([float(s) for s in spacing])
    img.SetOrigin([float(o) for o in origin])
    img.SetDirection(np.asarray(direction, float).ravel().tolist())
    sitk.WriteImage(img, str(path))


def lps_of(ijk, spacing, origin, direction) -> np.ndarray:
    """By hand: origin + D @ (spacing * ijk)."""
    return np.asarray(origin) + np.asarray(direction) @ (np.asarray(spacing) * np.asarray(ijk, float))


def write_csv(path: Path, header, rows) -> None:
    with open(path, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(header)
        w.writerows(rows)


# --- LUNA16 / Tianchi -----------------------------------------------------------------------

LUNA_HEADER = ["seriesuid", "coordX", "coordY", "coordZ", "diameter_mm"]


def make_luna(root: Path) -> dict:
    """Two .mhd/.raw scans in subset folders; the second has a flipped (non-identity) direction."""
    scans = {
        "1.2.3.100": dict(spacing=(0.7, 0.75, 2.5), origin=(-100.0, -50.0, -300.0), direction=np.eye(3),
                          ijk=(10, 25, 12)),
        "1.2.3.200": dict(spacing=(0.8, 0.8, 2.0), origin=(120.0, 80.0, -200.0),
                          direction=np.diag([-1.0, -1.0, 1.0]), ijk=(30, 8, 5)),
    }
    for n, (uid, s) in enumerate(scans.items()):
        i, j, k = s["ijk"]
        a = ct_array((20, 40, 36), [np.s_[k - 1:k + 2, j - 2:j + 3, i - 2:i + 3]])
        a[k, j, i] = 300  # the exact centre voxel, recognisable after loading
        folder = root / f"subset{n}"
        folder.mkdir(parents=True)
        write_image(folder / f"{uid}.mhd", a, s["spacing"], s["origin"], s["direction"])
        s["lps"] = lps_of(s["ijk"], s["spacing"], s["origin"], s["direction"])
    write_csv(root / "annotations.csv", LUNA_HEADER,
              [[uid, *s["lps"], 6.5] for uid, s in scans.items()])
    excl = scans["1.2.3.100"]["lps"] + np.array([5.0, 5.0, 0.0])
    write_csv(root / "annotations_excluded.csv", LUNA_HEADER, [["1.2.3.100", *excl, -1]])
    return scans


def test_luna16_centres_map_to_the_annotated_voxel(tmp_path):
    scans = make_luna(tmp_path)
    source = luna_cases(tmp_path, patient_ids={"1.2.3.200": "patient-B"})
    assert [c.case_id for c in source] == ["1.2.3.100", "1.2.3.200"]
    assert [c.patient_id for c in source] == ["1.2.3.100", "patient-B"]
    for case in source:
        s = scans[case.case_id]
        loaded = case.load()
        assert loaded.labels is None  # LUNA16 has no nodule masks
        real = [n for n in loaded.nodules if not n.excluded]
        assert len(real) == 1 and real[0].diameter_mm == 6.5
        ijk = loaded.ct.lps_to_ijk(np.array(real[0].centre_lps))
        np.testing.assert_allclose(ijk, s["ijk"], atol=1e-3)
        i, j, k = s["ijk"]
        assert loaded.ct.array[k, j, i] == 300
    excluded = [n for n in source[0].load().nodules if n.excluded]
    assert len(excluded) == 1 and excluded[0].diameter_mm == 0.0  # -1 in the file: size unknown


def test_tianchi_same_layout(tmp_path):
    scans = make_luna(tmp_path)
    (tmp_path / "annotations_excluded.csv").unlink()
    source = tianchi_cases(tmp_path)
    assert source.name == "tianchi" and len(source) == 2
    loaded = source[1].load()
    assert len(loaded.nodules) == 1 and not loaded.nodules[0].excluded
    np.testing.assert_allclose(loaded.ct.lps_to_ijk(np.array(loaded.nodules[0].centre_lps)),
                               scans["1.2.3.200"]["ijk"], atol=1e-3)


def test_luna_csv_without_a_required_column_is_an_input_error(tmp_path):
    make_luna(tmp_path)
    write_csv(tmp_path / "annotations.csv", ["seriesuid", "coordX", "coordY", "coordZ"], [["1.2.3.100", 0, 0, 0]])
    with pytest.raises(InputError, match="diameter_mm"):
        luna_cases(tmp_path)


# --- LNDb ---------------------------------------------------------------------------------

LNDB_HEADER = ["LNDbID", "RadID", "FindingID", "x", "y", "z", "Nodule", "Volume", "Text"]


def test_lndb_merges_readers_and_builds_the_consensus_mask(tmp_path):
    spacing, origin = (1.0, 1.0, 1.5), (10.0, 20.0, 30.0)
    shape = (16, 32, 32)
    write_image(tmp_path / "LNDb-0007.mhd", ct_array(shape), spacing, origin)
    masks_dir = tmp_path / "masks"
    masks_dir.mkdir()
    # Three readers outline one nodule, each a slightly shifted box, each with its own FindingID.
    boxes = {1: (1, np.s_[5:9, 10:16, 10:16]), 2: (2, np.s_[5:9, 11:17, 10:16]), 3: (1, np.s_[6:10, 10:16, 11:17])}
    votes = np.zeros(shape, np.uint8)
    rows = []
    for rad, (fid, box) in boxes.items():
        m = np.zeros(shape, np.uint8)
        m[box] = fid
        votes += m > 0
        write_image(masks_dir / f"LNDb-0007_rad{rad}.mhd", m, spacing, origin)
        kk, jj, ii = np.nonzero(m)
        centre = lps_of((ii.mean(), jj.mean(), kk.mean()), spacing, origin, np.eye(3))
        rows.append([7, rad, fid, *centre, 1, len(kk) * 1.5, "solid"])
    far = lps_of((25, 25, 12), spacing, origin, np.eye(3))
    rows.append([7, 1, 2, *far, 0, 0.0, ""])  # a non-nodule, centre only
    small = lps_of((4, 26, 3), spacing, origin, np.eye(3))
    rows.append([7, 2, 1, *small, 1, 4.0, "solid"])  # nodule < 3 mm (equivalent diameter 1.97 mm)
    write_csv(tmp_path / "trainNodules.csv", LNDB_HEADER, rows)

    source = lndb_cases(tmp_path)
    assert len(source) == 1 and source[0].patient_id == "LNDb-0007"
    loaded = source[0].load()
    nodules = [n for n in loaded.nodules if not n.excluded]
    assert len(nodules) == 1 and nodules[0].label == 1
    expected_centre = np.mean([r[3:6] for r in rows[:3]], axis=0)
    np.testing.assert_allclose(nodules[0].centre_lps, expected_centre, atol=1e-6)
    excluded = [n for n in loaded.nodules if n.excluded]
    assert len(excluded) == 2 and all(n.label == 0 for n in excluded)
    assert sorted(round(n.diameter_mm, 2) for n in excluded) == [0.0, 1.97]
    # 50 % consensus of 3 readers: voxels outlined by at least 2 of them.
    np.testing.assert_array_equal(loaded.labels, (votes >= 2).astype(np.uint16))


# --- local reviewed cases -------------------------------------------------------------------


def test_local_case_with_a_label_map_nrrd(tmp_path):
    spacing, origin = (0.8, 0.8, 2.0), (-40.0, -30.0, -100.0)
    shape = (12, 40, 40)
    labels = np.zeros(shape, np.uint8)
    labels[3:6, 10:15, 10:15] = 1
    labels[8:10, 25:30, 20:24] = 2
    case = tmp_path / "patient-17"
    case.mkdir()
    write_image(case / "ct.nrrd", ct_array(shape, [labels > 0]), spacing, origin)
    write_image(case / "nodules-label.nrrd", labels, spacing, origin)
    source = local_cases(tmp_path)
    assert len(source) == 1 and source[0].patient_id == "patient-17"
    loaded = source[0].load()
    np.testing.assert_array_equal(loaded.labels, labels)
    assert [n.label for n in loaded.nodules] == [1, 2]
    kk, jj, ii = np.nonzero(labels == 2)
    np.testing.assert_allclose(loaded.nodules[1].centre_lps,
                               lps_of((ii.mean(), jj.mean(), kk.mean()), spacing, origin, np.eye(3)), atol=1e-6)
    volume = 40 * 0.8 * 0.8 * 2.0
    assert loaded.nodules[1].diameter_mm == pytest.approx(2 * (3 * volume / (4 * np.pi)) ** (1 / 3))


def test_local_case_with_a_layered_seg_nrrd_in_ras(tmp_path):
    """Slicer's layout written with pynrrd: 4D (layers first), RAS space, segment extent cropped."""
    import nrrd

    from glance.io import read_seg_nrrd

    spacing, origin, shape = (0.8, 0.8, 2.0), (10.0, 20.0, -50.0), (10, 30, 30)
    case = tmp_path / "case-a"
    case.mkdir()
    write_image(case / "ct.nii.gz", ct_array(shape), spacing, origin)
    # Two overlapping segments, so Slicer stores them on two layers, both with label value 1.
    expected = np.zeros(shape, np.uint16)
    expected[2:5, 5:12, 6:14] = 1
    expected[4:7, 9:15, 10:16] = 2  # overwrites the overlap: the later segment wins
    k0, j0, i0 = 2, 5, 6  # the file holds only the block [2:7, 5:15, 6:16]
    block = (slice(2, 7), slice(5, 15), slice(6, 16))
    layers = np.zeros((2, 10, 10, 5), np.uint8)  # (layer, i, j, k): NRRD's fastest axis first
    seg_a = np.zeros(shape, bool)
    seg_a[2:5, 5:12, 6:14] = True
    seg_b = np.zeros(shape, bool)
    seg_b[4:7, 9:15, 10:16] = True
    layers[0] = seg_a[block].transpose(2, 1, 0)
    layers[1] = seg_b[block].transpose(2, 1, 0)
    block_lps = np.array(lps_of((i0, j0, k0), spacing, origin, np.eye(3)))
    header = {
        "space": "right-anterior-superior",
        "kinds": ["list", "domain", "domain", "domain"],
        "space directions": np.array([[np.nan] * 3, [-0.8, 0, 0], [0, -0.8, 0], [0, 0, 2.0]]),
        "space origin": block_lps * np.array([-1, -1, 1]),
        "Segment0_ID": "Segment_1", "Segment0_Name": "Nodule 1", "Segment0_Layer": "0",
        "Segment0_LabelValue": "1", "Segment0_Extent": "0 9 0 9 0 4",
        "Segment1_ID": "Segment_2", "Segment1_Name": "Nodule 2", "Segment1_Layer": "1",
        "Segment1_LabelValue": "1", "Segment1_Extent": "0 9 0 9 0 4",
    }
    nrrd.write(str(case / "nodules.seg.nrrd"), layers, header)
    seg = read_seg_nrrd(case / "nodules.seg.nrrd")
    assert [s.name for s in seg.segments] == ["Nodule 1", "Nodule 2"] and seg.layers.shape == (2, 5, 10, 10)
    np.testing.assert_allclose(seg.origin, block_lps)
    loaded = local_cases(tmp_path)[0].load()
    np.testing.assert_array_equal(loaded.labels, expected)


def test_local_case_with_a_seg_nrrd_written_by_slicer(tmp_path):
    """The file Slicer's own segmentation storage writes (slicer-core, headless)."""
    slicer = pytest.importorskip("slicer")
    import vtk
    from vtk.util import numpy_support

    # LPS direction diag(-1, -1, 1) is RAS identity: the vtkOrientedImageData needs no direction.
    spacing, origin_lps, shape = (0.8, 0.8, 2.0), (5.0, 6.0, -7.0), (8, 12, 10)
    direction = np.diag([-1.0, -1.0, 1.0])
    labels = np.zeros(shape, np.uint8)
    labels[2:5, 3:6, 4:7] = 1
    labels[5:7, 8:10, 1:3] = 2
    case = tmp_path / "reviewed"
    case.mkdir()
    write_image(case / "ct.nrrd", ct_array(shape), spacing, origin_lps, direction)

    scene = slicer.vtkMRMLScene()
    logic = slicer.vtkSlicerSegmentationsModuleLogic()
    logic.SetMRMLScene(scene)  # registers the binary-labelmap representation
    node = slicer.vtkMRMLSegmentationNode()
    scene.AddNode(node)
    node.SetSourceRepresentationToBinaryLabelmap()
    for value in (1, 2):
        image = slicer.vtkOrientedImageData()
        image.SetDimensions(shape[2], shape[1], shape[0])
        image.SetSpacing(*spacing)
        image.SetOrigin(-origin_lps[0], -origin_lps[1], origin_lps[2])
        image.AllocateScalars(vtk.VTK_UNSIGNED_CHAR, 1)
        numpy_support.vtk_to_numpy(image.GetPointData().GetScalars())[:] = (labels == value).ravel()
        sid = node.GetSegmentation().AddEmptySegment(f"Nodule {value}")
        assert slicer.vtkSlicerSegmentationsModuleLogic.SetBinaryLabelmapToSegment(image, node, sid)
    storage = node.CreateDefaultStorageNode()
    storage.SetFileName(str(case / "nodules.seg.nrrd"))
    assert storage.WriteData(node)

    loaded = local_cases(tmp_path)[0].load()
    np.testing.assert_array_equal(loaded.labels, labels)


def test_local_case_with_a_dicom_seg_beside_its_dicom_series(tmp_path):
    import highdicom as hd
    import pydicom
    from pydicom.sr.codedict import codes

    from glance.io.dicom_write import write_dicom_series

    spacing, origin, shape = (0.8, 0.8, 2.0), (-20.0, -20.0, -40.0), (6, 24, 24)
    labels = np.zeros(shape, np.uint16)
    labels[1:3, 4:9, 5:10] = 1
    labels[3:5, 14:20, 12:18] = 2
    case = tmp_path / "pacs-case"
    write_dicom_series(Volume(ct_array(shape, [labels > 0]), spacing, origin), case / "ct", "test-seed")
    sources = [pydicom.dcmread(p) for p in sorted((case / "ct").glob("*.dcm"))]
    sources.sort(key=lambda ds: float(ds.ImagePositionPatient[2]))
    descriptions = [
        hd.seg.SegmentDescription(
            segment_number=n, segment_label=f"Nodule {n}",
            segmented_property_category=codes.SCT.MorphologicallyAbnormalStructure,
            segmented_property_type=codes.SCT.Nodule, algorithm_type=hd.seg.SegmentAlgorithmTypeValues.MANUAL)
        for n in (1, 2)
    ]
    seg = hd.seg.Segmentation(
        source_images=sources, pixel_array=labels, segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=descriptions, series_instance_uid=hd.UID(), series_number=900,
        sop_instance_uid=hd.UID(), instance_number=1, manufacturer="test", manufacturer_model_name="test",
        software_versions="0", device_serial_number="0")
    seg.save_as(case / "nodules.seg.dcm")
    loaded = local_cases(tmp_path)[0].load()
    np.testing.assert_array_equal(loaded.labels, labels)
    assert [n.label for n in loaded.nodules] == [1, 2]


def test_local_cases_folder_without_segmentations_is_an_input_error(tmp_path):
    (tmp_path / "case").mkdir()
    write_image(tmp_path / "case" / "ct.nrrd", ct_array((4, 8, 8)), (1, 1, 1), (0, 0, 0))
    with pytest.raises(InputError, match="no case folder"):
        local_cases(tmp_path)


# --- LIDC-IDRI on the real scans ----------------------------------------------------------


@needs(LIDC_0001)
def test_lidc_0001_consensus_nodule_matches_the_reference():
    source = lidc_cases(LIDC_0001)
    assert len(source) == 1 and source[0].patient_id == "LIDC-IDRI-0001"
    loaded = source[0].load()
    assert loaded.ct.shape == (133, 512, 512)
    assert len(loaded.nodules) == 1
    nodule = loaded.nodules[0]
    kk, jj, ii = np.nonzero(loaded.labels == nodule.label)
    # Reference (row, col, slice) = (366.99, 316.31, 89.62), 5428 voxels, mean reader diameter 32.76 mm.
    np.testing.assert_allclose([jj.mean(), ii.mean(), kk.mean()], [366.99, 316.31, 89.62], atol=1.0)
    assert abs(len(kk) - 5428) <= 0.02 * 5428
    assert nodule.diameter_mm == pytest.approx(32.76, abs=0.05)
    np.testing.assert_allclose(nodule.centre_lps, (56.40, 86.34, -115.96), atol=0.75)


@needs(DATA / "scans" / "LIDC-IDRI-0003.nrrd")
def test_lidc_0003_from_nrrd_and_xml_matches_the_reference_label_map():
    source = lidc_cases(DATA / "scans")
    assert [c.patient_id for c in source] == ["LIDC-IDRI-0003"]
    loaded = source[0].load()
    reference = sitk.GetArrayFromImage(sitk.ReadImage(str(DATA / "scans" / "LIDC-IDRI-0003_consensus50-label.nrrd")))
    assert len(loaded.nodules) == 4
    for value, voxels in zip((1, 2, 3, 4), (2542, 3241, 261, 704)):
        overlap = np.count_nonzero((loaded.labels == value) & (reference == value))
        assert np.count_nonzero(reference == value) == voxels
        assert overlap >= 0.97 * voxels


# --- the real crop sets -----------------------------------------------------------------------


@needs(DATA / "lidc-nodule-crops")
def test_nodule_crops_load_with_their_scan_geometry():
    source = nodule_crop_cases(DATA / "lidc-nodule-crops")
    assert source.patient_ids == ["LIDC-IDRI-0001"] + ["LIDC-IDRI-0003"] * 4
    loaded = source[0].load()
    assert loaded.ct.shape == (64, 64, 64) and loaded.ct.array.dtype == np.int16
    assert loaded.ct.spacing == (0.703125, 0.703125, 2.5)
    assert int(loaded.labels.sum()) == 5428  # the whole consensus mask lies in the crop
    # Centred on the mask, the finding sits where the full scan's nodule is (reference LPS).
    np.testing.assert_allclose(loaded.nodules[0].centre_lps, (56.40, 86.34, -115.96), atol=0.05)
    assert loaded.nodules[0].diameter_mm == 32.76


@needs(DATA / "lidc-maxslice-crops")
def test_maxslice_crops_are_one_slice_cases_with_patient_ids():
    source = maxslice_crop_cases(DATA / "lidc-maxslice-crops")
    assert len(source) == 2287 and len(set(source.patient_ids)) == 740
    with open(DATA / "lidc-maxslice-crops" / "index.csv", newline="") as fh:
        index = list(csv.DictReader(fh))
    for n in (0, 1, 1000, 2286):
        assert source[n].patient_id == index[n]["patient_id"]
        loaded = source[n].load()
        assert loaded.ct.shape == (1, 71, 71) and loaded.labels.shape == (1, 71, 71)
        assert int(loaded.labels.sum()) == int(index[n]["mask_area_px"])
        assert loaded.ct.spacing[0] == pytest.approx(float(index[n]["spacing_mm"]))
        area, spacing = int(index[n]["mask_area_px"]), float(index[n]["spacing_mm"])
        assert loaded.nodules[0].diameter_mm == pytest.approx(2 * np.sqrt(area / np.pi) * spacing, rel=1e-5)
        # The index's diameter comes from the source's own area feature, within 1 % of the mask's.
        assert loaded.nodules[0].diameter_mm == pytest.approx(float(index[n]["equiv_diam_mm"]), rel=0.01)
    assert set(RESERVED_TEST_PATIENTS) <= set(source.patient_ids)


def _write_maxslice(folder: Path, masks: list[np.ndarray]) -> Path:
    """A max-slice crop file in the shared set's layout, with the given 71 x 71 masks."""
    from glance_training.datasets.crops import MAXSLICE_FILE

    n = len(masks)
    np.savez(folder / MAXSLICE_FILE, image_hu=np.full((n, 71, 71), -800, np.int16),
             mask=np.stack(masks).astype(np.uint8), spacing_mm=np.full(n, 0.7, np.float32),
             patient_id=np.array([f"LIDC-IDRI-{k:04d}" for k in range(n)]), reading_id=np.arange(n))
    return folder


def test_interior_outline_drops_the_drawn_contour_pixels_and_keeps_the_split(tmp_path):
    square = np.zeros((71, 71), np.uint8)
    square[30:37, 20:27] = 1  # 7 x 7 drawn: 24 contour pixels around a 5 x 5 interior
    line = np.zeros((71, 71), np.uint8)
    line[10, 10:16] = 1  # one pixel wide: no interior, kept as drawn
    folder = _write_maxslice(tmp_path, [square, line])
    drawn = maxslice_crop_cases(folder)
    interior = maxslice_crop_cases(folder, outline="interior")
    expected = np.zeros((1, 71, 71), np.uint16)
    expected[0, 31:36, 21:26] = 1
    np.testing.assert_array_equal(interior[0].load().labels, expected)
    assert int(drawn[0].load().labels.sum()) == 49
    np.testing.assert_array_equal(interior[1].load().labels[0], line)
    # The finding's diameter follows the reference: the equivalent circle of 25 pixels.
    assert interior[0].load().nodules[0].diameter_mm == pytest.approx(2 * np.sqrt(25 / np.pi) * 0.7, rel=1e-5)
    assert interior.patient_ids == drawn.patient_ids and [c.case_id for c in interior] == [c.case_id for c in drawn]
    with pytest.raises(InputError, match="outline='inner'"):
        maxslice_crop_cases(folder, outline="inner")
    # Through a --data spec: a choice option is not taken for a file name.
    from glance_training.data import DataSpec, load_source

    spec = load_source(DataSpec.parse(f"maxslice:{folder},outline=interior"), seed=0)
    np.testing.assert_array_equal(spec[0].load().labels, expected)


def test_case_weights_divide_a_sources_share_among_its_cases(tmp_path):
    from glance.errors import GlanceError
    from glance_training.data import DataSpec, load_source
    from glance_training.datasets import SliceDataset, SliceSamplingConfig

    masks = []
    for n in range(3):
        m = np.zeros((71, 71), np.uint8)
        m[30:37, 20 + n : 27 + n] = 1
        masks.append(m)
    folder = _write_maxslice(tmp_path, masks)
    ids = [c.case_id for c in maxslice_crop_cases(folder)]
    weights = tmp_path / "weights.csv"
    weights.write_text(f"case_id,weight\n{ids[0]},4\n{ids[1]},0.5\n")  # the third is unlisted: 1
    crops = load_source(DataSpec.parse(f"maxslice:{folder},outline=interior,case_weights={weights}"), seed=0)
    assert [c.sampling_weight for c in crops] == [4.0, 0.5, 1.0]
    np.testing.assert_array_equal(crops[0].load().labels.sum(), 25)  # the other options still apply
    plain = maxslice_crop_cases(folder)
    # Source shares 2 : 1; within the weighted source 4 : 0.5 : 1 of its 2/3.
    data = SliceDataset([crops, plain], SliceSamplingConfig(), [2.0, 1.0])
    np.testing.assert_allclose(data._p_case, [2 / 3 * 4 / 5.5, 2 / 3 * 0.5 / 5.5, 2 / 3 * 1 / 5.5, 1 / 9, 1 / 9, 1 / 9])
    np.testing.assert_allclose(SliceDataset(crops, SliceSamplingConfig())._p_case, [4 / 5.5, 0.5 / 5.5, 1 / 5.5])

    for text, message in (("case_id,weight\nnobody,2\n", "1 case\\(s\\) not in this source, e.g. 'nobody'"),
                          (f"case_id,weight\n{ids[0]},0\n", "line 2: weight 0 must be positive"),
                          (f"case,weight\n{ids[0]},2\n", "line 2: expected columns case_id,weight"),
                          (f"case_id,weight\n{ids[0]},heavy\n", "line 2: expected columns case_id,weight")):
        weights.write_text(text)
        with pytest.raises(GlanceError, match=message):
            load_source(DataSpec.parse(f"maxslice:{folder},case_weights={weights}"), seed=0)
    with pytest.raises(GlanceError, match="case_weights=.*: no such file"):
        load_source(DataSpec.parse(f"maxslice:{folder},case_weights={tmp_path / 'none.csv'}"), seed=0)


def test_nodule_weights_weigh_a_cases_nodules_and_the_case_by_their_mean(tmp_path):
    from glance.errors import GlanceError
    from glance_training.data import DataSpec, load_source

    masks = [np.pad(np.ones((7, 7), np.uint8), 32) for _ in range(3)]
    folder = _write_maxslice(tmp_path, masks)
    ids = [c.case_id for c in maxslice_crop_cases(folder)]
    weights = tmp_path / "nodules.csv"
    # Case 0: one nodule at 3; case 1: nodules 1 and 2 at 3 and 1 (mean 2); case 2 unlisted.
    weights.write_text(f"case_id,label,weight\n{ids[0]},1,3\n{ids[1]},1,3\n{ids[1]},2,1\n")
    crops = load_source(DataSpec.parse(f"maxslice:{folder},case_weights={weights}"), seed=0)
    assert [c.sampling_weight for c in crops] == [3.0, 2.0, 1.0]
    assert [c.nodule_weights for c in crops] == [{1: 3.0}, {1: 3.0, 2: 1.0}, {}]
    for text, message in (("case_id,label,weight\nnobody,1,2\n", "1 case\\(s\\) not in this source"),
                          (f"case_id,label,weight\n{ids[0]},0,2\n", "line 2: label 0 must be a nodule's"),
                          (f"case_id,label,weight\n{ids[0]},first,2\n",
                           "line 2: expected columns case_id,label,weight with a nodule label"),
                          (f"case_id,label,weight\n{ids[0]},1,-1\n", "line 2: weight -1 must be positive")):
        weights.write_text(text)
        with pytest.raises(GlanceError, match=message):
            load_source(DataSpec.parse(f"maxslice:{folder},case_weights={weights}"), seed=0)


def test_hard_case_weights_from_an_evaluation_csv(tmp_path):
    import importlib.util

    path = Path(__file__).resolve().parents[1] / "bench" / "hard_case_weights.py"
    spec = importlib.util.spec_from_file_location("hard_case_weights", path)
    hard = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(hard)
    nodules = tmp_path / "nodules.csv"
    nodules.write_text("case,source,gt_label,diameter_mm,kind,pred_label,dice,iou,sensitivity,hd95\n"
                       "A,phantom,1,5,solid,1,0.9,0.8,1,1\n"
                       "A,phantom,2,6,solid,0,0.0,0.0,0,inf\n"
                       "B,phantom,1,7,solid,2,0.5,0.3,0.6,2\n"
                       "C,phantom,1,7,solid,0,nan,nan,nan,nan\n")
    assert hard.case_weights(nodules, 0.25) == pytest.approx({"A": 1.25, "B": 0.75, "C": 1.25})
    assert hard.nodule_weights(nodules, 0.5) == pytest.approx({("A", 1): 0.6, ("A", 2): 1.5, ("B", 1): 1.0,
                                                              ("C", 1): 1.5})


# --- patient-level splits -----------------------------------------------------------------------


def test_split_is_a_stable_function_of_seed_and_patient():
    ids = [f"P{n:04d}" for n in range(2000)]
    a = split_patients(ids, SplitConfig(seed=3))
    assert split_patients(list(reversed(ids)) + ids[:10], SplitConfig(seed=3)) == a  # order and repeats do not matter
    assert split_patients(ids, SplitConfig(seed=4)) != a
    check_disjoint(a)
    assert sorted(a["train"] + a["val"] + a["test"]) == ids
    for name, share in zip(("train", "val", "test"), (0.8, 0.1, 0.1)):
        assert abs(len(a[name]) / 2000 - share) < 0.03
    assert split_patients(ids, SplitConfig(fractions=(0.5, 0.5, 0.0)))["test"] == []
    with pytest.raises(ValueError):
        SplitConfig(fractions=(0.5, 0.2, 0.2))


def test_check_disjoint_catches_a_patient_in_two_splits():
    with pytest.raises(ValueError, match="P1"):
        check_disjoint({"train": ["P0", "P1"], "val": ["P1"]})


@needs(DATA / "lidc-maxslice-crops")
def test_crop_splits_are_disjoint_and_reserved_patients_never_train():
    config = SplitConfig(seed=0, held_out=RESERVED_TEST_PATIENTS + ("LIDC-IDRI-0005",))
    crops = split_source(maxslice_crop_cases(DATA / "lidc-maxslice-crops"), config)
    nodules = split_source(nodule_crop_cases(DATA / "lidc-nodule-crops"), config)
    check_disjoint(crops)
    check_disjoint({s: list(crops[s]) + list(nodules[s]) for s in crops})  # across sets too
    train = set(crops["train"].patient_ids) | set(nodules["train"].patient_ids)
    assert not train & set(config.held_out)
    for pid in config.held_out:
        assert assign_split(pid, config) == "test"
    assert {"LIDC-IDRI-0001", "LIDC-IDRI-0003", "LIDC-IDRI-0005"} <= set(crops["test"].patient_ids)
    assert len(nodules["test"]) == 5  # all five 3D crops come from the reserved scans
    assert sum(len(crops[s]) for s in crops) == 2287
    # Every reader's crop of a patient lands in that patient's one split.
    assert len(crops["train"]) > 1500


@needs(DATA / "lidc-maxslice-crops")
def test_luna_series_map_to_lidc_patients_and_follow_the_held_out_rule(tmp_path):
    mapping = lidc_series_patients(DATA / "lidc-maxslice-crops")
    assert mapping[SERIES_0001] == "LIDC-IDRI-0001"
    folder = tmp_path / "subset0"
    folder.mkdir()
    write_image(folder / f"{SERIES_0001}.mhd", ct_array((4, 8, 8)), (1, 1, 1), (0, 0, 0))
    write_csv(tmp_path / "annotations.csv", LUNA_HEADER, [[SERIES_0001, 1, 1, 1, 5]])
    source = luna_cases(tmp_path, patient_ids=mapping)
    assert source[0].patient_id == "LIDC-IDRI-0001"
    assert len(split_source(source)["test"]) == 1


# --- synthetic: phantoms on the fly, nodules inserted into a background ------------------------


def small_phantoms(n: int, seed: int):
    from glance.phantom import PhantomConfig

    from glance_training.datasets import phantom_cases

    return phantom_cases(n, seed=seed, config=PhantomConfig((96, 96, 24), (2.0, 2.0, 4.0), n_nodules=1))


def test_phantom_cases_are_generated_on_load_and_reproducible():
    source = small_phantoms(2, seed=5)
    assert len(source) == 2 and len(set(source.patient_ids)) == 2
    a, b = source[0].load(), source[0].load()
    np.testing.assert_array_equal(a.ct.array, b.ct.array)
    np.testing.assert_array_equal(a.labels, b.labels)
    assert [n.label for n in a.nodules] == sorted(set(np.unique(a.labels)) - {0})
    for n in a.nodules:  # each finding sits on its own label (centre within a voxel of its centroid)
        kk, jj, ii = np.nonzero(a.labels == n.label)
        centroid = a.ct.ijk_to_lps(np.array([ii.mean(), jj.mean(), kk.mean()]))
        assert np.all(np.abs(centroid - n.centre_lps) <= np.array(a.ct.spacing))


def test_inserted_cases_keep_the_background_patient_and_its_nodules():
    from glance.phantom.insert import InsertConfig

    from glance_training.datasets import inserted_cases

    background = small_phantoms(1, seed=5)
    bg = background[0].load()
    source = inserted_cases(background, InsertConfig(n_nodules=1, source="synthetic"), seed=1)
    assert source[0].patient_id == background[0].patient_id
    loaded = source[0].load()
    assert len(loaded.nodules) == len(bg.nodules) + 1
    new = loaded.nodules[-1].label
    assert new == int(bg.labels.max()) + 1
    np.testing.assert_array_equal(loaded.labels[bg.labels > 0], bg.labels[bg.labels > 0])
    assert np.count_nonzero(loaded.labels == new) > 0
    # Only the new nodule's neighbourhood of the scan changed.
    from scipy import ndimage

    near = ndimage.binary_dilation(loaded.labels == new, iterations=3)
    changed = loaded.ct.array != bg.ct.array
    assert changed.any() and not (changed & ~near).any()


@needs(DATA / "lidc-nodule-crops")
def test_real_crops_of_held_out_patients_are_never_inserted():
    from glance.phantom.insert import InsertConfig

    from glance_training.datasets import inserted_cases

    with pytest.raises(InputError, match="held-out"):
        inserted_cases(small_phantoms(1, seed=5), InsertConfig(n_nodules=1, source="real"),
                       crops_path=DATA / "lidc-nodule-crops" / "lidc_nodule_crops_64.npz")
