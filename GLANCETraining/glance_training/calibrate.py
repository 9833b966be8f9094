"""``glance calibrate``: choose a model's operating point on validation data and store it in its card.

A network's probabilities are not calibrated: the shipped small model, trained with a Dice loss,
puts nodule boundaries well below p = 0.5, so a fixed 0.5 under-segments. The thresholds that
``glance segment`` uses by default therefore come from the model card, chosen here on the
*validation* patients of the model's own training split (never its training or test patients):

* segmentation threshold: the one with the best mean per-nodule Dice, where each data source
  counts equally (so 200 small 2D crops cannot pick a value that breaks full-volume
  segmentation on the phantoms). Crops score the network's segmentation alone, volumes the
  whole pipeline, exactly as ``glance evaluate`` does. Ties go to the higher threshold.
* outline fraction (post-processing rule 9: each nodule outlined at this fraction of its own
  peak probability, 0 = off): the one with the best mean per-nodule Dice at that segmentation
  threshold, same weighting, ties to the smaller. A faint small nodule needs a low threshold to
  be segmented at all; rule 9 keeps a confident large one from being outlined too wide at it.
* detection threshold (on the centre heatmap's peaks): the highest one that keeps at least
  ``target_sensitivity`` of the sensitivity reachable at any threshold (each source counting
  equally). Relative, because a nodule the network misses at every threshold cannot be bought
  back by lowering it, and a reading aid should lose few of the ones it can find. A nodule in a
  crop is found when the heatmap peaks at or above the threshold inside its mask; in a volume,
  when a candidate of the pipeline hits it by the LUNA16 rule. The detection threshold is then
  raised, if needed, until the validation volumes average at most ``max_fp_per_scan`` false
  positives (default 1, the operating point the detection targets are stated at). The false
  positives per scan at the chosen threshold are reported. Phantoms have far fewer look-alikes
  than real lungs, so real scans show more.
"""

from __future__ import annotations

import logging
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from glance.errors import GlanceError
from glance.preprocess import FIND_LUNGS

log = logging.getLogger(__name__)

SEG_GRID = tuple(round(0.05 * n, 2) for n in range(1, 11))  # 0.05 .. 0.50
DET_GRID = tuple(round(0.05 * n, 2) for n in range(1, 20))  # 0.05 .. 0.95
OUTLINE_GRID = (0.0, 0.1, 0.2, 0.3, 0.4)  # rule 9's fraction of each nodule's peak probability; 0 = off


@dataclass
class CalibrationConfig:
    model: str | None = None
    data: list[str] = field(default_factory=list)
    split: str = "val"  # val (default) | all; never test: test numbers must not choose thresholds
    target_sensitivity: float = 0.9
    max_fp_per_scan: float = 1.0  # on the validation volumes, at the chosen detection threshold
    seg_grid: tuple[float, ...] = SEG_GRID
    det_grid: tuple[float, ...] = DET_GRID
    outline_grid: tuple[float, ...] = OUTLINE_GRID
    # Rule 9 is adopted only if its best fraction raises the mean per-source Dice by at least this over
    # fraction 0 (the shipped model's ship rule asked 0.005); 0 adopts any fraction that helps at all.
    min_outline_gain: float = 0.0
    device: str = "auto"
    batch: int = 8
    max_cases: int = 0
    tta: bool = False  # calibrate on flip-averaged maps: the card's "with_flips" operating point


@dataclass
class SourceCurves:
    """Per-threshold results of one data source."""

    spec: str
    volumetric: bool
    dice: dict[float, float] = field(default_factory=dict)  # seg threshold -> mean per-nodule Dice
    outline_dice: dict[float, float] = field(default_factory=dict)  # fraction -> Dice at the chosen threshold
    sensitivity: dict[float, float] = field(default_factory=dict)  # det threshold -> fraction found
    fp_per_scan: dict[float, float] = field(default_factory=dict)  # det threshold -> (volumes only)
    n_nodules: int = 0
    n_cases: int = 0


