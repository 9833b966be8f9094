"""glance.io.seg_nrrd: Slicer's segmentation files read exactly, and instance maps placed on a CT grid.

Every file is written here with pynrrd in Slicer's layout (axes i, j, k with the layer axis
first, ``SegmentN_*`` keys), from arrays and geometry whose answer is known by hand; one
file is written by Slicer's own segmentation storage (slicer-core, headless).
"""

from __future__ import annotations

import numpy as np
import pytest

from glance.errors import InputError
from glance.io import Segment, place_on_grid, read_seg_nrrd
from glance.volume import Volume

LPS = "left-posterior-superior"
# The sign of each LPS axis in a file space (the test's own conversion, to write the files).
SPACE_SIGNS = {LPS: (1, 1, 1), "LPS": (1, 1, 1), "right-anterior-superior": (-1, -1, 1), "RAS": (-1, -1, 1),
               "left-anterior-superior": (1, -1, 1)}

# The CT grid of most tests: rotated 90 degrees about S (i runs to P, j to R), anisotropic.
SPACING = (0.7, 0.8, 2.5)
ORIGIN = (-12.5, 30.0, -100.0)
DIRECTION = np.array([[0.0, -1.0, 0.0], [1.0, 0.0, 0.0], [0.0, 0.0, 1.0]])  # columns: i, j, k
CT_SHAPE = (10, 16, 14)  # (k, j, i)
BOX_START = (2, 3, 4)  # (k, j, i) of the file's first voxel in the CT: Slicer crops to the segments
BOX_LPS = (-14.9, 32.8, -95.0)  # by hand: ORIGIN + 3 * 0.8 * (-1, 0, 0) + 4 * 0.7 * (0, 1, 0) + 2 * 2.5 * (0, 0, 1)


def ct_grid(shape=CT_SHAPE, spacing=SPACING, origin=ORIGIN, direction=DIRECTION) -> Volume:
    return Volume(np.zeros(shape, np.int16), spacing, origin, direction)


def write_seg(path, layers, spacing=SPACING, origin=BOX_LPS, direction=DIRECTION, space=LPS, keys=None,
              layered=None):
    """Write ``layers`` ((layer, k, j, i), or (k, j, i) for one layer) as Slicer does, geometry given in LPS."""
    import nrrd

    layers = np.asarray(layers)
    layered = layers.ndim == 4 if layered is None else layered
    signs = np.array(SPACE_SIGNS[space], float)
    steps = (np.asarray(direction, float) @ np.diag(spacing)).T * signs  # row n: step of axis n in file space
    header = {"space": space, "space origin": np.asarray(origin, float) * signs, **(keys or {})}
    if layered:
        header["space directions"] = np.vstack([[np.nan] * 3, steps])
        header["kinds"] = ["list", "domain", "domain", "domain"]
        data = layers.transpose(0, 3, 2, 1)
    else:
        header["space directions"] = steps
        header["kinds"] = ["domain"] * 3
        data = layers.transpose(2, 1, 0)
    nrrd.write(str(path), np.ascontiguousarray(data), header)
    return path


def segment_keys(*segments: dict) -> dict:
    """``SegmentN_<Key>`` header keys from one dict per segment."""
    return {f"Segment{n}_{k}": str(v) for n, s in enumerate(segments) for k, v in s.items()}


def one_layer_file(path, space=LPS):
    """A cropped single-layer file (5 x 6 x 7 voxels at BOX_START of the CT) with two segments.

    Nodule A: label value 3 in the box [0:2, 1:3, 2:5] (k, j, i), Extent "2 4 1 2 0 1"; a stray
    value 3 outside that Extent, which Slicer does not read as part of the segment.
    Nodule B: label value 7 on [3:5, 4:6, 0:2], no Extent key (the whole file).
    """
    layer = np.zeros((5, 6, 7), np.uint8)
    layer[0:2, 1:3, 2:5] = 3
    layer[4, 5, 6] = 3  # stray
    layer[3:5, 4:6, 0:2] = 7
    keys = segment_keys({"ID": "Nodule_1", "Name": "nodule A", "Layer": 0, "LabelValue": 3, "Extent": "2 4 1 2 0 1"},
                        {"ID": "Nodule_2", "Name": "nodule B", "Layer": 0, "LabelValue": 7})
    return write_seg(path, layer, space=space, keys=keys)


