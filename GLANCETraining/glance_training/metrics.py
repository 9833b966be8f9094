"""Segmentation metrics per nodule, with the real voxel spacing.

Conventions (the paper's Table 2 metrics: Dice, IoU, sensitivity, HD95 in mm):

* ``spacing`` is given **per array axis, in array order**. For a ``glance.volume.Volume``
  array indexed (k, j, i) that is ``volume.spacing[::-1]`` = (sk, sj, si).
* Dice = 2|P∩G| / (|P|+|G|), IoU = |P∩G| / |P∪G|, sensitivity (voxel recall) = |P∩G| / |G|.
* HD95: the surface of a mask is its boundary voxels (the mask minus its erosion by the
  face-connected structuring element; voxels on the array border count as boundary).
  Distances are Euclidean, in mm, between voxel centres. For each direction (P -> G and
  G -> P) every surface voxel's distance to the nearest surface voxel of the other mask is
  taken, and the 95th percentile of that set is computed with linear interpolation
  (numpy/torch default). HD95 is the larger of the two directed percentiles. This is MONAI's
  ``compute_hausdorff_distance(percentile=95)``, which computes it here. (Note: some tools,
  e.g. medpy, take the percentile of the pooled distances instead; the values differ.)
* Empty masks: both empty -> Dice 1, IoU 1, sensitivity 1, HD95 0 (perfect agreement).
  Exactly one empty -> Dice 0, IoU 0, HD95 = inf; sensitivity 0 when the prediction is the
  empty one, NaN when the ground truth is (recall is undefined without positives).
  Summaries leave non-finite values (inf, NaN) out of mean/median/std and count them in
  ``n_excluded``.

Per-nodule scoring matches each ground-truth instance to the predicted instance that
overlaps it most (most shared voxels); a nodule that no prediction overlaps is a miss
(empty prediction: Dice 0, HD95 inf). One predicted instance may be matched to several
ground-truth nodules (a merged prediction); ``NoduleScore.shared`` flags that.
"""

from __future__ import annotations

import logging
import math
import warnings
from dataclasses import asdict, dataclass
from typing import Iterable, Mapping, Sequence

import numpy as np
from scipy import ndimage

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SegmentationScores:
    dice: float
    iou: float
    sensitivity: float
    hd95: float  # mm; inf when exactly one mask is empty


@dataclass(frozen=True)
class NoduleScore:
    gt_label: int
    pred_label: int  # 0: no predicted instance overlaps this nodule (a miss)
    scores: SegmentationScores
    shared: bool = False  # the predicted instance is also matched to another nodule


@dataclass(frozen=True)
class MetricSummary:
    mean: float
    median: float
    std: float  # sample standard deviation (ddof=1); NaN when fewer than two values
    n: int  # finite values summarised
    n_excluded: int  # non-finite values left out (HD95 of a miss, undefined recall)


@dataclass(frozen=True)
class SegmentationSummary:
    dice: MetricSummary
    iou: MetricSummary
    sensitivity: MetricSummary
    hd95: MetricSummary

    def to_dict(self) -> dict:
        return asdict(self)


METRIC_NAMES = ("dice", "iou", "sensitivity", "hd95")


