"""Step 4 of "Segment nodules": the network's per-voxel maps become nodules.

Inputs are the two saved network outputs on the (canonical) CT grid: arrays
indexed (k, j, i) with axis 0 axial, ``spacing`` = (s0, s1, s2) mm along the
array axes. Each map is either uint8 (value = round(p * 255)) or float16/32 in
[0, 1]; thresholds are always given as probabilities and compared in the map's
own encoding, so a uint8 map and its float equivalent give the same nodules.

The rules (DESIGN step 4):

1. Segmentation: 3D connected components (26-connectivity) of prob >= seg_threshold.
2. Detection: heatmap local maxima >= det_threshold on each axial slice, with
   greedy non-maximum suppression within ``nms_radius_mm`` (Euclidean, in-plane).
3. Peaks on slices up to ``max_slice_gap`` apart and within ``cluster_distance_mm``
   in-plane are chained into one 3D detection. Its score is its highest peak;
   its position is the heatmap-weighted centroid of its peaks.
4. A detection needs segmentation support: only its peaks inside a component
   count, and a chain touching two components becomes one detection per
   component. A detection with no supported peak is dropped (a heatmap blip in
   air), and a component with no detection is dropped (vessel mimics: the network
   may segment a vessel but does not put a centre on it).
5. Several detections in one component are split apart (power diagram: each
   voxel goes to the seed minimising d^2 - r^2, r = the seed's depth inside the
   component, which cuts two touching spheres at their contact plane) and then
   merged back while two seeds are closer than ``split_separation`` x the larger
   part's equivalent radius, or while no neck parts them: the cut between their
   parts is at least as wide (equivalent radius) as ``neck_ratio`` x the smaller
   part's equivalent radius. Two peaks inside one nodule stay one nodule,
   however far apart the heatmap put them (a large nodule whose middle slices
   carry a weak heatmap gives two chains); two touching nodules, joined by a
   neck, become two.
6. Each nodule is clipped to a ball of ``max_diameter_mm`` around its seed (a
   nodule attached to a segmented vessel keeps the nodule, not the vessel tree),
   reduced to the connected piece holding its peak, and dropped if its
   equivalent-sphere diameter is below ``min_diameter_mm``.
7. confidence = detection score (max heatmap) x mean probability over the
   nodule's voxels; nodules are labelled 1..N by decreasing confidence.
8. Given the CT's lungs (``lungs``, a ``glance.preprocess.LungMap``; the pipeline
   passes them unless ``require_lung_contact`` is off), a nodule must lie against
   them: within about 2 mm in-plane and one slice of the lung mask. Every lung
   nodule borders lung parenchyma, juxta-pleural and juxta-vascular ones included;
   findings inside the mediastinum, heart, bone or upper abdomen do not, and are
   dropped before the ``max_nodules`` / ``max_candidates`` cut.
9. Outline: with ``outline_fraction`` f > 0, each nodule keeps only its voxels with
   p >= f x its own highest probability, the connected piece holding that voxel.
   One absolute threshold cannot suit every nodule: a faint small nodule needs a low
   one to be segmented at all, and at that level a confident large nodule is outlined
   too wide. Rules 1-8 run unchanged at ``seg_threshold``, so which nodules are found,
   their confidence and the FROC do not depend on f; only the outlines (and what is
   measured on them) do.

Memory: one boolean mask of the volume, component maps over the mask's bounding
box only (cc3d picks uint16 when it can), the uint16 output; everything else per
slice or per component bounding box, never a float copy of the volume.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING

import numpy as np
from scipy import ndimage
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components
from scipy.spatial import cKDTree

from glance.errors import InputError

if TYPE_CHECKING:
    from glance.preprocess import LungMap

log = logging.getLogger(__name__)

_STRUCTURE_26 = np.ones((3, 3, 3), dtype=bool)
_UINT8_SCALE = 255.0


@dataclass
class PostprocessConfig:
    seg_threshold: float = 0.5  # probability at or above which a voxel is nodule
    det_threshold: float = 0.3  # heatmap value at or above which a peak is a detection
    nms_radius_mm: float = 5.0  # in-plane suppression radius around a stronger peak
    cluster_distance_mm: float = 5.0  # in-plane distance joining peaks of nearby slices
    max_slice_gap: int = 1  # 1: only adjacent slices chain; 2: one missing slice tolerated
    min_diameter_mm: float = 3.0  # equivalent-sphere diameter below which a nodule is dropped
    max_diameter_mm: float = 40.0  # nodules are clipped to a ball of this diameter
    split_separation: float = 1.0  # seeds closer than this x part radius are one nodule
    # Seeds with no neck between them are one nodule: the cut between their parts is at least this
    # x the smaller part's equivalent radius wide. Two spheres of radius r whose centres are d apart
    # meet at a neck of about sqrt(1 - (d / 2r)^2) x r: 0.6 r at d = 1.6 r. inf turns the test off.
    neck_ratio: float = 0.8
    max_nodules: int = 100
    max_candidates: int = 100  # FROC candidates per scan (LUNA16 protocol)
    froc_det_threshold: float = 0.05  # low threshold so FROC reaches high FP rates
    max_peaks_per_slice: int = 256  # bounds work on a noisy heatmap
    require_lung_contact: bool = True  # rule 8; off for a CT whose lungs the field of view cuts
    outline_fraction: float = 0.0  # rule 9: outline at this fraction of each nodule's peak probability; 0 = off


@dataclass
class Candidate:
    label: int  # value in Detections.labels (1..N, rank by confidence)
    peak_index: tuple[int, int, int]  # (k, j, i) of the strongest heatmap peak
    position_index: tuple[float, float, float]  # heatmap-weighted (k, j, i)
    confidence: float  # detection_score x mean_probability
    detection_score: float  # max heatmap value of the detection, in [0, 1]
    mean_probability: float  # mean prob over the nodule's voxels before rule 9's outlining, in [0, 1]
    component_voxels: int  # voxels of the nodule (after splitting, clipping and outlining)
    slices: tuple[int, int]  # first and last slice (inclusive) holding one of its peaks
    bbox: tuple[int, int, int, int, int, int]  # (k0, j0, i0, k1, j1, i1), end exclusive


@dataclass
class Detections:
    labels: np.ndarray  # uint16 instance map on the input grid, 0 = background
    candidates: list[Candidate] = field(default_factory=list)
    outside_lungs: int | None = None  # findings rule 8 dropped; None when the rule did not run

    def by_label(self, label: int) -> Candidate:
        for c in self.candidates:
            if c.label == label:
                return c
        raise KeyError(f"no candidate with label {label}")


@dataclass
class _Peaks:
    """Heatmap peaks as parallel arrays; ``value`` is in [0, 1]."""

    kji: np.ndarray  # (n, 3) int
    value: np.ndarray  # (n,) float32


@dataclass
class _Seed:
    peak: np.ndarray  # (3,) int, global (k, j, i)
    position: np.ndarray  # (3,) float, global (k, j, i)
    score: float
    slices: tuple[int, int]


@dataclass
class _Nodule:
    seed: _Seed
    origin: np.ndarray  # global (k, j, i) of mask[0, 0, 0]
    mask: np.ndarray  # bool, its bounding box
    mean_probability: float

    @property
    def confidence(self) -> float:
        return self.seed.score * self.mean_probability

    @property
    def bbox(self) -> tuple[int, int, int, int, int, int]:
        o = self.origin
        return tuple(int(v) for v in (*o, *(o + np.array(self.mask.shape))))


# --------------------------------------------------------------------------- public API


def find_nodules(
    prob: np.ndarray,
    heatmap: np.ndarray,
    spacing: tuple[float, float, float],
    cfg: PostprocessConfig | None = None,
    lungs: LungMap | None = None,
) -> Detections:
    """Nodules from the network maps: a uint16 instance map and one Candidate per label.
    ``lungs``: the CT's ``LungMap`` for rule 8, or None to skip it."""
    cfg = cfg or PostprocessConfig()
    nodules, outside_lungs = _nodules(prob, heatmap, spacing, cfg, lungs)
    nodules = nodules[: cfg.max_nodules]
    if cfg.outline_fraction > 0:  # rule 9, on the reported nodules only: it moves no centre and no score
        nodules = [_outlined(n, prob, cfg.outline_fraction) for n in nodules]
    labels = np.zeros(prob.shape, dtype=np.uint16)
    candidates = []
    for label, nod in enumerate(nodules, start=1):
        k0, j0, i0, k1, j1, i1 = nod.bbox
        labels[k0:k1, j0:j1, i0:i1][nod.mask] = label
        candidates.append(_candidate(label, nod))
    log.info("post-process: %d nodules", len(candidates))
    return Detections(labels, candidates, outside_lungs)


