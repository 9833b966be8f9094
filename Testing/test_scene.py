"""glance.scene: MRML nodes through slicer-core (headless), Slicer files, the LPS/RAS boundary."""

from __future__ import annotations

import json
from types import SimpleNamespace

import numpy as np
import pytest

from glance import scene as S
from glance.errors import InputError
from glance.nodule import Nodule
from glance.report import AlgorithmInfo, nodule_colour, write_csv
from glance.volume import Volume

slicer = pytest.importorskip("slicer")
vtk = pytest.importorskip("vtk")
from vtk.util import numpy_support  # noqa: E402

ALGORITHM = AlgorithmInfo(name="glance-small", version="1.2.0", thresholds={"probability": 0.5})


def _rotation(axis: np.ndarray, degrees: float) -> np.ndarray:
    """Rodrigues rotation matrix (a proper, non-axis-aligned direction matrix)."""
    a = np.asarray(axis, float) / np.linalg.norm(axis)
    t = np.radians(degrees)
    k = np.array([[0, -a[2], a[1]], [a[2], 0, -a[0]], [-a[1], a[0], 0]])
    return np.eye(3) + np.sin(t) * k + (1 - np.cos(t)) * k @ k


DIRECTIONS = {
    "flip_i_k": np.diag([-1.0, 1.0, -1.0]),
    "oblique": _rotation([0.2, 0.3, 1.0], 25.0),
}


def _case(direction: np.ndarray):
    """A 9x12x10 (k, j, i) CT with three blobs of known voxels; nodules at the blob centroids."""
    rng = np.random.default_rng(0)
    ct = Volume(
        rng.integers(-1000, 200, size=(9, 12, 10)).astype(np.int16),
        spacing=(0.7, 0.8, 2.5),
        origin=(12.5, -30.25, 101.0),
        direction=direction,
    )
    labels = np.zeros(ct.shape, np.uint16)
    labels[1:4, 2:5, 1:4] = 1  # 27 voxels
    labels[6, 8:10, 5:9] = 2  # 8 voxels, one slice
    labels[7:9, 1, 8] = 3  # 2 voxels
    nodules = []
    for label, (conf, kind) in enumerate([(0.93, "solid"), (0.71, "part-solid"), (0.52, "ground-glass")], 1):
        kji = np.argwhere(labels == label).mean(axis=0)
        ijk = tuple(float(v) for v in kji[::-1])
        nodules.append(
            Nodule(
                label=label,
                centre_lps=tuple(float(v) for v in ct.ijk_to_lps(ijk)),
                centre_ijk=ijk,
                long_axis_mm=10.0 - label,
                short_axis_mm=5.5 - label,
                volume_mm3=float((labels == label).sum() * 0.7 * 0.8 * 2.5),
                mean_hu=-100.0 * label,
                median_hu=-90.0 * label,
                nodule_type=kind,
                confidence=conf,
            )
        )
    return ct, labels, nodules


@pytest.fixture(params=sorted(DIRECTIONS))
def case(request):
    return _case(DIRECTIONS[request.param])


def _export_labelmap(nodes: S.SceneNodes) -> tuple[np.ndarray, np.ndarray]:
    """The segmentation exported to a labelmap on its reference geometry: (array (k, j, i), IJKToRAS)."""
    seg = nodes.segmentation_node
    ids = vtk.vtkStringArray()
    seg.GetSegmentation().GetSegmentIDs(ids)
    labelmap = nodes.scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode")
    ok = slicer.vtkSlicerSegmentationsModuleLogic.ExportSegmentsToLabelmapNode(
        seg, ids, labelmap, None, slicer.vtkSegmentation.EXTENT_REFERENCE_GEOMETRY
    )
    assert ok
    matrix = vtk.vtkMatrix4x4()
    labelmap.GetIJKToRASMatrix(matrix)
    return slicer.util.arrayFromVolume(labelmap).copy(), S.numpy_matrix(matrix)


def _control_points_ras(markups) -> np.ndarray:
    out = []
    for n in range(markups.GetNumberOfControlPoints()):
        p = [0.0, 0.0, 0.0]
        markups.GetNthControlPointPosition(n, p)
        out.append(p)
    return np.array(out)


def _table_column(table_node, name: str) -> list:
    column = table_node.GetTable().GetColumnByName(name)
    return [column.GetValue(r) for r in range(column.GetNumberOfTuples())]


