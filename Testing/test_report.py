"""glance.report: nodules.csv, report.json, PNG snapshots, atomic writes."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from glance.nodule import Nodule
from glance.report import (
    CROSS_COLOUR,
    AlgorithmInfo,
    nodule_colour,
    read_csv,
    write_csv,
    write_report_json,
    write_snapshots,
)
from glance.volume import Volume

PIL = pytest.importorskip("PIL")
from PIL import Image  # noqa: E402


def _nodules() -> list[Nodule]:
    return [
        Nodule(2, (-40.5, 12.3456, -101.25), (1.0, 2.0, 3.0), 8.004, 5.5, 140.06, 20.04, 25.0, "solid", 0.61237),
        Nodule(1, (56.4, 86.34, -115.96), (4.0, 5.0, 6.0), 32.76, 21.1, 6708.84, -350.5, -402.0, "part-solid", 0.9),
    ]


def test_csv_header_and_values_exact(tmp_path):
    path = write_csv(_nodules(), tmp_path / "nodules.csv", accepted=[1])
    assert path.read_text() == (
        "label,name,centre_lps_L_mm,centre_lps_P_mm,centre_lps_S_mm,long_axis_mm,short_axis_mm,"
        "volume_mm3,mean_hu,median_hu,type,confidence,accepted\n"
        "1,Nodule 1,56.4,86.34,-115.96,32.76,21.1,6708.8,-350.5,-402.0,part-solid,0.9,1\n"
        "2,Nodule 2,-40.5,12.35,-101.25,8.0,5.5,140.1,20.0,25.0,solid,0.6124,0\n"
    )
    rows = read_csv(path)
    assert rows[1]["centre_lps_P_mm"] == 12.35 and rows[1]["accepted"] == 0 and rows[0]["label"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["nodules.csv"]


def test_csv_defaults_to_all_accepted_and_empty_has_header(tmp_path):
    assert [r["accepted"] for r in read_csv(write_csv(_nodules(), tmp_path / "a.csv"))] == [1, 1]
    assert (write_csv([], tmp_path / "b.csv")).read_text().count("\n") == 1


def test_report_json_converts_numpy_paths_and_dataclasses(tmp_path):
    payload = {
        "algorithm": AlgorithmInfo("glance-small", "1.2.0", {"probability": 0.5}),
        "count": np.int64(2),
        "spacing": np.array([0.5, 0.5, 2.5]),
        "input": Path("/data/ct"),
        "mean": np.float32(0.25),
    }
    path = write_report_json(tmp_path / "report.json", payload)
    assert json.loads(path.read_text()) == {
        "algorithm": {"name": "glance-small", "version": "1.2.0", "thresholds": {"probability": 0.5}},
        "count": 2,
        "spacing": [0.5, 0.5, 2.5],
        "input": "/data/ct",
        "mean": 0.25,
    }
    with pytest.raises(TypeError, match="not JSON serialisable: object"):
        write_report_json(tmp_path / "bad.json", {"x": object()})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report.json"]


# ------------------------------------------------------------------ snapshots

# Columns: LPS directions of the index axes. "coronal" stores coronal slices: j runs towards S, k towards anterior.
DIRECTIONS = {
    "identity": np.eye(3),
    "flip_i_k": np.diag([-1.0, 1.0, -1.0]),
    "coronal": np.array([[1.0, 0.0, 0.0], [0.0, 0.0, -1.0], [0.0, 1.0, 0.0]]),
    # i runs posterior, j left: image rows and columns swap.
    "rows_are_i": np.array([[0.0, 1.0, 0.0], [1.0, 0.0, 0.0], [0.0, 0.0, -1.0]]),
}
LEFT_BAR_HU = 150  # top of the lung window: pure white
POSTERIOR_BAR_HU = -100  # grey (1250 / 1500 * 255 = 212)


def _phantom(direction: np.ndarray):
    """24^3 grid at 1 mm: a nodule (5x5 mm axial section, 3x3 above and below), a white bar
    9-12 mm to the patient's left of it and a grey one 9-12 mm posterior."""
    n = 24
    ct = Volume(np.zeros((n, n, n), np.int16), (1.0, 1.0, 1.0), (0.0, 0.0, 0.0), direction)
    centre_ijk = np.array([12.0, 12.0, 12.0])
    k, j, i = np.meshgrid(np.arange(n), np.arange(n), np.arange(n), indexing="ij")
    ijk = np.stack([i, j, k], axis=-1).astype(float)
    rel = np.rint(ct.ijk_to_lps(ijk) - ct.ijk_to_lps(centre_ijk))
    L, P, S = rel[..., 0], rel[..., 1], rel[..., 2]
    labels = np.zeros(ct.shape, np.uint16)
    labels[(abs(L) <= 2) & (abs(P) <= 2) & (S == 0)] = 1
    labels[(abs(L) <= 1) & (abs(P) <= 1) & (abs(S) == 1)] = 1
    hu = np.full(ct.shape, -1000, np.int16)
    hu[labels == 1] = 0
    hu[(L >= 9) & (L <= 12) & (abs(P) <= 1) & (abs(S) <= 1)] = LEFT_BAR_HU
    hu[(P >= 9) & (P <= 12) & (abs(L) <= 1) & (abs(S) <= 1)] = POSTERIOR_BAR_HU
    ct = ct.with_array(hu)
    nodule = Nodule(1, tuple(ct.ijk_to_lps(centre_ijk)), tuple(centre_ijk), 5.0, 5.0, 43.0, -10.0, 0.0, "solid", 0.8)
    return ct, labels, nodule


