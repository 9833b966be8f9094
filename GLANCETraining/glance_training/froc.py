"""Detection FROC and CPM by the LUNA16 protocol.

Follows the official LUNA16 evaluation script (``noduleCADEvaluationLUNA16.py``):

* A candidate **hits** a finding when its distance to the finding's centre is strictly less
  than the finding's radius (``dist**2 < (diameter / 2)**2``): a candidate exactly at the
  radius is not a hit. A finding without a size gets 10 mm, LUNA16's rule for excluded
  findings that have no measured size (-1 in its CSVs): here any diameter <= 0 or NaN,
  since the dataset readers store an unknown size as 0 (a real finding is never 0 mm).
* Each nodule counts once: its score is the highest score among the candidates hitting it;
  the other candidates hitting it are ignored (neither TP nor FP). A candidate hitting two
  nodules detects both.
* A candidate hitting an excluded finding (irrelevant finding: non-nodule, < 3 mm, ...) and
  no nodule is ignored. Hitting a nodule takes precedence.
* Only the ``max_candidates`` (default 100) highest-scoring candidates per scan are kept;
  ties at the cut are broken by input order (LUNA16 instead drops every candidate tied with
  the first one left out).
* FROC: one operating point per distinct score threshold t (a candidate is positive when
  score >= t), from (0, 0): FPs/scan = FPs at t / scans; sensitivity = detected nodules at t
  / all nodules (missed ones included).
* CPM: mean sensitivity at 1/8, 1/4, 1/2, 1, 2, 4, 8 FPs/scan, read off the curve with
  ``np.interp`` exactly as the LUNA16 script does. With no TP/FP score ties the curve is a
  staircase and this is the sensitivity at the lowest threshold whose FP rate is <= the
  target (np.interp returns the top of a vertical step); where a TP and an FP share a score
  the curve has a diagonal segment and np.interp interpolates along it. Past the curve's
  last point the last sensitivity is used.
* Candidates files: :func:`candidates_csv` writes the LUNA16 submission format
  (``seriesuid,coordX,coordY,coordZ,probability``, world mm = LPS, one row per scored
  candidate) that the official script reads; :func:`read_candidates_csv` reads it back.
* Bootstrap CI: scans are resampled with replacement (numpy ``default_rng(seed)``), the curve
  is recomputed on each resample and the CI is the percentile interval (np.quantile, linear)
  of the CPM and of each operating point's sensitivity. Resamples without nodules are skipped.
"""

from __future__ import annotations

import csv
import io
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

log = logging.getLogger(__name__)

CPM_FP_RATES = (0.125, 0.25, 0.5, 1.0, 2.0, 4.0, 8.0)
CANDIDATE_COLUMNS = ("seriesuid", "coordX", "coordY", "coordZ", "probability")
DEFAULT_MAX_CANDIDATES = 100
UNSIZED_FINDING_DIAMETER_MM = 10.0


@dataclass(frozen=True)
class Candidate:
    position: tuple[float, float, float]  # LPS mm
    score: float


@dataclass(frozen=True)
class Finding:
    """A reference nodule or an excluded finding."""

    centre: tuple[float, float, float]  # LPS mm
    diameter: float  # mm; <= 0 or NaN means unknown (treated as 10 mm)


@dataclass(frozen=True)
class ScanOutcome:
    """Matching of one scan's candidates against its findings."""

    nodule_scores: np.ndarray  # per reference nodule: score of its best hit, NaN if missed
    fp_scores: np.ndarray  # scores of the false positives
    n_ignored_excluded: int  # candidates on excluded findings only
    n_ignored_double: int  # extra candidates on an already-hit nodule
    n_truncated: int  # candidates dropped beyond max_candidates


@dataclass(frozen=True)
class OperatingPoint:
    fp_per_scan: float
    sensitivity: float
    ci_low: float = math.nan
    ci_high: float = math.nan


