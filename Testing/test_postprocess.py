"""glance.postprocess: synthetic probability/heatmap maps built from known ground truth."""

from __future__ import annotations

import math
from dataclasses import replace

import numpy as np
import pytest
from scipy import ndimage

from glance.errors import InputError
from glance.postprocess import PostprocessConfig, candidates_for_froc, find_nodules

SPACING = (1.25, 0.7, 0.7)  # (k, j, i) mm
SHAPE = (48, 96, 96)
A_CENTRE, A_RADIUS = (16, 30, 30), 6.0
B_CENTRE, B_RADIUS = (32, 60, 30), 4.5
GRID = np.indices(SHAPE, dtype=np.float32)


def ball(centre, radius_mm, spacing=SPACING, grid=GRID):
    d2 = sum(((grid[a] - centre[a]) * spacing[a]) ** 2 for a in range(3))
    return d2 <= radius_mm**2 + 1e-6


def gaussian(centre, height, sigma_mm=2.0, spacing=SPACING, grid=GRID):
    d2 = sum(((grid[a] - centre[a]) * spacing[a]) ** 2 for a in range(3))
    return (height * np.exp(-d2 / (2 * sigma_mm**2))).astype(np.float32)


def tube_along_i(k, j, radius_mm, spacing=SPACING, grid=GRID):
    return ((grid[0] - k) * spacing[0]) ** 2 + ((grid[1] - j) * spacing[1]) ** 2 <= radius_mm**2


def scene(a_height=0.9, b_height=0.6):
    """Sphere A (prob 0.95), sphere B (prob 0.8), a vessel with probability but no
    heatmap, a heatmap peak in air, and a 2 mm blob with both."""
    prob = np.zeros(SHAPE, np.float32)
    heat = np.zeros(SHAPE, np.float32)
    truth = {
        "A": ball(A_CENTRE, A_RADIUS),
        "B": ball(B_CENTRE, B_RADIUS),
        "vessel": tube_along_i(40, 80, 1.5),
        "blob": ball((40, 20, 70), 1.0),
    }
    prob[truth["A"]] = 0.95
    prob[truth["B"]] = 0.8
    prob[truth["vessel"]] = 0.9
    prob[truth["blob"]] = 0.9
    for centre, h in ((A_CENTRE, a_height), (B_CENTRE, b_height), ((8, 75, 75), 0.8), ((40, 20, 70), 0.99)):
        heat = np.maximum(heat, gaussian(centre, h))
    return prob, heat, truth


def test_scene_keeps_exactly_the_two_spheres():
    prob, heat, truth = scene()
    det = find_nodules(prob, heat, SPACING)
    assert det.labels.dtype == np.uint16 and det.labels.shape == SHAPE
    assert np.array_equal(det.labels == 1, truth["A"])
    assert np.array_equal(det.labels == 2, truth["B"])
    assert det.labels.max() == 2
    # vessel (no heatmap peak), peak in air (no probability), 2 mm blob (min size): all gone
    assert not det.labels[truth["vessel"] | truth["blob"]].any()
    assert det.labels[8, 75, 75] == 0

    a, b = det.candidates
    assert (a.label, a.peak_index, a.position_index) == (1, A_CENTRE, tuple(map(float, A_CENTRE)))
    assert (b.label, b.peak_index, b.position_index) == (2, B_CENTRE, tuple(map(float, B_CENTRE)))
    assert a.detection_score == pytest.approx(0.9, abs=1e-6)
    assert a.mean_probability == pytest.approx(0.95, abs=1e-6)
    assert a.confidence == pytest.approx(0.9 * 0.95, abs=1e-6)
    assert b.confidence == pytest.approx(0.6 * 0.8, abs=1e-6)
    assert a.component_voxels == truth["A"].sum()
    # peaks >= 0.3: A's Gaussian is 0.9*exp(-(n*1.25)^2/8) = 0.74, 0.41, 0.16 n slices off
    assert a.slices == (14, 18)
    box = ndimage.find_objects(truth["A"].astype(np.uint8))[0]
    assert a.bbox == tuple(s.start for s in box) + tuple(s.stop for s in box)
    assert det.by_label(2) is b


