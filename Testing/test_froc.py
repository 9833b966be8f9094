"""FROC / CPM by the LUNA16 protocol on hand-computed cases (glance_training.froc)."""

from __future__ import annotations

import numpy as np
import pytest

from glance_training.froc import (
    CPM_FP_RATES,
    Candidate,
    Finding,
    evaluate_froc,
    match_scan,
    plot_froc,
    sensitivity_at,
)


def C(x, y, z, score):
    return Candidate((float(x), float(y), float(z)), score)


def F(x, y, z, diameter):
    return Finding((float(x), float(y), float(z)), diameter)


# Three scans, worked out by hand:
#   A: nodules N1 (0,0,0) d10, N2 (50,0,0) d6; excluded finding E1 (100,0,0) without size (-> 10 mm).
#      a1 0.90 hits N1; a2 0.60 hits N1 again (double: ignored); a3 0.99 on E1 (ignored);
#      a4 0.70 FP; a5 0.95 exactly 3 mm = N2's radius from N2: not a hit (strict <) -> FP, N2 missed.
#   B: nodule N3 (0,0,0) d8. b1 0.50 at 3.9 mm: TP; b2 0.85 FP; b3 0.40 FP.
#   C: no nodules. c1 0.30 FP; c2 0.75 FP.
# Nodules 3; TP scores 0.9, 0.5; FP scores 0.95, 0.85, 0.75, 0.7, 0.4, 0.3.
# Curve (FP/3, TP/3) by decreasing threshold: (0,0) (1/3,0) (1/3,1/3) (2/3,1/3) (1,1/3)
#   (4/3,1/3) (4/3,2/3) (5/3,2/3) (2,2/3).
# Sensitivity at 1/8..8 FP/scan: 0, 0, 1/3, 1/3, 2/3, 2/3, 2/3 -> CPM = (8/3)/7 = 8/21.
CANDIDATES = {
    "A": [C(1, 0, 0, 0.9), C(0, 2, 0, 0.6), C(100, 3, 0, 0.99), C(20, 0, 0, 0.7), C(53, 0, 0, 0.95)],
    "B": [C(0, 0, 3.9, 0.5), C(30, 30, 30, 0.85), C(-30, 0, 0, 0.4)],
    "C": [C(0, 0, 0, 0.3), C(1, 1, 1, 0.75)],
}
NODULES = {"A": [F(0, 0, 0, 10), F(50, 0, 0, 6)], "B": [F(0, 0, 0, 8)], "C": []}
EXCLUDED = {"A": [F(100, 0, 0, -1)]}


def test_hand_computed_froc_and_cpm():
    r = evaluate_froc(CANDIDATES, NODULES, EXCLUDED, n_bootstrap=0)
    third = 1 / 3
    assert r.fps == pytest.approx([0, third, third, 2 * third, 1, 4 * third, 4 * third, 5 * third, 2])
    assert r.sensitivity == pytest.approx([0, 0, third, third, third, third, 2 * third, 2 * third, 2 * third])
    assert r.thresholds[1:] == pytest.approx([0.95, 0.9, 0.85, 0.75, 0.7, 0.5, 0.4, 0.3])
    expected = [0, 0, third, third, 2 * third, 2 * third, 2 * third]
    assert [p.sensitivity for p in r.operating_points] == pytest.approx(expected)
    assert [p.fp_per_scan for p in r.operating_points] == list(CPM_FP_RATES)
    assert r.cpm == pytest.approx(8 / 21)
    assert (r.n_scans, r.n_nodules, r.n_detected, r.n_false_positives) == (3, 3, 2, 6)
    assert (r.n_ignored_excluded, r.n_ignored_double, r.n_truncated) == (1, 1, 0)
    assert r.cpm_ci is None


def test_excluded_hit_would_otherwise_be_a_false_positive():
    r = evaluate_froc(CANDIDATES, NODULES, {}, n_bootstrap=0)
    # a3 (0.99) now leads the FPs: at 1/2 FP/scan no nodule is found yet.
    assert r.n_false_positives == 7 and r.n_ignored_excluded == 0
    assert [p.sensitivity for p in r.operating_points] == pytest.approx([0, 0, 0, 1 / 3, 2 / 3, 2 / 3, 2 / 3])
    assert r.cpm == pytest.approx(1 / 3)


@pytest.mark.parametrize("unknown", [-1.0, 0.0, float("nan")])
def test_finding_without_a_size_counts_as_10_mm(unknown):
    # -1 is LUNA16's "no size"; 0 is how the dataset readers store it (luna.read_annotation_csv).
    excluded = [F(0, 0, 0, unknown)]
    inside, outside = C(4.99, 0, 0, 0.8), C(5.0, 0, 0, 0.7)  # radius 5 mm, strict
    r = match_scan([inside, outside, C(0, 0, 0, 0.6)], [], excluded)
    assert r.n_ignored_excluded == 2 and r.fp_scores.tolist() == [0.7]


def test_radius_boundary_is_exclusive():
    nodule = [F(10, 20, 30, 6)]
    at_radius = match_scan([C(10, 23, 30, 0.5)], nodule)
    assert np.isnan(at_radius.nodule_scores[0]) and at_radius.fp_scores.tolist() == [0.5]
    inside = match_scan([C(10, 22.999, 30, 0.5)], nodule)
    assert inside.nodule_scores.tolist() == [0.5] and inside.fp_scores.size == 0


