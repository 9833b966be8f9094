"""Insert synthetic or real nodules into a real chest CT, with ground truth.

Synthetic nodules are drawn with partial volume and added as a smooth
*change* to the scan (target HU minus the locally smoothed scan), so the
scan's own noise and texture stay inside them. Real nodules (LIDC crops) are
resampled to the scan's spacing and blended by their soft mask. Positions are
random lung voxels: isolated ones need lung all round them, juxta-pleural
ones sit on the lung edge and are cut by the chest wall. The scan's own
nodules (from its LIDC XML or a label map) are labelled first and never
overlapped. Only voxels within a nodule's footprint change.
"""

from __future__ import annotations

import csv
import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from scipy import ndimage

from glance.errors import InputError
from glance.phantom.grid import Grid
from glance.phantom.groundtruth import Phantom, PhantomNodule, claim_voxels, measure
from glance.phantom.nodules import SHAPES, TYPES, NoduleSpec, occupancy, random_hu, random_shape
from glance.phantom.placement import SPHERE_DIRS, NoduleMix, pick
from glance.volume import Volume

log = logging.getLogger(__name__)

_TRIES = 400


@dataclass
class RealCrop:
    """A real nodule: HU and 50 % consensus mask at its native spacing (k, j, i)."""

    hu: np.ndarray
    mask: np.ndarray
    spacing: tuple[float, float, float]  # (si, sj, sk)
    name: str
    diameter_mm: float


def load_crops(path: str | Path) -> list[RealCrop]:
    """The nodules of ``lidc_nodule_crops_64.npz`` (and its ``index.csv`` beside it)."""
    path = Path(path)
    try:
        data = np.load(path)
        hu, mask, spacing = data["hu"], data["mask"], data["spacing_xyz"]
    except (OSError, KeyError, ValueError) as exc:
        raise InputError(f"{path}: not a nodule crop file ({exc})") from exc
    names = [f"crop{n}" for n in range(len(hu))]
    diam = [float("nan")] * len(hu)
    index = path.with_name("index.csv")
    if index.exists():
        with open(index, newline="") as f:
            for row in csv.DictReader(f):
                n = int(row["crop_index"])
                names[n] = f"{row['patient_id']}:{row['nodule_index']}"
                diam[n] = float(row["mean_reader_diameter_mm"])
    return [RealCrop(hu[n], mask[n] > 0, tuple(float(v) for v in spacing[n]), names[n], diam[n])
            for n in range(len(hu))]


@dataclass
class InsertConfig:
    n_nodules: int = 3
    seed: int = 0
    source: str = "synthetic"  # synthetic | real | mixed
    juxta_pleural_fraction: float = 0.3
    mix: NoduleMix = field(default_factory=NoduleMix)
    psf_mm: float = 0.5


def lung_mask(ct: Volume) -> np.ndarray:
    """Both lungs with their vessels (air-like regions inside the body, holes filled per slice)."""
    from glance.preprocess import lung_mask as enclosed_air

    if not (ct.array < -400).any():
        raise InputError("the CT has no air-filled region: no lungs to put nodules in")
    lungs, _ = enclosed_air(ct.array, tuple(reversed(ct.spacing)), coarse_mm=None, min_ml=50.0, fill_holes=True)
    if not lungs.any():
        raise InputError("no lung-sized air region found in the CT")
    return lungs


def noise_sd(ct: Volume) -> float:
    """The scan's noise (HU SD) from neighbour differences in soft tissue (robust MAD estimate)."""
    a = ct.array[::4].astype(np.float32)
    d = a[:, :, 1:] - a[:, :, :-1]
    soft = (np.abs(a[:, :, 1:]) < 150) & (np.abs(a[:, :, :-1]) < 150)
    if soft.sum() < 1000:
        return 10.0
    v = d[soft]
    return float(1.4826 * np.median(np.abs(v - np.median(v))) / np.sqrt(2))