def test_min_diameter_is_what_drops_the_small_blob():
    prob, heat, truth = scene()
    # 9 voxels x 0.6125 mm^3: equivalent diameter 2.19 mm
    assert truth["blob"].sum() == 9
    det = find_nodules(prob, heat, SPACING, PostprocessConfig(min_diameter_mm=2.0))
    assert det.labels.max() == 3
    assert np.array_equal(det.labels == 1, truth["blob"])  # 0.99 x 0.9 beats A's 0.9 x 0.95
    assert det.candidates[0].peak_index == (40, 20, 70)


def test_order_follows_confidence():
    prob, heat, truth = scene(a_height=0.5, b_height=0.9)
    det = find_nodules(prob, heat, SPACING)
    assert np.array_equal(det.labels == 1, truth["B"])  # 0.9 x 0.8 = 0.72
    assert np.array_equal(det.labels == 2, truth["A"])  # 0.5 x 0.95 = 0.475
    assert [c.label for c in det.candidates] == [1, 2]
    assert det.candidates[0].confidence > det.candidates[1].confidence


@pytest.mark.parametrize(
    "change, expect_b",
    [
        ({"seg_threshold": 0.85}, False),  # B's probability is 0.8
        ({"seg_threshold": 0.8}, True),  # thresholds are inclusive
        ({"det_threshold": 0.65}, False),  # B's heatmap peak is 0.6
        ({"det_threshold": 0.6}, True),
    ],
)
def test_thresholds_change_the_result(change, expect_b):
    prob, heat, truth = scene()
    det = find_nodules(prob, heat, SPACING, PostprocessConfig(**change))
    assert np.array_equal(det.labels == 1, truth["A"])
    assert det.labels.max() == (2 if expect_b else 1)
    assert np.array_equal(det.labels == 2, truth["B"] if expect_b else np.zeros(SHAPE, bool))


def test_uint8_float32_float16_agree():
    prob, heat, _ = scene()
    prob_u8 = np.round(prob * 255).astype(np.uint8)
    heat_u8 = np.round(heat * 255).astype(np.uint8)
    results = [
        find_nodules(prob_u8, heat_u8, SPACING),
        find_nodules(prob_u8 / np.float32(255), heat_u8 / np.float32(255), SPACING),
        find_nodules(prob_u8.astype(np.float16) / 255, heat_u8.astype(np.float16) / 255, SPACING),
        find_nodules(prob, heat, SPACING),
    ]
    for r in results[1:]:
        assert np.array_equal(r.labels, results[0].labels)
        assert [c.peak_index for c in r.candidates] == [c.peak_index for c in results[0].candidates]
        for c, c0 in zip(r.candidates, results[0].candidates):
            assert c.confidence == pytest.approx(c0.confidence, abs=4e-3)
    # threshold exactly on a uint8 level: 0.2 * 255 = 51 is inside, 50 is not
    p = np.zeros((5, 9, 9), np.uint8)
    h = np.zeros_like(p)
    p[1:4, 3:6, 3:6] = 51
    h[2, 4, 4] = 200
    cfg = PostprocessConfig(seg_threshold=0.2, min_diameter_mm=0.0)
    assert find_nodules(p, h, (1, 1, 1), cfg).labels.sum() == 27
    assert find_nodules(p - (p > 0), h, (1, 1, 1), cfg).labels.sum() == 0
    assert find_nodules(p / np.float32(255), h / np.float32(255), (1, 1, 1), cfg).labels.sum() == 27


def test_empty_maps_give_no_nodules():
    z = np.zeros((6, 20, 20), np.uint8)
    for prob, heat in ((z, z), (z + 255, z), (z, z + 255)):
        det = find_nodules(prob, heat, (1.0, 1.0, 1.0))
        assert det.candidates == [] and det.labels.dtype == np.uint16 and not det.labels.any()
    assert candidates_for_froc(z, z, (1.0, 1.0, 1.0)) == []