def candidates_for_froc(
    prob: np.ndarray,
    heatmap: np.ndarray,
    spacing: tuple[float, float, float],
    cfg: PostprocessConfig | None = None,
    lungs: LungMap | None = None,
) -> list[Candidate]:
    """Scored candidates for FROC: every rule of find_nodules, but a low detection
    threshold (``froc_det_threshold``) so the curve reaches many false positives
    per scan, at most ``max_candidates``, best first. ``label`` is the rank. Rule 9 is not
    applied: it changes outlines, not a candidate's position or score."""
    cfg = cfg or PostprocessConfig()
    low = replace(cfg, det_threshold=min(cfg.det_threshold, cfg.froc_det_threshold))
    nodules = _nodules(prob, heatmap, spacing, low, lungs)[0][: cfg.max_candidates]
    return [_candidate(rank, nod) for rank, nod in enumerate(nodules, start=1)]


# --------------------------------------------------------------------------- encoding


def _check_maps(prob: np.ndarray, heatmap: np.ndarray, spacing) -> None:
    for name, a in (("probability", prob), ("heatmap", heatmap)):
        if a.ndim != 3:
            raise InputError(f"{name} map: expected a 3D array, got shape {a.shape}")
        if a.dtype != np.uint8 and not np.issubdtype(a.dtype, np.floating):
            raise InputError(f"{name} map: dtype {a.dtype} is neither uint8 nor float")
    if prob.shape != heatmap.shape:
        raise InputError(f"probability {prob.shape} and heatmap {heatmap.shape} shapes differ")
    if len(spacing) != 3 or min(spacing) <= 0:
        raise InputError(f"spacing {tuple(spacing)} must be three positive values in mm")


