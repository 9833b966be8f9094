"""glance.export: the reviewed result as DICOM-SEG, end to end on a phantom CT written as DICOM.

The result folder is made by the engine's own post-processing and writer from
maps whose answer is known: probability 255 exactly on the phantom's nodule
voxels, a heatmap peak at each nodule centre. So every nodule is found with
exactly its ground-truth voxels, and the exported SEG can be checked voxel for voxel.
"""

from __future__ import annotations

import csv
import types
from pathlib import Path

import numpy as np
import pytest

from glance.dicomseg import dicom_seg_unavailable
from glance.errors import InputError
from glance.export import export_dicom_seg, labels_on_grid, read_source_ct

MODEL = ("glance-small", "1.2.3")


@pytest.fixture(scope="module")
def reviewed(tmp_path_factory):
    """(DICOM files, result folder, result labels, nodule labels, phantom) for a small phantom."""
    from glance.io import read_volume
    from glance.io.dicom_write import write_dicom_series
    from glance.phantom import NoduleMix, PhantomConfig, make_phantom
    from glance.pipeline import Analysis, SegmentOptions, algorithm_info, analyse_maps, base_report, write_result

    root = tmp_path_factory.mktemp("export")
    cfg = PhantomConfig((96, 96, 32), (2.0, 2.0, 3.0), 3, 3, mix=NoduleMix(diameter_mm=(8.0, 14.0)), vessel_points=200)
    phantom = make_phantom(config=cfg)
    series = write_dicom_series(phantom.ct, root / "ct", "glance-export-test")
    ct = read_volume(root / "ct")  # what "glance segment" would read
    np.testing.assert_array_equal(ct.array, phantom.ct.array)

    prob = np.where(phantom.labels > 0, 255, 0).astype(np.uint8)
    heat = np.zeros(ct.shape, np.uint8)
    for n in phantom.nodules:
        i, j, k = (int(round(v)) for v in n.centre_ijk)
        heat[k, j, i] = 255
    options = SegmentOptions()
    labels, nodules, _ = analyse_maps(ct, prob, heat, options.postprocess)
    card = types.SimpleNamespace(name=MODEL[0], version=MODEL[1], weights_sha256="0" * 64, intended_use="test")
    report = base_report(ct, card, root / "model", options, "cpu")
    result = root / "result"
    result.mkdir()
    write_result(result, Analysis(ct, prob, heat, labels, nodules), algorithm_info(*MODEL, options.postprocess),
                 report, snapshots=False)
    return series.files, result, labels, sorted(n.label for n in nodules), phantom


def _csv_accepted(path: Path) -> dict[int, int]:
    with open(path, newline="") as f:
        return {int(r["label"]): int(r["accepted"]) for r in csv.DictReader(f)}


def test_result_holds_exactly_the_phantom_nodules(reviewed):
    _files, _result, labels, found, phantom = reviewed
    assert len(found) == len(phantom.nodules) == 3
    np.testing.assert_array_equal(labels > 0, phantom.labels > 0)


@pytest.mark.skipif(dicom_seg_unavailable() is not None, reason=str(dicom_seg_unavailable()))
def test_exported_seg_is_the_accepted_nodules_voxel_for_voxel(reviewed, tmp_path):
    import highdicom as hd
    import pydicom

    from glance.dicomseg import read_dicom_seg

    files, result, labels, found, _ = reviewed
    accepted = [found[0], found[2]]  # the reader rejected the middle one
    shuffled = list(reversed(files))  # Slicer's database lists instances in any order

    out = export_dicom_seg(result, shuffled, tmp_path / "seg" / "nodules.dcm", accepted)

    assert out == tmp_path / "seg" / "nodules.dcm" and out.is_file()
    ct, ordered = read_source_ct(files)
    got = read_dicom_seg(out, ct)
    expected = np.zeros_like(labels)
    for number, label in enumerate(accepted, start=1):
        expected[labels == label] = number
    np.testing.assert_array_equal(got, expected)
    assert not np.isin(got[labels == found[1]], [1, 2]).any()  # rejected nodule absent

    seg = hd.seg.segread(out)
    assert [d.SegmentLabel for d in seg.SegmentSequence] == [f"Nodule {a}" for a in accepted]
    algo = seg.SegmentSequence[0].SegmentationAlgorithmIdentificationSequence[0]
    assert (algo.AlgorithmName, algo.AlgorithmVersion) == MODEL
    source_uids = {pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID for f in files}
    referenced = {r.ReferencedSOPInstanceUID
                  for s in seg.ReferencedSeriesSequence for r in s.ReferencedInstanceSequence}
    assert referenced <= source_uids and referenced
    assert ordered == files  # k order recovered from a shuffled list
    assert _csv_accepted(result / "nodules.csv") == {found[0]: 1, found[1]: 0, found[2]: 1}


