"""``glance evaluate``: how good a model is on a site's data, scoring what ``glance segment`` produces.

Full scans go through the whole pipeline (``glance.pipeline.segment_volume``):
per-nodule Dice / IoU / sensitivity / HD95 of the final nodule masks, and
detection FROC + CPM (LUNA16 protocol, ``glance_training.froc``) from the
post-processing's scored candidates. Crops (2D max-slice and 3D nodule crops,
centred on a nodule, without the surroundings detection needs) score the
network's segmentation alone: the predicted component overlapping the nodule.

Besides ``evaluation.json`` (and ``nodules.csv``, ``froc.png``) the report folder holds,
when full scans were scored, the FROC's candidates in LUNA16's submission format
(``candidates.csv``: ``seriesuid,coordX,coordY,coordZ,probability``, world mm = LPS,
at most 100 per scan) and the scans they come from (``seriesuids.csv``, one uid a
line, no header, like the official ``seriesuids.csv``): the official LUNA16 script
scores them, and folds pool by concatenation. A LUNA16/Tianchi scan is named by its
series uid, any other case by its case id.

Only patients of the requested split are scored (default ``test``), using the
split the model was trained with (from its card), so a reported number never
comes from a patient the model trained on. ``train`` scores the patients it did train on:
set beside ``val`` it tells under-fitting (both low) from over-fitting (train far above val);
it is never an accuracy to report.
"""

from __future__ import annotations

import csv
import io
import logging
import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from operator import attrgetter
from pathlib import Path

import numpy as np

from glance.errors import GlanceError
from glance.preprocess import FIND_LUNGS

log = logging.getLogger(__name__)

CROP_KINDS = {"maxslice", "crops3d"}
EVALUATION_SEED_OFFSET = 7919  # phantoms evaluated are generated from the training seed + this: never trained on
CANDIDATES_FILE = "candidates.csv"
SERIESUIDS_FILE = "seriesuids.csv"


@dataclass
class EvaluateConfig:
    model: str | None = None
    data: list[str] = field(default_factory=list)
    split: str = "test"  # test | val | train | all (train, all: patients the model trained on)
    out: str = "glance-evaluation"
    device: str = "auto"
    batch: int = 8
    seg_threshold: float | None = None  # None: the model card's calibrated value, else the built-in default
    det_threshold: float | None = None
    n_bootstrap: int = 1000
    max_cases: int = 0  # 0: every case of the split
    tta: bool = False  # average the network over the in-plane flips
    outline_fraction: float | None = None  # post-processing rule 9; None: the card's value, else off


SPLIT_CHOICES = ("test", "val", "train", "all")


def training_split(card):
    """The SplitConfig the model was trained with (defaults for a model without training info)."""
    from glance_training.datasets import SplitConfig

    train_cfg = (card.training or {}).get("config") or {}
    return SplitConfig(tuple(train_cfg.get("split", (0.8, 0.1, 0.1))), int(train_cfg.get("seed", 0)),
                       tuple(train_cfg.get("held_out", ("LIDC-IDRI-0001", "LIDC-IDRI-0003"))))


def training_seed(card) -> int:
    """The seed the model was trained with (0 for a model without training info)."""
    return int(((card.training or {}).get("config") or {}).get("seed", 0))


def evaluation_seed(card, which: str) -> int:
    """The seed an evaluation loads its sources with (it decides the phantoms). ``--split train`` and
    ``--split val`` take the training seed, so that they score the model's own training and validation
    phantoms (those ``glance calibrate`` chose its thresholds on), as they score its own training and
    validation patients; ``test`` and ``all`` take the seed + EVALUATION_SEED_OFFSET: phantoms that no
    training or calibration of the model has seen."""
    seed = training_seed(card)
    return seed if which in ("train", "val") else seed + EVALUATION_SEED_OFFSET


def split_cases(spec_text: str, which: str, max_cases: int, split, seed: int):
    """(spec, cases) of one data source: the ``which`` part (one of SPLIT_CHOICES) of ``split``, at most
    ``max_cases`` of them (0: all)."""
    from glance_training.data import DataSpec, load_source
    from glance_training.datasets import split_source

    spec = DataSpec.parse(spec_text)
    source = load_source(spec, seed)
    cases = list(source) if which == "all" else list(split_source(source, split)[which])
    if max_cases:
        cases = cases[:max_cases]
    return spec, cases


def model_split_cases(card, spec_text: str, which: str, max_cases: int = 0):
    """``split_cases`` by ``card``'s training split and the seed ``evaluation_seed`` gives ``which``."""
    return split_cases(spec_text, which, max_cases, training_split(card), evaluation_seed(card, which))