def _check_fraction(cfg: PostprocessConfig) -> None:
    if not 0.0 <= cfg.outline_fraction < 1.0:
        raise InputError(f"outline fraction must be at least 0 and below 1, got {cfg.outline_fraction}")


def raw_threshold(threshold: float, dtype: np.dtype) -> float:
    """Threshold in the map's own encoding: ``raw >= result`` iff ``raw/255 >= threshold``."""
    if dtype == np.uint8:
        # The small epsilon keeps 0.2 * 255 = 51.000000000000007 at 51.
        return float(math.ceil(threshold * _UINT8_SCALE - 1e-6))
    return float(threshold)


def _unit(values: np.ndarray) -> np.ndarray:
    """Map values (a small selection, never a whole volume) as float32 in [0, 1]."""
    if values.dtype == np.uint8:
        return values.astype(np.float32) / np.float32(_UINT8_SCALE)
    return values.astype(np.float32)


# --------------------------------------------------------------------------- detection


def _find_peaks(heatmap: np.ndarray, spacing, cfg: PostprocessConfig) -> _Peaks:
    """Per-slice local maxima >= det_threshold, thinned by greedy disc NMS."""
    raw = raw_threshold(cfg.det_threshold, heatmap.dtype)
    slice_max = heatmap.max(axis=(1, 2))
    found_kji, found_val = [], []
    for k in np.flatnonzero(slice_max >= raw):
        plane = heatmap[k]
        if plane.dtype == np.float16:  # scipy.ndimage has no float16 kernels; one slice is cheap
            plane = plane.astype(np.float32)
        # 3x3 local maxima keep the candidate list short; the exact disc NMS follows.
        is_peak = (plane >= raw) & (plane == ndimage.maximum_filter(plane, size=3))
        jj, ii = np.nonzero(is_peak)
        vals = _unit(plane[jj, ii])
        keep = _nms(np.stack([jj * spacing[1], ii * spacing[2]], axis=1), vals, cfg)
        found_kji.append(np.stack([np.full(keep.size, k), jj[keep], ii[keep]], axis=1))
        found_val.append(vals[keep])
    if not found_kji:
        return _Peaks(np.zeros((0, 3), dtype=np.int64), np.zeros(0, dtype=np.float32))
    return _Peaks(np.concatenate(found_kji).astype(np.int64), np.concatenate(found_val))


