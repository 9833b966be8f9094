"""Calibration of a model's default thresholds, on maps whose right answer is known by construction."""

from __future__ import annotations

import json

import numpy as np
import pytest

from glance.errors import GlanceError
from glance.volume import Volume


def _disk(shape, centre, radius):
    jj, ii = np.ogrid[: shape[0], : shape[1]]
    return (jj - centre[0]) ** 2 + (ii - centre[1]) ** 2 <= radius**2


def _u8(p: float) -> int:
    return int(round(p * 255))


def _crop_case(n: int):
    """A 1-slice crop: reader mask = disk r6; p = 0.31 on the mask, 0.60 on its inner disk r4,
    0.02 elsewhere; heatmap 0.50 at the centre. Dice is 1 for every threshold <= 0.30 and
    |r4| * 2 / (|r4| + |r6|) above; the nodule is detected for heatmap thresholds <= 0.50."""
    from glance_training.calibrate import CaseMaps
    from glance_training.datasets.cases import LoadedCase

    shape = (41, 41)
    outer, inner = _disk(shape, (20, 20), 6), _disk(shape, (20, 20), 4)
    prob = np.full(shape, _u8(0.02), np.uint8)
    prob[outer], prob[inner] = _u8(0.31), _u8(0.60)
    heat = np.zeros(shape, np.uint8)
    heat[20, 20] = _u8(0.50)
    ct = Volume(np.zeros((1, *shape), np.int16), (0.7, 0.7, 2.5))
    loaded = LoadedCase(f"crop{n}", f"p{n}", "maxslice", ct, outer[None].astype(np.uint16), [])
    return CaseMaps(loaded, prob[None], heat[None])


def _ball(shape, centre, radius):
    kk, jj, ii = np.ogrid[: shape[0], : shape[1], : shape[2]]
    return (kk - centre[0]) ** 2 + (jj - centre[1]) ** 2 + (ii - centre[2]) ** 2 <= radius**2


def _volume_case():
    """A 1 mm volume with a labelled nodule (ball r5, p = 0.60, heatmap peak 0.80) and an unlabelled
    look-alike (ball r5, p = 0.60, heatmap peak 0.40): Dice 1 at every threshold <= 0.60, found
    for heatmap thresholds <= 0.80, one false positive per scan at thresholds <= 0.40."""
    from glance_training.calibrate import CaseMaps
    from glance_training.datasets.cases import Annotation, LoadedCase

    shape = (24, 48, 48)
    ct = Volume(np.full(shape, -800, np.int16), (1.0, 1.0, 1.0))
    nodule, other = _ball(shape, (12, 14, 14), 5), _ball(shape, (12, 34, 34), 5)
    prob = np.zeros(shape, np.uint8)
    prob[nodule | other] = _u8(0.60)
    heat = np.zeros(shape, np.uint8)
    for (k, j, i), peak in (((12, 14, 14), 0.80), ((12, 34, 34), 0.40)):
        heat[k, j, i] = _u8(peak)
    centre = tuple(ct.ijk_to_lps(np.array([14.0, 14.0, 12.0])))
    loaded = LoadedCase("vol", "pv", "phantom", ct, nodule.astype(np.uint16), [Annotation(centre, 10.0, label=1)])
    return CaseMaps(loaded, prob, heat)


def test_crop_thresholds_are_the_highest_of_the_best():
    from glance_training.calibrate import CalibrationConfig, choose_thresholds

    cfg = CalibrationConfig(data=["crops"])
    result = choose_thresholds([("crops", [_crop_case(n) for n in range(3)], False)], cfg)
    inner, outer = _disk((41, 41), (20, 20), 4).sum(), _disk((41, 41), (20, 20), 6).sum()
    curve = result.sources[0]
    assert curve.dice[0.3] == 1.0 and curve.dice[0.05] == 1.0
    assert curve.dice[0.35] == pytest.approx(2 * inner / (inner + outer))
    assert result.segmentation == 0.3  # ties at Dice 1 go to the highest threshold
    assert curve.sensitivity[0.5] == 1.0 and curve.sensitivity[0.55] == 0.0
    assert result.detection == 0.5
    assert curve.n_nodules == 3 and curve.fp_per_scan == {}