def expected_one_layer() -> np.ndarray:
    """The instance map of :func:`one_layer_file` on the CT grid (A -> 1, B -> 2)."""
    out = np.zeros(CT_SHAPE, np.uint16)
    k, j, i = BOX_START
    out[k + 0:k + 2, j + 1:j + 3, i + 2:i + 5] = 1
    out[k + 3:k + 5, j + 4:j + 6, i + 0:i + 2] = 2
    return out


# --- reading ------------------------------------------------------------------------------


def test_single_layer_segments_geometry_and_labels(tmp_path):
    seg = read_seg_nrrd(one_layer_file(tmp_path / "a.seg.nrrd"))

    assert seg.segments == [Segment(0, "Nodule_1", "nodule A", 0, 3, (2, 4, 1, 2, 0, 1)),
                            Segment(1, "Nodule_2", "nodule B", 0, 7, None)]
    assert seg.layers.shape == (1, 5, 6, 7)
    np.testing.assert_allclose(seg.spacing, SPACING, atol=1e-12)
    np.testing.assert_allclose(seg.origin, BOX_LPS, atol=1e-9)
    np.testing.assert_allclose(seg.direction, DIRECTION, atol=1e-12)

    instances = seg.instance_map()
    assert instances.array.dtype == np.uint16
    assert np.count_nonzero(instances.array == 1) == 2 * 2 * 3  # the stray voxel is outside A's Extent
    assert np.count_nonzero(instances.array == 2) == 2 * 2 * 2
    # Position of B's first voxel, file index (i, j, k) = (0, 4, 3), by hand:
    # BOX_LPS + 4 * 0.8 * (-1, 0, 0) + 3 * 2.5 * (0, 0, 1).
    np.testing.assert_allclose(instances.ijk_to_lps(np.array([0, 4, 3])), (-18.1, 32.8, -87.5), atol=1e-9)
    assert instances.array[3, 4, 0] == 2

    np.testing.assert_array_equal(place_on_grid(instances, ct_grid()), expected_one_layer())


@pytest.mark.parametrize("space", ["right-anterior-superior", "RAS", "left-anterior-superior", "LPS"])
def test_older_spaces_are_read_in_lps(tmp_path, space):
    """Older Slicer wrote RAS: the same segmentation in any patient space reads identically."""
    path = one_layer_file(tmp_path / "old.seg.nrrd", space=space)
    if space == "right-anterior-superior":
        header = path.read_bytes()[:600].decode("latin-1")
        assert "space origin: (14.9" in header and "(-0,-0.69999999999999996,0)" in header  # RAS on disk

    seg = read_seg_nrrd(path)

    np.testing.assert_allclose(seg.origin, BOX_LPS, atol=1e-9)
    np.testing.assert_allclose(seg.direction, DIRECTION, atol=1e-12)
    np.testing.assert_allclose(seg.spacing, SPACING, atol=1e-12)
    np.testing.assert_array_equal(place_on_grid(seg.instance_map(), ct_grid()), expected_one_layer())