@dataclass(frozen=True)
class FrocResult:
    fps: np.ndarray  # average FPs per scan at each operating point (non-decreasing)
    sensitivity: np.ndarray
    thresholds: np.ndarray  # score threshold of each point (inf for the origin)
    operating_points: tuple[OperatingPoint, ...]
    cpm: float
    cpm_ci: tuple[float, float] | None
    n_scans: int
    n_nodules: int
    n_detected: int  # nodules hit at the lowest threshold
    n_false_positives: int
    n_ignored_excluded: int
    n_ignored_double: int
    n_truncated: int
    n_bootstrap: int = 0
    seed: int | None = None
    confidence: float = 0.95
    extra: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        """JSON-ready summary (the full curve included)."""
        return {
            "cpm": self.cpm,
            "cpm_ci": list(self.cpm_ci) if self.cpm_ci else None,
            "operating_points": [vars(p) for p in self.operating_points],
            "curve": {
                "fps": self.fps.tolist(),
                "sensitivity": self.sensitivity.tolist(),
                "thresholds": [None if math.isinf(t) else t for t in self.thresholds.tolist()],
            },
            "n_scans": self.n_scans,
            "n_nodules": self.n_nodules,
            "n_detected": self.n_detected,
            "n_false_positives": self.n_false_positives,
            "n_ignored_excluded": self.n_ignored_excluded,
            "n_ignored_double": self.n_ignored_double,
            "n_truncated": self.n_truncated,
            "n_bootstrap": self.n_bootstrap,
            "seed": self.seed,
            "confidence": self.confidence,
        }


def _finding_arrays(findings: Sequence[Finding]) -> tuple[np.ndarray, np.ndarray]:
    centres = np.array([f.centre for f in findings], dtype=np.float64).reshape(-1, 3)
    diameters = np.array([f.diameter for f in findings], dtype=np.float64)
    diameters = np.where(diameters > 0, diameters, UNSIZED_FINDING_DIAMETER_MM)  # also NaN
    return centres, (diameters / 2.0) ** 2


def _hits(positions: np.ndarray, findings: Sequence[Finding]) -> np.ndarray:
    """hits[c, f]: candidate c lies strictly inside finding f's radius."""
    centres, radius_sq = _finding_arrays(findings)
    dist_sq = ((positions[:, None, :] - centres[None, :, :]) ** 2).sum(axis=-1)
    return dist_sq < radius_sq[None, :]


def _kept(scores: np.ndarray, max_candidates: int) -> np.ndarray:
    """Indices of the ``max_candidates`` best scores, best first, ties in input order."""
    return np.argsort(-scores, kind="stable")[:max_candidates]


def top_candidates(candidates: Sequence[Candidate], max_candidates: int = DEFAULT_MAX_CANDIDATES) -> list[Candidate]:
    """The candidates of a scan that the FROC scores (see :func:`match_scan`), best first."""
    scores = np.array([c.score for c in candidates], dtype=np.float64)
    return [candidates[i] for i in _kept(scores, max_candidates)]


def match_scan(
    candidates: Sequence[Candidate],
    nodules: Sequence[Finding],
    excluded: Sequence[Finding] = (),
    max_candidates: int = DEFAULT_MAX_CANDIDATES,
) -> ScanOutcome:
    """Classify one scan's candidates as nodule hits, false positives or ignored."""
    scores = np.array([c.score for c in candidates], dtype=np.float64)
    positions = np.array([c.position for c in candidates], dtype=np.float64).reshape(-1, 3)
    keep = _kept(scores, max_candidates)
    n_truncated = len(scores) - len(keep)
    scores, positions = scores[keep], positions[keep]

    nodule_hits = _hits(positions, nodules)  # (candidates, nodules)
    hit_scores = np.where(nodule_hits, scores[:, None], -np.inf)
    best = hit_scores.max(axis=0, initial=-np.inf)
    nodule_scores = np.where(np.isfinite(best), best, np.nan)
    on_nodule = nodule_hits.any(axis=1)
    on_excluded = _hits(positions, excluded).any(axis=1) & ~on_nodule
    # LUNA16's count of "double detections": every hit on a nodule beyond its best one.
    n_double = int(np.clip(nodule_hits.sum(axis=0) - 1, 0, None).sum())
    return ScanOutcome(
        nodule_scores=nodule_scores,
        fp_scores=scores[~on_nodule & ~on_excluded],
        n_ignored_excluded=int(on_excluded.sum()),
        n_ignored_double=n_double,
        n_truncated=n_truncated,
    )