def test_sources_count_equally_and_volumes_report_false_positives():
    from glance_training.calibrate import CalibrationConfig, choose_thresholds

    cfg = CalibrationConfig(data=["crops", "volumes"])
    result = choose_thresholds([("crops", [_crop_case(n) for n in range(5)], False),
                                ("volumes", [_volume_case()], True)], cfg)
    crops, volumes = result.sources
    assert volumes.dice[0.5] == pytest.approx(1.0) and volumes.n_nodules == 1
    assert result.segmentation == 0.3  # crops need <= 0.30; the volume is perfect up to 0.60
    assert volumes.sensitivity[0.8] == 1.0 and volumes.sensitivity[0.85] == 0.0
    assert volumes.fp_per_scan[0.4] == 1.0 and volumes.fp_per_scan[0.45] == 0.0
    # At 0.55 the crops lose every nodule: mean relative sensitivity (0 + 1) / 2 < 0.9.
    assert result.detection == 0.5
    entry = result.card_entry()
    assert entry["segmentation"] == 0.3 and entry["detection"] == 0.5
    assert entry["calibration"]["fp_per_scan_at_detection"] == {"volumes": 0.0}
    assert entry["calibration"]["n_nodules"] == {"crops": 5, "volumes": 1}
    json.dumps(result.to_dict())  # the curves file is plain JSON


def test_relative_sensitivity_ignores_nodules_missed_at_every_threshold():
    from glance_training.calibrate import CalibrationConfig, choose_thresholds

    missed = _crop_case(9)
    missed.heat[:] = 0  # never detected at any threshold
    cases = [_crop_case(n) for n in range(3)] + [missed]
    result = choose_thresholds([("crops", cases, False)], CalibrationConfig(data=["crops"]))
    assert result.sources[0].sensitivity[0.5] == 0.75
    assert result.detection == 0.5  # 0.75 is all that any threshold reaches


def test_nothing_to_calibrate_on_is_one_clear_error():
    from glance_training.calibrate import CalibrationConfig, calibrate, choose_thresholds

    with pytest.raises(GlanceError, match="no labelled val cases"):
        choose_thresholds([("crops", [], False)], CalibrationConfig(data=["crops"]))
    with pytest.raises(GlanceError, match="--split must be val or all"):
        calibrate(CalibrationConfig(data=["crops"], split="test"))


def test_card_thresholds_drive_segment_defaults_and_explicit_values_win():
    from glance.model.weights import ModelCard
    from glance.pipeline import SegmentOptions, with_model_thresholds

    card = ModelCard("m", "1", {}, thresholds={"segmentation": 0.2, "detection": 0.45, "calibration": {}})
    chosen = with_model_thresholds(SegmentOptions(), card)
    assert (chosen.postprocess.seg_threshold, chosen.postprocess.det_threshold) == (0.2, 0.45)
    assert chosen.threshold_sources == {"segmentation": "model card (calibrated)",
                                        "detection": "model card (calibrated)",
                                        "outline_fraction": "built-in default"}
    assert chosen.postprocess.outline_fraction == 0.0  # a card without rule 9's fraction keeps it off
    outlined = ModelCard("m", "1", {}, thresholds={"segmentation": 0.2, "detection": 0.45, "outline_fraction": 0.3})
    assert with_model_thresholds(SegmentOptions(), outlined).postprocess.outline_fraction == 0.3
    off = with_model_thresholds(SegmentOptions(outline_fraction=0.0), outlined)
    assert off.postprocess.outline_fraction == 0.0 and off.threshold_sources["outline_fraction"] == "requested"
    mixed = with_model_thresholds(SegmentOptions(det_threshold=0.7), card)
    assert (mixed.postprocess.seg_threshold, mixed.postprocess.det_threshold) == (0.2, 0.7)
    assert mixed.threshold_sources["detection"] == "requested"
    plain = with_model_thresholds(SegmentOptions(), ModelCard("m", "1", {}))
    assert (plain.postprocess.seg_threshold, plain.postprocess.det_threshold) == (0.5, 0.3)
    assert plain.threshold_sources["segmentation"] == "built-in default"