def test_two_layers_with_overlapping_segments(tmp_path):
    """4D file, layers first: A and C share layer 0 (values 1, 2); B overlaps A on layer 1."""
    shape = (6, 8, 9)
    a = np.zeros(shape, bool)
    a[1:4, 2:6, 2:6] = True
    b = np.zeros(shape, bool)
    b[3:5, 4:7, 4:8] = True  # overlaps A on [3:4, 4:6, 4:6]
    c = np.zeros(shape, bool)
    c[0, 0:2, 7:9] = True
    layers = np.zeros((2, *shape), np.uint8)
    layers[0][a] = 1
    layers[0][c] = 2
    layers[1][b] = 1
    keys = segment_keys({"ID": "A", "Name": "first", "Layer": 0, "LabelValue": 1, "Extent": "2 5 2 5 1 3"},
                        {"ID": "B", "Name": "second", "Layer": 1, "LabelValue": 1, "Extent": "4 7 4 6 3 4"},
                        {"ID": "C", "Name": "third", "Layer": 0, "LabelValue": 2, "Extent": "7 8 0 1 0 0"})
    origin = (1.0, 2.0, 3.0)
    seg = read_seg_nrrd(write_seg(tmp_path / "two.seg.nrrd", layers, (1.0, 1.0, 2.0), origin, np.eye(3), keys=keys))

    assert [(s.id, s.name, s.layer, s.label_value) for s in seg.segments] == [
        ("A", "first", 0, 1), ("B", "second", 1, 1), ("C", "third", 0, 2)]
    np.testing.assert_array_equal(seg.layers, layers)
    np.testing.assert_allclose(seg.origin, origin)
    expected = np.zeros(shape, np.uint16)
    expected[a], expected[b], expected[c] = 1, 2, 3  # B was written after A: it wins on the overlap
    np.testing.assert_array_equal(seg.instance_map().array, expected)
    assert seg.instance_map().array[3, 4, 4] == 2 and seg.instance_map().array[3, 3, 3] == 1
    relabelled = seg.instance_map(lambda s: {"A": 40, "B": 50, "C": 60}[s.id]).array
    np.testing.assert_array_equal(relabelled, np.where(expected > 0, expected * 10 + 30, 0))


def test_files_without_layer_label_value_or_name_keys(tmp_path):
    """Before Slicer 4.11: one binary layer per segment, only IDs; layer N, value 1, named by the ID."""
    layers = np.zeros((2, 4, 5, 6), np.uint8)
    layers[0, 1, 1:3, 2] = 1
    layers[1, 2:4, 3, 4:6] = 1
    seg = read_seg_nrrd(write_seg(tmp_path / "legacy.seg.nrrd", layers, keys={"Segment0_ID": "left",
                                                                              "Segment1_ID": "right"}))
    assert seg.segments == [Segment(0, "left", "left", 0, 1), Segment(1, "right", "right", 1, 1)]
    np.testing.assert_array_equal(seg.instance_map().array, layers[0] * 1 + layers[1] * 2)


def test_plain_label_map_is_one_segment_per_value(tmp_path):
    labels = np.zeros((3, 4, 5), np.uint8)
    labels[0, 0, 0:2] = 9
    labels[2, 3, 4] = 4
    seg = read_seg_nrrd(write_seg(tmp_path / "plain.seg.nrrd", labels))
    assert [(s.id, s.label_value) for s in seg.segments] == [("Segment_4", 4), ("Segment_9", 9)]
    np.testing.assert_array_equal(seg.instance_map().array, np.select([labels == 4, labels == 9], [1, 2], 0))