def _nms(points_mm: np.ndarray, values: np.ndarray, cfg: PostprocessConfig) -> np.ndarray:
    """Indices of the peaks kept by greedy NMS, strongest first (ties: raster order)."""
    order = np.argsort(-values, kind="stable")[: cfg.max_peaks_per_slice]
    kept: list[int] = []
    for idx in order:
        if kept:
            d = np.linalg.norm(points_mm[kept] - points_mm[idx], axis=1)
            if d.min() < cfg.nms_radius_mm:
                continue
        kept.append(int(idx))
    return np.array(kept, dtype=np.int64)


def _chain_peaks(peaks: _Peaks, spacing, cfg: PostprocessConfig) -> np.ndarray:
    """Cluster id per peak: peaks on nearby slices, close in-plane, chain together."""
    n = len(peaks.value)
    if n == 0:
        return np.zeros(0, dtype=np.int64)
    mm = peaks.kji * np.asarray(spacing, dtype=np.float64)
    reach = math.hypot(cfg.cluster_distance_mm, cfg.max_slice_gap * spacing[0])
    pairs = cKDTree(mm).query_pairs(reach, output_type="ndarray")
    if len(pairs):
        dk = np.abs(peaks.kji[pairs[:, 0], 0] - peaks.kji[pairs[:, 1], 0])
        in_plane = np.linalg.norm(mm[pairs[:, 0], 1:] - mm[pairs[:, 1], 1:], axis=1)
        ok = (dk >= 1) & (dk <= cfg.max_slice_gap) & (in_plane <= cfg.cluster_distance_mm)
        pairs = pairs[ok]
    graph = coo_matrix((np.ones(len(pairs)), (pairs[:, 0], pairs[:, 1])), shape=(n, n))
    return connected_components(graph, directed=False)[1]


def _seeds_per_component(
    peaks: _Peaks, chain: np.ndarray, comp_of_peak: np.ndarray
) -> dict[int, list[_Seed]]:
    """One seed per (chain, component) pair among supported peaks."""
    seeds: dict[int, list[_Seed]] = {}
    supported = comp_of_peak > 0
    n_chains = len(np.unique(chain))
    n_supported = len(np.unique(chain[supported]))
    if n_chains > n_supported:
        log.debug("dropped %d detections without segmentation support", n_chains - n_supported)
    for c, comp in sorted({(int(a), int(b)) for a, b in zip(chain[supported], comp_of_peak[supported])}):
        members = np.flatnonzero((chain == c) & (comp_of_peak == comp))
        vals = peaks.value[members].astype(np.float64)
        kji = peaks.kji[members]
        best = members[np.argmax(vals)]
        seeds.setdefault(comp, []).append(
            _Seed(
                peak=peaks.kji[best].copy(),
                position=(kji * vals[:, None]).sum(axis=0) / vals.sum(),
                score=float(peaks.value[best]),
                slices=(int(kji[:, 0].min()), int(kji[:, 0].max())),
            )
        )
    return seeds


# --------------------------------------------------------------------------- segmentation


def _nodules(prob, heatmap, spacing, cfg: PostprocessConfig,
             lungs: LungMap | None = None) -> tuple[list[_Nodule], int | None]:
    """All nodules passing every rule, best first, and how many rule 8 dropped (None: not run)."""
    _check_maps(prob, heatmap, spacing)
    _check_fraction(cfg)
    spacing = tuple(float(s) for s in spacing)
    none_dropped = None if lungs is None else 0
    peaks = _find_peaks(heatmap, spacing, cfg)
    if len(peaks.value) == 0:
        return [], none_dropped
    components, offset, comp_of_peak = _components_at_peaks(prob, peaks, cfg)
    if components is None:
        return [], none_dropped
    seeds = _seeds_per_component(peaks, _chain_peaks(peaks, spacing, cfg), comp_of_peak)

    objects = ndimage.find_objects(components)
    nodules: list[_Nodule] = []
    for comp, comp_seeds in seeds.items():
        lo, hi = _ball_box(objects[comp - 1], comp_seeds, offset, spacing, cfg)
        comp_mask = components[tuple(slice(a, b) for a, b in zip(lo, hi))] == comp
        origin = offset + lo
        for seed, part in _split(comp_mask, origin, comp_seeds, spacing, cfg):
            nod = _finish(part, origin, seed, prob, spacing, cfg)
            if nod is not None:
                nodules.append(nod)
    outside = none_dropped
    if lungs is not None:
        inside = [n for n in nodules if lungs.touches(n.origin, n.mask)]
        outside = len(nodules) - len(inside)
        if outside:
            log.info("post-process: %d findings away from the lungs dropped", outside)
        nodules = inside
    nodules.sort(key=lambda n: (-n.confidence, tuple(n.seed.peak)))
    return nodules, outside