def test_touching_spheres_with_two_peaks_are_two_nodules():
    shape, spacing = (20, 30, 50), (1.0, 1.0, 1.0)
    grid = np.indices(shape, dtype=np.float32)
    left = ball((10, 15, 20), 4.6, spacing, grid)
    right = ball((10, 15, 29), 4.6, spacing, grid)
    union = left | right
    assert ndimage.label(union, structure=np.ones((3, 3, 3)))[1] == 1  # one component
    prob = union.astype(np.float32)
    heat = np.maximum(
        gaussian((10, 15, 20), 0.9, 2.0, spacing, grid), gaussian((10, 15, 29), 0.8, 2.0, spacing, grid)
    )
    det = find_nodules(prob, heat, spacing)
    # equal seeds: the cut is the mid-plane i = 24.5
    split = grid[2] <= 24
    assert np.array_equal(det.labels == 1, union & split)
    assert np.array_equal(det.labels == 2, union & ~split)
    assert [c.peak_index for c in det.candidates] == [(10, 15, 20), (10, 15, 29)]


def test_two_peaks_inside_one_nodule_stay_one():
    shape, spacing = (24, 40, 40), (1.0, 1.0, 1.0)
    grid = np.indices(shape, dtype=np.float32)
    sphere = ball((12, 20, 20), 8.0, spacing, grid)
    prob = sphere.astype(np.float32)
    # two peaks 6 mm apart: closer than the equivalent radius of either half (6.35 mm)
    heat = np.maximum(
        gaussian((12, 20, 17), 0.9, 1.0, spacing, grid), gaussian((12, 20, 23), 0.7, 1.0, spacing, grid)
    )
    cfg = PostprocessConfig(nms_radius_mm=2.0)
    det = find_nodules(prob, heat, spacing, cfg)
    assert np.array_equal(det.labels == 1, sphere) and det.labels.max() == 1
    assert det.candidates[0].peak_index == (12, 20, 17)
    assert det.candidates[0].detection_score == pytest.approx(0.9, abs=1e-6)
    # with a smaller merge factor, and the neck test off, the halves count as two nodules
    two = find_nodules(prob, heat, spacing, replace(cfg, split_separation=0.9, neck_ratio=math.inf))
    assert two.labels.max() == 2 and np.array_equal(two.labels > 0, sphere)


CHAIN_PEAKS = ((9, 0.9), (21, 0.8))  # (slice, height): two chains 12 slices (12 mm) apart


def _two_chain_heatmap(shape, spacing, grid):
    """Heatmap peaks on slices 8-10 and 20-22 only, as on a large nodule whose middle slices carry
    a weak heatmap: two chains in one component."""
    heat = np.zeros(shape, np.float32)
    for k, h in CHAIN_PEAKS:
        heat[k - 1 : k + 2] = gaussian((k, 20, 20), h, 1.5, spacing, grid)[k - 1 : k + 2]
    return heat


def _z_long_nodule():
    """An ellipsoid 26 mm long in k and 18 mm across: its halves' equivalent radii (8.1 mm) are
    well under the 12 mm between the chains, so the distance rule alone splits it."""
    shape, spacing = (30, 40, 40), (1.0, 1.0, 1.0)
    grid = np.indices(shape, dtype=np.float32)
    body = ((grid[0] - 15) / 13.0) ** 2 + ((grid[1] - 20) / 9.0) ** 2 + ((grid[2] - 20) / 9.0) ** 2 <= 1.0
    return shape, spacing, grid, body


def test_a_nodule_whose_heatmap_breaks_into_two_chains_is_one_nodule():
    shape, spacing, grid, body = _z_long_nodule()
    heat, cfg = _two_chain_heatmap(shape, spacing, grid), PostprocessConfig(nms_radius_mm=2.0)
    det = find_nodules(body.astype(np.float32), heat, spacing, cfg)
    assert det.labels.max() == 1 and np.array_equal(det.labels == 1, body)
    assert det.candidates[0].peak_index == (9, 20, 20) and det.candidates[0].slices == (8, 10)
    # without the neck test (the rule before it), the two halves were reported as two nodules
    off = find_nodules(body.astype(np.float32), heat, spacing, replace(cfg, neck_ratio=math.inf))
    assert off.labels.max() == 2 and np.array_equal(off.labels > 0, body)