def test_flip_averaged_runs_use_the_cards_flip_thresholds():
    from glance.infer import InferenceOptions
    from glance.model.weights import ModelCard
    from glance.pipeline import SegmentOptions, with_model_thresholds

    flips = SegmentOptions(inference=InferenceOptions(tta=True))
    card = ModelCard("m", "1", {}, thresholds={"segmentation": 0.05, "detection": 0.4, "outline_fraction": 0.1,
                                               "with_flips": {"segmentation": 0.15, "detection": 0.35,
                                                              "outline_fraction": 0.2}})
    chosen = with_model_thresholds(flips, card)
    assert (chosen.postprocess.seg_threshold, chosen.postprocess.det_threshold) == (0.15, 0.35)
    assert chosen.postprocess.outline_fraction == 0.2
    assert set(chosen.threshold_sources.values()) == {"model card (calibrated with flips)"}
    plain = with_model_thresholds(SegmentOptions(), card)
    assert (plain.postprocess.seg_threshold, plain.postprocess.det_threshold) == (0.05, 0.4)
    # A card calibrated without flips serves flip-averaged runs too, and says so.
    only_plain = ModelCard("m", "1", {}, thresholds={"segmentation": 0.05, "detection": 0.4})
    fallback = with_model_thresholds(flips, only_plain)
    assert (fallback.postprocess.seg_threshold, fallback.threshold_sources["segmentation"]) == (
        0.05, "model card (calibrated)")


def test_writing_one_kind_of_calibration_keeps_the_other(tmp_path):
    from glance.model.weights import ModelCard, read_card
    from glance_training.calibrate import Calibration, CalibrationConfig, write_to_card

    (tmp_path / "card.json").write_text(ModelCard("m", "1", {}, thresholds={"segmentation": 0.05,
                                                                             "detection": 0.4}).to_json())
    write_to_card(tmp_path, Calibration(0.15, 0.35, [], CalibrationConfig(data=["x"], tta=True)))
    both = read_card(tmp_path).thresholds
    assert (both["segmentation"], both["detection"]) == (0.05, 0.4)
    assert (both["with_flips"]["segmentation"], both["with_flips"]["calibration"]["flip_averaging"]) == (0.15, True)
    write_to_card(tmp_path, Calibration(0.1, 0.45, [], CalibrationConfig(data=["x"])))
    again = read_card(tmp_path).thresholds
    assert (again["segmentation"], again["with_flips"]["segmentation"]) == (0.1, 0.15)


@pytest.mark.parametrize("thresholds", [{"segmentation": 1.5}, {"detection": 0}, {"detection": "high"},
                                        {"segmentation": True}, [], {"with_flips": {"segmentation": 2.0}},
                                        {"with_flips": "0.2"}, {"outline_fraction": 1.0},
                                        {"outline_fraction": -0.1}, {"outline_fraction": True}])
def test_a_card_with_impossible_thresholds_is_refused(tmp_path, thresholds):
    from glance.errors import ModelError
    from glance.model.weights import ModelCard, read_card

    card = ModelCard("m", "1", {}, thresholds=thresholds)
    (tmp_path / "card.json").write_text(card.to_json())
    with pytest.raises(ModelError, match="invalid model card.*thresholds"):
        read_card(tmp_path)


def test_evaluate_and_calibrate_cut_a_crop_at_the_same_voxels(monkeypatch):
    """p = 0.2 is stored as 51 = 0.2 * 255; evaluate once computed ceil(0.2 * 255) = 52 in floating
    point and left those voxels out, so its Dice disagreed with calibration's and the pipeline's."""
    import glance.pipeline
    from glance.pipeline import SegmentOptions
    from glance_training.calibrate import CalibrationConfig, choose_thresholds
    from glance_training.evaluate import _crop_prediction

    case = _crop_case(0)
    case.prob[case.loaded.labels > 0] = 51
    monkeypatch.setattr(glance.pipeline, "predict_maps", lambda *a, **k: (case.prob, case.heat, {}, {}))
    options = SegmentOptions(seg_threshold=0.2)
    options.postprocess.seg_threshold = 0.2
    evaluated = _crop_prediction(case.loaded, None, options)
    assert np.array_equal(evaluated, case.loaded.labels > 0)
    curve = choose_thresholds([("crops", [case], False)], CalibrationConfig(data=["crops"])).sources[0]
    assert curve.dice[0.2] == 1.0 and curve.dice[0.25] < 1.0