def test_overlapping_segments_written_by_slicer(tmp_path):
    """Slicer's own writer: two overlapping segments on two layers, cropped to their union, LPS on disk."""
    slicer = pytest.importorskip("slicer")
    import vtk
    from vtk.util import numpy_support

    # LPS direction diag(-1, -1, 1) is RAS identity: the vtkOrientedImageData needs no direction.
    spacing, origin_lps, shape = (0.8, 0.8, 2.0), (5.0, 6.0, -7.0), (8, 12, 10)
    grid = Volume(np.zeros(shape, np.int16), spacing, origin_lps, np.diag([-1.0, -1.0, 1.0]))
    a = np.zeros(shape, np.uint8)
    a[2:5, 3:6, 4:7] = 1
    b = np.zeros(shape, np.uint8)
    b[4:7, 5:9, 5:8] = 1  # overlaps a on [4:5, 5:6, 5:7]
    scene = slicer.vtkMRMLScene()
    logic = slicer.vtkSlicerSegmentationsModuleLogic()
    logic.SetMRMLScene(scene)
    node = slicer.vtkMRMLSegmentationNode()
    scene.AddNode(node)
    node.SetSourceRepresentationToBinaryLabelmap()
    for name, mask in (("Nodule_1", a), ("Nodule_2", b)):
        image = slicer.vtkOrientedImageData()
        image.SetDimensions(shape[2], shape[1], shape[0])
        image.SetSpacing(*spacing)
        image.SetOrigin(-origin_lps[0], -origin_lps[1], origin_lps[2])
        image.AllocateScalars(vtk.VTK_UNSIGNED_CHAR, 1)
        numpy_support.vtk_to_numpy(image.GetPointData().GetScalars())[:] = mask.ravel()
        sid = node.GetSegmentation().AddEmptySegment(name, name)
        assert slicer.vtkSlicerSegmentationsModuleLogic.SetBinaryLabelmapToSegment(image, node, sid)
    storage = node.CreateDefaultStorageNode()
    storage.SetFileName(str(tmp_path / "slicer.seg.nrrd"))
    assert storage.WriteData(node)

    seg = read_seg_nrrd(tmp_path / "slicer.seg.nrrd")

    # The union of the segments, (k, j, i) = [2:7, 3:9, 4:8], is what Slicer stores.
    assert seg.layers.shape == (2, 5, 6, 4)
    np.testing.assert_allclose(seg.origin, grid.ijk_to_lps(np.array([4, 3, 2])), atol=1e-9)  # (1.8, 3.6, -3)
    assert [(s.id, s.layer, s.label_value, s.extent) for s in seg.segments] == [
        ("Nodule_1", 0, 1, (0, 2, 0, 2, 0, 2)), ("Nodule_2", 1, 1, (1, 3, 2, 5, 2, 4))]
    expected = np.where(b > 0, 2, a).astype(np.uint16)
    np.testing.assert_array_equal(place_on_grid(seg.instance_map(), grid), expected)


# --- placing on a grid ---------------------------------------------------------------------


def test_empty_segmentation_places_as_zeros_anywhere():
    """Slicer writes an empty segmentation as a 1-voxel image at (0, 0, 0): no grid to check."""
    empty = Volume(np.zeros((1, 1, 1), np.uint16), (1.0, 1.0, 1.0), (0.0, 0.0, 0.0), np.diag([-1.0, -1.0, 1.0]))
    out = place_on_grid(empty, ct_grid())
    assert out.shape == CT_SHAPE and out.dtype == np.uint16 and not out.any()


def test_off_grid_labels_are_refused_or_resampled():
    grid = Volume(np.zeros((4, 4, 8), np.int16), (1.0, 1.0, 1.0), (0.25, 0.0, 0.0))
    labels = np.zeros((4, 4, 4), np.uint16)
    labels[1, 2, :] = [5, 6, 7, 8]  # one row along i
    coarse = Volume(labels, (2.0, 1.0, 1.0), (0.0, 0.0, 0.0), metadata={"source": "coarse.seg.nrrd"})
    with pytest.raises(InputError, match=r"^coarse\.seg\.nrrd: not on the CT's voxels"):
        place_on_grid(coarse, grid)

    out = place_on_grid(coarse, grid, resample=True)

    # Grid voxel i lies at x = 0.25 + i; the nearest coarse voxel is round((0.25 + i) / 2), by hand:
    # i = 0..7 -> 0, 1, 1, 2, 2, 3, 3, 4 (4 is past the last coarse voxel: background).
    expected_row = [5, 6, 6, 7, 7, 8, 8, 0]
    np.testing.assert_array_equal(out[1, 2], expected_row)
    assert np.count_nonzero(out) == 7


def test_labels_beyond_the_grid_are_refused_unless_resampling():
    labels = np.zeros((2, 2, 3), np.uint16)
    labels[0, 0, 0] = 1
    labels[1, 1, 2] = 2  # lands one voxel past the grid's last column
    grid = ct_grid()
    start = grid.ijk_to_lps(np.array([grid.shape[2] - 2, 0, 0], float))  # i = 12: columns 12, 13, 14
    moved = Volume(labels, SPACING, start, DIRECTION, {"source": "edge.seg.nrrd"})
    with pytest.raises(InputError, match=r"^edge\.seg\.nrrd: 1 labelled voxels lie outside the CT"):
        place_on_grid(moved, grid)
    out = place_on_grid(moved, grid, resample=True)
    assert out[0, 0, 12] == 1 and np.count_nonzero(out) == 1