def _components_at_peaks(prob, peaks: _Peaks, cfg: PostprocessConfig):
    """(map of the components holding a peak, numbered 1..m, over the mask's bounding
    box; that box's offset; component number per peak, 0 where unsupported).
    The map is None when no peak has segmentation support."""
    mask = prob >= raw_threshold(cfg.seg_threshold, prob.dtype)
    box = _bounding_box(mask)
    if box is None:
        return None, None, None
    offset = np.array([s.start for s in box])
    components = _label_26(mask[box])
    del mask
    local = peaks.kji - offset
    inside = np.all((local >= 0) & (local < components.shape), axis=1)
    comp_of_peak = np.zeros(len(local), dtype=np.int64)
    comp_of_peak[inside] = components[tuple(local[inside].T)]
    if not comp_of_peak.any():
        return None, None, None
    # Renumber only the wanted components so that finding their boxes does not
    # walk every speck of the mask.
    wanted = np.unique(comp_of_peak[comp_of_peak > 0])
    lut = np.zeros(int(components.max()) + 1, dtype=np.uint16 if len(wanted) < 2**16 else np.uint32)
    lut[wanted] = np.arange(1, len(wanted) + 1)
    return lut[components], offset, lut[comp_of_peak].astype(np.int64)


def _label_26(mask: np.ndarray) -> np.ndarray:
    """26-connected components; cc3d when installed (several times faster, and a
    uint16 result when few components), else scipy."""
    try:
        import cc3d
    except ImportError:
        return ndimage.label(mask, structure=_STRUCTURE_26)[0]
    return cc3d.connected_components(mask, connectivity=26)


def _bounding_box(mask: np.ndarray) -> tuple[slice, slice, slice] | None:
    box = []
    for axis in range(3):
        others = tuple(a for a in range(3) if a != axis)
        hit = np.flatnonzero(mask.any(axis=others))
        if hit.size == 0:
            return None
        box.append(slice(int(hit[0]), int(hit[-1]) + 1))
    return tuple(box)


def _ball_box(comp_box, seeds: list[_Seed], offset, spacing, cfg: PostprocessConfig):
    """(lo, hi) of the component's box, local to the labelled crop, cut to the seeds'
    clipping balls: a nodule touching a large vessel tree is worked on in a box of
    its own size, not the tree's."""
    start = np.array([s.start for s in comp_box])
    stop = np.array([s.stop for s in comp_box])
    reach = cfg.max_diameter_mm / 2.0 / np.asarray(spacing)
    pts = np.array([s.position for s in seeds] + [s.peak for s in seeds], dtype=np.float64) - offset
    lo = np.floor(pts.min(axis=0) - reach).astype(np.int64)
    hi = np.ceil(pts.max(axis=0) + reach).astype(np.int64) + 1
    return np.maximum(start, lo), np.minimum(stop, hi)


def _split(comp_mask, origin, seeds: list[_Seed], spacing, cfg: PostprocessConfig):
    """(seed, part mask) pairs: the component cut among its seeds, merged where too close."""
    spacing_arr = np.asarray(spacing)
    coords = np.argwhere(comp_mask)  # local (k, j, i)
    coords_mm = (coords * spacing_arr).astype(np.float32)
    if len(seeds) > 1:
        depth = ndimage.distance_transform_edt(np.pad(comp_mask, 1), sampling=spacing)[1:-1, 1:-1, 1:-1]
    seeds = sorted(seeds, key=lambda s: -s.score)
    voxel_mm3 = float(np.prod(spacing_arr))
    while True:
        pos_mm = np.array([(s.position - origin) * spacing_arr for s in seeds], dtype=np.float32)
        d2 = ((coords_mm[:, None, :] - pos_mm[None, :, :]) ** 2).sum(axis=2)
        if len(seeds) > 1:
            radius = np.array([depth[tuple(s.peak - origin)] for s in seeds], dtype=np.float32)
            owner = np.argmin(d2 - radius**2, axis=1)
        else:
            owner = np.zeros(len(coords), dtype=np.int64)
        pair = _closest_pair_to_merge(pos_mm, owner, voxel_mm3, cfg)
        if pair is None and len(seeds) > 1:
            pair = _pair_without_neck(comp_mask.shape, coords, owner, pos_mm, spacing, cfg)
        if pair is None:
            break
        seeds.pop(pair[1])  # the weaker seed; seeds are sorted by score
    clip2 = (cfg.max_diameter_mm / 2.0) ** 2
    own_d2 = d2[np.arange(len(coords)), owner]
    for n, seed in enumerate(seeds):
        part = np.zeros(comp_mask.shape, dtype=bool)
        sel = (owner == n) & (own_d2 <= clip2)
        part[tuple(coords[sel].T)] = True
        yield seed, part