def _ringed_crop(n: int, core: float, ring: float):
    """A 1-slice crop: reader mask = disk r4 at p = ``core``; a ring out to r7 at p = ``ring``;
    0.02 elsewhere; heatmap 0.50 at the centre."""
    case = _crop_case(n)
    shape = case.prob.shape[1:]
    inner, outer = _disk(shape, (20, 20), 4), _disk(shape, (20, 20), 7)
    case.prob[0] = _u8(0.02)
    case.prob[0][outer], case.prob[0][inner] = _u8(ring), _u8(core)
    case.loaded.labels[0] = inner
    return case


def test_the_outline_fraction_fits_a_strong_and_a_faint_nodule_that_no_single_threshold_fits(tmp_path):
    """Strong crop: 0.90 core, 0.30 ring; faint crop: 0.20 core, 0.06 ring. No one threshold keeps the
    faint core and drops the strong ring: the best, 0.20 (ties to the highest), scores the faint crop
    1 and the strong one |r4| * 2 / (|r4| + |r7|). There, a fraction of 0.4 cuts the strong nodule at
    0.36 (its core) and leaves the faint one whole: Dice 1 for both; 0.3 cuts at 0.27, too low."""
    from glance.model.weights import ModelCard, read_card
    from glance_training.calibrate import CalibrationConfig, choose_thresholds, write_to_card

    cases = [_ringed_crop(0, 0.90, 0.30), _ringed_crop(1, 0.20, 0.06)]
    result = choose_thresholds([("crops", cases, False)], CalibrationConfig(data=["crops"]))
    inner, outer = (int(_disk((41, 41), (20, 20), r).sum()) for r in (4, 7))
    assert result.segmentation == 0.2
    assert result.sources[0].outline_dice == pytest.approx({0.0: (1 + 2 * inner / (inner + outer)) / 2, 0.1: (
        1 + 2 * inner / (inner + outer)) / 2, 0.2: (1 + 2 * inner / (inner + outer)) / 2, 0.3: (
        1 + 2 * inner / (inner + outer)) / 2, 0.4: 1.0})
    assert result.outline_fraction == 0.4
    (tmp_path / "card.json").write_text(ModelCard("m", "1", {}).to_json())
    write_to_card(tmp_path, result)
    thresholds = read_card(tmp_path).thresholds
    assert thresholds["outline_fraction"] == 0.4
    assert thresholds["calibration"]["dice_at_outline_fraction"] == {"crops": 1.0}


def test_an_outline_fraction_under_the_minimum_gain_stays_off_and_the_card_says_why(tmp_path):
    """The ringed crops above: 0.4 raises the mean Dice from (1 + 2|r4| / (|r4| + |r7|)) / 2 to 1. A bar
    below that gain adopts it; a bar above keeps rule 9 off and records the best fraction and its gain."""
    from glance.model.weights import ModelCard, read_card
    from glance_training.calibrate import CalibrationConfig, choose_thresholds, write_to_card

    inner, outer = (int(_disk((41, 41), (20, 20), r).sum()) for r in (4, 7))
    gain = 1.0 - (1 + 2 * inner / (inner + outer)) / 2

    def calibrated(min_gain):
        cases = [_ringed_crop(0, 0.90, 0.30), _ringed_crop(1, 0.20, 0.06)]
        cfg = CalibrationConfig(data=["crops"], min_outline_gain=min_gain)
        return choose_thresholds([("crops", cases, False)], cfg)

    assert calibrated(gain - 0.01).outline_fraction == 0.4
    kept_off = calibrated(gain + 0.01)
    assert kept_off.outline_fraction == 0.0
    (tmp_path / "card.json").write_text(ModelCard("m", "1", {}).to_json())
    write_to_card(tmp_path, kept_off)
    thresholds = read_card(tmp_path).thresholds
    assert thresholds["outline_fraction"] == 0.0
    assert thresholds["outline_fraction_not_adopted"] == (
        f"0.4 was best (crops 1.0000) but raised the validation criterion by {gain:.5f} ({1 - gain:.5f} -> 1.00000), "
        f"under the {gain + 0.01:g} that the rule written before calibrating required; so rule 9 stays off at this "
        "operating point")