def test_nothing_accepted_writes_no_file_but_keeps_the_review(reviewed, tmp_path):
    files, result, _labels, found, _ = reviewed
    assert export_dicom_seg(result, files, tmp_path / "none.dcm", []) is None
    assert not (tmp_path / "none.dcm").exists()
    assert _csv_accepted(result / "nodules.csv") == {label: 0 for label in found}


def test_unknown_label_and_partial_series_are_refused(reviewed, tmp_path):
    files, result, _labels, found, _ = reviewed
    with pytest.raises(InputError, match=f"no nodule with label {max(found) + 1}"):
        export_dicom_seg(result, files, tmp_path / "x.dcm", [max(found) + 1])
    with pytest.raises(InputError, match="instances of series"):
        export_dicom_seg(result, files[:-1], tmp_path / "x.dcm", found)
    assert not (tmp_path / "x.dcm").exists()


def test_result_from_another_grid_is_refused(reviewed, tmp_path):
    import json
    import shutil

    files, result, _labels, found, _ = reviewed
    other = tmp_path / "result"
    shutil.copytree(result, other)
    report = json.loads((other / "report.json").read_text())
    report["input"]["origin_lps_mm"][2] += 3.0  # one slice off
    (other / "report.json").write_text(json.dumps(report))
    with pytest.raises(InputError, match="another grid"):
        export_dicom_seg(other, files, tmp_path / "x.dcm", found)


def test_cropped_segmentation_file_is_pasted_back_by_its_origin(reviewed, tmp_path):
    import SimpleITK as sitk

    from glance.io import to_sitk
    from glance.volume import Volume

    files, _result, labels, found, _ = reviewed
    ct, _ = read_source_ct(files)
    k, j, i = (int(v[0]) for v in np.nonzero(labels == found[0]))
    box = (slice(k, k + 3), slice(j - 2, j + 4), slice(i - 2, i + 5))
    crop_origin = ct.ijk_to_lps(np.array([box[2].start, box[1].start, box[0].start], float))
    values = np.where(labels[box] == found[0], 7, 0).astype(np.uint8)  # stored with label value 7
    image = to_sitk(values, Volume(values, ct.spacing, crop_origin, ct.direction))
    image.SetMetaData("Segment0_ID", f"Nodule_{found[0]}")
    image.SetMetaData("Segment0_LabelValue", "7")
    image.SetMetaData("Segment0_Layer", "0")
    path = tmp_path / "cropped.seg.nrrd"
    sitk.WriteImage(image, str(path))

    got = labels_on_grid(path, ct)

    expected = np.zeros_like(labels)
    expected[box] = np.where(labels[box] == found[0], found[0], 0)
    assert got.shape == ct.shape
    np.testing.assert_array_equal(got, expected)


def test_segmentation_that_is_not_a_glance_result_is_refused(tmp_path):
    """Only a GLANCE file maps to nodule labels: one shared layer, segments ``Nodule_<label>``."""
    import nrrd

    from glance.volume import Volume

    ct = Volume(np.zeros((3, 4, 5), np.int16), (1.0, 1.0, 1.0))
    lps = {"space": "left-posterior-superior", "space origin": np.zeros(3)}
    one = np.zeros((5, 4, 3), np.uint8)  # NRRD axis order (i, j, k)
    one[1, 2, 0] = 4
    path = tmp_path / "renamed.seg.nrrd"
    nrrd.write(str(path), one, {**lps, "space directions": np.eye(3), "Segment0_ID": "Nodule_9",
                                "Segment0_LabelValue": "4"})
    expected = np.zeros(ct.shape, np.uint16)
    expected[0, 2, 1] = 9  # the label comes from the ID, not from the label value
    np.testing.assert_array_equal(labels_on_grid(path, ct), expected)

    nrrd.write(str(path), one, {**lps, "space directions": np.eye(3), "Segment0_ID": "Segment_1",
                                "Segment0_LabelValue": "4"})
    with pytest.raises(InputError, match=r"renamed\.seg\.nrrd: segment 'Segment_1' is not a GLANCE nodule"):
        labels_on_grid(path, ct)
    layered = tmp_path / "layered.seg.nrrd"
    nrrd.write(str(layered), np.stack([one, one]), {
        **lps, "space directions": np.vstack([[np.nan] * 3, np.eye(3)]),
        "kinds": ["list", "domain", "domain", "domain"],
        "Segment0_ID": "Nodule_1", "Segment0_Layer": "0", "Segment0_LabelValue": "4",
        "Segment1_ID": "Nodule_2", "Segment1_Layer": "1", "Segment1_LabelValue": "4"})
    with pytest.raises(InputError, match="segments on several layers"):
        labels_on_grid(layered, ct)
    with pytest.raises(InputError, match="missing from the result folder"):
        labels_on_grid(tmp_path / "absent.seg.nrrd", ct)