def _crop_prediction(loaded, network, options) -> np.ndarray:
    """Network segmentation of a crop (p >= threshold, outlined by rule 9), on its grid."""
    from glance.pipeline import predict_maps
    from glance.postprocess import outline_mask

    prob, _, _, _ = predict_maps(loaded.ct, network, options.inference, whole_image=True)
    return outline_mask(prob, options.postprocess)


def froc_candidates(loaded, prob, heatmap, cfg, lungs=FIND_LUNGS) -> list[tuple[tuple, object]]:
    """(LPS position in mm, ``glance.postprocess.Candidate``) of each FROC candidate of one scan, to be
    scored by any ranking (``froc_inputs``, ``bench/froc_ranking.py``). ``prob`` and ``heatmap`` lie on
    ``loaded.ct``'s grid. ``lungs``: the scan's lungs (``glance.pipeline.ct_lungs``) when known, else
    found here."""
    from glance.pipeline import canonical_volume, lungs_for
    from glance.postprocess import candidates_for_froc

    canon, grid = canonical_volume(loaded.ct)
    spacing = tuple(grid.canonical_spacing)
    found = candidates_for_froc(grid.to_canonical(prob), grid.to_canonical(heatmap), spacing, cfg,
                                lungs_for(canon.array, spacing, cfg, lungs))
    return [(tuple(canon.ijk_to_lps(np.asarray(c.position_index)[::-1])), c) for c in found]


def scored_candidates(found: list[tuple[tuple, object]], score: str | Callable = "confidence") -> list:
    """``froc_candidates`` as FROC candidates scored by their ``score`` field (``confidence``, as the
    FROC ranks them, or ``detection_score``, the heatmap peak) or by ``score(candidate)``."""
    from glance_training.froc import Candidate

    score_of = score if callable(score) else attrgetter(score)
    return [Candidate(position, float(score_of(c))) for position, c in found]


def froc_inputs(loaded, prob, heatmap, cfg, score: str | Callable = "confidence", lungs=FIND_LUNGS):
    """(candidates, reference nodules, excluded findings) of one scan, all in LPS mm, the candidates
    scored as ``scored_candidates`` scores them (``froc_candidates`` says what the inputs are)."""
    found = froc_candidates(loaded, prob, heatmap, cfg, lungs)
    return (scored_candidates(found, score), *reference_findings(loaded))


def reference_findings(loaded):
    """(reference nodules, excluded findings) of one scan as FROC findings, in LPS mm."""
    from glance_training.froc import Finding

    refs = [Finding(tuple(a.centre_lps), a.diameter_mm) for a in loaded.nodules if not a.excluded]
    excluded = [Finding(tuple(a.centre_lps), a.diameter_mm) for a in loaded.nodules if a.excluded]
    return refs, excluded


@dataclass
class _Collected:
    rows: list[dict] = field(default_factory=list)
    per_case: dict = field(default_factory=dict)
    candidates: dict = field(default_factory=dict)
    references: dict = field(default_factory=dict)
    excluded: dict = field(default_factory=dict)
    scans: list = field(default_factory=list)
    seriesuids: dict = field(default_factory=dict)  # scan -> name in candidates.csv
    reported: dict = field(default_factory=dict)  # scan -> the nodules the pipeline reports, as candidates


def _score(collected: _Collected, case_id: str, source: str, pred, gt, spacing_kji, annotations=(),
           patient: str = "") -> None:
    """Score one case; ``annotations`` (its findings) give each labelled nodule its diameter and kind;
    ``patient`` (default: the case) groups cases for the bootstrap interval."""
    from glance_training.metrics import score_nodules

    if gt is None:
        return
    scores = score_nodules(pred, gt, spacing_kji)
    collected.per_case[case_id] = [s.scores for s in scores]
    by_label = {a.label: a for a in annotations if a.label}
    for s in scores:
        a = by_label.get(s.gt_label)
        collected.rows.append({"case": case_id, "patient": patient or case_id, "source": source,
                               "gt_label": s.gt_label,
                               "diameter_mm": a.diameter_mm if a else math.nan, "kind": a.kind if a else "",
                               "pred_label": s.pred_label, **asdict(s.scores)})


DICE_CI_BOOTSTRAP = 2000  # resamples of the patients for the interval of the mean per-nodule Dice

# Lung-RADS solid-nodule size steps (mm): the sizes at which a reader's management changes.
SIZE_EDGES_MM = (6.0, 8.0, 15.0)
SIZE_GROUPS = (f"< {SIZE_EDGES_MM[0]:g} mm",
               *(f"{a:g}-{b:g} mm" for a, b in zip(SIZE_EDGES_MM, SIZE_EDGES_MM[1:])),
               f">= {SIZE_EDGES_MM[-1]:g} mm", "unknown size")  # smallest first


