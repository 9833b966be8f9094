"""Build a synthetic chest CT with exact nodule ground truth, deterministically from a seed.

Steps: anatomy (analytic, LPS mm) -> tissue map and HU with texture -> vessel
and airway trees drawn with partial volume -> nodules placed and drawn ->
scanner blur, noise and FOV padding -> int16 CT. Every random choice comes
from one SeedSequence, so a seed gives the same bytes on every run.
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass, field

import numpy as np

from glance.phantom.anatomy import Anatomy, Tissue
from glance.phantom.grid import Grid
from glance.phantom.groundtruth import Phantom, PhantomNodule, claim_voxels, measure
from glance.phantom.nodules import NoduleSpec, draw_nodule, occupancy
from glance.phantom.placement import NoduleMix, place_nodules
from glance.phantom.render import render_anatomy
from glance.phantom.scanner import ScannerConfig, apply_scanner
from glance.phantom.vessels import Tubes, build_airways, build_vessels, draw_tubes

log = logging.getLogger(__name__)

_NODULE_ALLOWED = (Tissue.LUNG, Tissue.VESSEL)


@dataclass
class PhantomConfig:
    size_ijk: tuple[int, int, int] = (512, 512, 240)  # columns, rows, slices
    spacing: tuple[float, float, float] = (0.7, 0.7, 1.25)  # mm (i, j, k)
    seed: int = 0
    n_nodules: int = 4
    scanner: ScannerConfig = field(default_factory=ScannerConfig)
    mix: NoduleMix = field(default_factory=NoduleMix)
    vessel_points: int = 1500  # territory points per lung: more = finer vessel tree


def make_phantom(size_ijk=(512, 512, 240), spacing=(0.7, 0.7, 1.25), seed: int = 0, n_nodules: int = 4,
                 config: PhantomConfig | None = None) -> Phantom:
    """A synthetic chest CT (int16 HU) with instance labels and nodule list; same seed, same result."""
    cfg = config or PhantomConfig(tuple(size_ijk), tuple(spacing), int(seed), int(n_nodules))
    if min(cfg.size_ijk) < 8 or min(cfg.spacing) <= 0:
        raise ValueError(f"phantom grid too small or bad spacing: {cfg.size_ijk} at {cfg.spacing} mm")
    if cfg.n_nodules < 0:
        raise ValueError("the number of nodules cannot be negative")
    start = time.perf_counter()
    grid = Grid.centred(cfg.size_ijk, cfg.spacing)
    rng_anat, rng_tex, rng_tree, rng_nod = (np.random.default_rng(s) for s in np.random.SeedSequence(cfg.seed).spawn(4))
    fov_half = min(grid.shape[1] * grid.spacing[1], grid.shape[2] * grid.spacing[0]) / 2
    z = grid.axis_mm(2)
    anatomy = Anatomy.random(rng_anat, fov_half, float(z[0]), float(z[-1]))
    hu, tissue = render_anatomy(grid, anatomy, rng_tex)
    vessels, airway_walls = _draw_trees(hu, tissue, grid, anatomy, rng_tree, cfg.vessel_points, float(z[-1]))
    specs = place_nodules(cfg.n_nodules, grid, anatomy, vessels, rng_nod, cfg.mix, airway_walls)
    labels = np.zeros(grid.shape, dtype=np.uint16)
    ct_grid = grid.volume(labels)  # geometry only
    nodules = []
    for spec in specs:
        nodule = _draw(hu, tissue, labels, grid, ct_grid, len(nodules) + 1, spec)
        if nodule is None:
            log.info("nodule at LPS %s: no voxel of it lies in lung or vessel; skipped", np.round(spec.centre, 1))
        else:
            nodules.append(nodule)
    ct = grid.volume(apply_scanner(hu, grid, cfg.scanner, cfg.seed))
    del hu
    info = {
        "generator": "glance.phantom",
        "seed": cfg.seed,
        "size_ijk": list(cfg.size_ijk),
        "spacing": list(cfg.spacing),
        "slice_thickness_mm": cfg.scanner.slice_thickness_mm or cfg.spacing[2],
        "padding_hu": cfg.scanner.padding_hu,
        "scanner": asdict(cfg.scanner),
    }
    log.info("phantom %s at %s mm, seed %d: %d nodules in %.1f s", cfg.size_ijk, cfg.spacing, cfg.seed,
             len(nodules), time.perf_counter() - start)
    return Phantom(ct, labels, nodules, tissue, info)


def make_example_phantom(seed: int = 0) -> Phantom:
    """The built-in example: 256 x 256 x 64 at 1.25 x 1.25 x 2.5 mm with four nodules of mixed types."""
    mix = NoduleMix(diameter_mm=(5.0, 20.0))
    cfg = PhantomConfig((256, 256, 64), (1.25, 1.25, 2.5), seed, 4, mix=mix, vessel_points=1200)
    return make_phantom(config=cfg)


def _draw_trees(hu, tissue, grid: Grid, anatomy: Anatomy, rng, n_points: int, top_z: float) -> tuple[Tubes, Tubes]:
    """Draw vessels and airways; returns the vessel segments (for juxta-vascular placement) and the
    airway walls (which nodules keep clear of)."""
    arteries, veins = build_vessels(anatomy, rng, n_points)
    airways = build_airways(anatomy, arteries, top_z)
    vessel_hu = anatomy.hu[Tissue.VESSEL]
    lung_or_vessel = (Tissue.LUNG, Tissue.VESSEL)
    draw_tubes(hu, tissue, grid, arteries, vessel_hu, lung_or_vessel, Tissue.VESSEL)
    draw_tubes(hu, tissue, grid, veins, vessel_hu, lung_or_vessel, Tissue.VESSEL)
    walls = (Tissue.LUNG, Tissue.VESSEL, Tissue.MEDIASTINUM)
    draw_tubes(hu, tissue, grid, airways.wall, 0.0, walls, Tissue.AIRWAY_WALL)
    draw_tubes(hu, tissue, grid, airways.lumen, anatomy.hu[Tissue.AIRWAY], walls + (Tissue.AIRWAY_WALL,), Tissue.AIRWAY)
    return Tubes.concat([arteries, veins]), airways.wall


def _draw(hu, tissue, labels, grid: Grid, ct_grid, nid: int, spec: NoduleSpec) -> PhantomNodule | None:
    """Draw one nodule as label ``nid``; None (and the CT untouched) when no voxel of it can be labelled:
    a nodule without voxels has no centre or volume, and training would aim at NaN."""
    occ = occupancy(grid, spec.centre, spec.shape)
    (k0, k1), (j0, j1), (i0, i1) = occ.box
    t_box = tissue[k0:k1, j0:j1, i0:i1]
    hu_box = hu[k0:k1, j0:j1, i0:i1]
    before = hu_box.copy()
    weights = draw_nodule(hu_box, np.isin(t_box, _NODULE_ALLOWED), occ, spec)
    inside = claim_voxels(labels[k0:k1, j0:j1, i0:i1], weights, nid)
    if inside is None:
        hu_box[...] = before
        return None
    t_box[inside] = Tissue.NODULE
    return measure(nid, weights, occ.box, ct_grid, int(inside.sum()), diameter_mm=spec.diameter_mm,
                   nodule_type=spec.nodule_type, shape=spec.shape_name, attachment=spec.attachment,
                   mean_hu=spec.hu, extra={"core_hu": spec.core_hu} if spec.core_hu is not None else {})