def test_a_nodule_with_a_hollow_core_between_its_chains_is_one_nodule():
    # The network may leave a part-solid nodule's dense core unsegmented on its middle slices (it
    # looks like a vessel in cross-section): the part left is a thick shell around a hole.
    shape, spacing, grid, body = _z_long_nodule()
    core = (np.abs(grid[0] - 15) <= 2) & (((grid[1] - 20) ** 2 + (grid[2] - 20) ** 2) <= 9.0)
    det = find_nodules((body & ~core).astype(np.float32), _two_chain_heatmap(shape, spacing, grid), spacing,
                       PostprocessConfig(nms_radius_mm=2.0))
    assert det.labels.max() == 1 and np.array_equal(det.labels == 1, body & ~core)


@pytest.mark.parametrize("normal", [(0.0, 0.0, 1.0), (1.0, 1.0, 1.0), (0.3, 1.0, 0.0)])
def test_the_cut_between_two_parts_has_the_area_of_the_plane_they_share(normal):
    # A 9 mm ball on 1.25 x 0.7 x 0.7 mm voxels, cut through its centre: the cut is a disc of
    # pi x 81 = 254.5 mm^2, however the plane lies across the voxel grid. Counting the cut's voxel
    # faces instead would overestimate an oblique cut by up to sqrt(3) (the staircase); what is left
    # is the voxelised rim and lattice alignment, 4.9 % at worst here (the diagonal).
    from glance.postprocess import _cut_areas

    spacing, centre = (1.25, 0.7, 0.7), (12, 20, 20)
    grid = np.indices((24, 40, 40), dtype=np.float32)
    coords = np.argwhere(ball(centre, 9.0, spacing, grid))
    unit = np.asarray(normal) / np.linalg.norm(normal)
    offset_mm = (coords - np.asarray(centre)) * np.asarray(spacing)
    owner = (offset_mm @ unit > 0).astype(np.int64)
    seeds_mm = np.array([np.asarray(centre) * spacing - unit, np.asarray(centre) * spacing + unit])
    areas = _cut_areas((24, 40, 40), coords, owner, seeds_mm, spacing)
    assert list(areas) == [(0, 1)]
    assert areas[(0, 1)] == pytest.approx(math.pi * 81.0, rel=0.06)


@pytest.mark.parametrize("distance, nodules", [(5.0, 1), (9.0, 2)])
def test_two_overlapping_spheres_split_only_at_a_neck(distance, nodules):
    # Radius 5 mm. Centres 9 mm apart meet at a neck of radius sqrt(25 - 4.5^2) = 2.2 mm, 0.45 x
    # either part's equivalent radius (4.9 mm): two nodules. 5 mm apart the neck is 4.3 mm, 0.92 x
    # the parts' 4.7 mm: one lobulated nodule, though the seeds are further apart than the
    # distance rule (split_separation 0.5 x 4.7 mm) would merge.
    shape, spacing = (24, 24, 40), (1.0, 1.0, 1.0)
    grid = np.indices(shape, dtype=np.float32)
    left, right = (12, 12, 20 - distance / 2), (12, 12, 20 + distance / 2)
    union = ball(left, 5.0, spacing, grid) | ball(right, 5.0, spacing, grid)
    heat = np.maximum(gaussian(left, 0.9, 1.0, spacing, grid), gaussian(right, 0.8, 1.0, spacing, grid))
    cfg = PostprocessConfig(nms_radius_mm=2.0, split_separation=0.5)
    det = find_nodules(union.astype(np.float32), heat, spacing, cfg)
    assert det.labels.max() == nodules and np.array_equal(det.labels > 0, union)


def test_one_heatmap_chain_over_two_components_gives_two_nodules():
    shape, spacing = (30, 20, 20), (1.0, 1.0, 1.0)
    grid = np.indices(shape, dtype=np.float32)
    low, high = ball((9, 10, 10), 3.0, spacing, grid), ball((18, 10, 10), 3.0, spacing, grid)
    prob = (low | high).astype(np.float32)
    heat = np.zeros(shape, np.float32)
    heat[5:23, 10, 10] = 0.8  # one peak per slice, one chain across both spheres
    heat[9, 10, 10] = 0.9
    det = find_nodules(prob, heat, spacing)
    assert np.array_equal(det.labels == 1, low)
    assert np.array_equal(det.labels == 2, high)
    assert det.candidates[1].slices == (15, 21)  # the chain's supported peaks in "high"