def _size_group(diameter_mm: float) -> str:
    """The size group of a diameter; a group includes its lower edge."""
    if not math.isfinite(diameter_mm) or diameter_mm <= 0:
        return SIZE_GROUPS[-1]
    return SIZE_GROUPS[int(np.searchsorted(SIZE_EDGES_MM, diameter_mm, side="right"))]


def _breakdown(rows: list[dict], key, order=None) -> dict[str, dict]:
    """Per group of nodules (``key(row)``, listed in ``order`` of their names, default alphabetical):
    how many, how many found, Dice with misses as 0 and Dice of the found ones."""
    groups: dict[str, list[dict]] = {}
    for row in rows:
        groups.setdefault(key(row), []).append(row)
    out = {}
    for name in sorted(groups, key=order):
        dice = np.array([r["dice"] for r in groups[name]], float)
        found = np.array([bool(r["pred_label"]) for r in groups[name]])
        out[name] = {"n": int(dice.size), "n_found": int(found.sum()), "found_fraction": float(found.mean()),
                     "dice_mean": float(dice.mean()),
                     "dice_mean_found": float(dice[found].mean()) if found.any() else None}
    return out


def evaluate(cfg: EvaluateConfig, progress=None) -> dict:
    from glance.infer import InferenceOptions
    from glance.pipeline import SegmentOptions, ct_lungs, load_network, segment_volume
    from glance.pipeline import with_model_thresholds
    from glance_training.froc import Candidate

    if cfg.split not in SPLIT_CHOICES:
        raise GlanceError(f"--split must be one of {', '.join(SPLIT_CHOICES)}, got {cfg.split!r}")
    if not cfg.data:
        raise GlanceError("no evaluation data: give --data KIND:PATH")
    options = SegmentOptions(model=cfg.model, inference=InferenceOptions(cfg.device, cfg.batch, tta=cfg.tta),
                             seg_threshold=cfg.seg_threshold, det_threshold=cfg.det_threshold,
                             outline_fraction=cfg.outline_fraction)
    network = load_network(options)
    card = network[1]
    options = with_model_thresholds(options, card)
    split = training_split(card)
    got = _Collected()
    for spec_text in cfg.data:
        spec, cases = model_split_cases(card, spec_text, cfg.split, cfg.max_cases)
        log.info("%s: %d %s cases", spec_text, len(cases), cfg.split)
        if cfg.split == "train" or (cfg.split == "all" and spec.kind != "phantom"):  # see evaluation_seed
            log.warning("%s: --split %s scores patients the model trained on: not a held-out accuracy",
                        spec_text, cfg.split)
        for n, case in enumerate(cases, start=1):
            loaded = case.load()
            spacing_kji = tuple(reversed(loaded.ct.spacing))
            if spec.kind in CROP_KINDS:
                _score(got, loaded.case_id, spec.kind, _crop_prediction(loaded, network, options),
                       loaded.labels, spacing_kji, loaded.nodules, loaded.patient_id)
            else:
                lungs = ct_lungs(loaded.ct, options.postprocess)
                analysis = segment_volume(loaded.ct, network, options, lungs=lungs)
                _score(got, loaded.case_id, spec.kind, analysis.labels, loaded.labels, spacing_kji, loaded.nodules,
                       loaded.patient_id)
                cands, refs, excl = froc_inputs(loaded, analysis.prob, analysis.heatmap, options.postprocess,
                                                lungs=lungs)
                got.scans.append(loaded.case_id)
                got.seriesuids[loaded.case_id] = case.metadata.get("seriesuid", loaded.case_id)
                got.candidates[loaded.case_id], got.references[loaded.case_id] = cands, refs
                got.excluded[loaded.case_id] = excl
                got.reported[loaded.case_id] = [Candidate(nodule.centre_lps, nodule.confidence)
                                            for nodule in analysis.nodules]
            if progress:
                progress(f"PROGRESS {n}/{len(cases)} {spec.kind}")
    return _report(cfg, options, card, split, got)