def test_lps_ras_conversion_negates_first_two_axes():
    points = np.array([[1.0, -2.0, 3.0], [-4.5, 0.0, -6.0]])
    np.testing.assert_array_equal(S.lps_to_ras(points), [[-1.0, 2.0, 3.0], [4.5, -0.0, -6.0]])
    np.testing.assert_array_equal(S.ras_to_lps(S.lps_to_ras(points)), points)
    ct = Volume(np.zeros((2, 2, 2), np.int16), (0.5, 0.6, 2.0), (10.0, 20.0, 30.0), np.diag([-1.0, 1.0, -1.0]))
    expected = np.array(
        [[0.5, 0.0, 0.0, -10.0], [0.0, -0.6, 0.0, -20.0], [0.0, 0.0, -2.0, 30.0], [0.0, 0.0, 0.0, 1.0]]
    )
    np.testing.assert_allclose(S.ijk_to_ras_matrix(ct), expected)


def test_segments_names_order_terminology_and_tags(case):
    ct, labels, nodules = case
    nodes = S.build_scene(ct, labels, list(reversed(nodules)), ALGORITHM)
    segmentation = nodes.segmentation_node.GetSegmentation()
    assert segmentation.GetNumberOfSegments() == 3
    for n, nodule in enumerate(nodules):
        assert segmentation.GetNthSegmentID(n) == f"Nodule_{nodule.label}"
        segment = segmentation.GetNthSegment(n)
        assert segment.GetName() == f"Nodule {nodule.label}"
        assert segment.GetLabelValue() == nodule.label
        assert segment.GetTerminology() == (
            "Segmentation category and type - DICOM master list~SCT^49755003^Morphologically Altered Structure"
            "~SCT^27925004^Nodule~^^~Anatomic codes - DICOM master list~SCT^39607008^Lung~^^"
        )
        value = vtk.reference("")
        assert segment.GetTag("DICOM.SegmentAlgorithmType", value) and str(value) == "AUTOMATIC"
        assert segment.GetTag("DICOM.SegmentAlgorithmName", value) and str(value) == "glance-small"
        np.testing.assert_allclose(segment.GetColor(), np.array(nodule_colour(nodule.label)) / 255.0)


def test_segmentation_exports_back_to_the_input_labels(case):
    ct, labels, nodules = case
    nodes = S.build_scene(ct, labels, nodules, ALGORITHM)
    exported, ijk_to_ras = _export_labelmap(nodes)
    np.testing.assert_array_equal(exported, labels)
    np.testing.assert_allclose(ijk_to_ras, S.ijk_to_ras_matrix(ct), atol=1e-9)


def test_closed_surface_can_be_created(case):
    ct, labels, nodules = case
    nodes = S.build_scene(ct, labels, nodules, ALGORITHM)
    assert nodes.segmentation_node.CreateClosedSurfaceRepresentation()
    surface = vtk.vtkPolyData()
    assert nodes.segmentation_node.GetClosedSurfaceRepresentation("Nodule_1", surface)
    assert surface.GetNumberOfPoints() > 0
    # The 3x3x3 blob's surface lies around its centre (RAS), within the blob's half-diagonal.
    points = numpy_support.vtk_to_numpy(surface.GetPoints().GetData())
    centre_ras = S.lps_to_ras(nodules[0].centre_lps)
    assert np.linalg.norm(points.mean(axis=0) - centre_ras) < 1.0


def test_control_points_are_ras_of_the_lps_centres(case):
    ct, labels, nodules = case
    nodes = S.build_scene(ct, labels, nodules, ALGORITHM)
    markups = nodes.markups_node
    expected = np.array([[-n.centre_lps[0], -n.centre_lps[1], n.centre_lps[2]] for n in nodules])
    np.testing.assert_allclose(_control_points_ras(markups), expected, atol=1e-9)
    assert markups.GetNthControlPointLabel(0) == "Nodule 1: 9.0 x 4.5 mm, 93%"
    assert markups.GetNthControlPointDescription(1) == "part-solid, 11 mm3, mean -200 HU"
    assert markups.GetNthControlPointLocked(2)