def test_an_outline_fraction_that_does_not_help_stays_off():
    from glance_training.calibrate import CalibrationConfig, choose_thresholds

    result = choose_thresholds([("crops", [_crop_case(0)], False)], CalibrationConfig(data=["crops"]))
    assert set(result.sources[0].outline_dice.values()) == {1.0} and result.outline_fraction == 0.0


def test_detection_threshold_is_raised_to_the_false_positive_budget():
    """Crop nodules peak at 0.31, so the sensitivity rule alone picks 0.30; there the volume has its
    look-alike (peak 0.40) as one false positive. Within a budget of 1 per scan, 0.30 stands; with a
    budget of 0.5 the threshold rises to 0.45, the lowest above the look-alike."""
    from glance_training.calibrate import CalibrationConfig, choose_thresholds

    def groups():
        crops = [_crop_case(n) for n in range(3)]
        for c in crops:
            c.heat[0, 20, 20] = _u8(0.31)
        return [("crops", crops, False), ("volumes", [_volume_case()], True)]

    loose = choose_thresholds(groups(), CalibrationConfig(data=["crops", "volumes"]))
    assert loose.detection == 0.3
    assert loose.card_entry()["calibration"]["fp_per_scan_at_detection"] == {"volumes": 1.0}
    tight = choose_thresholds(groups(), CalibrationConfig(data=["crops", "volumes"], max_fp_per_scan=0.5))
    assert tight.detection == 0.45
    entry = tight.card_entry()["calibration"]
    assert entry["fp_per_scan_at_detection"] == {"volumes": 0.0}
    assert entry["sensitivity_at_detection"] == {"crops": 0.0, "volumes": 1.0}
    assert "<= 0.5 false positives per validation volume" in entry["rule"]


def test_false_positive_budget_edges():
    from glance_training.calibrate import SourceCurves, _lowest_within_fp_budget

    grid = (0.1, 0.2, 0.3)
    crops_only = [SourceCurves("crops", False, sensitivity={t: 1.0 for t in grid})]
    assert _lowest_within_fp_budget(crops_only, grid, 0.0) == 0.1  # no volumes: no constraint
    noisy = SourceCurves("v", True, fp_per_scan={0.1: 9.0, 0.2: 5.0, 0.3: 2.0})
    assert _lowest_within_fp_budget([noisy], grid, 1.0) == 0.3  # never within: the highest
    quiet = SourceCurves("w", True, fp_per_scan={0.1: 1.0, 0.2: 0.0, 0.3: 0.0})
    assert _lowest_within_fp_budget([noisy, quiet], grid, 3.0) == 0.2  # mean (5 + 0) / 2 = 2.5


def test_froc_inputs_score_candidates_by_a_field_or_a_callable():
    from glance.postprocess import PostprocessConfig
    from glance_training.evaluate import froc_inputs

    case = _volume_case()
    cfg = PostprocessConfig(seg_threshold=0.5, froc_det_threshold=0.3, require_lung_contact=False)

    def scores(score):
        cands, refs, excluded = froc_inputs(case.loaded, case.prob, case.heat, cfg, score=score, lungs=None)
        assert len(refs) == 1 and excluded == []
        return sorted(round(c.score, 3) for c in cands)

    # the nodule (peak 0.80) and the look-alike (peak 0.40), both of mean probability 0.60 (153/255)
    assert scores("detection_score") == [0.4, 0.8]
    assert scores("confidence") == [0.24, 0.48]
    assert scores(lambda c: 1.0 - c.detection_score) == [0.2, 0.6]