@dataclass(frozen=True)
class _Pooled:
    """All scans' TP and FP entries, sorted once by decreasing score."""

    scores: np.ndarray
    is_tp: np.ndarray
    scan: np.ndarray  # scan index of each entry
    nodules_per_scan: np.ndarray

    @classmethod
    def from_outcomes(cls, outcomes: Sequence[ScanOutcome]) -> "_Pooled":
        scores, is_tp, scan = [], [], []
        for s, o in enumerate(outcomes):
            tp = o.nodule_scores[np.isfinite(o.nodule_scores)]
            scores += [tp, o.fp_scores]
            is_tp += [np.ones(tp.size, bool), np.zeros(o.fp_scores.size, bool)]
            scan += [np.full(tp.size + o.fp_scores.size, s)]
        scores_a = np.concatenate(scores) if scores else np.zeros(0)
        order = np.argsort(-scores_a, kind="stable")
        return cls(
            scores=scores_a[order],
            is_tp=(np.concatenate(is_tp) if is_tp else np.zeros(0, bool))[order],
            scan=(np.concatenate(scan) if scan else np.zeros(0, int))[order],
            nodules_per_scan=np.array([o.nodule_scores.size for o in outcomes], dtype=np.int64),
        )

    def curve(self, scan_weight: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(fps, sensitivity, thresholds) with each scan counted ``scan_weight`` times."""
        n_nodules = float((scan_weight * self.nodules_per_scan).sum())
        w = scan_weight[self.scan].astype(np.float64)
        cum_tp = np.cumsum(np.where(self.is_tp, w, 0.0))
        cum_fp = np.cumsum(np.where(self.is_tp, 0.0, w))
        # One operating point per distinct score: the last entry of each run of equal scores.
        last = np.r_[self.scores[1:] != self.scores[:-1], True] if self.scores.size else np.zeros(0, bool)
        fps = np.r_[0.0, cum_fp[last]] / float(scan_weight.sum())
        sens = np.r_[0.0, cum_tp[last]] / n_nodules if n_nodules > 0 else np.full(last.sum() + 1, np.nan)
        return fps, sens, np.r_[np.inf, self.scores[last]]


def sensitivity_at(fps: np.ndarray, sens: np.ndarray, rates: Sequence[float] = CPM_FP_RATES) -> np.ndarray:
    """Sensitivity at the given FP/scan rates, read off the curve as LUNA16 does."""
    return np.interp(np.asarray(rates, dtype=np.float64), fps, sens)


def _bootstrap(pooled: _Pooled, n: int, seed: int, rates: Sequence[float]) -> np.ndarray:
    """(resamples, rates) sensitivities of scan-bootstrap resamples without nodule-free draws."""
    rng = np.random.default_rng(seed)
    n_scans = pooled.nodules_per_scan.size
    rows = []
    for _ in range(n):
        weight = np.bincount(rng.integers(0, n_scans, n_scans), minlength=n_scans)
        fps, sens, _ = pooled.curve(weight)
        if not np.isnan(sens).any():
            rows.append(sensitivity_at(fps, sens, rates))
    return np.array(rows).reshape(-1, len(rates))


def evaluate_froc(
    candidates: Mapping[str, Sequence[Candidate]],
    nodules: Mapping[str, Sequence[Finding]],
    excluded: Mapping[str, Sequence[Finding]] | None = None,
    *,
    scans: Sequence[str] | None = None,
    max_candidates: int = DEFAULT_MAX_CANDIDATES,
    n_bootstrap: int = 1000,
    seed: int = 0,
    confidence: float = 0.95,
) -> FrocResult:
    """FROC, CPM and bootstrap CI over scans by the LUNA16 protocol (module docstring).

    ``scans``: every evaluated scan, including those without candidates or nodules (they
    count in the FPs/scan denominator); default: the union of the mapping keys.
    ``n_bootstrap=0`` skips the CI.
    """
    excluded = excluded or {}
    scan_ids = list(scans) if scans is not None else sorted(set(candidates) | set(nodules) | set(excluded))
    if not scan_ids:
        raise ValueError("FROC needs at least one scan")
    unknown = (set(candidates) | set(nodules)) - set(scan_ids)
    if unknown:
        raise ValueError(f"candidates or nodules for scans not in the scan list: {sorted(unknown)[:5]}")
    outcomes = [
        match_scan(candidates.get(s, ()), nodules.get(s, ()), excluded.get(s, ()), max_candidates) for s in scan_ids
    ]
    pooled = _Pooled.from_outcomes(outcomes)
    fps, sens, thresholds = pooled.curve(np.ones(len(scan_ids), dtype=np.int64))
    n_nodules = int(pooled.nodules_per_scan.sum())
    if n_nodules == 0:
        log.warning("FROC over %d scans without reference nodules: sensitivity undefined", len(scan_ids))
    at_rates = sensitivity_at(fps, sens)
    cpm = float(at_rates.mean())

    low = high = np.full(len(CPM_FP_RATES), np.nan)
    cpm_ci = None
    if n_bootstrap > 0 and n_nodules > 0:
        boot = _bootstrap(pooled, n_bootstrap, seed, CPM_FP_RATES)
        tail = (1.0 - confidence) / 2.0
        low, high = np.quantile(boot, [tail, 1.0 - tail], axis=0)
        cpm_low, cpm_high = np.quantile(boot.mean(axis=1), [tail, 1.0 - tail])
        cpm_ci = (float(cpm_low), float(cpm_high))
    points = tuple(
        OperatingPoint(rate, float(s), float(lo), float(hi))
        for rate, s, lo, hi in zip(CPM_FP_RATES, at_rates, low, high)
    )
    return FrocResult(
        fps=fps,
        sensitivity=sens,
        thresholds=thresholds,
        operating_points=points,
        cpm=cpm,
        cpm_ci=cpm_ci,
        n_scans=len(scan_ids),
        n_nodules=n_nodules,
        n_detected=int(pooled.is_tp.sum()),
        n_false_positives=int((~pooled.is_tp).sum()),
        n_ignored_excluded=sum(o.n_ignored_excluded for o in outcomes),
        n_ignored_double=sum(o.n_ignored_double for o in outcomes),
        n_truncated=sum(o.n_truncated for o in outcomes),
        n_bootstrap=n_bootstrap if cpm_ci else 0,
        seed=seed if cpm_ci else None,
        confidence=confidence,
    )


def candidates_csv(
    candidates: Mapping[str, Sequence[Candidate]],
    seriesuids: Mapping[str, str] | None = None,
    max_candidates: int = DEFAULT_MAX_CANDIDATES,
) -> str:
    """LUNA16 candidates file: a header and, per scan, the candidates the FROC scores, best first.

    ``candidates`` is keyed by scan; ``seriesuids`` renames scans (default: the key).
    Coordinates are the candidates' LPS mm (LUNA16's world coordinates), written with
    Python's shortest exact float text so they read back to the same numbers.
    """
    seriesuids = seriesuids or {}
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(CANDIDATE_COLUMNS)
    for scan, cands in candidates.items():
        uid = seriesuids.get(scan, scan)
        for c in top_candidates(cands, max_candidates):
            writer.writerow([uid, *(repr(float(v)) for v in c.position), repr(float(c.score))])
    return buf.getvalue()


def read_candidates_csv(path: str | Path) -> dict[str, list[Candidate]]:
    """{seriesuid: candidates} from a LUNA16 candidates file (``glance evaluate``'s ``candidates.csv``)."""
    from glance_training.datasets.luna import read_luna_csv

    return {uid: [Candidate(position, score) for position, score in rows]
            for uid, rows in read_luna_csv(path, "probability").items()}


def plot_froc(result: FrocResult, path: str | Path, title: str = "FROC") -> Path:
    """Write the FROC curve (log2 FP axis, 1/8..8 FPs/scan, CI band when bootstrapped) as PNG."""
    # A bare Figure renders with Agg without pyplot, so the process-wide backend (Slicer's
    # Qt one, say) is left alone.
    from matplotlib.figure import Figure

    from glance.io.atomic import atomic_path

    path = Path(path)
    fig = Figure(figsize=(6, 4.5), dpi=150)
    ax = fig.add_subplot()
    # The curve is a staircase: hold each sensitivity until the next FP step.
    ax.step(np.maximum(result.fps, CPM_FP_RATES[0] / 2), result.sensitivity, where="post", lw=2, label="FROC")
    rates = [p.fp_per_scan for p in result.operating_points]
    ax.plot(rates, [p.sensitivity for p in result.operating_points], "o", label=f"CPM {result.cpm:.3f}")
    if result.cpm_ci:
        ax.fill_between(
            rates, [p.ci_low for p in result.operating_points], [p.ci_high for p in result.operating_points],
            alpha=0.2, label=f"{result.confidence:.0%} CI ({result.cpm_ci[0]:.3f}-{result.cpm_ci[1]:.3f})",
        )
    ax.set_xscale("log", base=2)
    ax.set_xlim(CPM_FP_RATES[0], CPM_FP_RATES[-1])
    ax.set_xticks(rates, [f"{r:g}" for r in rates])
    ax.set_ylim(0, 1)
    ax.set_xlabel("Average false positives per scan")
    ax.set_ylabel("Sensitivity")
    ax.set_title(f"{title} ({result.n_nodules} nodules, {result.n_scans} scans)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(loc="lower right")
    with atomic_path(path) as temp:
        fig.savefig(temp, format="png")
    return path