def _closest_pair_to_merge(pos_mm, owner, voxel_mm3, cfg) -> tuple[int, int] | None:
    """The closest seed pair (a < b) closer than split_separation x the larger part radius."""
    n = len(pos_mm)
    if n < 2:
        return None
    radius = _part_radii(owner, n, voxel_mm3)
    best = None
    for a in range(n):
        for b in range(a + 1, n):
            d = float(np.linalg.norm(pos_mm[a] - pos_mm[b]))
            if d < cfg.split_separation * max(radius[a], radius[b]) and (best is None or d < best[0]):
                best = (d, a, b)
    return None if best is None else (best[1], best[2])


def _part_radii(owner: np.ndarray, n: int, voxel_mm3: float) -> np.ndarray:
    """Equivalent-sphere radius (mm) of each seed's part."""
    return np.cbrt(3.0 * np.bincount(owner, minlength=n) * voxel_mm3 / (4.0 * math.pi))


def _pair_without_neck(comp_shape, coords, owner, pos_mm, spacing, cfg: PostprocessConfig) -> tuple[int, int] | None:
    """A seed pair (a < b) that no neck parts: the cut between their parts (a plane of the power
    diagram) crosses the component over an area whose equivalent radius sqrt(area / pi) is at least
    ``neck_ratio`` x the smaller part's equivalent radius. Touching nodules meet at a contact as thin
    as their overlap; the halves of one nodule meet over its whole cross-section, even where the
    network left its core hollow. Seeds further apart than the clipping radius stay apart: one ball
    could not hold both."""
    if not math.isfinite(cfg.neck_ratio):
        return None
    part_radius = _part_radii(owner, len(pos_mm), float(np.prod(spacing)))
    for (a, b), area_mm2 in sorted(_cut_areas(comp_shape, coords, owner, pos_mm, spacing).items()):
        separation = float(np.linalg.norm(pos_mm[a] - pos_mm[b]))
        if separation > cfg.max_diameter_mm / 2.0:
            continue
        if math.sqrt(area_mm2 / math.pi) >= cfg.neck_ratio * min(part_radius[a], part_radius[b]):
            return a, b
    return None


def _cut_areas(comp_shape, coords, owner, pos_mm, spacing) -> dict[tuple[int, int], float]:
    """Area (mm^2) of the cut between each pair of touching parts. The cut is a plane with normal u
    along the seeds' offset; a plane of area A is crossed by A |u_a| / (face area across axis a)
    of the voxel-centre lines along axis a, so counting the neighbours of different parts along
    each axis gives A = sum_a crossings_a x face_a x |u_a| without a staircase bias."""
    owner_map = np.full(comp_shape, -1, dtype=np.int32)
    owner_map[tuple(coords.T)] = owner
    n = len(pos_mm)
    crossings: dict[tuple[int, int], np.ndarray] = {}
    for axis in range(3):
        lo = owner_map[tuple(slice(0, -1) if ax == axis else slice(None) for ax in range(3))]
        hi = owner_map[tuple(slice(1, None) if ax == axis else slice(None) for ax in range(3))]
        cut = (lo != hi) & (lo >= 0) & (hi >= 0)
        a, b = np.minimum(lo[cut], hi[cut]), np.maximum(lo[cut], hi[cut])
        pairs, hits = np.unique(a.astype(np.int64) * n + b, return_counts=True)
        for code, hit in zip(pairs.tolist(), hits.tolist()):
            crossings.setdefault(divmod(code, n), np.zeros(3))[axis] = hit
    face = np.array([spacing[1] * spacing[2], spacing[0] * spacing[2], spacing[0] * spacing[1]])
    areas = {}
    for (a, b), hit in crossings.items():
        offset = np.asarray(pos_mm[a], dtype=np.float64) - pos_mm[b]
        unit = np.abs(offset) / max(float(np.linalg.norm(offset)), 1e-9)
        areas[(a, b)] = float((hit * face * unit).sum())
    return areas