def _pair(pred: np.ndarray, gt: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    pred = np.asarray(pred).astype(bool, copy=False)
    gt = np.asarray(gt).astype(bool, copy=False)
    if pred.shape != gt.shape:
        raise ValueError(f"prediction shape {pred.shape} differs from ground truth {gt.shape}")
    return pred, gt


def dice(pred: np.ndarray, gt: np.ndarray) -> float:
    """Dice coefficient of two binary masks (1.0 when both are empty)."""
    pred, gt = _pair(pred, gt)
    total = int(pred.sum()) + int(gt.sum())
    if total == 0:
        return 1.0
    return 2.0 * int(np.count_nonzero(pred & gt)) / total


def iou(pred: np.ndarray, gt: np.ndarray) -> float:
    """Intersection over union of two binary masks (1.0 when both are empty)."""
    pred, gt = _pair(pred, gt)
    union = int(np.count_nonzero(pred | gt))
    if union == 0:
        return 1.0
    return int(np.count_nonzero(pred & gt)) / union


def sensitivity(pred: np.ndarray, gt: np.ndarray) -> float:
    """Voxel recall |P∩G|/|G|: 1.0 when both are empty, NaN when only ``gt`` is."""
    pred, gt = _pair(pred, gt)
    positives = int(gt.sum())
    if positives == 0:
        return 1.0 if not pred.any() else math.nan
    return int(np.count_nonzero(pred & gt)) / positives


def hd95(pred: np.ndarray, gt: np.ndarray, spacing: Sequence[float]) -> float:
    """Symmetric 95th-percentile surface distance in mm (see the module docstring).

    ``spacing``: mm per array axis, in array order. Both empty -> 0.0; one empty -> inf.
    """
    pred, gt = _pair(pred, gt)
    if len(spacing) != pred.ndim:
        raise ValueError(f"spacing {tuple(spacing)} does not match a {pred.ndim}-D mask")
    has_pred, has_gt = bool(pred.any()), bool(gt.any())
    if not has_pred and not has_gt:
        return 0.0
    if has_pred != has_gt:
        return math.inf
    from monai.metrics import compute_hausdorff_distance

    with warnings.catch_warnings():
        # MONAI 1.5-1.6 passes its own deprecated argument internally (FutureWarning per call).
        warnings.simplefilter("ignore", FutureWarning)
        value = compute_hausdorff_distance(
            pred[None, None],
            gt[None, None],
            include_background=True,
            percentile=95,
            spacing=[float(s) for s in spacing],
        )
    return float(value.reshape(-1)[0])


def score_masks(pred: np.ndarray, gt: np.ndarray, spacing: Sequence[float]) -> SegmentationScores:
    """All four metrics for one pair of binary masks."""
    return SegmentationScores(
        dice=dice(pred, gt),
        iou=iou(pred, gt),
        sensitivity=sensitivity(pred, gt),
        hd95=hd95(pred, gt, spacing),
    )


def _instances(labels: np.ndarray) -> np.ndarray:
    """Instance labels; a boolean mask is split into 26-connected (8 in 2-D) components."""
    labels = np.asarray(labels)
    if labels.dtype != bool:
        if not np.issubdtype(labels.dtype, np.integer):
            raise ValueError(f"instance labels must be integers or booleans, got {labels.dtype}")
        return labels  # no widening copy: a CT-sized label map stays in its own dtype
    import cc3d

    connectivity = 26 if labels.ndim == 3 else 8
    return cc3d.connected_components(labels, connectivity=connectivity)


def _overlap_matrix(pred: np.ndarray, gt: np.ndarray) -> np.ndarray:
    """overlap[g, p] = voxels shared by ground-truth label g and predicted label p."""
    n_gt, n_pred = int(gt.max(initial=0)) + 1, int(pred.max(initial=0)) + 1
    inside = gt > 0
    pair_index = gt[inside].astype(np.int64) * n_pred + pred[inside].astype(np.int64)
    return np.bincount(pair_index, minlength=n_gt * n_pred).reshape(n_gt, n_pred)


def _union_box(*boxes: tuple[slice, ...] | None, shape: tuple[int, ...]) -> tuple[slice, ...]:
    """Bounding box covering all given boxes, grown by one voxel so surfaces stay intact."""
    present = [b for b in boxes if b is not None]
    starts = [max(0, min(b[a].start for b in present) - 1) for a in range(len(shape))]
    stops = [min(shape[a], max(b[a].stop for b in present) + 1) for a in range(len(shape))]
    return tuple(slice(lo, hi) for lo, hi in zip(starts, stops))


def _best_match(row: np.ndarray) -> int:
    """Predicted label sharing most voxels with one nodule (first on ties), 0 if none."""
    if row.size < 2 or row[1:].max() == 0:
        return 0
    return int(row[1:].argmax()) + 1


def score_nodules(
    pred_labels: np.ndarray, gt_labels: np.ndarray, spacing: Sequence[float]
) -> list[NoduleScore]:
    """Score every ground-truth nodule against its best-overlapping predicted instance.

    ``pred_labels`` / ``gt_labels``: instance label maps (0 = background) of one case, or
    boolean masks (split into connected components). ``spacing`` as in :func:`hd95`.
    """
    pred = _instances(pred_labels)
    gt = _instances(gt_labels)
    if pred.shape != gt.shape:
        raise ValueError(f"prediction shape {pred.shape} differs from ground truth {gt.shape}")
    overlap = _overlap_matrix(pred, gt)
    gt_boxes = ndimage.find_objects(gt)
    pred_boxes = ndimage.find_objects(pred)
    matched = {g: _best_match(overlap[g]) for g in range(1, len(overlap)) if gt_boxes[g - 1] is not None}
    use_count = np.bincount(np.fromiter(matched.values(), np.int64), minlength=overlap.shape[1])
    results = []
    for g, p in matched.items():
        box = _union_box(gt_boxes[g - 1], pred_boxes[p - 1] if p else None, shape=gt.shape)
        scores = score_masks(pred[box] == p if p else np.zeros_like(gt[box], bool), gt[box] == g, spacing)
        shared = bool(p and use_count[p] > 1)
        results.append(NoduleScore(gt_label=g, pred_label=p, scores=scores, shared=shared))
    log.debug("scored %d nodules (%d missed)", len(results), sum(r.pred_label == 0 for r in results))
    return results


def summarize_values(values: Iterable[float]) -> MetricSummary:
    """Mean, median, sample std and count of the finite values; non-finite ones are counted."""
    arr = np.asarray(list(values), dtype=np.float64)
    finite = arr[np.isfinite(arr)]
    n = int(finite.size)
    if n == 0:
        return MetricSummary(math.nan, math.nan, math.nan, 0, int(arr.size))
    std = float(np.std(finite, ddof=1)) if n > 1 else math.nan
    return MetricSummary(float(finite.mean()), float(np.median(finite)), std, n, int(arr.size - n))


def bootstrap_mean_ci(values: Sequence[float], groups: Sequence, n_bootstrap: int = 2000, seed: int = 0,
                      level: float = 0.95) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean of the finite ``values``, resampling whole ``groups``
    (patients) with replacement: a patient's nodules, and one nodule's crops from several readers, are
    not independent, so resampling single values would give too narrow an interval. Each resample's
    mean weighs every value the same, as the mean itself does. (NaN, NaN) without finite values."""
    vals = np.asarray(values, dtype=np.float64)
    keys = np.asarray([str(g) for g in groups])
    if vals.shape != keys.shape:
        raise ValueError(f"{vals.size} values but {keys.size} groups")
    finite = np.isfinite(vals)
    if not finite.any():
        return math.nan, math.nan
    _, group = np.unique(keys[finite], return_inverse=True)
    sums = np.bincount(group, weights=vals[finite])
    counts = np.bincount(group).astype(np.float64)
    picks = np.random.default_rng(seed).integers(0, sums.size, size=(n_bootstrap, sums.size))
    means = sums[picks].sum(axis=1) / counts[picks].sum(axis=1)
    tail = 50.0 * (1.0 - level)
    low, high = np.percentile(means, [tail, 100.0 - tail])
    return float(low), float(high)


def summarize(scores: Iterable[SegmentationScores]) -> SegmentationSummary:
    """Per-nodule summary: every nodule weighs the same."""
    scores = list(scores)
    return SegmentationSummary(
        **{name: summarize_values(getattr(s, name) for s in scores) for name in METRIC_NAMES}
    )


def summarize_cases(cases: Mapping[str, Sequence[SegmentationScores]]) -> SegmentationSummary:
    """Per-case summary: each case's mean over its nodules first, then across cases.

    A case mean uses the finite values only; a case with none (e.g. all its nodules missed,
    for HD95) is non-finite and counted in ``n_excluded``. Cases without nodules are skipped.
    """
    case_means: dict[str, list[float]] = {name: [] for name in METRIC_NAMES}
    for scores in cases.values():
        if not scores:
            continue
        for name in METRIC_NAMES:
            case_means[name].append(summarize_values(getattr(s, name) for s in scores).mean)
    return SegmentationSummary(**{name: summarize_values(v) for name, v in case_means.items()})
