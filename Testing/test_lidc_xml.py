"""LIDC-IDRI reader XML: contours -> reader masks -> clustered nodules -> 50 % consensus."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from glance.errors import InputError
from glance.io.lidc_xml import lidc_label_map, read_lidc_nodules
from glance.volume import Volume

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


def _roi(z: float, pts) -> str:
    edges = "".join(f"<edgeMap><xCoord>{x}</xCoord><yCoord>{y}</yCoord></edgeMap>" for x, y in pts)
    return (f"<roi><imageZposition>{z}</imageZposition><imageSOP_UID>1.2</imageSOP_UID>"
            f"<inclusion>TRUE</inclusion>{edges}</roi>")


def _square(x0: int, y0: int, n: int):
    """Outline pixels of an n x n square, in order round the edge."""
    top = [(x, y0) for x in range(x0, x0 + n)]
    right = [(x0 + n - 1, y) for y in range(y0 + 1, y0 + n)]
    bottom = [(x, y0 + n - 1) for x in range(x0 + n - 2, x0 - 1, -1)]
    left = [(x0, y) for y in range(y0 + n - 2, y0, -1)]
    return top + right + bottom + left


def _xml(sessions) -> str:
    body = ""
    for nodules in sessions:
        body += "<readingSession>"
        for rois, big in nodules:
            chars = "<characteristics><malignancy>3</malignancy></characteristics>" if big else ""
            body += f"<unblindedReadNodule><noduleID>n</noduleID>{chars}{''.join(rois)}</unblindedReadNodule>"
        body += "</readingSession>"
    return f'<?xml version="1.0"?><LidcReadMessage xmlns="http://www.nih.gov">{body}</LidcReadMessage>'


@pytest.fixture
def grid():
    # 5 slices at z = -10, -8, ..., -2; 40 x 40 pixels of 0.5 mm.
    return Volume(np.zeros((5, 40, 40), np.int16), (0.5, 0.5, 2.0), (0.0, 0.0, -10.0))


def test_filled_polygon_without_outline_and_consensus(tmp_path, grid):
    # Reader A: 7x7 squares on slices 1 and 2 -> 5x5 inside each. Reader B: same square shifted by one column
    # on slice 2 only. A tiny (<3 mm) nodule without characteristics is ignored.
    a = ([_roi(-8.0, _square(10, 10, 7)), _roi(-6.0, _square(10, 10, 7))], True)
    b = ([_roi(-6.0, _square(11, 10, 7))], True)
    small = ([_roi(-4.0, [(30, 30)])], False)
    path = tmp_path / "r.xml"
    path.write_text(_xml([[a, small], [b]]))
    (nod,) = read_lidc_nodules(path, grid)
    assert nod.n_readers == 2
    # Consensus >= 1 of 2 readers: union. Slice 1: 25 px; slice 2: columns 11..16 x rows 11..15 = 30 px.
    assert nod.n_voxels == 55
    assert nod.bbox == (1, 11, 11, 3, 16, 17)
    assert nod.volume_mm3 == pytest.approx(55 * 0.5)
    labels = lidc_label_map([nod], grid.shape)
    assert labels[1, 11:16, 11:16].all() and not labels[1, 10].any()
    assert nod.reader_diameters_mm[0] == pytest.approx(np.hypot(6, 6) * 0.5)


def test_three_readers_need_two_votes(tmp_path, grid):
    marks = [([_roi(-6.0, _square(10 + s, 10, 7))], True) for s in (0, 1, 2)]
    path = tmp_path / "r.xml"
    path.write_text(_xml([[m] for m in marks]))
    (nod,) = read_lidc_nodules(path, grid)
    # Inside columns: 11-15, 12-16, 13-17 -> at least two votes on 12..16 = 5 columns x 5 rows.
    assert nod.n_readers == 3 and nod.n_voxels == 25
    assert nod.centroid_ijk == pytest.approx((14.0, 13.0, 2.0))


def test_far_apart_marks_are_two_nodules(tmp_path, grid):
    a = ([_roi(-6.0, _square(2, 2, 6))], True)
    b = ([_roi(-6.0, _square(30, 30, 6))], True)
    path = tmp_path / "r.xml"
    path.write_text(_xml([[a, b]]))
    nods = read_lidc_nodules(path, grid)
    assert [n.n_readers for n in nods] == [1, 1]


def test_bad_xml_is_input_error(tmp_path, grid):
    path = tmp_path / "bad.xml"
    path.write_text("<notLidc/>")
    with pytest.raises(InputError):
        read_lidc_nodules(path, grid)


needs_data = pytest.mark.skipif(not (DATA / "scans" / "LIDC-IDRI-0003.nrrd").exists(), reason="shared LIDC data absent")


@needs_data
def test_lidc_0001_matches_pylidc():
    from glance.io import read_volume

    vol = read_volume(DATA / "LIDC-IDRI-0001")
    (nod,) = read_lidc_nodules(DATA / "LIDC-IDRI-0001" / "069.xml", vol)
    assert nod.n_readers == 4 and nod.n_voxels == 5428
    row, col, sl = 366.99, 316.31, 89.62
    assert nod.centroid_ijk == pytest.approx((col, row, sl), abs=0.01)
    assert nod.centroid_lps == pytest.approx((56.40, 86.34, -115.96), abs=0.01)
    assert nod.mean_diameter_mm == pytest.approx(32.76, abs=0.01)


@needs_data
def test_lidc_0003_matches_reference_label_map():
    from glance.io import read_volume
    from glance.io.image_read import read_label_map

    vol = read_volume(DATA / "scans" / "LIDC-IDRI-0003.nrrd")
    ref = read_label_map(DATA / "scans" / "LIDC-IDRI-0003_consensus50-label.nrrd").array
    nods = read_lidc_nodules(DATA / "scans" / "LIDC-IDRI-0003_072.xml", vol)
    doc = json.loads((DATA / "scans" / "LIDC-IDRI-0003_annotations.json").read_text())["nodules_all_clusters"]
    assert [n.n_readers for n in nods] == [d["n_readers"] for d in doc] == [1, 4, 4, 4]
    labels = lidc_label_map(nods, vol.shape)
    for n, d in zip(nods, doc):
        a, b = labels == n.index, ref == d["nodule_index"]
        dice = 2 * (a & b).sum() / (a.sum() + b.sum())
        assert dice > 0.99, (n.index, dice)
        assert n.n_voxels == d["consensus50_voxels"]
        row, col, sl = d["centroid_row_col_slice"]
        assert np.linalg.norm(np.subtract(n.centroid_ijk, (col, row, sl))) < 0.02
        assert n.mean_diameter_mm == pytest.approx(d["mean_reader_diameter_mm"], abs=0.01)