@pytest.mark.parametrize("name", sorted(DIRECTIONS))
def test_snapshot_is_oriented_axial_crop_with_contour_and_cross(tmp_path, name):
    ct, labels, nodule = _phantom(DIRECTIONS[name])
    paths = write_snapshots(ct, labels, [nodule], tmp_path, size=256, margin_mm=15.0)
    assert paths == [tmp_path / "nodule_01.png"]
    image = Image.open(paths[0])
    assert image.size == (256, 256) and image.mode == "RGB"
    rgb = np.asarray(image).astype(int)

    # Window: 31 x 31 pixels at 1 mm (15 mm each side of the centre) scaled to 256.
    scale = 256 / 31
    contour = np.all(rgb == nodule_colour(1), axis=-1)
    rows, cols = np.nonzero(contour)
    # The 5 x 5 section (window pixels 13..17) is the largest; its outline spans 13*scale .. 18*scale.
    for found in (rows, cols):
        assert abs(found.min() - 13 * scale) <= 1.5 and abs(found.max() + 1 - 18 * scale) <= 1.5
    assert tuple(rgb[128, 128]) == CROSS_COLOUR

    # Radiological view: patient left on the image right, posterior at the bottom.
    # Bars: window pixels 24..27 from the top/left edge, i.e. 24*scale .. 28*scale in the image.
    grey = rgb[..., 0]
    white = np.all(rgb >= 250, axis=-1)
    white[:40, :] = False  # the caption
    _, bar_l_cols = np.nonzero(white[110:146, :])
    assert bar_l_cols.size and bar_l_cols.min() >= 24 * scale - 1.5 and bar_l_cols.max() < 28 * scale + 1.5
    assert not white[160:, :].any() and not white[:, :160].any()
    bar_p_rows, _ = np.nonzero(np.abs(grey[:, 110:146] - 212) <= 1)
    bar_p_rows = bar_p_rows[bar_p_rows > 160]  # the nodule's bilinear edge also passes 212
    assert bar_p_rows.size and bar_p_rows.min() >= 24 * scale - 1.5 and bar_p_rows.max() < 28 * scale + 1.5


def test_snapshot_per_nodule_and_shape_check(tmp_path):
    ct, labels, nodule = _phantom(np.eye(3))
    second = Nodule(2, nodule.centre_lps, (5.0, 5.0, 5.0), 1.0, 1.0, 1.0, 0.0, 0.0, "solid", 0.5)
    labels[5, 5, 5] = 2
    paths = write_snapshots(ct, labels, [second, nodule], tmp_path / "snaps", size=64)
    assert [p.name for p in paths] == ["nodule_01.png", "nodule_02.png"]
    assert Image.open(paths[1]).size == (64, 64)
    assert np.all(np.asarray(Image.open(paths[1])) == nodule_colour(2), axis=-1).any()
    with pytest.raises(ValueError, match="does not match"):
        write_snapshots(ct, labels[:-1], [nodule], tmp_path)