def insert_nodules(ct: Volume, config: InsertConfig, crops: list[RealCrop] | None = None,
                   existing: list[PhantomNodule] | None = None, existing_labels: np.ndarray | None = None) -> Phantom:
    """Return a copy of ``ct`` with nodules inserted, its label map and nodule list.

    ``existing`` / ``existing_labels``: the scan's own nodules, labelled 1..M
    and kept as they are; inserted nodules are numbered from M + 1.
    """
    try:
        grid = Grid.of(ct)
    except ValueError as exc:
        raise InputError(f"{ct.metadata.get('source', 'CT')}: nodule insertion needs an axis-aligned CT") from exc
    if config.source in ("real", "mixed") and not crops:
        raise InputError("real nodules requested but no nodule crops were given")
    rng = np.random.default_rng([config.seed, 0x1A5E])
    out = ct.array.astype(np.float32)
    labels = np.zeros(ct.shape, np.uint16) if existing_labels is None else existing_labels.astype(np.uint16).copy()
    nodules = list(existing or [])
    lungs = lung_mask(ct)
    sd = noise_sd(ct)
    blocked = ndimage.binary_dilation(labels > 0, iterations=3) if labels.any() else np.zeros(ct.shape, bool)
    placer = _VoxelPlacer(grid, lungs, blocked, ct.array, rng)
    next_id = int(labels.max()) + 1 if labels.any() else 1
    for n in range(config.n_nodules):
        real = config.source == "real" or (config.source == "mixed" and n % 2 == 1)
        pleural = rng.random() < config.juxta_pleural_fraction
        if real:
            made = _insert_real(out, labels, lungs, placer, crops[int(rng.integers(len(crops)))], pleural, next_id,
                                ct, rng)
        else:
            made = _insert_synthetic(out, labels, lungs, placer, config, pleural, next_id, ct, rng)
        if made is None:
            log.warning("inserted nodule %d: no free lung position, or no voxel of it in the lung; skipped", n + 1)
            continue
        nodules.append(made)
        next_id += 1
    new = ct.with_array(np.clip(np.rint(out), -32768, 32767).astype(np.int16))
    info = {"generator": "glance.phantom.insert", "seed": config.seed, "source_scan": ct.metadata.get("source"),
            "noise_sd_hu": round(sd, 2), "existing_nodules": len(existing or []),
            "slice_thickness_mm": ct.metadata.get("slice_thickness", ct.spacing[2])}
    return Phantom(new, labels, nodules, None, info)


class _VoxelPlacer:
    """Random nodule centres on a real scan's lung mask.

    Distances to the lung edge are tested with rays of points on spheres
    (nearest voxel lookups) instead of a distance transform of the whole
    scan, which costs seconds per scan.
    """

    def __init__(self, grid, lungs, blocked, hu, rng) -> None:
        self.grid, self.lungs, self.blocked, self.hu, self.rng = grid, lungs, blocked, hu, rng
        self.lung_idx = np.flatnonzero(lungs)
        self.scale = 1.0 / np.asarray(grid.spacing[::-1])  # mm -> voxels, (k, j, i)

    def _inside(self, kji: np.ndarray, radius: float) -> np.ndarray:
        pts = np.rint(kji + SPHERE_DIRS[:, ::-1] * radius * self.scale).astype(int)
        ok = np.all((pts >= 0) & (pts < self.lungs.shape), axis=1)
        out = np.zeros(len(pts), bool)
        out[ok] = self.lungs[tuple(pts[ok].T)]
        return out

    def centre(self, radius: float, pleural: bool) -> np.ndarray | None:
        """A voxel (k, j, i) for a nodule of ``radius`` mm, or None."""
        for _ in range(_TRIES):
            flat = int(self.lung_idx[self.rng.integers(len(self.lung_idx))])
            kji = np.array(np.unravel_index(flat, self.lungs.shape))
            if self.hu[tuple(kji)] > -600:
                continue
            if pleural:
                # The lung edge lies between 0.35 and 0.65 radii from the centre.
                if not self._inside(kji, 0.35 * radius).all() or self._inside(kji, 0.65 * radius).all():
                    continue
            elif not (self._inside(kji, radius + 2.0).all() and self._inside(kji, 0.5 * radius).all()):
                continue
            if self._clear(kji, radius + 4.0):
                return kji
        return None

    def _clear(self, kji: np.ndarray, radius: float) -> bool:
        r = np.ceil(radius * self.scale).astype(int)
        if np.any(kji - r < 0) or np.any(kji + r + 1 > self.lungs.shape):
            return False
        lo, hi = kji - r, kji + r + 1
        return not self.blocked[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]].any()

    def block(self, box, mask) -> None:
        (k0, k1), (j0, j1), (i0, i1) = box
        self.blocked[k0:k1, j0:j1, i0:i1] |= ndimage.binary_dilation(mask, iterations=3)