@dataclass
class Calibration:
    segmentation: float
    detection: float
    sources: list[SourceCurves]
    config: CalibrationConfig
    outline_fraction: float = 0.0
    outline_not_adopted: str = ""  # why the best fraction was not adopted (under min_outline_gain), if so

    def at(self, curve: str, threshold: float) -> dict[str, float]:
        return {s.spec: getattr(s, curve)[threshold] for s in self.sources if threshold in getattr(s, curve)}

    def card_entry(self) -> dict:
        """The card's ``thresholds`` object: the values and how they were chosen."""
        return {
            "segmentation": self.segmentation,
            "detection": self.detection,
            "outline_fraction": self.outline_fraction,
            "calibration": {
                "data": self.config.data,
                "split": self.config.split,
                "rule": (f"segmentation: best mean per-nodule Dice (sources weighted equally); outline fraction: "
                         f"the same at that threshold; detection: "
                         f"highest heatmap threshold keeping >= {self.config.target_sensitivity:g} of the sensitivity "
                         f"reachable at any threshold (sources weighted equally), raised if needed to <= "
                         f"{self.config.max_fp_per_scan:g} false positives per validation volume"),
                "dice_at_segmentation": self.at("dice", self.segmentation),
                "dice_at_outline_fraction": self.at("outline_dice", self.outline_fraction),
                "sensitivity_at_detection": self.at("sensitivity", self.detection),
                "fp_per_scan_at_detection": self.at("fp_per_scan", self.detection),
                "n_nodules": {s.spec: s.n_nodules for s in self.sources},
                "flip_averaging": self.config.tta,
            },
            **({"outline_fraction_not_adopted": self.outline_not_adopted} if self.outline_not_adopted else {}),
        }

    def to_dict(self) -> dict:
        return {"thresholds": self.card_entry(), "curves": [asdict(s) for s in self.sources]}


@dataclass
class CaseMaps:
    """One labelled case with the network's maps, kept for both calibration passes."""

    loaded: object  # glance_training.datasets.LoadedCase
    prob: np.ndarray
    heat: np.ndarray
    lungs: object = FIND_LUNGS  # a volume's LungMap (or None), found once for every threshold tried


def calibrate(cfg: CalibrationConfig, progress=None) -> Calibration:
    from glance.infer import InferenceOptions
    from glance.pipeline import SegmentOptions, load_network

    if cfg.split not in ("val", "all"):
        raise GlanceError(f"calibration uses validation data: --split must be val or all, got {cfg.split!r}")
    if not cfg.data:
        raise GlanceError("no calibration data: give --data KIND:PATH")
    if not 0.0 < cfg.target_sensitivity <= 1.0:
        raise GlanceError(f"--target-sensitivity must be in (0, 1], got {cfg.target_sensitivity}")
    if not cfg.max_fp_per_scan >= 0.0:
        raise GlanceError(f"--max-fp-per-scan must be >= 0, got {cfg.max_fp_per_scan}")
    if not cfg.min_outline_gain >= 0.0:
        raise GlanceError(f"--min-outline-gain must be >= 0, got {cfg.min_outline_gain}")
    inference = InferenceOptions(cfg.device, cfg.batch, tta=cfg.tta)
    network = load_network(SegmentOptions(model=cfg.model, inference=inference))
    groups = [_predict_source(spec, cfg, network, inference, progress) for spec in cfg.data]
    return choose_thresholds(groups, cfg)


def choose_thresholds(groups: list[tuple[str, list[CaseMaps], bool]], cfg: CalibrationConfig) -> Calibration:
    """The operating point from (spec, cases with maps, volumetric) per data source."""
    groups = [g for g in groups if g[1]]
    if not groups:
        raise GlanceError(f"no labelled {cfg.split} cases in {', '.join(cfg.data)}")
    curves = [_seg_curve(spec, cases, volumetric, cfg) for spec, cases, volumetric in groups]
    seg = _best_segmentation([c for c in curves if c.dice], cfg.seg_grid)
    for curve, (_, cases, volumetric) in zip(curves, groups):
        _outline_curve(curve, cases, volumetric, seg, cfg)
    fraction, not_adopted = _best_outline([c for c in curves if c.outline_dice], cfg.outline_grid,
                                          cfg.min_outline_gain)
    for curve, (_, cases, volumetric) in zip(curves, groups):
        _det_curve(curve, cases, volumetric, seg, cfg)  # rule 9 changes outlines only, not what is found
    det = max(_best_detection(curves, cfg.det_grid, cfg.target_sensitivity),
              _lowest_within_fp_budget(curves, cfg.det_grid, cfg.max_fp_per_scan))
    log.info("calibrated: segmentation %.2f, outline fraction %.2f, detection %.2f", seg, fraction, det)
    return Calibration(seg, det, curves, cfg, fraction, not_adopted)