def segmentation_summaries(got: _Collected) -> dict:
    """Per nodule (a missed nodule scores Dice 0), per case, and per found nodule: the outline
    quality of the nodules the pipeline reports, apart from the ones it misses."""
    from glance_training.metrics import (METRIC_NAMES, SegmentationScores, bootstrap_mean_ci, summarize,
                                         summarize_cases)

    found = [SegmentationScores(**{m: r[m] for m in METRIC_NAMES}) for r in got.rows if r["pred_label"]]
    low, high = bootstrap_mean_ci([r["dice"] for r in got.rows], [r["patient"] for r in got.rows],
                                  DICE_CI_BOOTSTRAP)
    return {
        "segmentation_per_nodule": summarize(s for v in got.per_case.values() for s in v).to_dict(),
        "dice_per_nodule_ci95": {"low": low, "high": high, "resampled": "patients",
                                 "n_patients": len({r["patient"] for r in got.rows}),
                                 "n_bootstrap": DICE_CI_BOOTSTRAP, "seed": 0},
        "segmentation_per_case": summarize_cases(got.per_case).to_dict(),
        "segmentation_per_found_nodule": summarize(found).to_dict(),
        "n_nodules_missed": len(got.rows) - len(found),
        "by_size": _breakdown(got.rows, lambda r: _size_group(r["diameter_mm"]), order=SIZE_GROUPS.index),
        **({"by_kind": _breakdown(got.rows, lambda r: r["kind"] or "unknown")}
           if any(r["kind"] for r in got.rows) else {}),
    }


def reported_summary(got: _Collected) -> dict:
    """What a reader sees at the default thresholds: the nodules ``glance segment`` reports, matched
    to the reference as the FROC matches candidates. Per scan: reference nodules found (their
    indices among the scan's non-excluded findings) and missed, false positives, reports ignored
    because they lie on an excluded finding, and second reports of a nodule already found (neither
    a hit nor a false positive, as in LUNA16); then the totals."""
    scans = {scan: reported_outcome(got.reported[scan], got.references[scan], got.excluded[scan])
             for scan in got.scans}
    n_nodules = sum(s["n_nodules"] for s in scans.values())
    n_fp = sum(s["n_false_positives"] for s in scans.values())
    return {"n_scans": len(scans), "n_nodules": n_nodules,
            "sensitivity": sum(len(s["found"]) for s in scans.values()) / n_nodules if n_nodules else None,
            "n_false_positives": n_fp, "fp_per_scan": n_fp / len(scans) if scans else None, "scans": scans}


def reported_outcome(reported, references, excluded) -> dict:
    """One scan's reported nodules (FROC candidates) matched to its reference by the FROC's rule."""
    from glance_training.froc import match_scan

    outcome = match_scan(reported, references, excluded)
    found = ~np.isnan(outcome.nodule_scores)
    return {"n_reported": len(reported), "n_nodules": int(found.size),
            "found": np.flatnonzero(found).tolist(), "missed": np.flatnonzero(~found).tolist(),
            "n_false_positives": int(outcome.fp_scores.size),
            "n_ignored_excluded": outcome.n_ignored_excluded,
            "n_second_reports": outcome.n_ignored_double}


def _report(cfg: EvaluateConfig, options, card, split, got: _Collected) -> dict:
    from glance.pipeline import threshold_values
    from glance_training.froc import evaluate_froc, plot_froc

    report = {
        "model": {"name": card.name, "version": card.version},
        "split": {"evaluated": cfg.split, "fractions": split.fractions, "seed": split.seed,
                  "held_out": split.held_out},
        "data": cfg.data,
        "inference": {"tta": cfg.tta},
        "thresholds": threshold_values(options.postprocess) | {"source": options.threshold_sources},
        "conventions": {
            "hd95": "symmetric 95th percentile of surface distances (boundary voxels, voxel centres, mm)",
            "empty_masks": "both empty: Dice 1, HD95 0; one empty: Dice 0, HD95 inf (left out of means, counted)",
            "froc": "LUNA16: hit = candidate strictly within the nodule radius, one TP per nodule, "
                    "excluded findings ignored, at most 100 candidates per scan",
        },
        "n_nodules_scored": len(got.rows),
    }
    if got.rows:
        report.update(segmentation_summaries(got))
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    if got.scans:
        froc = evaluate_froc(got.candidates, got.references, got.excluded, scans=got.scans,
                             n_bootstrap=cfg.n_bootstrap)
        report["detection"] = froc.to_dict()
        report["at_default_thresholds"] = reported_summary(got)
        plot_froc(froc, out / "froc.png", title=f"{card.name}@{card.version}")
    _write(out, report, got)
    return report


def _write(out: Path, report: dict, got: _Collected) -> None:
    from glance.io import atomic_write_text
    from glance.report import write_report_json
    from glance_training.froc import candidates_csv

    write_report_json(out / "evaluation.json", report)
    if got.scans:
        scans = {scan: got.candidates[scan] for scan in got.scans}
        atomic_write_text(out / CANDIDATES_FILE, candidates_csv(scans, got.seriesuids))
        atomic_write_text(out / SERIESUIDS_FILE, "".join(f"{got.seriesuids[s]}\n" for s in scans))
    if got.rows:
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=list(got.rows[0]))
        writer.writeheader()
        writer.writerows(got.rows)
        atomic_write_text(out / "nodules.csv", buf.getvalue())