def _finish(part, origin, seed: _Seed, prob, spacing, cfg) -> _Nodule | None:
    """Keep the connected piece holding the peak, tighten the box, apply the size rule."""
    pieces, n = ndimage.label(part, structure=_STRUCTURE_26)
    if n == 0:
        return None
    local_peak = tuple(seed.peak - origin)
    keep = pieces[local_peak] if part[local_peak] else 1 + int(np.argmax(np.bincount(pieces.ravel())[1:]))
    piece = pieces == keep
    sl = ndimage.find_objects(piece.astype(np.uint8))[0]
    piece = piece[sl]
    piece_origin = origin + np.array([s.start for s in sl])
    volume_mm3 = piece.sum() * float(np.prod(spacing))
    if (6.0 * volume_mm3 / math.pi) ** (1.0 / 3.0) < cfg.min_diameter_mm:
        return None
    k0, j0, i0 = piece_origin
    k1, j1, i1 = piece_origin + np.array(piece.shape)
    mean_p = float(_unit(prob[k0:k1, j0:j1, i0:i1][piece]).mean())
    return _Nodule(seed, piece_origin, piece, mean_p)


def _peak_piece(mask: np.ndarray, prob_box: np.ndarray, fraction: float) -> np.ndarray:
    """The voxels of ``mask`` at or above ``fraction`` x its highest value of ``prob_box`` that are
    connected to that voxel. In the map's own encoding: for uint8 (round(p * 255)) and float maps
    alike, raw >= f x raw_max is p >= f x p_max."""
    values = np.where(mask, prob_box, 0)
    top = np.unravel_index(int(np.argmax(values)), values.shape)
    structure = np.ones((3,) * mask.ndim, dtype=bool)  # 26-connected in 3D
    pieces, _ = ndimage.label(mask & (values >= fraction * float(values[top])), structure=structure)
    return pieces == pieces[top]


def _outlined(nod: _Nodule, prob: np.ndarray, fraction: float) -> _Nodule:
    """Rule 9: the nodule cut at ``fraction`` of its own peak probability, box tightened."""
    k0, j0, i0, k1, j1, i1 = nod.bbox
    piece = _peak_piece(nod.mask, prob[k0:k1, j0:j1, i0:i1], fraction)
    sl = ndimage.find_objects(piece.astype(np.uint8))[0]
    return replace(nod, origin=nod.origin + np.array([s.start for s in sl]), mask=piece[sl])


def outline_mask(prob: np.ndarray, cfg: PostprocessConfig) -> np.ndarray:
    """The network's segmentation without the detection rules (a nodule crop, which holds one
    nodule and no lungs): components (26-connected) of p >= ``seg_threshold``, each reduced by
    rule 9 when ``outline_fraction`` > 0. ``prob``: uint8 or float map of any dimension up to 3."""
    _check_fraction(cfg)
    mask = prob >= raw_threshold(cfg.seg_threshold, prob.dtype)
    if cfg.outline_fraction <= 0 or not mask.any():
        return mask
    components, _ = ndimage.label(mask, structure=np.ones((3,) * prob.ndim, dtype=bool))
    out = np.zeros_like(mask)
    for n, box in enumerate(ndimage.find_objects(components), start=1):
        out[box] |= _peak_piece(components[box] == n, prob[box], cfg.outline_fraction)
    return out


def _candidate(label: int, nod: _Nodule) -> Candidate:
    return Candidate(
        label=label,
        peak_index=tuple(int(v) for v in nod.seed.peak),
        position_index=tuple(float(v) for v in nod.seed.position),
        confidence=nod.confidence,
        detection_score=nod.seed.score,
        mean_probability=nod.mean_probability,
        component_voxels=int(nod.mask.sum()),
        slices=nod.seed.slices,
        bbox=nod.bbox,
    )
