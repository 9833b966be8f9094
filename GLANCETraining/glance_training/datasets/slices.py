"""2D / 2.5D training samples drawn from cases, with nodule-slice over-sampling and augmentation.

One sample is an axial patch of ``patch_size`` pixels at ``pixel_spacing_mm``:

- ``image`` [C, H, W] float32: HU windowed [-1000, 400] -> [0, 1], C = 2k + 1 neighbouring
  slices (k = ``context_slices``); indices are clamped at the volume ends, so a one-slice
  case (a 2D max-slice crop, which has no 3D context) gets its slice repeated C times;
- ``mask`` [1, H, W]: the nodule mask of the centre slice (0 where the case has no masks,
  see ``mask_valid``);
- ``heatmap`` [1, H, W]: centre heatmap (:func:`glance_training.targets.make_targets`) of
  every nodule cross-section on the centre slice: mask components, and discs drawn from
  centre + diameter for findings without a mask (LUNA16, small LNDb nodules);
- ``ignore`` [1, H, W]: discs of excluded findings (LUNA16 annotations_excluded.csv,
  LNDb non-nodules), which a loss should neither reward nor penalise;
- ``mask_valid`` (float 0/1), ``positive`` (bool: drawn as a nodule slice), ``case_id``.

With probability ``positive_prob`` a sample is a nodule slice: a random non-excluded
finding, a random slice through it, and the patch centre shifted from the nodule by up
to ``max_shift_fraction`` of the patch. Otherwise it is a random lung slice (a slice with
lung-density pixels, patch centred on one of them).

Augmentation (MONAI): ``RandAffined`` (rotation +-15 deg, scale +-10 %) then a mild
``Rand2DElasticd``, applied to the image and to the label channels in one dictionary, so
they move together (bilinear for the image, nearest for labels, zeros outside). The
heatmap is then recomputed from the transformed label components, never warped itself,
so its peaks stay exactly 1 at the moved centres.

Determinism: sample ``i`` of epoch ``e`` is a function of (seed, e, i) alone: every random
choice comes from a generator seeded with that triple, and the MONAI transforms are
re-seeded from it before each sample. It does not matter which DataLoader worker draws
it or in what order. Memory: only ``cache_cases`` loaded cases per worker; consecutive
indices in blocks of ``samples_per_case`` share one case, so a worker building a batch
reads one CT, not one per sample.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from scipy import ndimage

from glance.preprocess import window
from glance_training.targets import MIN_SIGMA_PX

from .cases import Case, CaseSource, LoadedCase

log = logging.getLogger(__name__)

AIR_HU = -1024.0


@dataclass
class SliceSamplingConfig:
    patch_size: int = 256
    pixel_spacing_mm: float = 0.7  # in-plane spacing of the model's input
    context_slices: int = 0  # k: C = 2k + 1 channels
    positive_prob: float = 0.5  # p: share of nodule slices
    samples_per_epoch: int = 1000
    samples_per_case: int = 8  # consecutive samples drawn from one loaded case
    max_shift_fraction: float = 0.25  # nodule offset from the patch centre, fraction of the patch
    window_hu: tuple[float, float] = (-1000.0, 400.0)
    lung_hu: tuple[float, float] = (-950.0, -600.0)  # what a "lung pixel" of a negative slice is
    augment: bool = True
    affine_prob: float = 0.8
    rotate_deg: float = 15.0
    scale: float = 0.10
    elastic_prob: float = 0.3
    elastic_spacing_px: int = 32  # control-point spacing of the elastic grid
    elastic_magnitude_px: tuple[float, float] = (0.0, 2.0)  # mild: at most ~2 px displacement
    # Mirror left-right and front-back, each with this probability. Rotations of +-15 deg never show the
    # network a mirrored chest. Off, as in the paper: on glance-small it did not improve a single pass
    # (docs/training.md, "mirror-image augmentation").
    flip_prob: float = 0.0
    seed: int = 0
    cache_cases: int = 2
    heatmap_min_sigma_px: float = MIN_SIGMA_PX  # floor of the centre Gaussians' sigma (glance_training.targets)

    def __post_init__(self) -> None:
        for name in ("positive_prob", "flip_prob"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {getattr(self, name)}")
        if self.patch_size < 8 or self.context_slices < 0 or self.pixel_spacing_mm <= 0:
            raise ValueError("patch_size >= 8, context_slices >= 0 and pixel_spacing_mm > 0 are required")
        if not self.heatmap_min_sigma_px > 0:
            raise ValueError(f"heatmap_min_sigma_px must be positive, got {self.heatmap_min_sigma_px}")

    @property
    def channels(self) -> int:
        return 2 * self.context_slices + 1


@dataclass
class _Finding:
    centre: np.ndarray  # canonical (c0 slice, c1 row, c2 col), continuous
    diameter_mm: float
    excluded: bool
    label: int
    weight: float = 1.0  # relative chance among the case's findings on a nodule slice


@dataclass
class _Prepared:
    """A loaded case in canonical axial order, with what the sampler needs precomputed."""

    case_id: str
    hu: np.ndarray  # canonical (slice, row, col) view
    labels: np.ndarray | None
    spacing: tuple[float, float, float]  # canonical (slice, row, col) mm
    findings: list[_Finding]
    label_slices: dict[int, tuple[int, int]]  # label -> slice range [k0, k1)
    two_d: bool


def prepare(loaded: LoadedCase, nodule_weights: dict[int, float] | None = None) -> _Prepared:
    from glance.io.geometry import to_canonical

    hu, grid = to_canonical(loaded.ct)
    labels = grid.to_canonical(loaded.labels) if loaded.labels is not None else None
    lps_to_canonical = np.linalg.inv(grid.index_to_lps)
    weights = nodule_weights or {}
    findings = [
        _Finding((lps_to_canonical @ np.r_[n.centre_lps, 1.0])[:3], n.diameter_mm, n.excluded, n.label,
                 weights.get(n.label, 1.0))
        for n in loaded.nodules
    ]
    unknown = sorted(set(weights) - {n.label for n in loaded.nodules})
    if unknown:
        log.warning("%s: nodule weights for label(s) %s, which the case does not have", loaded.case_id, unknown)
    label_slices = {}
    if labels is not None:
        for value, box in enumerate(ndimage.find_objects(labels), start=1):
            if box is not None:
                label_slices[value] = (box[0].start, box[0].stop)
    return _Prepared(loaded.case_id, hu, labels, grid.canonical_spacing, findings, label_slices,
                     bool(loaded.ct.metadata.get("two_d", False)) or hu.shape[0] == 1)


class SliceDataset(torch.utils.data.Dataset):
    """Random 2D / 2.5D patches from one or more case sources (see the module docstring)."""

    def __init__(self, sources: CaseSource | Sequence[CaseSource], config: SliceSamplingConfig = SliceSamplingConfig(),
                 source_weights: Sequence[float] | None = None):
        sources = [sources] if isinstance(sources, CaseSource) else list(sources)
        self.config = config
        self.cases: list[Case] = [c for s in sources for c in s]
        if not self.cases:
            raise ValueError("no cases to sample from")
        # Default: every case as likely as its sampling_weight says (1: equally); source weights make
        # each source's share explicit, the cases' weights only dividing it among them.
        relative = [np.array([c.sampling_weight for c in s], dtype=np.float64) for s in sources]
        if source_weights is None:
            weights = np.concatenate(relative)
        else:
            if len(source_weights) != len(sources):
                raise ValueError(f"{len(source_weights)} weights for {len(sources)} sources")
            weights = np.concatenate([w * r / r.sum() for r, w in zip(relative, source_weights) if len(r)])
        self._p_case = weights / weights.sum()
        self.epoch = 0
        self._cache: OrderedDict[int, _Prepared] = OrderedDict()
        self._no_findings: set[int] = set()
        self._warned_two_d = False
        self._transforms = self._make_transforms() if config.augment else None

    def __len__(self) -> int:
        return self.config.samples_per_epoch

    def preload(self) -> None:
        """Load the cases now, in this process: DataLoader workers forked later start with them
        cached instead of each re-loading (or re-generating) every case in every epoch."""
        for index in range(min(len(self.cases), self.config.cache_cases)):
            self._case(index)

    def set_epoch(self, epoch: int) -> None:
        """New draws for a new epoch (call on the dataset before each epoch's DataLoader pass)."""
        self.epoch = int(epoch)

    # -- case access --------------------------------------------------------------------------

    def _case(self, index: int) -> _Prepared:
        if index in self._cache:
            self._cache.move_to_end(index)
            return self._cache[index]
        case = self.cases[index]
        prepared = prepare(case.load(), case.nodule_weights)
        self._cache[index] = prepared
        while len(self._cache) > max(1, self.config.cache_cases):
            self._cache.popitem(last=False)
        if not any(not f.excluded for f in prepared.findings):
            self._no_findings.add(index)
        return prepared

    def _positive_case(self, first: int, rng: np.random.Generator, tries: int = 20) -> _Prepared | None:
        index = first
        for _ in range(tries):
            if index not in self._no_findings:
                case = self._case(index)
                if any(not f.excluded for f in case.findings):
                    return case
            index = int(rng.choice(len(self.cases), p=self._p_case))
        return None

    # -- one sample ----------------------------------------------------------------------------

    def __getitem__(self, i: int) -> dict:
        cfg = self.config
        if not 0 <= i < len(self):
            raise IndexError(i)
        block_rng = np.random.default_rng([cfg.seed, self.epoch, i // max(1, cfg.samples_per_case), 0])
        rng = np.random.default_rng([cfg.seed, self.epoch, i, 1])
        first = int(block_rng.choice(len(self.cases), p=self._p_case))
        want_positive = rng.random() < cfg.positive_prob
        case = self._positive_case(first, rng) if want_positive else None
        positive = case is not None
        if case is None:
            case = self._case(first)
        if positive:
            k, centre = self._nodule_position(case, rng)
        else:
            k, centre = self._lung_position(case, rng)
        if case.two_d and cfg.context_slices and not self._warned_two_d:
            log.info("%s: 2D crop without neighbours: its slice is repeated in all %d channels",
                     case.case_id, cfg.channels)
            self._warned_two_d = True
        image, labels = self._extract(case, k, centre)
        if self._transforms is not None:
            image, labels = self._augment(image, labels, int(rng.integers(2**31 - 1)))
        return self._sample(case, image, labels, positive)

    def _nodule_position(self, case: _Prepared, rng: np.random.Generator) -> tuple[int, np.ndarray]:
        cfg = self.config
        candidates = [f for f in case.findings if not f.excluded]
        weights = np.array([f.weight for f in candidates])
        if np.all(weights == 1.0):  # the unweighted draw, kept so that unweighted runs sample as before
            f = candidates[int(rng.integers(len(candidates)))]
        else:
            f = candidates[int(rng.choice(len(candidates), p=weights / weights.sum()))]
        if f.label in case.label_slices:
            k0, k1 = case.label_slices[f.label]
            k = int(rng.integers(k0, k1))
            rows, cols = np.nonzero(case.labels[k] == f.label)
            if len(rows):
                in_plane = np.array([rows.mean(), cols.mean()])
            else:  # a consensus mask with a gap in z: aim at the 3D centre
                in_plane = f.centre[1:]
        else:
            # Centre-only finding: a slice within half a radius of the centre, where its
            # cross-section is still at least 87 % of the full diameter.
            half = 0.25 * f.diameter_mm / case.spacing[0]
            k = int(np.clip(np.round(f.centre[0] + rng.uniform(-half, half)), 0, case.hu.shape[0] - 1))
            in_plane = f.centre[1:]
        shift_px = cfg.max_shift_fraction * cfg.patch_size
        shift_mm = rng.uniform(-shift_px, shift_px, size=2) * cfg.pixel_spacing_mm
        return k, in_plane + shift_mm / np.asarray(case.spacing[1:])

    def _lung_position(self, case: _Prepared, rng: np.random.Generator, tries: int = 5) -> tuple[int, np.ndarray]:
        lo, hi = self.config.lung_hu
        n, h, w = case.hu.shape
        stride = 4  # a coarse look is enough to find lung pixels
        for _ in range(tries):
            k = int(rng.integers(n))
            coarse = case.hu[k, ::stride, ::stride]
            rows, cols = np.nonzero((coarse >= lo) & (coarse <= hi))
            if len(rows) >= 0.01 * coarse.size:
                pick = int(rng.integers(len(rows)))
                return k, np.array([rows[pick] * stride, cols[pick] * stride], dtype=np.float64)
        return k, np.array([(h - 1) / 2, (w - 1) / 2])

    def _extract(self, case: _Prepared, k: int, centre: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Windowed image [C, P, P] and label channels [3, P, P] (mask, centre-only, excluded)."""
        cfg = self.config
        p = cfg.patch_size
        zoom = cfg.pixel_spacing_mm / np.asarray(case.spacing[1:])  # source px per output px
        n = case.hu.shape[0]
        ks = np.clip(np.arange(k - cfg.context_slices, k + cfg.context_slices + 1), 0, n - 1)
        image = np.stack([self._resample(case.hu[kk], centre, zoom, 1, AIR_HU) for kk in ks])
        image = window(image, *cfg.window_hu)
        labels = np.zeros((3, p, p), dtype=np.float32)
        if case.labels is not None:
            labels[0] = self._resample(case.labels[k], centre, zoom, 0, 0)
        self._draw_discs(case, k, centre, labels)
        return image, labels

    def _resample(self, plane: np.ndarray, centre: np.ndarray, zoom: np.ndarray, order: int, cval: float) -> np.ndarray:
        """The patch around ``centre`` (source row, col) at the target spacing, from a cropped window."""
        p = self.config.patch_size
        half = (p - 1) / 2 * zoom + 2  # source extent needed on each side, plus interpolation margin
        lo = np.floor(centre - half).astype(int)
        hi = np.ceil(centre + half).astype(int) + 1
        src_lo = np.maximum(lo, 0)
        src_hi = np.minimum(hi, plane.shape)
        window_ = np.full(hi - lo, cval, dtype=np.float32)
        if np.all(src_hi > src_lo):
            window_[src_lo[0] - lo[0]:src_hi[0] - lo[0], src_lo[1] - lo[1]:src_hi[1] - lo[1]] = \
                plane[src_lo[0]:src_hi[0], src_lo[1]:src_hi[1]]
        offset = centre - (p - 1) / 2 * zoom - lo
        return ndimage.affine_transform(window_, zoom, offset=offset, output_shape=(p, p), order=order,
                                        mode="constant", cval=cval, prefilter=False)

    def _draw_discs(self, case: _Prepared, k: int, centre: np.ndarray, labels: np.ndarray) -> None:
        """Cross-sections of centre-only and excluded findings on slice ``k``, in patch pixels."""
        p = self.config.patch_size
        ts = self.config.pixel_spacing_mm
        rr, cc = np.mgrid[0:p, 0:p]
        origin_mm = (centre - (p - 1) / 2 * ts / np.asarray(case.spacing[1:])) * np.asarray(case.spacing[1:])
        next_value = 1
        for f in case.findings:
            if f.label and not f.excluded and case.labels is not None:
                continue  # has a mask in channel 0
            dz = (k - f.centre[0]) * case.spacing[0]
            r2 = (f.diameter_mm / 2) ** 2 - dz**2
            if case.two_d:
                r2 = (f.diameter_mm / 2) ** 2
            if r2 <= 0:
                continue
            rc_mm = f.centre[1:] * np.asarray(case.spacing[1:]) - origin_mm
            disc = ((rr * ts - rc_mm[0]) ** 2 + (cc * ts - rc_mm[1]) ** 2) <= r2
            if f.excluded:
                labels[2][disc] = 1
            else:
                labels[1][disc] = next_value
                next_value += 1

    # -- augmentation and targets ------------------------------------------------------------

    def _make_transforms(self):
        from monai.transforms import Compose, Rand2DElasticd, RandAffined, RandFlipd

        cfg = self.config
        keys = ("image", "labels")
        modes = ("bilinear", "nearest")
        rotate = np.deg2rad(cfg.rotate_deg)
        transforms = [
            RandAffined(keys, prob=cfg.affine_prob, rotate_range=(rotate,), scale_range=(cfg.scale, cfg.scale),
                        mode=modes, padding_mode="zeros"),
            Rand2DElasticd(keys, spacing=(cfg.elastic_spacing_px, cfg.elastic_spacing_px),
                           magnitude_range=cfg.elastic_magnitude_px, prob=cfg.elastic_prob,
                           mode=modes, padding_mode="zeros"),
        ]
        if cfg.flip_prob > 0:  # off: no per-sample no-op; the transforms before draw the same either way
            # Spatial axes of a (C, H, W) sample: 0 = rows (front-back), 1 = columns (left-right).
            transforms += [RandFlipd(keys, prob=cfg.flip_prob, spatial_axis=axis) for axis in (0, 1)]
        return Compose(transforms)

    def _augment(self, image: np.ndarray, labels: np.ndarray, seed: int) -> tuple[np.ndarray, np.ndarray]:
        self._transforms.set_random_state(seed=seed)
        out = self._transforms({"image": torch.from_numpy(image), "labels": torch.from_numpy(labels)})
        return _plain(out["image"]).numpy(), _plain(out["labels"]).numpy()

    def _sample(self, case: _Prepared, image: np.ndarray, labels: np.ndarray, positive: bool) -> dict:
        from glance_training.targets import make_targets

        real = np.rint(labels[0]).astype(np.int64)
        pseudo = np.rint(labels[1]).astype(np.int64)
        # One instance map for the heatmap: masked nodules keep their values, centre-only
        # discs are numbered after them so components never merge.
        instances = np.where(pseudo > 0, pseudo + real.max(), real)
        heatmap = make_targets(torch.from_numpy(instances),
                               min_sigma_px=self.config.heatmap_min_sigma_px).heatmap[0]
        return {
            "image": torch.from_numpy(np.ascontiguousarray(image, dtype=np.float32)),
            "mask": torch.from_numpy((real > 0).astype(np.float32))[None],
            "heatmap": heatmap,
            "ignore": torch.from_numpy((labels[2] > 0.5).astype(np.float32))[None],
            "mask_valid": torch.tensor(float(case.labels is not None)),
            "positive": torch.tensor(positive),
            "case_id": case.case_id,
        }


def _plain(t) -> torch.Tensor:
    """A MONAI MetaTensor as a plain tensor (its metadata is of no use here and slows collation)."""
    return t.as_tensor() if hasattr(t, "as_tensor") else torch.as_tensor(t)
