"""``glance evaluate``'s LUNA16 candidates file: the FROC's candidates in the official submission
format (glance_training.froc.candidates_csv / read_candidates_csv, glance_training.evaluate).

The end-to-end test writes a LUNA16 folder (an .mhd with a flipped direction, annotations.csv and
annotations_excluded.csv beside the subset) and scores it with an oracle network whose maps peak
exactly on the annotated voxels, so the written coordinates must be the annotations' own."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from glance.errors import InputError
from glance_training.froc import (CANDIDATE_COLUMNS, Candidate, Finding, candidates_csv, evaluate_froc,
                                  read_candidates_csv, top_candidates)

UID = "1.3.6.1.4.1.14519.5.2.1.6279.6001.105756658031515062000744821260"


# --- the pure function: candidates -> rows ---------------------------------------------------------


def test_rows_are_the_exact_world_coordinates_and_scores(tmp_path):
    # Coordinates as LUNA16's annotations.csv writes them, and one with a long shortest form.
    a = Candidate((-128.6994211, -175.3192718, -298.3875064), 0.9)
    b = Candidate((0.1 + 0.2, 1e-7, 103.0), 0.25)
    c = Candidate((5.0, -0.0, 2.5), 0.5)
    text = candidates_csv({"case-1": [b, a], "LIDC-IDRI-0001/072": [c]}, seriesuids={"case-1": UID})
    assert text.splitlines() == [
        "seriesuid,coordX,coordY,coordZ,probability",
        f"{UID},-128.6994211,-175.3192718,-298.3875064,0.9",  # best first
        f"{UID},0.30000000000000004,1e-07,103.0,0.25",
        "LIDC-IDRI-0001/072,5.0,-0.0,2.5,0.5",  # not a LUNA case: named by its case id
    ]
    path = tmp_path / "candidates.csv"
    path.write_text(text)
    assert read_candidates_csv(path) == {UID: [a, b], "LIDC-IDRI-0001/072": [c]}  # float-exact
    with open(path, newline="") as fh:
        assert tuple(next(csv.reader(fh))) == CANDIDATE_COLUMNS


def test_the_file_holds_exactly_the_candidates_the_froc_scores(tmp_path):
    """105 candidates with a four-way tie across the 100-candidate cut: the file keeps the same 100
    as the FROC (ties in input order), so the official-format file scores the same curve."""
    rng = np.random.default_rng(3)
    distinct = [Candidate(tuple(rng.uniform(-150, 150, 3)), s) for s in np.linspace(0.99, 0.2, 98)]
    tied = [Candidate((float(10 * n), 0.0, 0.0), 0.1) for n in range(4)]  # ranks 99..102
    tail = [Candidate((0.0, 200.0, float(n)), 0.05) for n in range(3)]
    scan = distinct + tied + tail
    kept = top_candidates(scan)
    assert len(kept) == 100 and kept[98:] == tied[:2] and kept[:98] == distinct
    # Nodule under the second tied candidate (kept) and under the third (dropped at the cut).
    nodules = {"s": [Finding((10.0, 0.0, 0.0), 4.0), Finding((20.0, 0.0, 0.0), 4.0)]}
    path = tmp_path / "candidates.csv"
    path.write_text(candidates_csv({"s": scan}))
    back = read_candidates_csv(path)
    assert back == {"s": kept}
    original = evaluate_froc({"s": scan}, nodules, n_bootstrap=0)
    from_file = evaluate_froc(back, nodules, n_bootstrap=0)
    assert (original.n_truncated, from_file.n_truncated) == (5, 0)
    assert original.n_detected == from_file.n_detected == 1
    np.testing.assert_array_equal(original.fps, from_file.fps)
    np.testing.assert_array_equal(original.sensitivity, from_file.sensitivity)
    assert original.cpm == from_file.cpm


def test_reading_a_file_without_the_probability_column(tmp_path):
    path = tmp_path / "c.csv"
    path.write_text("seriesuid,coordX,coordY,coordZ\n1.2.3,0,0,0\n")
    with pytest.raises(InputError, match=r"c\.csv: missing column\(s\) probability$"):
        read_candidates_csv(path)
    path.write_text("seriesuid,coordX,coordY,coordZ,probability\n1.2.3,0,zero,0,0.5\n")
    with pytest.raises(InputError, match=r"c\.csv: line 2: "):
        read_candidates_csv(path)


# --- end to end: glance evaluate on a LUNA16 folder, oracle network ---------------------------------

SPACING = (0.8, 0.8, 1.25)  # (i, j, k) mm
ORIGIN = (120.5, 80.25, -200.0)
DIRECTION = np.diag([-1.0, -1.0, 1.0])  # i runs to patient right, j anterior: not the identity
SHAPE = (24, 48, 48)  # (k, j, i)
NODULE, EXCLUDED, FALSE_POSITIVE = (30, 20, 12), (10, 34, 12), (12, 8, 6)  # (i, j, k) voxels
PEAK = {NODULE: 255, EXCLUDED: 204, FALSE_POSITIVE: 153}  # heatmap peak: confidence 1.0, 0.8, 0.6


def world(ijk) -> tuple[float, float, float]:
    """LUNA16 world coordinates (ITK physical space) of a voxel, by ITK itself."""
    img = sitk.Image([SHAPE[2], SHAPE[1], SHAPE[0]], sitk.sitkInt16)
    img.SetSpacing(SPACING)
    img.SetOrigin(ORIGIN)
    img.SetDirection(DIRECTION.ravel().tolist())
    return tuple(img.TransformIndexToPhysicalPoint([int(v) for v in ijk]))


def write_luna(root: Path) -> None:
    subset = root / "subset4"
    subset.mkdir(parents=True)
    ct = np.full(SHAPE, -800, np.int16)  # lung, with a chest wall so the reader accepts it as CT
    ct[:, :6, :] = ct[:, -6:, :] = 40
    img = sitk.GetImageFromArray(ct)
    img.SetSpacing(SPACING)
    img.SetOrigin(ORIGIN)
    img.SetDirection(DIRECTION.ravel().tolist())
    sitk.WriteImage(img, str(subset / f"{UID}.mhd"))
    header = "seriesuid,coordX,coordY,coordZ,diameter_mm\n"
    (root / "annotations.csv").write_text(header + f"{UID},{','.join(map(repr, world(NODULE)))},6.5\n")
    # Size unknown (-1): LUNA16 counts it as 10 mm, so the candidate on it is ignored, not an FP.
    (root / "annotations_excluded.csv").write_text(header + f"{UID},{','.join(map(repr, world(EXCLUDED)))},-1\n")


def oracle_segment_volume(ct, network, options, lungs=None):
    """Maps a perfect network would give: a 6 mm ball of p = 1 around each finding and a
    symmetric heatmap peak on its voxel (the candidate lands exactly on the voxel centre)."""
    from glance.pipeline import Analysis

    k, j, i = np.indices(ct.shape)
    prob = np.zeros(ct.shape, np.uint8)
    heat = np.zeros(ct.shape, np.uint8)
    for (ci, cj, ck), peak in PEAK.items():
        d2 = ((i - ci) * SPACING[0]) ** 2 + ((j - cj) * SPACING[1]) ** 2 + ((k - ck) * SPACING[2]) ** 2
        prob[d2 <= 3.0 ** 2] = 255
        heat = np.maximum(heat, np.round(peak * np.exp(-d2 / (2 * 1.0 ** 2))).astype(np.uint8))
    return Analysis(ct, prob, heat, np.zeros(ct.shape, np.uint16), [])


def test_glance_evaluate_writes_the_luna16_candidates_file(tmp_path, monkeypatch):
    import glance.pipeline
    import glance.preprocess
    from glance.model.card import ModelCard
    from glance_training.evaluate import EvaluateConfig, evaluate

    write_luna(tmp_path / "LUNA16")
    card = ModelCard("oracle", "1.0.0", config={})
    monkeypatch.setattr(glance.pipeline, "load_network", lambda options: (None, card, None))
    given_lungs = []

    def oracle(ct, network, options, lungs=glance.pipeline.FIND_LUNGS):
        given_lungs.append(lungs)
        return oracle_segment_volume(ct, network, options)

    monkeypatch.setattr(glance.pipeline, "segment_volume", oracle)
    found = []
    real_lung_map = glance.preprocess.lung_map
    monkeypatch.setattr(glance.preprocess, "lung_map", lambda *a, **k: found.append(1) or real_lung_map(*a, **k))
    out = tmp_path / "eval"
    # The subset alone: annotations.csv and annotations_excluded.csv are found beside it.
    report = evaluate(EvaluateConfig(data=[f"luna:{tmp_path / 'LUNA16' / 'subset4'}"], split="all",
                                     out=str(out), n_bootstrap=0))

    with open(out / "candidates.csv", newline="") as fh:
        rows = list(csv.reader(fh))
    assert rows[0] == list(CANDIDATE_COLUMNS)
    assert [r[0] for r in rows[1:]] == [UID] * 3
    coords = [tuple(float(v) for v in r[1:4]) for r in rows[1:]]
    probabilities = [float(r[4]) for r in rows[1:]]
    assert probabilities == pytest.approx([1.0, 0.8, 0.6], abs=1e-6)
    assert coords == [world(v) for v in (NODULE, EXCLUDED, FALSE_POSITIVE)]  # float-exact
    annotated = (tmp_path / "LUNA16" / "annotations.csv").read_text().splitlines()[1].split(",")[1:4]
    assert rows[1][1:4] == annotated  # the very text of annotations.csv
    assert (out / "seriesuids.csv").read_text() == f"{UID}\n"
    # The scan's lungs are found once and shared by the reported nodules and the FROC candidates.
    assert len(found) == 1 and len(given_lungs) == 1 and given_lungs[0] != glance.pipeline.FIND_LUNGS

    # The file's scores are the FROC's own: its thresholds are the probabilities written.
    detection = json.loads((out / "evaluation.json").read_text())["detection"]
    assert report["detection"]["cpm"] == detection["cpm"] == 1.0
    assert (detection["n_nodules"], detection["n_detected"], detection["n_false_positives"],
            detection["n_ignored_excluded"]) == (1, 1, 1, 1)
    assert sorted(t for t in detection["curve"]["thresholds"] if t is not None) == sorted(
        p for p in probabilities if p != probabilities[1])


def test_glance_evaluate_counts_what_a_reader_sees_at_the_default_thresholds(tmp_path, monkeypatch):
    """The reported nodules (not the FROC's candidates) matched like the FROC: two on the nodule (one
    hit, one second report), one on the excluded finding (ignored), two elsewhere (false positives)."""
    from types import SimpleNamespace

    import glance.pipeline
    from glance.model.card import ModelCard
    from glance_training.evaluate import EvaluateConfig, evaluate

    def reporting(ct, network, options, lungs=None):
        analysis = oracle_segment_volume(ct, network, options)
        analysis.nodules = [SimpleNamespace(centre_lps=world(v), confidence=c)
                            for v, c in ((FALSE_POSITIVE, 0.9), (NODULE, 0.8), (EXCLUDED, 0.7), ((40, 40, 20), 0.6),
                                         ((31, 20, 12), 0.5))]  # 0.8 mm from the 6.5 mm nodule's centre
        return analysis

    write_luna(tmp_path / "LUNA16")
    card = ModelCard("oracle", "1.0.0", config={})
    monkeypatch.setattr(glance.pipeline, "load_network", lambda options: (None, card, None))
    monkeypatch.setattr(glance.pipeline, "segment_volume", reporting)
    report = evaluate(EvaluateConfig(data=[f"luna:{tmp_path / 'LUNA16' / 'subset4'}"], split="all",
                                     out=str(tmp_path / "eval"), n_bootstrap=0))
    assert report["at_default_thresholds"] == {
        "n_scans": 1, "n_nodules": 1, "sensitivity": 1.0, "n_false_positives": 2, "fp_per_scan": 2.0,
        "scans": {UID: {"n_reported": 5, "n_nodules": 1, "found": [0], "missed": [],
                        "n_false_positives": 2, "n_ignored_excluded": 1, "n_second_reports": 1}}}