def test_nodule_on_a_vessel_is_clipped_to_max_diameter():
    prob = np.zeros(SHAPE, np.float32)
    nodule, vessel = ball(A_CENTRE, A_RADIUS), tube_along_i(A_CENTRE[0], A_CENTRE[1], 1.5)
    prob[nodule | vessel] = 0.9
    heat = gaussian(A_CENTRE, 0.9)
    det = find_nodules(prob, heat, SPACING, PostprocessConfig(max_diameter_mm=30.0))
    expected = (nodule | vessel) & ball(A_CENTRE, 15.0)
    assert np.array_equal(det.labels == 1, expected) and det.labels.max() == 1
    assert not (det.labels[vessel & ~expected]).any()


def test_candidates_for_froc_use_the_low_threshold_and_cap():
    prob, heat, truth = scene()
    faint = ball((30, 30, 70), 3.0)
    prob[faint] = 0.9
    heat = np.maximum(heat, gaussian((30, 30, 70), 0.1))
    assert find_nodules(prob, heat, SPACING).labels.max() == 2
    cands = candidates_for_froc(prob, heat, SPACING)
    assert [c.label for c in cands] == [1, 2, 3]
    assert [c.peak_index for c in cands] == [A_CENTRE, B_CENTRE, (30, 30, 70)]
    assert cands[2].confidence == pytest.approx(0.1 * 0.9, abs=1e-6)
    capped = candidates_for_froc(prob, heat, SPACING, PostprocessConfig(max_candidates=2))
    assert [c.peak_index for c in capped] == [A_CENTRE, B_CENTRE]


@pytest.mark.parametrize(
    "prob, heat, spacing",
    [
        (np.zeros((4, 5, 5), np.uint8), np.zeros((4, 5, 6), np.uint8), (1, 1, 1)),
        (np.zeros((4, 5, 5), np.int16), np.zeros((4, 5, 5), np.uint8), (1, 1, 1)),
        (np.zeros((5, 5), np.uint8), np.zeros((5, 5), np.uint8), (1, 1, 1)),
        (np.zeros((4, 5, 5), np.uint8), np.zeros((4, 5, 5), np.uint8), (1, 0, 1)),
    ],
)
def test_bad_maps_raise_input_error(prob, heat, spacing):
    with pytest.raises(InputError):
        find_nodules(prob, heat, spacing)


def test_scipy_fallback_without_cc3d(monkeypatch):
    prob, heat, truth = scene()
    monkeypatch.setitem(__import__("sys").modules, "cc3d", None)  # import cc3d -> ImportError
    det = find_nodules(prob, heat, SPACING)
    assert np.array_equal(det.labels == 1, truth["A"])
    assert np.array_equal(det.labels == 2, truth["B"])
    assert det.labels.max() == 2


# --- rule 8: findings must lie against the lungs ---------------------------------------------------


def chest(lung_slices, lung_rows=(8, 55), lung_cols=(8, 56), nodules=()):
    """Soft tissue (40 HU) with one air-filled lung box inside it and the given nodule masks drawn as
    soft tissue: the lungs ``glance.preprocess.lung_map`` finds are that box minus the nodules."""
    hu = np.full(SHAPE, 40, np.int16)
    hu[slice(*lung_slices), slice(*lung_rows), slice(*lung_cols)] = -850
    for mask in nodules:
        hu[mask] = 40
    return hu


def test_lung_map_touches_within_one_cell_and_one_slice():
    from glance.preprocess import LungMap

    lungs = LungMap(np.zeros((6, 10, 10), bool), step=2)
    lungs.mask[2, 4, 4] = True  # the cell of rows 8-9 and columns 8-9 on slice 2
    region = np.zeros((1, 2, 2), bool)
    region[0, 0, 0] = True
    assert lungs.touches(np.array([3, 10, 10]), region)  # next slice, next cell: touching
    assert lungs.touches(np.array([1, 6, 6]), region)  # previous slice, one cell before (rows 6-7)
    assert not lungs.touches(np.array([4, 8, 8]), region)  # two slices away
    assert not lungs.touches(np.array([2, 12, 8]), region)  # two cells away (rows 12-13)
    assert not lungs.touches(np.array([2, 8, 8]), np.zeros((1, 2, 2), bool))  # nothing to place