def _insert_synthetic(out, labels, lungs, placer, config, pleural, nid, ct, rng) -> PhantomNodule | None:
    mix = config.mix
    diameter = float(np.exp(rng.uniform(np.log(mix.diameter_mm[0]), np.log(mix.diameter_mm[1]))))
    ntype = pick(TYPES, mix.type_weights, rng)
    shape_name = "round" if diameter < 6 else pick(SHAPES, mix.shape_weights, rng)
    shape = random_shape(diameter, shape_name, ntype, rng)
    hu, core_hu = random_hu(ntype, rng)
    kji = placer.centre(shape.extent, pleural)
    if kji is None:
        return None
    grid = placer.grid
    centre = grid.to_lps(kji[::-1].astype(float))
    occ = occupancy(grid, centre, shape)
    (k0, k1), (j0, j1), (i0, i1) = occ.box
    allowed = lungs[k0:k1, j0:j1, i0:i1]
    box = out[k0:k1, j0:j1, i0:i1]
    sigma = [config.psf_mm / s for s in grid.spacing[::-1]]
    background = ndimage.gaussian_filter(box, [max(s, 1.0) * 1.5 for s in sigma])
    total = occ.total * allowed
    delta = total * (hu - background)
    if ntype != "solid":
        np.maximum(delta, 0, out=delta)  # ground glass never darkens vessels
        if core_hu is not None:
            core = occ.core * allowed
            delta = delta + core * (core_hu - (background + delta))
    delta = ndimage.gaussian_filter(delta, sigma)
    footprint = ndimage.binary_dilation(total > 0, iterations=2)
    delta *= footprint
    spec = NoduleSpec(centre, diameter, ntype, shape_name, "juxta-pleural" if pleural else "isolated", shape, hu,
                      core_hu)
    made = _label(labels, occ.box, total, nid, ct, placer, spec.diameter_mm, ntype, shape_name, spec.attachment,
                  hu, "synthetic", {"core_hu": core_hu} if core_hu is not None else {})
    if made is not None:
        box += delta
    return made


def _insert_real(out, labels, lungs, placer, crop: RealCrop, pleural, nid, ct, rng) -> PhantomNodule | None:
    hu, weight = _resample_crop(crop, ct.spacing)
    kk, jj, ii = np.nonzero(weight >= 0.5)
    if not len(kk):
        return None
    half = np.array(weight.shape) // 2
    radius = 0.5 * max(np.ptp(v) * s for v, s in zip((ii, jj, kk), ct.spacing)) + 1
    kji = placer.centre(radius, pleural)
    if kji is None and not pleural:
        # Large real nodules rarely find lung all round them: let them touch the pleura.
        pleural = True
        kji = placer.centre(radius, pleural)
    if kji is None:
        return None
    lo = kji - half
    hi = lo + np.array(weight.shape)
    if np.any(lo < 0) or np.any(hi > np.array(ct.shape)):
        return None
    box = ((int(lo[0]), int(hi[0])), (int(lo[1]), int(hi[1])), (int(lo[2]), int(hi[2])))
    sl = tuple(slice(a, b) for a, b in box)
    w = weight * lungs[sl]
    made = _label(labels, box, w, nid, ct, placer, crop.diameter_mm, "unknown", "real",
                  "juxta-pleural" if pleural else "isolated", float(np.mean(hu[weight >= 0.5])),
                  f"lidc-crop:{crop.name}", {})
    if made is not None:
        out[sl] += w * (hu - out[sl])
    return made


