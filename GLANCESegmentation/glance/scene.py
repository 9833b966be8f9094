"""Step 6 (scene) and the MRML half of step 7: results as Slicer nodes and Slicer files.

This module is the engine's only LPS <-> RAS boundary. It builds real MRML
nodes: through slicer-core (headless, PyPI) in a terminal or CI, and through the
running application inside Slicer, where ``import slicer`` is the app. The code
path is the same; only where the scene comes from differs (:func:`mrml_scene`).

Nodes made for a result:
- segmentation: one segment per nodule, in label order (= by confidence), ID
  ``Nodule_<label>``, lung-nodule terminology and the DICOM algorithm tags, all
  segments sharing one binary labelmap whose label value is the nodule label;
- markups fiducials: one control point per nodule centre (RAS in memory; Slicer
  writes ``.mrk.json`` in LPS);
- table: one row per nodule, the columns of ``nodules.csv`` (glance.report).
The control points and the table rows are in the same order as the segments.

A result folder loads back all or nothing (:func:`load_result`), and
:func:`remove_result` takes a result out with everything made for it: either
way no stray node is left in the user's scene.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from glance.errors import InputError
from glance.io.atomic import atomic_path
from glance.io.seg_nrrd import read_seg_nrrd
from glance.nodule import Nodule
from glance.report import CSV_COLUMNS, AlgorithmInfo, csv_rows, nodule_colour, read_csv
from glance.volume import Volume

log = logging.getLogger(__name__)

SEGMENTATION_FILE = "nodules.seg.nrrd"
MARKUPS_FILE = "nodules.mrk.json"
CSV_FILE = "nodules.csv"

# Slicer's terminology entry string (see notes/dependencies.md): category
# Morphologically Altered Structure, type Nodule, anatomic region Lung.
NODULE_TERMINOLOGY = (
    "Segmentation category and type - DICOM master list"
    "~SCT^49755003^Morphologically Altered Structure~SCT^27925004^Nodule~^^"
    "~Anatomic codes - DICOM master list~SCT^39607008^Lung~^^"
)
TAG_ALGORITHM_TYPE = "DICOM.SegmentAlgorithmType"
TAG_ALGORITHM_NAME = "DICOM.SegmentAlgorithmName"

SEGMENTATION_NODE_NAME = "GLANCE nodules"
MARKUPS_NODE_NAME = "GLANCE nodule centres"
TABLE_NODE_NAME = "GLANCE nodule measurements"

_INT_COLUMNS = ("label", "accepted")
_TEXT_COLUMNS = ("name", "type")
_COLUMN_UNITS = {
    "centre_lps_L_mm": "mm",
    "centre_lps_P_mm": "mm",
    "centre_lps_S_mm": "mm",
    "long_axis_mm": "mm",
    "short_axis_mm": "mm",
    "volume_mm3": "mm3",
    "mean_hu": "HU",
    "median_hu": "HU",
}

# ------------------------------------------------------------ LPS <-> RAS

_FLIP_LR_AP = np.array([-1.0, -1.0, 1.0])


def lps_to_ras(points: Any) -> np.ndarray:
    """LPS mm (..., 3) to RAS mm (..., 3): negate the first two axes."""
    return np.asarray(points, dtype=np.float64) * _FLIP_LR_AP


def ras_to_lps(points: Any) -> np.ndarray:
    """RAS mm (..., 3) to LPS mm (..., 3): negate the first two axes."""
    return np.asarray(points, dtype=np.float64) * _FLIP_LR_AP


def ijk_to_ras_matrix(volume: Volume) -> np.ndarray:
    """4x4 matrix mapping homogeneous (i, j, k, 1) of ``volume`` to RAS mm (MRML's IJKToRAS)."""
    return np.diag([*_FLIP_LR_AP, 1.0]) @ volume.index_to_lps


def segment_id(label: int) -> str:
    """Segment ID of nodule ``label`` in a GLANCE segmentation node."""
    return f"Nodule_{int(label)}"


# ------------------------------------------------------------ scene


@dataclass
class SceneNodes:
    """The MRML nodes of one result. Rows, control points and segments share one order."""

    scene: Any
    segmentation_node: Any
    markups_node: Any
    table_node: Any
    volume_node: Any = None


def _in_slicer_app() -> bool:
    import slicer

    # slicer-core (headless) has no application object.
    return hasattr(slicer, "app")


def mrml_scene(scene=None):
    """The scene to build in: ``scene``, else Slicer's own inside the app, else a new headless one.

    Headless, the application logic and the segmentations / markups module logics
    that the app would provide are attached to the scene (kept alive as a Python
    attribute on it): they register the storage nodes and the conversion rules
    (closed surface) and give markups a selection node.
    """
    import slicer

    if scene is None:
        scene = slicer.mrmlScene if _in_slicer_app() else slicer.vtkMRMLScene()
    if not _in_slicer_app() and getattr(scene, "_glance_logics", None) is None:
        app_logic = slicer.vtkMRMLApplicationLogic()
        app_logic.SetMRMLScene(scene)
        segmentations = slicer.vtkSlicerSegmentationsModuleLogic()
        segmentations.SetMRMLScene(scene)
        markups = slicer.vtkSlicerMarkupsLogic()
        markups.SetMRMLScene(scene)
        scene._glance_logics = (app_logic, segmentations, markups)
    return scene


def _vtk_matrix(m: np.ndarray):
    import vtk

    out = vtk.vtkMatrix4x4()
    for r in range(4):
        for c in range(4):
            out.SetElement(r, c, float(m[r, c]))
    return out


def numpy_matrix(vtk_matrix) -> np.ndarray:
    """A vtkMatrix4x4 as a 4x4 numpy array."""
    return np.array([[vtk_matrix.GetElement(r, c) for c in range(4)] for r in range(4)])


def add_volume_node(scene, ct: Volume, name: str = "CT"):
    """Add ``ct`` to ``scene`` as a scalar volume node (for use outside Slicer; inside it the CT is loaded)."""
    import vtk
    from vtk.util import numpy_support

    image = vtk.vtkImageData()
    nk, nj, ni = ct.shape
    image.SetDimensions(ni, nj, nk)
    scalars = numpy_support.numpy_to_vtk(np.ascontiguousarray(ct.array).ravel(), deep=True)
    image.GetPointData().SetScalars(scalars)
    node = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", name)
    node.SetIJKToRASMatrix(_vtk_matrix(ijk_to_ras_matrix(ct)))
    node.SetAndObserveImageData(image)
    node.CreateDefaultDisplayNodes()
    return node


def _oriented_image(ct: Volume, labels: np.ndarray | None):
    """vtkOrientedImageData on the CT grid (IJKToRAS of ``ct``).

    With ``labels``: the label map cropped to its non-zero bounding box (extent
    offset kept), so a large CT costs no full-size copy in the scene. Without:
    the full grid with no scalars, as a geometry reference.
    """
    import slicer
    import vtk
    from vtk.util import numpy_support

    image = slicer.vtkOrientedImageData()
    image.SetImageToWorldMatrix(_vtk_matrix(ijk_to_ras_matrix(ct)))
    nk, nj, ni = ct.shape
    if labels is None:
        image.SetExtent(0, ni - 1, 0, nj - 1, 0, nk - 1)
        return image
    nonzero = np.argwhere(labels)
    lo = nonzero.min(axis=0) if len(nonzero) else np.zeros(3, int)
    hi = nonzero.max(axis=0) if len(nonzero) else np.zeros(3, int)
    crop = np.ascontiguousarray(labels[lo[0] : hi[0] + 1, lo[1] : hi[1] + 1, lo[2] : hi[2] + 1], dtype=np.uint16)
    image.SetExtent(lo[2], hi[2], lo[1], hi[1], lo[0], hi[0])
    image.GetPointData().SetScalars(
        numpy_support.numpy_to_vtk(crop.ravel(), deep=True, array_type=vtk.VTK_UNSIGNED_SHORT)
    )
    return image


def _check_labels(ct: Volume, labels: np.ndarray, nodules: Sequence[Nodule]) -> None:
    if labels.shape != ct.shape:
        raise ValueError(f"label map shape {labels.shape} does not match CT grid {ct.shape}")
    if labels.size and (labels.min() < 0 or labels.max() > np.iinfo(np.uint16).max):
        raise ValueError("label map values must fit uint16")
    known = {n.label for n in nodules}
    stray = set(np.unique(labels[labels > 0]).tolist()) - known
    if stray:
        raise ValueError(f"label map has values without a nodule: {sorted(stray)[:10]}")


def _add_segmentation_node(scene, ct, labels, nodules, algorithm, volume_node):
    import slicer

    node = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", SEGMENTATION_NODE_NAME)
    node.CreateDefaultDisplayNodes()
    node.SetSourceRepresentationToBinaryLabelmap()
    segmentation = node.GetSegmentation()
    if volume_node is not None:
        node.SetReferenceImageGeometryParameterFromVolumeNode(volume_node)
    else:
        segmentation.SetConversionParameter(
            slicer.vtkSegmentationConverter.GetReferenceImageGeometryParameterName(),
            slicer.vtkSegmentationConverter.SerializeImageGeometry(_oriented_image(ct, None)),
        )
    if not nodules:
        return node
    # All segments share one labelmap; each one's label value is its nodule label.
    shared = _oriented_image(ct, labels)
    labelmap_name = slicer.vtkSegmentationConverter.GetBinaryLabelmapRepresentationName()
    for nodule in nodules:
        segment = slicer.vtkSegment()
        segment.SetName(nodule.name)
        segment.SetNameAutoGenerated(False)  # else Slicer renames it after the terminology
        segment.SetColor(*(c / 255.0 for c in nodule_colour(nodule.label)))
        segment.SetColorAutoGenerated(False)
        segment.AddRepresentation(labelmap_name, shared)
        segment.SetLabelValue(int(nodule.label))
        segment.SetTerminology(NODULE_TERMINOLOGY)
        segment.SetTag(TAG_ALGORITHM_TYPE, "AUTOMATIC")
        segment.SetTag(TAG_ALGORITHM_NAME, algorithm.name)
        segmentation.AddSegment(segment, segment_id(nodule.label))
    return node


def control_point_label(nodule: Nodule) -> str:
    return f"{nodule.name}: {nodule.long_axis_mm:.1f} x {nodule.short_axis_mm:.1f} mm, {nodule.confidence:.0%}"


def control_point_description(nodule: Nodule) -> str:
    return f"{nodule.nodule_type}, {nodule.volume_mm3:.0f} mm3, mean {nodule.mean_hu:.0f} HU"


def _add_markups_node(scene, nodules):
    import vtk

    node = scene.AddNewNodeByClass("vtkMRMLMarkupsFiducialNode", MARKUPS_NODE_NAME)
    node.CreateDefaultDisplayNodes()
    for nodule in nodules:
        index = node.AddControlPoint(vtk.vtkVector3d(*lps_to_ras(nodule.centre_lps)), control_point_label(nodule))
        node.SetNthControlPointDescription(index, control_point_description(nodule))
        # Detected positions are results, not handles: a stray click must not move them.
        node.SetNthControlPointLocked(index, True)
    return node


def _add_table_node(scene, rows: Sequence[dict]):
    import vtk

    node = scene.AddNewNodeByClass("vtkMRMLTableNode", TABLE_NODE_NAME)
    table = node.GetTable()
    for key in CSV_COLUMNS:
        if key in _TEXT_COLUMNS:
            column = vtk.vtkStringArray()
        elif key in _INT_COLUMNS:
            column = vtk.vtkIntArray()
        else:
            column = vtk.vtkDoubleArray()
        column.SetName(key)
        for row in rows:
            column.InsertNextValue(row[key])
        table.AddColumn(column)
    for key, unit in _COLUMN_UNITS.items():
        node.SetColumnUnitLabel(key, unit)
    node.SetColumnDescription("accepted", "1 = accepted by the reader, 0 = rejected")
    node.Modified()
    return node


def build_scene(
    ct: Volume,
    labels: np.ndarray,
    nodules: Sequence[Nodule],
    algorithm: AlgorithmInfo,
    scene=None,
    volume_node=None,
    create_volume_node: bool = False,
) -> SceneNodes:
    """Segmentation, fiducial and table nodes for a result on ``ct``'s grid.

    ``labels`` is the instance map (values = ``Nodule.label``) on the CT grid.
    Inside Slicer pass the loaded CT as ``volume_node`` (it becomes the
    segmentation's reference geometry); elsewhere ``create_volume_node=True``
    adds ``ct`` itself to the scene.
    """
    _check_labels(ct, labels, nodules)
    nodules = sorted(nodules, key=lambda n: n.label)
    scene = mrml_scene(scene)
    if volume_node is None and create_volume_node:
        volume_node = add_volume_node(scene, ct)
    elif volume_node is not None:
        _warn_if_other_grid(volume_node, ct)
    nodes = SceneNodes(
        scene=scene,
        segmentation_node=_add_segmentation_node(scene, ct, labels, nodules, algorithm, volume_node),
        markups_node=_add_markups_node(scene, nodules),
        table_node=_add_table_node(scene, csv_rows(nodules)),
        volume_node=volume_node,
    )
    log.info("scene: %d nodule segment(s), fiducial(s) and table row(s)", len(nodules))
    return nodes


def _warn_if_other_grid(volume_node, ct: Volume) -> None:
    import vtk

    matrix = vtk.vtkMatrix4x4()
    volume_node.GetIJKToRASMatrix(matrix)
    dims = volume_node.GetImageData().GetDimensions() if volume_node.GetImageData() else None
    same = np.allclose(numpy_matrix(matrix), ijk_to_ras_matrix(ct), atol=1e-3) and dims == ct.shape[::-1]
    if not same:
        # Still correct in patient space (the labelmap carries the CT's geometry), but worth knowing.
        log.warning("volume node %s is not on the grid the nodules were found on", volume_node.GetName())


# ------------------------------------------------------------ files


def _write_with_storage_node(node, path: Path) -> None:
    storage = node.CreateDefaultStorageNode()
    if storage is None:
        raise RuntimeError(f"no storage node for {node.GetClassName()} (module logic missing?)")
    with atomic_path(path) as tmp:
        storage.SetFileName(str(tmp))
        if not storage.WriteData(node):
            raise OSError(f"{path}: Slicer could not write {node.GetClassName()}")


def save_scene_files(nodes: SceneNodes, out_dir: Path) -> dict[str, Path]:
    """Write ``nodules.seg.nrrd`` and ``nodules.mrk.json`` (Slicer's own storage, LPS on disk)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {"segmentation": out_dir / SEGMENTATION_FILE, "markups": out_dir / MARKUPS_FILE}
    _write_with_storage_node(nodes.segmentation_node, paths["segmentation"])
    _write_with_storage_node(nodes.markups_node, paths["markups"])
    return paths


def _read_with_storage_node(scene, class_name: str, name: str, path: Path):
    if not path.is_file():
        raise InputError(f"{path}: missing from the result folder")
    node = scene.AddNewNodeByClass(class_name, name)
    storage = node.CreateDefaultStorageNode()
    storage.SetFileName(str(path))
    if not storage.ReadData(node):  # the node goes with the rest of load_result's rollback
        raise InputError(f"{path}: Slicer could not read it")
    node.CreateDefaultDisplayNodes()
    return node


def load_result(out_dir: Path, scene=None, reference_volume_node=None) -> SceneNodes:
    """Load a finished result folder (seg.nrrd, mrk.json, nodules.csv) into a scene; all or nothing.

    Rejected nodules (``accepted`` 0 in the CSV) come back hidden. With
    ``reference_volume_node`` (the CT) the segmentation takes its geometry and the
    three nodes join the CT's parent in the subject hierarchy (its study).
    On any failure every node the load added goes again, with its display and
    storage nodes and subject hierarchy item, before the error is re-raised.
    """
    scene = mrml_scene(scene)
    before = _node_ids(scene)
    try:
        nodes = _load_result_nodes(Path(out_dir), scene, reference_volume_node)
        if reference_volume_node is not None:
            _place_beside(nodes, reference_volume_node)
        return nodes
    except BaseException:  # Ctrl-C half-way must not leave half a result either
        _remove_nodes_added_since(scene, before)
        raise


def _load_result_nodes(out_dir: Path, scene, reference_volume_node) -> SceneNodes:
    seg_path = out_dir / SEGMENTATION_FILE
    if seg_path.is_file():  # Slicer's reader aborts the whole process on a broken header; this one raises
        read_seg_nrrd(seg_path)
    csv_path = out_dir / CSV_FILE
    if not csv_path.is_file():
        raise InputError(f"{csv_path}: missing from the result folder")
    rows = read_csv(csv_path)
    seg = _read_with_storage_node(scene, "vtkMRMLSegmentationNode", SEGMENTATION_NODE_NAME, seg_path)
    if reference_volume_node is not None:
        seg.SetReferenceImageGeometryParameterFromVolumeNode(reference_volume_node)
    markups = _read_with_storage_node(scene, "vtkMRMLMarkupsFiducialNode", MARKUPS_NODE_NAME, out_dir / MARKUPS_FILE)
    counts = (seg.GetSegmentation().GetNumberOfSegments(), markups.GetNumberOfControlPoints(), len(rows))
    if len(set(counts)) != 1:
        raise InputError(
            f"{out_dir}: segments, control points and CSV rows disagree ({counts[0]}, {counts[1]}, {counts[2]})"
        )
    nodes = SceneNodes(scene, seg, markups, _add_table_node(scene, rows), reference_volume_node)
    for row in rows:
        if not row["accepted"]:
            set_nodule_accepted(nodes, row["label"], False)
    return nodes


def _result_nodes(nodes: SceneNodes) -> tuple:
    return nodes.segmentation_node, nodes.markups_node, nodes.table_node


def _place_beside(nodes: SceneNodes, volume_node) -> None:
    """The result's nodes under the subject hierarchy parent of ``volume_node`` (the CT's study)."""
    sh = nodes.scene.GetSubjectHierarchyNode()
    volume_item = sh.GetItemByDataNode(volume_node)
    parent = sh.GetItemParent(volume_item) if volume_item else sh.GetSceneItemID()
    for node in _result_nodes(nodes):
        item = sh.GetItemByDataNode(node)
        if item:
            sh.SetItemParent(item, parent)
        else:  # no item yet: a scene without Slicer's subject hierarchy plugins (scripts, CI)
            sh.CreateItem(parent, node)


def remove_result(nodes: SceneNodes) -> None:
    """Remove a result's segmentation, markups and table nodes completely; the CT stays.

    Their display and storage nodes and subject hierarchy items go too. A node
    the user already deleted is skipped.
    """
    _remove_nodes(nodes.scene, _result_nodes(nodes))


def _node_ids(scene) -> set[str]:
    return {scene.GetNthNode(i).GetID() for i in range(scene.GetNumberOfNodes())}


def _remove_nodes_added_since(scene, before: set[str]) -> None:
    """Undo a half-done load: every node added since ``before`` goes.

    Singletons (subject hierarchy, selection) are shared scene state and stay.
    """
    added = (scene.GetNodeByID(node_id) for node_id in sorted(_node_ids(scene) - before))
    _remove_nodes(scene, [node for node in added if not node.GetSingletonTag()])


def _remove_nodes(scene, nodes) -> None:
    """Remove ``nodes`` with what was made for them: subject hierarchy item, display and storage nodes.

    (The application's subject hierarchy logic would drop the items, but a script's scene has none.)
    """
    sh = scene.GetSubjectHierarchyNode()
    for node in nodes:
        if not scene.IsNodePresent(node):  # the user deleted it, or removing an earlier node took it along
            continue
        item = sh.GetItemByDataNode(node)
        if item:
            sh.RemoveItem(item, False, False)  # the item only: the node goes below
        count = node.GetNumberOfDisplayNodes() if node.IsA("vtkMRMLDisplayableNode") else 0
        extras = [node.GetNthDisplayNode(i) for i in range(count)]
        extras += [node.GetStorageNode()] if node.IsA("vtkMRMLStorableNode") else []
        for extra in extras:
            if extra is not None and scene.IsNodePresent(extra):
                scene.RemoveNode(extra)
        scene.RemoveNode(node)


# ------------------------------------------------------------ review


def _table_labels(nodes: SceneNodes) -> list[int]:
    column = nodes.table_node.GetTable().GetColumnByName("label")
    return [int(column.GetValue(r)) for r in range(column.GetNumberOfTuples())]


def set_nodule_accepted(nodes: SceneNodes, label: int, accepted: bool) -> None:
    """Accept or reject nodule ``label``: a rejected one's segment and fiducial are hidden, its row flagged 0."""
    labels = _table_labels(nodes)
    if label not in labels:
        raise ValueError(f"no nodule with label {label} in this result")
    row = labels.index(label)
    table = nodes.table_node.GetTable()
    table.GetColumnByName("accepted").SetValue(row, int(bool(accepted)))
    table.Modified()
    nodes.table_node.Modified()
    display = nodes.segmentation_node.GetDisplayNode()
    if display is not None:
        display.SetSegmentVisibility(segment_id(label), bool(accepted))
    nodes.markups_node.SetNthControlPointVisibility(row, bool(accepted))


def accepted_labels(nodes: SceneNodes) -> list[int]:
    """Labels of the nodules whose table row is flagged accepted, in table order."""
    column = nodes.table_node.GetTable().GetColumnByName("accepted")
    return [label for r, label in enumerate(_table_labels(nodes)) if int(column.GetValue(r))]