def _predict_source(spec_text: str, cfg: CalibrationConfig, network, inference, progress):
    """(spec, [cases with maps], volumetric) of the labelled cases of one source's split."""
    from glance.pipeline import ct_lungs, predict_maps
    from glance_training.evaluate import CROP_KINDS, split_cases, training_seed, training_split

    card = network[1]
    seed = training_seed(card)
    spec, cases = split_cases(spec_text, cfg.split, cfg.max_cases, training_split(card), seed)
    volumetric = spec.kind not in CROP_KINDS
    kept = []
    for n, case in enumerate(cases, start=1):
        loaded = case.load()
        if _has_mask(loaded) or (volumetric and any(not a.excluded for a in loaded.nodules)):
            prob, heat, _, _ = predict_maps(loaded.ct, network, inference, whole_image=not volumetric)
            kept.append(CaseMaps(loaded, prob, heat, ct_lungs(loaded.ct) if volumetric else None))
        if progress:
            progress(f"PROGRESS {n}/{len(cases)} {spec.kind}")
    log.info("%s: %d labelled %s cases", spec_text, len(kept), cfg.split)
    return spec_text, kept, volumetric


def _has_mask(loaded) -> bool:
    return loaded.labels is not None and bool(loaded.labels.any())


def _spacing_kji(loaded) -> tuple[float, float, float]:
    return tuple(reversed(loaded.ct.spacing))


def _seg_curve(spec: str, cases: list[CaseMaps], volumetric: bool, cfg: CalibrationConfig) -> SourceCurves:
    from glance.postprocess import PostprocessConfig

    curve = SourceCurves(spec, volumetric, n_cases=len(cases))
    lowest = min(cfg.det_grid)
    masked = [c for c in cases if _has_mask(c.loaded)]  # centre-only findings (LUNA16) have no Dice
    for t in cfg.seg_grid if masked else ():
        curve.dice[t], curve.n_nodules = _mean_dice(masked, volumetric, PostprocessConfig(t, lowest))
    return curve


def _outline_curve(curve: SourceCurves, cases: list[CaseMaps], volumetric: bool, seg: float,
                   cfg: CalibrationConfig) -> None:
    from glance.postprocess import PostprocessConfig

    masked = [c for c in cases if _has_mask(c.loaded)]
    for f in cfg.outline_grid if masked else ():
        curve.outline_dice[f], _ = _mean_dice(masked, volumetric,
                                              PostprocessConfig(seg, min(cfg.det_grid), outline_fraction=f))


def _mean_dice(masked: list[CaseMaps], volumetric: bool, post) -> tuple[float, int]:
    """Mean per-nodule Dice of the cases under post-processing ``post``, and the number of nodules.
    Volumes run the whole pipeline (detecting at the lowest threshold the calibration considers);
    crops the network's segmentation alone, as ``glance evaluate`` scores them."""
    from glance.pipeline import nodule_labels
    from glance.postprocess import outline_mask
    from glance_training.metrics import score_nodules

    dice = []
    for c in masked:
        pred = (nodule_labels(c.loaded.ct, c.prob, c.heat, post, c.lungs) if volumetric
                else outline_mask(c.prob, post))
        dice += [s.scores.dice for s in score_nodules(pred, c.loaded.labels, _spacing_kji(c.loaded))]
    return float(np.mean(dice)), len(dice)


def _best_segmentation(curves: list[SourceCurves], grid) -> float:
    if not curves:
        raise GlanceError("no nodule masks to calibrate segmentation on")
    mean = {t: float(np.mean([c.dice[t] for c in curves])) for t in grid}
    return max(sorted(grid, reverse=True), key=lambda t: mean[t])  # max() keeps the first (highest) of ties