def _resample_crop(crop: RealCrop, spacing) -> tuple[np.ndarray, np.ndarray]:
    """Crop HU and a soft mask weight, resampled (linear) to ``spacing`` about the crop centre."""
    src = np.array(crop.spacing[::-1])  # (k, j, i)
    dst = np.array(spacing[::-1])
    shape_in = np.array(crop.hu.shape)
    extent = (shape_in - 1) * src
    n_out = np.floor(extent / dst).astype(int) | 1  # odd, so the centre is a voxel
    coords = [((np.arange(n) - n // 2) * d + (s - 1) * sp / 2) / sp for n, d, s, sp in zip(n_out, dst, shape_in, src)]
    grid = np.meshgrid(*coords, indexing="ij")
    hu = ndimage.map_coordinates(crop.hu.astype(np.float32), grid, order=1, mode="nearest")
    weight = ndimage.map_coordinates(crop.mask.astype(np.float32), grid, order=1, mode="constant")
    # Soften the mask edge by about one voxel: partial volume at the new spacing.
    weight = np.clip(ndimage.gaussian_filter(weight, 0.5), 0, 1)
    weight[weight < 0.02] = 0
    return hu, weight


def _label(labels, box, weights, nid, ct, placer, diameter, ntype, shape, attachment, mean_hu, source, extra):
    """Label nodule ``nid`` and measure it; None, with nothing labelled, when no voxel of it can be
    labelled (all of it outside the lung or under another label): the caller then leaves the CT."""
    (k0, k1), (j0, j1), (i0, i1) = box
    inside = claim_voxels(labels[k0:k1, j0:j1, i0:i1], weights, nid)
    if inside is None:
        return None
    placer.block(box, weights > 0)
    extra = dict(extra, footprint_bbox=[box[0][0], box[1][0], box[2][0], box[0][1], box[1][1], box[2][1]])
    return measure(nid, weights, box, ct, int(inside.sum()), diameter_mm=float(diameter), nodule_type=ntype,
                   shape=shape, attachment=attachment, mean_hu=float(mean_hu), source=source, extra=extra)


def existing_from_lidc(xml_path: str | Path, ct: Volume) -> tuple[list[PhantomNodule], np.ndarray]:
    """The scan's own nodules from its LIDC XML, as ground-truth entries and a label map."""
    from glance.io.lidc_xml import lidc_label_map, read_lidc_nodules

    found = read_lidc_nodules(xml_path, ct)
    labels = lidc_label_map(found, ct.shape)
    nodules = []
    for n in found:
        k0, j0, i0, k1, j1, i1 = n.bbox
        hu = ct.array[k0:k1, j0:j1, i0:i1][n.mask]
        nodules.append(PhantomNodule(
            id=n.index, centre_ijk=n.centroid_ijk, centre_lps=n.centroid_lps,
            diameter_mm=n.mean_diameter_mm or 0.0, volume_mm3=n.volume_mm3, label_voxels=n.n_voxels,
            nodule_type="unknown", shape="real", attachment="unknown", mean_hu=float(hu.mean()),
            source="lidc-xml", extra={"n_readers": n.n_readers}))
    return nodules, labels


def existing_from_labels(label_map: Volume, ct: Volume) -> tuple[list[PhantomNodule], np.ndarray]:
    """The scan's own nodules from a label map on its grid (value n = nodule n)."""
    if label_map.shape != ct.shape:
        raise InputError(f"{label_map.metadata.get('source', 'label map')}: grid {label_map.shape} "
                         f"is not the CT's {ct.shape}")
    labels = label_map.array.astype(np.uint16)
    nodules = []
    for n, sl in enumerate(ndimage.find_objects(labels), start=1):
        if sl is None:
            continue
        m = labels[sl] == n
        box = tuple((s.start, s.stop) for s in sl)
        nodules.append(measure(n, m.astype(np.float32), box, ct, int(m.sum()), diameter_mm=0.0,
                               nodule_type="unknown", shape="real", attachment="unknown",
                               mean_hu=float(ct.array[sl][m].mean()), source="label-map"))
    return nodules, labels
