"""glance.measure: digital shapes whose measurements are known by hand."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy.spatial.distance import pdist

from glance.measure import TypeConfig, in_plane_calipers, measure_nodules, solid_fraction, type_from_hu
from glance.postprocess import Candidate, Detections
from glance.volume import Volume

# i -> -L, j -> +P, k -> -S: a flipped, non-trivial but axial geometry
DIRECTION = np.array([[-1.0, 0, 0], [0, 1.0, 0], [0, 0, -1.0]])
ORIGIN = (-10.0, 20.0, -30.0)


def ct_volume(hu: np.ndarray, spacing_ijk) -> Volume:
    return Volume(hu, spacing_ijk, ORIGIN, DIRECTION)


def lps_by_hand(i, j, k, spacing_ijk):
    si, sj, sk = spacing_ijk
    return (ORIGIN[0] - i * si, ORIGIN[1] + j * sj, ORIGIN[2] - k * sk)


def candidate(label, confidence):
    return Candidate(label, (0, 0, 0), (0.0, 0.0, 0.0), confidence, confidence, 1.0, 0, (0, 0), (0,) * 6)


def test_digital_sphere():
    spacing = (0.8, 0.8, 0.8)
    shape, c, r = (25, 30, 35), (12, 14, 16), 8
    kk, jj, ii = np.indices(shape)
    sphere = (kk - c[0]) ** 2 + (jj - c[1]) ** 2 + (ii - c[2]) ** 2 <= r * r
    labels = sphere.astype(np.uint16)
    hu = np.full(shape, -900, np.int16)
    hu[sphere] = 40
    det = Detections(labels, [candidate(1, 0.7)])
    (nod,) = measure_nodules(labels, ct_volume(hu, spacing), det)

    assert nod.label == 1 and nod.name == "Nodule 1"
    assert nod.centre_ijk == (16.0, 14.0, 12.0)
    assert nod.centre_lps == pytest.approx(lps_by_hand(16, 14, 12, spacing), abs=1e-9)
    count = int(sphere.sum())
    assert nod.volume_mm3 == pytest.approx(count * 0.8**3, rel=1e-12)
    assert nod.volume_mm3 == pytest.approx(4 / 3 * math.pi * (r * 0.8) ** 3, rel=0.03)
    # the central disc (largest area) spans (c - 8) .. (c + 8) along both axes
    assert nod.axial_slice == 12
    assert nod.long_axis_mm == pytest.approx(16 * 0.8, abs=1e-9)
    assert nod.short_axis_mm == pytest.approx(16 * 0.8, abs=1e-9)
    assert (nod.mean_hu, nod.median_hu, nod.nodule_type) == (40.0, 40.0, "solid")
    assert nod.confidence == 0.7
    assert nod.bbox == (4, 6, 8, 21, 23, 25)
    assert nod.extra["equivalent_diameter_mm"] == pytest.approx((6 * nod.volume_mm3 / math.pi) ** (1 / 3))
    ends = np.array(nod.long_axis_lps)
    assert np.linalg.norm(ends[1] - ends[0]) == pytest.approx(nod.long_axis_mm)
    assert ends[:, 2] == pytest.approx([ORIGIN[2] - 12 * 0.8] * 2)  # both on the measured slice


@pytest.mark.parametrize("axis", ["i", "j"])
def test_one_pixel_line_uses_pixel_centres(axis):
    spacing = (0.5, 0.7, 2.0)  # (si, sj, sk)
    labels = np.zeros((3, 20, 20), np.uint16)
    n = 11
    if axis == "i":
        labels[1, 4, 3 : 3 + n] = 1
        first, last, step = (3, 4), (3 + n - 1, 4), spacing[0]
    else:
        labels[1, 3 : 3 + n, 4] = 1
        first, last, step = (4, 3), (4, 3 + n - 1), spacing[1]
    (nod,) = measure_nodules(labels, ct_volume(np.zeros(labels.shape, np.int16), spacing))
    assert nod.long_axis_mm == pytest.approx((n - 1) * step, abs=1e-12)
    assert nod.short_axis_mm == 0.0
    expected = {lps_by_hand(*first, 1, spacing), lps_by_hand(*last, 1, spacing)}
    assert {tuple(np.round(p, 9)) for p in nod.long_axis_lps} == {tuple(np.round(p, 9)) for p in expected}
    assert math.isnan(nod.confidence)  # no detections given


def test_axis_aligned_ellipse_anisotropic():
    sj, si = 0.7, 0.5
    jj, ii = np.indices((21, 41))
    # semi-axes 6 mm along i (12 pixels) and 3.5 mm along j (5 pixels), centre (10, 20)
    ellipse = ((ii - 20) * si / 6.0) ** 2 + ((jj - 10) * sj / 3.5) ** 2 <= 1 + 1e-9
    cal = in_plane_calipers(ellipse, (sj, si))
    assert cal.long_mm == pytest.approx(12.0, abs=1e-9)
    assert cal.short_mm == pytest.approx(7.0, abs=1e-9)
    assert sorted(map(tuple, cal.long_ends)) == [(10.0, 8.0), (10.0, 32.0)]
    assert sorted(map(tuple, np.round(cal.short_ends, 9))) == [(5.0, 20.0), (15.0, 20.0)]


def test_axis_aligned_rectangle_long_axis_is_the_diagonal():
    rect = np.zeros((12, 16), bool)
    rect[2:6, 3:13] = True  # 4 x 10 pixels, 1 mm: centres span 3 x 9 mm
    cal = in_plane_calipers(rect, (1.0, 1.0))
    assert cal.long_mm == pytest.approx(math.hypot(9, 3), abs=1e-12)
    # longest chord perpendicular to a diagonal of an A x B box (A >= B): B * hypot(A, B) / A
    assert cal.short_mm == pytest.approx(3 * math.hypot(9, 3) / 9, abs=1e-12)
    long_v = np.diff(cal.long_ends, axis=0)[0]
    short_v = np.diff(cal.short_ends, axis=0)[0]
    assert long_v @ short_v == pytest.approx(0.0, abs=1e-9)


def rasterise(inside, shape, spacing):
    jj, ii = np.indices(shape)
    y, x = (jj - shape[0] // 2) * spacing[0], (ii - shape[1] // 2) * spacing[1]
    return inside(x, y)


def rotate(x, y, degrees):
    t = math.radians(degrees)
    return x * math.cos(t) + y * math.sin(t), -x * math.sin(t) + y * math.cos(t)


def test_rotated_rectangle_30_degrees():
    sp, length, width = 0.25, 20.0, 8.0
    def inside(x, y):
        u, v = rotate(x, y, 30)
        return (abs(u) <= length / 2) & (abs(v) <= width / 2)

    rect = rasterise(inside, (121, 121), (sp, sp))
    cal = in_plane_calipers(rect, (sp, sp))
    diag = math.hypot(length, width)
    pixel = sp * math.sqrt(2)
    assert diag - 2 * pixel <= cal.long_mm <= diag  # pixel centres lie inside the rectangle
    assert cal.short_mm == pytest.approx(width * diag / length, abs=2 * pixel)
    # the long axis is a diagonal: 30 deg +/- atan(W / L) from the i axis
    dj, di = (cal.long_ends[1] - cal.long_ends[0]) * sp
    angle = math.degrees(math.atan2(dj, di)) % 180
    assert min(abs(angle - a) for a in (30 + 21.801, 30 - 21.801)) < 2.0
    short_v = (cal.short_ends[1] - cal.short_ends[0]) * sp
    assert np.array([dj, di]) @ short_v == pytest.approx(0.0, abs=1e-9)


def test_rotated_ellipse_30_degrees():
    sp = (0.6, 0.5)
    def inside(x, y):
        u, v = rotate(x, y, 30)
        return (u / 9.0) ** 2 + (v / 4.0) ** 2 <= 1

    ellipse = rasterise(inside, (61, 61), sp)
    cal = in_plane_calipers(ellipse, sp)
    assert cal.long_mm == pytest.approx(18.0, abs=1.0)
    assert cal.short_mm == pytest.approx(8.0, abs=1.0)
    dj, di = (cal.long_ends[1] - cal.long_ends[0]) * np.array(sp)
    assert math.degrees(math.atan2(dj, di)) % 180 == pytest.approx(30.0, abs=3.0)
    # the short axis ends are (within half a pixel of) pixel centres inside the ellipse
    for j, i in cal.short_ends:
        assert ellipse[int(round(j)), int(round(i))]


@pytest.mark.parametrize("seed", range(5))
def test_long_axis_is_the_brute_force_max_distance(seed):
    rng = np.random.default_rng(seed)
    mask = np.zeros((40, 40), bool)
    jj, ii = np.indices(mask.shape)
    for _ in range(4):
        cj, ci, r = rng.uniform(8, 32), rng.uniform(8, 32), rng.uniform(2, 7)
        mask |= (jj - cj) ** 2 + (ii - ci) ** 2 <= r * r
    sp = (0.9, 0.6)
    cal = in_plane_calipers(mask, sp)
    assert cal.long_mm == pytest.approx(pdist(np.argwhere(mask) * sp).max(), abs=1e-9)
    assert 0 < cal.short_mm <= cal.long_mm + 1e-9


def test_measurement_slice_is_the_largest_area():
    labels = np.zeros((6, 20, 20), np.uint16)
    labels[2, 5:10, 5:10] = 1  # area 25, diagonal 4 * sqrt(2) = 5.66
    labels[3, 10, 2:12] = 1  # area 10, long axis 9
    (nod,) = measure_nodules(labels, ct_volume(np.zeros(labels.shape, np.int16), (1, 1, 1)))
    assert nod.axial_slice == 2
    assert nod.long_axis_mm == pytest.approx(4 * math.sqrt(2))
    assert nod.volume_mm3 == 35.0


def test_hu_statistics_and_two_labels():
    labels = np.zeros((6, 8, 8), np.uint16)
    hu = np.full(labels.shape, -1000, np.int16)
    labels[1:4, 2:5, 2:5] = 2
    hu[1, 2:5, 2:5], hu[2, 2:5, 2:5], hu[3, 2:5, 2:5] = -500, 0, 100
    labels[5, 0:2, 0:2] = 1
    hu[5, 0:2, 0:2] = -600
    det = Detections(labels, [candidate(1, 0.9), candidate(2, 0.4)])
    one, two = measure_nodules(labels, ct_volume(hu, (0.5, 0.5, 2.0)), det)
    assert (one.label, two.label) == (1, 2)
    assert two.mean_hu == pytest.approx(-400 / 3)
    assert two.median_hu == 0.0
    assert two.volume_mm3 == 27 * 0.5
    assert two.centre_ijk == (3.0, 3.0, 2.0)
    assert two.bbox == (1, 2, 2, 4, 5, 5)
    assert two.extra["solid_fraction"] == pytest.approx(2 / 3)
    assert two.nodule_type == "part-solid"
    assert (one.nodule_type, one.confidence, two.confidence) == ("ground-glass", 0.9, 0.4)
    with pytest.raises(ValueError):
        measure_nodules(labels[:5], ct_volume(hu, (0.5, 0.5, 2.0)))


@pytest.mark.parametrize(
    "values, expected",
    [
        ([40] * 10, "solid"),
        ([-600] * 10, "ground-glass"),
        ([-600] * 5 + [30] * 5, "part-solid"),
        ([-600] * 2 + [30] * 8, "solid"),  # exactly 0.8 solid
        ([-600] * 3 + [30] * 7, "part-solid"),
        ([-600] * 9 + [30] * 1, "part-solid"),  # exactly 0.1 solid
        ([-600] * 21 + [30] * 1, "ground-glass"),
        ([30] * 7 + [-950] * 3, "solid"),  # aerated margin voxels do not dilute
        ([-950] * 10, "ground-glass"),
        ([-300] * 10, "ground-glass"),  # -300 itself is not solid
    ],
)
def test_type_from_hu(values, expected):
    assert type_from_hu(np.array(values, np.int16)) == expected


def test_type_thresholds_are_config():
    values = np.array([-600] * 15 + [30] * 85)
    assert solid_fraction(values) == 0.85
    assert type_from_hu(values) == "solid"
    assert type_from_hu(values, TypeConfig(solid_min_fraction=0.9)) == "part-solid"
    assert type_from_hu(values, TypeConfig(solid_hu=50)) == "ground-glass"
    with pytest.raises(ValueError):
        type_from_hu(np.array([], np.int16))