def test_double_hits_count_once_with_the_highest_score():
    out = match_scan([C(0, 0, 1, 0.2), C(0, 1, 0, 0.7), C(1, 0, 0, 0.4)], [F(0, 0, 0, 10)])
    assert out.nodule_scores.tolist() == [0.7]
    assert out.fp_scores.size == 0 and out.n_ignored_double == 2


def test_nodule_hit_takes_precedence_over_excluded_and_one_mark_can_hit_two_nodules():
    nodules = [F(0, 0, 0, 10), F(4, 0, 0, 10)]
    out = match_scan([C(2, 0, 0, 0.8)], nodules, excluded=[F(2, 0, 0, 10)])
    assert out.nodule_scores.tolist() == [0.8, 0.8]
    assert out.n_ignored_excluded == 0 and out.fp_scores.size == 0


def test_at_most_100_candidates_per_scan():
    far = [C(200 + i, 0, 0, (i + 1) / 1000) for i in range(150)]
    low_tp = far + [C(0, 0, 0, 0.0001)]
    r = evaluate_froc({"s": low_tp}, {"s": [F(0, 0, 0, 5)]}, n_bootstrap=0)
    assert r.n_truncated == 51 and r.n_false_positives == 100 and r.n_detected == 0
    high_tp = far + [C(0, 0, 0, 0.9)]
    r = evaluate_froc({"s": high_tp}, {"s": [F(0, 0, 0, 5)]}, n_bootstrap=0)
    assert r.n_truncated == 51 and r.n_false_positives == 99 and r.n_detected == 1
    assert r.cpm == pytest.approx(1.0)
    unlimited = evaluate_froc({"s": low_tp}, {"s": [F(0, 0, 0, 5)]}, max_candidates=1000, n_bootstrap=0)
    assert unlimited.n_detected == 1 and unlimited.n_truncated == 0


def test_interpolation_reads_the_top_of_each_step():
    fps = np.array([0, 0.5, 0.5, 1, 1])
    sens = np.array([0, 0, 0.5, 0.5, 1])
    got = sensitivity_at(fps, sens, [0.25, 0.5, 0.75, 1, 8])
    assert got.tolist() == [0, 0.5, 0.5, 1, 1]


def test_no_false_positives_and_empty_scans_in_denominator():
    cands = {"a": [C(0, 0, 0, 0.9)], "b": []}
    nods = {"a": [F(0, 0, 0, 10)], "b": [F(0, 0, 0, 10)]}
    r = evaluate_froc(cands, nods, scans=["a", "b", "c"], n_bootstrap=0)
    assert r.cpm == pytest.approx(0.5) and r.n_scans == 3
    with pytest.raises(ValueError):
        evaluate_froc({"x": [C(0, 0, 0, 1)]}, {}, scans=["a"], n_bootstrap=0)


def _random_study(seed, n_scans=12):
    rng = np.random.default_rng(seed)
    cands, nods = {}, {}
    for s in range(n_scans):
        centres = rng.uniform(-100, 100, (rng.integers(0, 3), 3))
        nods[s] = [F(*c, 8) for c in centres]
        hits = [C(*(c + rng.normal(0, 1.5, 3)), rng.uniform(0.3, 1)) for c in centres if rng.random() < 0.8]
        fps = [C(*rng.uniform(200, 300, 3), rng.uniform(0, 0.9)) for _ in range(rng.integers(0, 12))]
        cands[s] = hits + fps
    return cands, nods


def test_bootstrap_ci_contains_estimate_and_is_deterministic():
    cands, nods = _random_study(1)
    r1 = evaluate_froc(cands, nods, n_bootstrap=300, seed=7)
    r2 = evaluate_froc(cands, nods, n_bootstrap=300, seed=7)
    r3 = evaluate_froc(cands, nods, n_bootstrap=300, seed=8)
    assert r1.cpm_ci is not None and r1.n_bootstrap == 300
    assert r1.cpm_ci[0] <= r1.cpm <= r1.cpm_ci[1]
    assert r1.cpm_ci[0] < r1.cpm_ci[1]
    assert r1.cpm_ci == r2.cpm_ci
    assert [p.ci_low for p in r1.operating_points] == [p.ci_low for p in r2.operating_points]
    assert r1.cpm_ci != r3.cpm_ci


def test_bootstrap_weighting_equals_duplicating_scans():
    # A resample drawing scan A twice, B never and C once must score like the study [A, A', C].
    from glance_training.froc import _Pooled

    outcomes = [match_scan(CANDIDATES[s], NODULES[s], EXCLUDED.get(s, ())) for s in "ABC"]
    fps, sens, _ = _Pooled.from_outcomes(outcomes).curve(np.array([2, 0, 1]))
    dup = evaluate_froc(
        {"A": CANDIDATES["A"], "A2": CANDIDATES["A"], "C": CANDIDATES["C"]},
        {"A": NODULES["A"], "A2": NODULES["A"], "C": []},
        {"A": EXCLUDED["A"], "A2": EXCLUDED["A"]},
        n_bootstrap=0,
    )
    assert sensitivity_at(fps, sens) == pytest.approx([p.sensitivity for p in dup.operating_points])
    assert fps[-1] == pytest.approx(dup.fps[-1])


def test_plot_froc_writes_png(tmp_path):
    cands, nods = _random_study(2)
    r = evaluate_froc(cands, nods, n_bootstrap=50, seed=0)
    out = plot_froc(r, tmp_path / "froc.png")
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert [p.name for p in tmp_path.iterdir()] == ["froc.png"]
    d = r.to_dict()
    assert d["cpm"] == r.cpm and d["curve"]["thresholds"][0] is None
