"""Segmentation metrics on hand-computed cases (glance_training.metrics)."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import ndimage
from scipy.spatial.distance import cdist

from glance_training.metrics import (
    SegmentationScores,
    dice,
    hd95,
    iou,
    score_masks,
    score_nodules,
    sensitivity,
    summarize,
    summarize_cases,
    summarize_values,
)


def _square(shape, top, left, size):
    m = np.zeros(shape, bool)
    m[top : top + size, left : left + size] = True
    return m


def test_overlapping_squares_known_counts():
    gt = _square((30, 30), 2, 2, 10)  # 100 px
    pred = _square((30, 30), 5, 6, 10)  # overlap rows 5..11 (7) x cols 6..11 (6) = 42 px
    assert dice(pred, gt) == pytest.approx(2 * 42 / 200)
    assert iou(pred, gt) == pytest.approx(42 / (200 - 42))
    assert sensitivity(pred, gt) == pytest.approx(42 / 100)
    # Prediction inside the ground truth: recall is the covered fraction, Dice 2*25/(25+100).
    inner = _square((30, 30), 4, 4, 5)
    assert sensitivity(inner, gt) == pytest.approx(0.25)
    assert dice(inner, gt) == pytest.approx(50 / 125)
    assert iou(inner, gt) == pytest.approx(0.25)


def test_hd95_parallel_planes_is_offset_times_spacing():
    # One-voxel-thick planes: every surface voxel is d slices from the other plane.
    spacing = (2.5, 0.7, 0.8)  # (sk, sj, si), array order
    gt = np.zeros((10, 6, 7), bool)
    pred = gt.copy()
    gt[2] = True
    pred[5] = True
    assert hd95(pred, gt, spacing) == pytest.approx(3 * 2.5)
    # Planes across the last axis, 3 columns apart: 3 * si; catches a reversed spacing.
    gt_i, pred_i = np.zeros((10, 6, 7), bool), np.zeros((10, 6, 7), bool)
    gt_i[..., 1] = True
    pred_i[..., 4] = True
    assert hd95(pred_i, gt_i, spacing) == pytest.approx(3 * 0.8)


def test_hd95_percentile_and_symmetry_by_hand():
    # 2-D lines, spacing (rows 3.0, cols 0.5). gt: row 5, cols 2..11 (10 px); pred: cols 2..21.
    # pred->gt: ten 0s then 0.5, 1.0, ..., 5.0 (20 values); 95th percentile, linear:
    # position 0.95*19 = 18.05 -> 4.5 + 0.05*(5.0-4.5) = 4.525. gt->pred: all 0. HD95 = 4.525.
    # (The pooled convention would give 4.275, so this pins the max-of-directed rule.)
    gt = np.zeros((12, 25), bool)
    pred = gt.copy()
    gt[5, 2:12] = True
    pred[5, 2:22] = True
    assert hd95(pred, gt, (3.0, 0.5)) == pytest.approx(4.525, abs=1e-6)
    assert hd95(gt, pred, (3.0, 0.5)) == pytest.approx(4.525, abs=1e-6)


def _reference_hd95(pred, gt, spacing):
    """Brute force of the documented convention: boundary voxels, all pairwise distances."""

    def surface_mm(m):
        edge = m & ~ndimage.binary_erosion(m)
        return np.argwhere(edge) * np.asarray(spacing)

    p, g = surface_mm(pred), surface_mm(gt)
    d = cdist(p, g)
    return max(np.percentile(d.min(axis=1), 95), np.percentile(d.min(axis=0), 95))


def test_hd95_matches_brute_force_on_anisotropic_blobs():
    rng = np.random.default_rng(3)
    spacing = (2.0, 0.75, 0.6)
    for _ in range(3):
        gt = ndimage.binary_dilation(rng.random((12, 20, 20)) > 0.985, iterations=2)
        pred = ndimage.binary_dilation(rng.random((12, 20, 20)) > 0.985, iterations=2)
        assert gt.any() and pred.any()
        assert hd95(pred, gt, spacing) == pytest.approx(_reference_hd95(pred, gt, spacing), rel=1e-5)


def test_empty_mask_rules():
    empty = np.zeros((4, 5, 6), bool)
    some = empty.copy()
    some[1, 2, 3] = True
    both = score_masks(empty, empty, (1, 1, 1))
    assert both == SegmentationScores(dice=1.0, iou=1.0, sensitivity=1.0, hd95=0.0)
    missed = score_masks(empty, some, (1, 1, 1))
    assert (missed.dice, missed.iou, missed.sensitivity, missed.hd95) == (0.0, 0.0, 0.0, math.inf)
    spurious = score_masks(some, empty, (1, 1, 1))
    assert spurious.dice == 0.0 and spurious.hd95 == math.inf and math.isnan(spurious.sensitivity)


def test_shape_and_spacing_errors():
    with pytest.raises(ValueError):
        dice(np.zeros((3, 3), bool), np.zeros((3, 4), bool))
    with pytest.raises(ValueError):
        hd95(np.ones((3, 3), bool), np.ones((3, 3), bool), (1.0, 1.0, 1.0))


def test_score_nodules_matches_by_overlap():
    gt = np.zeros((8, 30, 30), np.int32)
    gt[2:6, 2:6, 2:6] = 1  # 64 voxels
    gt[2:6, 20:24, 20:24] = 2  # missed
    pred = np.zeros_like(gt)
    pred[2:6, 3:7, 2:6] = 7  # nodule 1 shifted one row: overlap 4*3*4 = 48
    pred[2:4, 12:14, 12:14] = 3  # false positive, overlaps nothing
    pred[0, 0, 29] = 9  # tiny speck overlapping nothing
    scores = {s.gt_label: s for s in score_nodules(pred, gt, (2.0, 1.0, 1.0))}
    assert set(scores) == {1, 2}
    assert scores[1].pred_label == 7 and not scores[1].shared
    assert scores[1].scores.dice == pytest.approx(2 * 48 / 128)
    assert scores[1].scores.iou == pytest.approx(48 / 80)
    assert scores[1].scores.sensitivity == pytest.approx(48 / 64)
    # Both surfaces are shifted by one row (1.0 mm) almost everywhere.
    assert scores[1].scores.hd95 == pytest.approx(1.0)
    assert scores[2].pred_label == 0
    assert scores[2].scores.dice == 0.0 and scores[2].scores.hd95 == math.inf


def test_score_nodules_binary_input_and_merged_prediction():
    gt = np.zeros((5, 20, 20), np.int32)
    gt[1:4, 2:5, 2:5] = 1
    gt[1:4, 2:5, 8:11] = 2
    pred = np.zeros((5, 20, 20), bool)
    pred[1:4, 2:5, 2:11] = True  # one component covering both nodules
    scores = score_nodules(pred, gt, (1.0, 1.0, 1.0))
    assert [s.gt_label for s in scores] == [1, 2]
    assert all(s.pred_label == 1 and s.shared for s in scores)
    assert scores[0].scores.sensitivity == 1.0
    assert scores[0].scores.dice == pytest.approx(2 * 27 / (27 + 81))


def test_summaries_exclude_non_finite_and_count_them():
    s = summarize_values([0.5, 1.0, math.inf, math.nan])
    assert (s.mean, s.median, s.n, s.n_excluded) == (0.75, 0.75, 2, 2)
    assert s.std == pytest.approx(math.sqrt(2 * 0.25**2 / 1))
    single = summarize_values([0.3])
    assert single.mean == 0.3 and math.isnan(single.std)


def test_per_nodule_versus_per_case_aggregation():
    a = [SegmentationScores(1.0, 1.0, 1.0, 0.5), SegmentationScores(0.5, 0.4, 0.6, math.inf)]
    b = [SegmentationScores(0.25, 0.2, 0.3, 2.0)]
    per_nodule = summarize(a + b)
    assert per_nodule.dice.mean == pytest.approx((1.0 + 0.5 + 0.25) / 3)
    assert per_nodule.hd95.n == 2 and per_nodule.hd95.n_excluded == 1
    per_case = summarize_cases({"A": a, "B": b, "empty": []})
    assert per_case.dice.mean == pytest.approx((0.75 + 0.25) / 2)
    assert per_case.dice.n == 2
    assert per_case.hd95.mean == pytest.approx((0.5 + 2.0) / 2)  # case A: its finite HD95 only


def test_score_nodules_edge_cases():
    empty = np.zeros((3, 6, 6), np.uint8)
    assert score_nodules(empty, empty, (1.0, 1.0, 1.0)) == []
    gt = empty.copy()
    gt[1, 2:4, 2:4] = 5  # labels need not start at 1
    (only,) = score_nodules(empty, gt, (1.0, 1.0, 1.0))
    assert only.gt_label == 5 and only.pred_label == 0 and only.scores.hd95 == math.inf
    with pytest.raises(ValueError):
        score_nodules(empty.astype(float), gt, (1.0, 1.0, 1.0))


def test_evaluation_separates_missed_nodules_from_outline_quality():
    """Case a: nodule 1 (16 voxels) half-covered by a prediction (Dice 2*8/24 = 2/3), nodule 2 missed.
    Case b: one nodule predicted exactly (Dice 1). Per nodule the miss counts as 0: (2/3 + 0 + 1) / 3;
    per found nodule only the two outlines count: (2/3 + 1) / 2. By size (Lung-RADS steps 6, 8, 15 mm,
    lower edge included) and by kind, each group holds exactly its own nodules."""
    from glance_training.datasets.cases import Annotation
    from glance_training.evaluate import _Collected, _score, segmentation_summaries

    gt_a = np.zeros((8, 8, 8), np.uint16)
    gt_a[0:2, 0:2, 0:4] = 1
    gt_a[5:7, 5:7, 5:7] = 2
    pred_a = np.zeros_like(gt_a)
    pred_a[0:2, 0:2, 0:2] = 1
    gt_b = np.zeros((8, 8, 8), np.uint16)
    gt_b[3:5, 3:5, 3:5] = 1
    got = _Collected()
    a_found = Annotation((0.0, 0.0, 0.0), 5.0, label=1, kind="solid, isolated")  # < 6 mm
    a_missed = Annotation((0.0, 0.0, 0.0), 6.0, label=2, kind="ground-glass, isolated")  # 6-8 mm (6 is in)
    b = Annotation((0.0, 0.0, 0.0), 15.0, label=1, kind="solid, isolated")  # >= 15 mm
    _score(got, "a", "phantom", pred_a, gt_a, (1.0, 1.0, 1.0), [a_missed, a_found])
    _score(got, "b", "phantom", gt_b.copy(), gt_b, (1.0, 1.0, 1.0), [b])
    summaries = segmentation_summaries(got)
    assert summaries["by_size"] == {
        "< 6 mm": {"n": 1, "n_found": 1, "found_fraction": 1.0, "dice_mean": pytest.approx(2 / 3),
                   "dice_mean_found": pytest.approx(2 / 3)},
        "6-8 mm": {"n": 1, "n_found": 0, "found_fraction": 0.0, "dice_mean": 0.0, "dice_mean_found": None},
        ">= 15 mm": {"n": 1, "n_found": 1, "found_fraction": 1.0, "dice_mean": 1.0, "dice_mean_found": 1.0},
    }
    assert list(summaries["by_size"]) == ["< 6 mm", "6-8 mm", ">= 15 mm"]  # smallest first
    assert summaries["by_kind"]["solid, isolated"]["n"] == 2
    assert summaries["by_kind"]["solid, isolated"]["dice_mean"] == pytest.approx((2 / 3 + 1) / 2)
    assert summaries["by_kind"]["ground-glass, isolated"]["n_found"] == 0
    assert [r["diameter_mm"] for r in got.rows] == [5.0, 6.0, 15.0]
    assert summaries["n_nodules_missed"] == 1
    assert summaries["segmentation_per_nodule"]["dice"]["mean"] == pytest.approx((2 / 3 + 0 + 1) / 3)
    assert summaries["segmentation_per_found_nodule"]["dice"]["mean"] == pytest.approx((2 / 3 + 1) / 2)
    assert summaries["segmentation_per_found_nodule"]["dice"]["n"] == 2
    assert summaries["segmentation_per_case"]["dice"]["mean"] == pytest.approx(((2 / 3 + 0) / 2 + 1) / 2)
    # Resampling the two patients: a+a gives 1/3, b+b gives 1, a+b 5/9; the 2.5 and 97.5 percentiles
    # of 2,000 resamples are the two extremes.
    ci = summaries["dice_per_nodule_ci95"]
    assert (ci["low"], ci["high"], ci["n_patients"]) == (pytest.approx(1 / 3), pytest.approx(1.0), 2)
    assert [r["patient"] for r in got.rows] == ["a", "a", "b"]  # no patient given: each case is its own


def test_bootstrap_interval_resamples_whole_patients():
    from glance_training.metrics import bootstrap_mean_ci

    values = [0.0] * 10 + [1.0] * 10
    by_patient = bootstrap_mean_ci(values, ["A"] * 10 + ["B"] * 10)
    by_value = bootstrap_mean_ci(values, range(20))
    assert by_patient == (0.0, 1.0)  # two patients: A+A, B+B and A+B are all drawn
    assert 0.25 <= by_value[0] < 0.5 < by_value[1] <= 0.75  # 20 independent values: far narrower
    assert bootstrap_mean_ci([0.4, 0.8, math.nan], ["p", "p", "q"]) == (pytest.approx(0.6), pytest.approx(0.6))
    assert bootstrap_mean_ci([0.3] * 5, range(5)) == (pytest.approx(0.3), pytest.approx(0.3))
    assert all(math.isnan(v) for v in bootstrap_mean_ci([math.nan], ["p"]))
    assert bootstrap_mean_ci(values, range(20), seed=3) == bootstrap_mean_ci(values, range(20), seed=3)
    with pytest.raises(ValueError, match="groups"):
        bootstrap_mean_ci([0.5, 0.5], ["p"])