def _best_outline(curves: list[SourceCurves], grid, min_gain: float = 0.0) -> tuple[float, str]:
    """The fraction with the best mean Dice (sources weighted equally; ties go to the smaller one, so
    rule 9 stays off unless it helps), or 0 with the reason when it gains less than ``min_gain`` over 0."""
    mean = {f: float(np.mean([c.outline_dice[f] for c in curves])) for f in grid}
    best = max(sorted(grid), key=lambda f: mean[f])
    off = min(grid)
    gain = mean[best] - mean[off]
    if best == off or gain >= min_gain:
        return best, ""
    scores = ", ".join(f"{c.spec.split(':')[0]} {c.outline_dice[best]:.4f}" for c in curves)
    return off, (f"{best:g} was best ({scores}) but raised the validation criterion by {gain:.5f} "
                 f"({mean[off]:.5f} -> {mean[best]:.5f}), under the {min_gain:g} that the rule written before "
                 f"calibrating required; so rule 9 stays off at this operating point")


def _det_curve(curve: SourceCurves, cases: list[CaseMaps], volumetric: bool, seg: float,
               cfg: CalibrationConfig) -> None:
    found, fps = [], []  # per nodule: best heatmap peak that finds it; per scan: FP peaks
    for c in cases:
        if volumetric:
            nodule_scores, fp_scores = _volume_detection_scores(c, seg)
            found += list(np.nan_to_num(nodule_scores, nan=-1.0))
            fps.append(fp_scores)
        else:
            found += _crop_peak_scores(c)
    found = np.asarray(found)
    for t in cfg.det_grid:
        curve.sensitivity[t] = float(np.mean(found >= t)) if len(found) else float("nan")
        if volumetric:
            curve.fp_per_scan[t] = float(np.mean([np.sum(f >= t) for f in fps]))


def _crop_peak_scores(c: CaseMaps) -> list[float]:
    """Per labelled nodule of a crop: the highest heatmap value inside its mask."""
    from scipy import ndimage

    labels = c.loaded.labels
    ids = [int(v) for v in np.unique(labels) if v]
    return [float(v) / 255.0 for v in ndimage.maximum(c.heat, labels, ids)]


def _volume_detection_scores(c: CaseMaps, seg: float):
    """(best detection score per reference nodule, NaN if missed; scores of false positives) of one
    volume, by the LUNA16 hit rule, ranking candidates by their heatmap peak."""
    from glance.postprocess import PostprocessConfig
    from glance_training.evaluate import froc_inputs
    from glance_training.froc import match_scan

    outcome = match_scan(*froc_inputs(c.loaded, c.prob, c.heat, PostprocessConfig(seg_threshold=seg),
                                      score="detection_score", lungs=c.lungs))
    return outcome.nodule_scores, outcome.fp_scores


def _best_detection(curves: list[SourceCurves], grid, target: float) -> float:
    usable = [c for c in curves if not math.isnan(next(iter(c.sensitivity.values()), float("nan")))]
    if not usable:
        raise GlanceError("no nodules to calibrate detection on")
    relative = {t: np.mean([_relative(c, t) for c in usable]) for t in grid}
    return max(t for t in grid if relative[t] >= target or t == min(grid))


def _lowest_within_fp_budget(curves: list[SourceCurves], grid, budget: float) -> float:
    """The lowest threshold at which the volumetric sources average at most ``budget`` false positives
    per scan (each source counting equally); the grid's lowest when there are no volumes, its highest
    when no threshold is low enough in false positives."""
    volumes = [c for c in curves if c.fp_per_scan]
    if not volumes:
        return min(grid)
    within = [t for t in grid if np.mean([c.fp_per_scan[t] for c in volumes]) <= budget]
    return min(within) if within else max(grid)


def _relative(curve: SourceCurves, t: float) -> float:
    """Sensitivity at ``t`` as a share of the best this source reaches at any threshold."""
    best = max(curve.sensitivity.values())
    return curve.sensitivity[t] / best if best > 0 else 1.0


def write_to_card(model_folder: str | Path, calibration: Calibration) -> Path:
    """Store the calibrated thresholds in the model's card (the weights are untouched): a calibration on
    flip-averaged maps becomes its ``with_flips`` entry, and each kind keeps the other's."""
    from glance.model.card import FLIPS_KEY, read_card, write_card

    card = read_card(model_folder)
    entry, old = calibration.card_entry(), card.thresholds or {}
    kept_flips = {key: old[key] for key in (FLIPS_KEY,) if key in old}
    card.thresholds = {**old, FLIPS_KEY: entry} if calibration.config.tta else {**entry, **kept_flips}
    return write_card(model_folder, card)