def test_table_rows(case):
    ct, labels, nodules = case
    nodes = S.build_scene(ct, labels, nodules, ALGORITHM)
    table = nodes.table_node
    assert table.GetNumberOfRows() == 3
    assert _table_column(table, "name") == ["Nodule 1", "Nodule 2", "Nodule 3"]
    assert _table_column(table, "type") == ["solid", "part-solid", "ground-glass"]
    assert _table_column(table, "accepted") == [1, 1, 1]
    for axis, key in enumerate(("centre_lps_L_mm", "centre_lps_P_mm", "centre_lps_S_mm")):
        np.testing.assert_allclose(_table_column(table, key), [round(n.centre_lps[axis], 2) for n in nodules])
    assert _table_column(table, "volume_mm3") == [37.8, 11.2, 2.8]
    assert _table_column(table, "confidence") == [0.93, 0.71, 0.52]
    assert table.GetColumnUnitLabel("long_axis_mm") == "mm"


def test_volume_node_is_created_on_the_ct_grid(case):
    ct, labels, nodules = case
    nodes = S.build_scene(ct, labels, nodules, ALGORITHM, create_volume_node=True)
    np.testing.assert_array_equal(slicer.util.arrayFromVolume(nodes.volume_node), ct.array)
    matrix = vtk.vtkMatrix4x4()
    nodes.volume_node.GetIJKToRASMatrix(matrix)
    np.testing.assert_allclose(S.numpy_matrix(matrix), S.ijk_to_ras_matrix(ct), atol=1e-9)
    # The volume node becomes the segmentation's reference geometry.
    exported, _ = _export_labelmap(nodes)
    np.testing.assert_array_equal(exported, labels)