def test_findings_away_from_the_lungs_are_dropped_and_the_rest_relabelled():
    from glance.preprocess import lung_map

    prob, heat, truth = scene()
    # The lungs end two slices below sphere B: A sits inside them, B in the soft tissue beyond.
    lungs = lung_map(chest((4, 28), nodules=(truth["A"], truth["B"])), SPACING)
    assert lungs is not None
    det = find_nodules(prob, heat, SPACING, lungs=lungs)
    assert det.labels.max() == 1 and np.array_equal(det.labels == 1, truth["A"])
    assert [c.peak_index for c in det.candidates] == [A_CENTRE] and det.outside_lungs == 1
    assert [c.peak_index for c in candidates_for_froc(prob, heat, SPACING, lungs=lungs)] == [A_CENTRE]
    unchecked = find_nodules(prob, heat, SPACING)  # without the lungs both stay, and none was dropped
    assert unchecked.labels.max() == 2 and unchecked.outside_lungs is None


def test_a_nodule_on_the_lung_wall_is_kept():
    from glance.preprocess import lung_map

    prob, heat, truth = scene()
    # B (rows 54-66) straddles the lung's wall at row 55: a juxta-pleural nodule, mostly in the wall.
    lungs = lung_map(chest((4, 40), nodules=(truth["A"], truth["B"])), SPACING)
    assert truth["B"][:, 55:].sum() > truth["B"][:, :55].sum()
    det = find_nodules(prob, heat, SPACING, lungs=lungs)
    assert [c.peak_index for c in det.candidates] == [A_CENTRE, B_CENTRE]


def test_a_ct_without_lungs_skips_the_rule():
    from glance.preprocess import lung_map

    assert lung_map(np.full(SHAPE, 40, np.int16), SPACING) is None


def test_a_gas_pocket_far_smaller_than_the_lungs_is_not_lung():
    from glance.preprocess import lung_map

    spacing = (5.0, 2.8, 2.8)  # 39 mm3 voxels: a 1.25 l lung box and a 34 ml gas pocket (2.8 % of it)
    hu = np.full(SHAPE, 40, np.int16)
    hu[4:24, 8:48, 8:48] = -850
    hu[36:42, 60:72, 60:72] = -900
    lungs = lung_map(hu, spacing)
    assert lungs.step == 1 and lungs.mask.sum() == 20 * 40 * 40
    assert not lungs.mask[36:42, 60:72, 60:72].any()
    pocket = np.zeros((1, 2, 2), bool)
    pocket[0, 0, 0] = True
    assert not lungs.touches(np.array([38, 72, 66]), pocket)  # just below the pocket: not against the lungs
    assert lungs.touches(np.array([12, 48, 20]), pocket)  # just beyond the lung box's wall


# --------------------------------------------------------------------------- rule 9: outlines


def _cone(centre, peak, radius_mm):
    """Probability falling linearly from ``peak`` at ``centre`` to 0 at ``radius_mm``."""
    d = np.sqrt(sum(((GRID[a] - centre[a]) * SPACING[a]) ** 2 for a in range(3)))
    return np.clip(peak * (1.0 - d / radius_mm), 0.0, 1.0).astype(np.float32)


def _strong_and_faint():
    """A confident nodule (peak 1.0, support 8 mm) and a faint one (peak 0.2, support 5 mm)."""
    prob = np.maximum(_cone(A_CENTRE, 1.0, 8.0), _cone(B_CENTRE, 0.2, 5.0))
    heat = np.maximum(gaussian(A_CENTRE, 0.9), gaussian(B_CENTRE, 0.6))
    return prob, heat