# --- bad files ------------------------------------------------------------------------------


def _bad_file(tmp_path, kind: str):
    """A file broken in one way; returns (path, text the one-line message must contain)."""
    import nrrd

    path = tmp_path / f"{kind}.seg.nrrd"
    ok = np.zeros((2, 3, 4), np.uint8)
    two = np.zeros((2, 2, 3, 4), np.uint8)
    one_segment = segment_keys({"ID": "a", "Layer": 0, "LabelValue": 1})
    if kind == "junk":
        path.write_bytes(b"this is not an NRRD file")
        return path, "not a readable NRRD segmentation"
    if kind == "truncated":
        path.write_bytes(b"NRRD0004\ntype: unsigned char\ndimension: 3\nsizes: 4 3 2\nencoding: raw\n"
                         b"space: left-posterior-superior\nspace directions: (1,0,0) (0,1,0) (0,0,1)\n"
                         b"space origin: (0,0,0)\n\n" + bytes(10))
        return path, "cannot read the segmentation data"
    if kind == "2d":
        nrrd.write(str(path), np.zeros((3, 4), np.uint8), {"spacings": [1.0, 1.0]})
        return path, "a 2D image"
    if kind == "4d-domain":
        nrrd.write(str(path), np.zeros((2, 3, 4, 5), np.uint8), {"kinds": ["domain"] * 4, "spacings": [1.0] * 4})
        return path, "a 4D image"
    if kind == "no-space":
        nrrd.write(str(path), ok, {"spacings": [1.0, 1.0, 1.0], **one_segment})
        return path, "no patient space"
    if kind == "scanner-space":
        nrrd.write(str(path), ok, {"space": "scanner-xyz", "space directions": np.eye(3), "space origin": [0, 0, 0]})
        return path, "space 'scanner-xyz' is not a patient space"
    if kind == "float":
        write_seg(path, ok.astype(np.float32))
        return path, "float32 voxels"
    keys = {
        "orphan": (ok, {**one_segment, "Segment1_Name": "b", "Segment1_LabelValue": "2"}, "Segment1_* keys without"),
        "no-layer-key": (ok, {"Segment0_ID": "a", "Segment1_ID": "b"}, "no Segment1_Layer key"),
        "layer-range": (two, {**one_segment, "Segment1_ID": "b", "Segment1_Layer": "2"},
                        "is on layer 2, the file has 2"),
        "label-value": (ok, {"Segment0_ID": "a", "Segment0_LabelValue": "one"}, "Segment0_LabelValue 'one'"),
        "extent": (ok, {**one_segment, "Segment0_Extent": "0 1 2"}, "Segment0_Extent '0 1 2'"),
        "duplicate": (two, {**one_segment, **segment_keys({}, {"ID": "b", "Layer": 0, "LabelValue": 1})},
                      "share layer 0 and label value 1"),
    }
    layers, header, text = keys[kind]
    write_seg(path, layers, keys=header)
    return path, text


BAD_KINDS = ["junk", "truncated", "2d", "4d-domain", "no-space", "scanner-space", "float", "orphan", "no-layer-key",
             "layer-range", "label-value", "extent", "duplicate"]


@pytest.mark.parametrize("kind", BAD_KINDS)
def test_bad_files_raise_one_line_naming_the_file(tmp_path, kind):
    path, text = _bad_file(tmp_path, kind)
    with pytest.raises(InputError) as err:
        read_seg_nrrd(path)
    message = str(err.value)
    assert message.startswith(f"{path}: ") and "\n" not in message
    assert text in message


def test_missing_file_and_voxel_budget(tmp_path):
    with pytest.raises(InputError, match="no such file"):
        read_seg_nrrd(tmp_path / "absent.seg.nrrd")
    path = write_seg(tmp_path / "big.seg.nrrd", np.zeros((2, 4, 5, 6), np.uint8))
    with pytest.raises(InputError, match=r"6 x 5 x 4 x 2 = 240 voxels exceeds the limit of 239"):
        read_seg_nrrd(path, max_voxels=239)
    assert read_seg_nrrd(path, max_voxels=240).layers.shape == (2, 4, 5, 6)