def test_saved_files_are_lps_on_the_ct_grid(case, tmp_path):
    import nrrd

    ct, labels, nodules = case
    nodes = S.build_scene(ct, labels, nodules, ALGORITHM)
    paths = S.save_scene_files(nodes, tmp_path)
    assert paths == {"segmentation": tmp_path / "nodules.seg.nrrd", "markups": tmp_path / "nodules.mrk.json"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["nodules.mrk.json", "nodules.seg.nrrd"]

    markup = json.loads(paths["markups"].read_text())["markups"][0]
    assert markup["coordinateSystem"] == "LPS"
    positions = np.array([p["position"] for p in markup["controlPoints"]])
    np.testing.assert_allclose(positions, [n.centre_lps for n in nodules], atol=1e-6)

    data, header = nrrd.read(str(paths["segmentation"]))  # pynrrd: axes (i, j, k)
    assert header["space"] == "left-posterior-superior"
    np.testing.assert_array_equal(data.transpose(2, 1, 0), labels)
    np.testing.assert_allclose(header["space directions"], (ct.direction @ np.diag(ct.spacing)).T, atol=1e-9)
    np.testing.assert_allclose(header["space origin"], ct.origin, atol=1e-9)
    assert [header[f"Segment{n}_Name"] for n in range(3)] == ["Nodule 1", "Nodule 2", "Nodule 3"]
    assert "SCT^27925004^Nodule" in header["Segment0_Tags"]


def test_load_result_round_trip_with_rejected_nodule(case, tmp_path):
    ct, labels, nodules = case
    S.save_scene_files(S.build_scene(ct, labels, nodules, ALGORITHM), tmp_path)
    write_csv(nodules, tmp_path / "nodules.csv", accepted=[1, 3])

    loaded = S.load_result(tmp_path)
    segmentation = loaded.segmentation_node.GetSegmentation()
    assert [segmentation.GetNthSegment(n).GetName() for n in range(3)] == ["Nodule 1", "Nodule 2", "Nodule 3"]
    exported, ijk_to_ras = _export_labelmap(loaded)
    np.testing.assert_array_equal(exported, labels)
    np.testing.assert_allclose(ijk_to_ras, S.ijk_to_ras_matrix(ct), atol=1e-6)
    expected_ras = [S.lps_to_ras(n.centre_lps) for n in nodules]
    np.testing.assert_allclose(_control_points_ras(loaded.markups_node), expected_ras, atol=1e-6)
    assert _table_column(loaded.table_node, "label") == [1, 2, 3]
    assert _table_column(loaded.table_node, "volume_mm3") == [37.8, 11.2, 2.8]
    assert S.accepted_labels(loaded) == [1, 3]
    display = loaded.segmentation_node.GetDisplayNode()
    assert [display.GetSegmentVisibility(f"Nodule_{n}") for n in (1, 2, 3)] == [True, False, True]
    assert [loaded.markups_node.GetNthControlPointVisibility(n) for n in range(3)] == [True, False, True]


def test_load_result_reports_missing_files(tmp_path):
    with pytest.raises(InputError, match="nodules.csv: missing"):
        S.load_result(tmp_path)
    write_csv([], tmp_path / "nodules.csv")
    with pytest.raises(InputError, match="nodules.seg.nrrd: missing"):
        S.load_result(tmp_path)


def test_accept_and_reject(case):
    ct, labels, nodules = case
    nodes = S.build_scene(ct, labels, nodules, ALGORITHM)
    assert S.accepted_labels(nodes) == [1, 2, 3]
    S.set_nodule_accepted(nodes, 2, False)
    assert S.accepted_labels(nodes) == [1, 3]
    assert _table_column(nodes.table_node, "accepted") == [1, 0, 1]
    assert not nodes.segmentation_node.GetDisplayNode().GetSegmentVisibility("Nodule_2")
    assert not nodes.markups_node.GetNthControlPointVisibility(1)
    S.set_nodule_accepted(nodes, 2, True)
    assert S.accepted_labels(nodes) == [1, 2, 3]
    assert nodes.segmentation_node.GetDisplayNode().GetSegmentVisibility("Nodule_2")
    assert nodes.markups_node.GetNthControlPointVisibility(1)
    with pytest.raises(ValueError, match="label 7"):
        S.set_nodule_accepted(nodes, 7, False)


def test_no_nodules_gives_empty_nodes_and_files(tmp_path):
    ct, _, _ = _case(np.eye(3))
    nodes = S.build_scene(ct, np.zeros(ct.shape, np.uint16), [], ALGORITHM)
    assert nodes.segmentation_node.GetSegmentation().GetNumberOfSegments() == 0
    assert nodes.markups_node.GetNumberOfControlPoints() == 0
    assert nodes.table_node.GetNumberOfRows() == 0
    S.save_scene_files(nodes, tmp_path)
    write_csv([], tmp_path / "nodules.csv")
    assert S.accepted_labels(S.load_result(tmp_path)) == []


def test_label_values_without_a_nodule_are_refused():
    ct, labels, nodules = _case(np.eye(3))
    with pytest.raises(ValueError, match=r"without a nodule: \[3\]"):
        S.build_scene(ct, labels, nodules[:2], ALGORITHM)


# ------------------------------------------------------------ loading is all or nothing; removal is complete

RESULT_CLASSES = ("vtkMRMLSegmentationNode", "vtkMRMLMarkupsFiducialNode", "vtkMRMLTableNode")


def _snapshot(scene) -> tuple[list[tuple[str, str]], int]:
    """(ID, name) of every node, and the number of subject hierarchy items below the scene."""
    nodes = [scene.GetNthNode(i) for i in range(scene.GetNumberOfNodes())]
    names = sorted((n.GetID(), n.GetName()) for n in nodes)
    sh = scene.GetSubjectHierarchyNode()
    items = vtk.vtkIdList()
    sh.GetItemChildren(sh.GetSceneItemID(), items, True)
    return names, items.GetNumberOfIds()


def _items_like_the_app(scene) -> None:
    """Give each new data node a subject hierarchy item at the top, as the application's plugin logic does."""
    sh = scene.GetSubjectHierarchyNode()

    @vtk.calldata_type(vtk.VTK_OBJECT)
    def added(_scene, _event, node):
        if node.GetClassName() in RESULT_CLASSES:
            sh.CreateItem(sh.GetSceneItemID(), node)

    scene._glance_test_observer = added  # keep the callback alive with the scene
    scene.AddObserver(slicer.vtkMRMLScene.NodeAddedEvent, added)


@pytest.fixture
def study(tmp_path):
    """A result folder (nodule 2 rejected) and a scene with its CT in a study, a previous result loaded.

    ``empty`` is the scene's snapshot before that result was loaded.
    """
    ct, labels, nodules = _case(np.eye(3))
    folder = tmp_path / "result"
    S.save_scene_files(S.build_scene(ct, labels, nodules, ALGORITHM), folder)
    write_csv(nodules, folder / S.CSV_FILE, accepted=[1, 3])
    scene = S.mrml_scene(slicer.vtkMRMLScene())
    _items_like_the_app(scene)
    volume = S.add_volume_node(scene, ct, name="chest CT")
    sh = scene.GetSubjectHierarchyNode()
    study_item = sh.CreateStudyItem(sh.CreateSubjectItem(sh.GetSceneItemID(), "patient"), "study")
    sh.CreateItem(study_item, volume)
    empty = _snapshot(scene)
    previous = S.load_result(folder, scene=scene, reference_volume_node=volume)
    return SimpleNamespace(folder=folder, scene=scene, volume=volume, study=study_item, previous=previous, empty=empty)


def _truncate(path) -> None:
    path.write_bytes(path.read_bytes()[:300])  # the header cut mid-way, no data


def _corrupt_json(path) -> None:
    path.write_text("{not json")


@pytest.mark.parametrize("name, corrupt, message", [
    # Slicer's own reader would abort the whole process on this one (an uncaught ITK exception).
    (S.SEGMENTATION_FILE, _truncate, "nodules.seg.nrrd: not a readable NRRD segmentation"),
    # Read after the segmentation node and its display node are in the scene.
    (S.MARKUPS_FILE, _corrupt_json, "nodules.mrk.json: Slicer could not read it"),
])
def test_load_result_of_a_corrupt_file_leaves_the_scene_as_it_was(study, name, corrupt, message):
    folder, scene, volume, previous = study.folder, study.scene, study.volume, study.previous
    corrupt(folder / name)
    before = _snapshot(scene)
    with pytest.raises(InputError, match=message):
        S.load_result(folder, scene=scene, reference_volume_node=volume)
    assert _snapshot(scene) == before
    assert all(scene.IsNodePresent(n) for n in (previous.segmentation_node, previous.markups_node, previous.table_node))


def test_load_result_failing_after_every_node_was_added_removes_them_all(study, monkeypatch):
    folder, scene, volume = study.folder, study.scene, study.volume
    added = []

    def fail(nodes, label, accepted):  # re-applying the rejected nodule 2: the load's last step
        added.extend(n.GetClassName() for n in (nodes.segmentation_node, nodes.markups_node, nodes.table_node)
                     if scene.IsNodePresent(n) and scene.GetSubjectHierarchyNode().GetItemByDataNode(n))
        raise RuntimeError("refused")

    monkeypatch.setattr(S, "set_nodule_accepted", fail)
    before = _snapshot(scene)
    with pytest.raises(RuntimeError, match="^refused$"):
        S.load_result(folder, scene=scene, reference_volume_node=volume)
    assert added == list(RESULT_CLASSES)  # all three, with their items, were in the scene when it failed
    assert _snapshot(scene) == before


def test_load_result_places_the_nodes_beside_the_ct_and_remove_result_takes_all_out(study):
    folder, scene, volume = study.folder, study.scene, study.volume
    sh = scene.GetSubjectHierarchyNode()
    result = (study.previous.segmentation_node, study.previous.markups_node, study.previous.table_node)
    assert [sh.GetItemParent(sh.GetItemByDataNode(n)) for n in result] == [study.study] * 3
    S.remove_result(study.previous)
    before = _snapshot(scene)
    assert before == study.empty
    assert before[1] == 3  # patient, study, CT

    nodes = S.load_result(folder, scene=scene, reference_volume_node=volume)
    result = (nodes.segmentation_node, nodes.markups_node, nodes.table_node)
    assert [sh.GetItemParent(sh.GetItemByDataNode(n)) for n in result] == [study.study] * 3
    assert nodes.volume_node is volume and S.accepted_labels(nodes) == [1, 3]
    # What Slicer adds once the result is saved: a storage node per file.
    storage = [nodes.segmentation_node.AddDefaultStorageNode(), nodes.markups_node.AddDefaultStorageNode()]
    assert storage == [True, True]
    names, items = _snapshot(scene)
    # Segmentation, markups and table, the first two with a display and a storage node each.
    assert len(names) == len(before[0]) + 7 and items == before[1] + 3

    S.remove_result(nodes)
    assert _snapshot(scene) == before
    assert scene.IsNodePresent(volume)
    S.remove_result(nodes)  # already gone: nothing to do
    assert _snapshot(scene) == before


def test_load_result_beside_a_ct_without_an_item_goes_to_the_top(tmp_path):
    ct, labels, nodules = _case(np.eye(3))
    S.save_scene_files(S.build_scene(ct, labels, nodules, ALGORITHM), tmp_path)
    write_csv(nodules, tmp_path / S.CSV_FILE)
    scene = S.mrml_scene(slicer.vtkMRMLScene())
    volume = S.add_volume_node(scene, ct)  # headless: no subject hierarchy item
    nodes = S.load_result(tmp_path, scene=scene, reference_volume_node=volume)
    sh = scene.GetSubjectHierarchyNode()
    for node in (nodes.segmentation_node, nodes.markups_node, nodes.table_node):
        assert sh.GetItemParent(sh.GetItemByDataNode(node)) == sh.GetSceneItemID()