def test_rule_9_outlines_each_nodule_at_its_own_share_of_its_peak():
    prob, heat = _strong_and_faint()
    base = PostprocessConfig(seg_threshold=0.05, det_threshold=0.3)
    plain = find_nodules(prob, heat, SPACING, base)
    half = find_nodules(prob, heat, SPACING, replace(base, outline_fraction=0.5))
    # p >= 0.5 * peak is the inner half of each cone's radius: 4 mm and 2.5 mm balls.
    strong = {c.peak_index: c.label for c in half.candidates}[A_CENTRE]
    faint = {c.peak_index: c.label for c in half.candidates}[B_CENTRE]
    assert np.array_equal(half.labels == strong, ball(A_CENTRE, 4.0))
    assert np.array_equal(half.labels == faint, ball(B_CENTRE, 2.5))
    # An absolute threshold of 0.5 would lose the faint nodule; 0.05 outlines the strong one to 7.6 mm.
    assert np.array_equal(plain.labels == {c.peak_index: c.label for c in plain.candidates}[A_CENTRE],
                          ball(A_CENTRE, 8.0 * 0.95))


def test_rule_9_changes_outlines_only_not_what_is_found_or_its_confidence():
    prob, heat = _strong_and_faint()
    base = PostprocessConfig(seg_threshold=0.05, det_threshold=0.3)
    plain = find_nodules(prob, heat, SPACING, base)
    half = find_nodules(prob, heat, SPACING, replace(base, outline_fraction=0.5))
    assert [(c.peak_index, c.confidence, c.mean_probability) for c in plain.candidates] == \
        [(c.peak_index, c.confidence, c.mean_probability) for c in half.candidates]
    assert all(h.component_voxels < p.component_voxels for p, h in zip(plain.candidates, half.candidates))
    froc = [(c.peak_index, c.confidence) for c in candidates_for_froc(prob, heat, SPACING, base)]
    assert froc == [(c.peak_index, c.confidence)
                    for c in candidates_for_froc(prob, heat, SPACING, replace(base, outline_fraction=0.5))]


def test_rule_9_keeps_the_piece_holding_the_peak():
    # A nodule (peak 0.9) with a lobe of its component at 0.3 on one side: at 0.5 x peak the lobe goes.
    prob = _cone(A_CENTRE, 0.9, 6.0)
    lobe = ball((A_CENTRE[0], A_CENTRE[1] + 10, A_CENTRE[2]), 2.5)
    bridge = np.zeros(SHAPE, bool)
    bridge[A_CENTRE[0], A_CENTRE[1]:A_CENTRE[1] + 10, A_CENTRE[2]] = True
    prob[lobe | (bridge & (prob < 0.1))] = 0.3
    heat = gaussian(A_CENTRE, 0.9)
    det = find_nodules(prob, heat, SPACING, PostprocessConfig(0.05, 0.3, outline_fraction=0.5))
    assert len(det.candidates) == 1
    assert np.array_equal(det.labels == 1, (prob >= 0.45) & ball(A_CENTRE, 6.0))
    assert not (det.labels[lobe]).any()


def test_outline_mask_cuts_each_crop_component_at_its_own_peak():
    from glance.postprocess import outline_mask

    prob = np.zeros((1, 40, 40), np.float32)
    prob[0, 5:15, 5:15] = 0.2
    prob[0, 8:12, 8:12] = 0.8  # component 1: peak 0.8, core of 16 pixels
    prob[0, 25:35, 25:35] = 0.1  # component 2: flat at 0.1, kept whole
    cfg = PostprocessConfig(seg_threshold=0.05, outline_fraction=0.5)
    expected = np.zeros_like(prob, bool)
    expected[0, 8:12, 8:12] = True
    expected[0, 25:35, 25:35] = True
    assert np.array_equal(outline_mask(prob, cfg), expected)
    assert np.array_equal(outline_mask(prob, replace(cfg, outline_fraction=0.0)), prob >= 0.05)
    u8 = np.round(prob * 255).astype(np.uint8)
    assert np.array_equal(outline_mask(u8, cfg), expected)  # the map's encoding does not matter


@pytest.mark.parametrize("fraction", [-0.1, 1.0, 1.5])
def test_an_outline_fraction_outside_0_to_1_is_an_input_error(fraction):
    from glance.postprocess import outline_mask

    prob, heat = _strong_and_faint()
    cfg = PostprocessConfig(outline_fraction=fraction)
    with pytest.raises(InputError, match="outline fraction"):
        find_nodules(prob, heat, SPACING, cfg)
    with pytest.raises(InputError, match="outline fraction"):
        outline_mask(prob, cfg)
