""""Segment nodules" end to end: read, preprocess, infer, post-process, measure, scene, export.

Each step lives in its own module; this one only sequences them, times them and
decides what goes into the result folder. ``segment_volume`` is the in-memory
core (used by the CLI, the Slicer module and the tests); ``run_segment`` adds
reading the input and writing the result folder atomically.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from scipy import ndimage

from glance import __version__
from glance.infer import CancelFn, InferenceOptions, ProgressFn
from glance.model.card import OUTLINE_KEY
from glance.nodule import Nodule
from glance.postprocess import PostprocessConfig
from glance.preprocess import FIND_LUNGS
from glance.report import REPORT_FILE  # noqa: F401  (re-exported: where callers have found it)
from glance.volume import Volume

if TYPE_CHECKING:
    from glance.preprocess import LungMap

log = logging.getLogger(__name__)

MAPS_DIR = "maps"
PROB_FILE = "nodule_probability.nrrd"
HEAT_FILE = "centre_heatmap.nrrd"
SEG_DICOM_FILE = "nodules_seg.dcm"
EXAMPLE_CT_FILE = "example_ct.nrrd"


# (card / report key, SegmentOptions and PostprocessConfig field) of every calibrated post-processing value
THRESHOLD_FIELDS = (("segmentation", "seg_threshold"), ("detection", "det_threshold"),
                    (OUTLINE_KEY, "outline_fraction"))


def threshold_values(cfg: PostprocessConfig) -> dict[str, float]:
    """The calibrated values ``cfg`` runs at, by card key (what reports and exports record)."""
    return {key: getattr(cfg, field_name) for key, field_name in THRESHOLD_FIELDS}


@dataclass
class SegmentOptions:
    model: str | None = None  # registry name, NAME@VERSION or a folder; None = default
    inference: InferenceOptions = field(default_factory=InferenceOptions)
    # Thresholds: an explicit value here wins; else the model card's calibrated one; else
    # postprocess's own (PostprocessConfig's defaults, for a model without calibration).
    seg_threshold: float | None = None
    det_threshold: float | None = None
    outline_fraction: float | None = None  # rule 9 of glance.postprocess
    threshold_sources: dict[str, str] = field(default_factory=dict)  # filled by with_model_thresholds
    postprocess: PostprocessConfig = field(default_factory=PostprocessConfig)
    series_uid: str | None = None
    max_voxels: int | None = None
    snapshots: bool = True


@dataclass
class Analysis:
    """Everything a result folder holds, in memory, on the input grid."""

    ct: Volume
    prob: np.ndarray  # uint8 p * 255
    heatmap: np.ndarray  # uint8
    labels: np.ndarray  # uint16 instance map, values = Nodule.label
    nodules: list[Nodule]
    seconds: dict[str, float] = field(default_factory=dict)
    crop: dict | None = None
    outside_lungs: int | None = None  # findings post-processing rule 8 dropped; None: the rule was off


@contextmanager
def _timed(seconds: dict[str, float], stage: str):
    t = time.perf_counter()
    yield
    seconds[stage] = seconds.get(stage, 0.0) + time.perf_counter() - t


def canonical_volume(ct: Volume, array: np.ndarray | None = None):
    """``ct`` (or a same-grid array) as a Volume in canonical axial order, and its grid."""
    from glance.io.geometry import canonical_grid

    grid = canonical_grid(ct)
    m = grid.index_to_lps[:, [2, 1, 0, 3]]  # canonical (c0, c1, c2) = Volume (k, j, i)
    spacing = tuple(reversed(grid.canonical_spacing))
    direction = m[:3, :3] / np.asarray(spacing)
    data = grid.to_canonical(ct.array if array is None else array)
    return Volume(data, spacing, m[:3, 3], direction, dict(ct.metadata)), grid


def load_network(options: SegmentOptions):
    """(model on its device, model card, model folder) for ``options.model``."""
    from glance.infer import select_device
    from glance.model.weights import load_model
    from glance.registry import resolve_model

    folder = resolve_model(options.model)
    device = select_device(options.inference.device)
    model, card = load_model(folder, device)
    return model, card, folder


def with_model_thresholds(options: SegmentOptions, card) -> SegmentOptions:
    """``options`` with final post-processing thresholds for ``card``'s model, and where each came from."""
    from dataclasses import replace

    from glance.model.card import recommended_thresholds, uses_flip_thresholds

    flips = options.inference.tta
    recommended = recommended_thresholds(card.thresholds, flips)
    calibrated = ("model card (calibrated with flips)" if uses_flip_thresholds(card.thresholds, flips)
                  else "model card (calibrated)")
    chosen, sources = {}, {}
    for key, field_name in THRESHOLD_FIELDS:
        explicit = getattr(options, field_name)
        if explicit is not None:
            chosen[field_name], sources[key] = float(explicit), "requested"
        elif key in recommended:
            chosen[field_name], sources[key] = recommended[key], calibrated
        else:
            chosen[field_name], sources[key] = getattr(options.postprocess, field_name), "built-in default"
    # The explicit fields stay as given: resolving again (segment_volume after run_segment) gives the same.
    return replace(options, postprocess=replace(options.postprocess, **chosen), threshold_sources=sources)


def analyse_maps(ct: Volume, prob: np.ndarray, heatmap: np.ndarray, cfg: PostprocessConfig,
                 seconds: dict[str, float] | None = None,
                 lungs: LungMap | None | str = FIND_LUNGS) -> tuple[np.ndarray, list[Nodule], int | None]:
    """Steps 4-5 on saved maps (input grid): instance labels, measured nodules, and the number of
    findings rule 8 dropped as away from the lungs (None when it was off).
    This is all that re-thresholding needs: no network. ``lungs``: the CT's lungs from ``ct_lungs``
    when the caller already has them."""
    from glance.measure import measure_nodules

    seconds = {} if seconds is None else seconds
    with _timed(seconds, "postprocess"):
        canon, grid, detections = _detect(ct, prob, heatmap, cfg, lungs)
        nodules = measure_nodules(detections.labels, canon, detections)
        labels = np.ascontiguousarray(grid.to_original(detections.labels))
    boxes = ndimage.find_objects(labels)
    for nodule in nodules:
        box = boxes[nodule.label - 1]
        nodule.bbox = tuple(int(b.start) for b in box) + tuple(int(b.stop) for b in box)
    return labels, [_on_input_grid(n, ct) for n in nodules], detections.outside_lungs


def nodule_labels(ct: Volume, prob: np.ndarray, heatmap: np.ndarray, cfg: PostprocessConfig,
                  lungs: LungMap | None | str = FIND_LUNGS) -> np.ndarray:
    """Step 4 alone: the nodules' instance labels on the input grid, without measuring them.
    ``lungs``: the CT's lungs from ``ct_lungs`` when the caller post-processes one CT many times."""
    _, grid, detections = _detect(ct, prob, heatmap, cfg, lungs)
    return np.ascontiguousarray(grid.to_original(detections.labels))


def _detect(ct: Volume, prob: np.ndarray, heatmap: np.ndarray, cfg: PostprocessConfig,
            lungs: LungMap | None | str = FIND_LUNGS):
    from glance.postprocess import find_nodules

    canon, grid = canonical_volume(ct)
    spacing = tuple(grid.canonical_spacing)
    detections = find_nodules(grid.to_canonical(prob), grid.to_canonical(heatmap), spacing, cfg,
                              lungs_for(canon.array, spacing, cfg, lungs))
    return canon, grid, detections


def lungs_for(hu: np.ndarray, spacing: tuple[float, float, float], cfg: PostprocessConfig,
              lungs: LungMap | None | str = FIND_LUNGS) -> LungMap | None:
    """The lungs that post-processing's rule 8 checks findings against: None when the rule is off,
    else ``lungs`` when the caller already has them, else found in the canonical CT ``hu``."""
    if not cfg.require_lung_contact:
        return None
    if lungs != FIND_LUNGS:
        return lungs
    from glance.preprocess import lung_map

    return lung_map(hu, spacing)


def ct_lungs(ct: Volume, cfg: PostprocessConfig | None = None) -> LungMap | None:
    """The lungs rule 8 needs for a CT (None when ``cfg`` turns the rule off), found once for many
    post-processings of it."""
    canon, grid = canonical_volume(ct)
    return lungs_for(canon.array, tuple(grid.canonical_spacing), cfg or PostprocessConfig())


def _on_input_grid(nodule: Nodule, ct: Volume) -> Nodule:
    """Re-express the canonical indices of a nodule on the input grid (LPS is unchanged)."""
    ijk = ct.lps_to_ijk(np.asarray(nodule.centre_lps))
    nodule.centre_ijk = tuple(float(v) for v in ijk)
    if nodule.long_axis_lps is not None:
        from glance.io.geometry import axial_axis

        n = axial_axis(ct.direction)
        nodule.axial_slice = int(round(ct.lps_to_ijk(np.asarray(nodule.long_axis_lps[0]))[n]))
    return nodule


def segment_volume(ct: Volume, network, options: SegmentOptions, progress: ProgressFn | None = None,
                   cancel: CancelFn | None = None, lungs: LungMap | None | str = FIND_LUNGS) -> Analysis:
    """Steps 2-5 on a CT already in memory (``lungs``: as for ``analyse_maps``)."""
    options = with_model_thresholds(options, network[1])
    prob, heat, seconds, crop = predict_maps(ct, network, options.inference, progress, cancel)
    labels, nodules, outside_lungs = analyse_maps(ct, prob, heat, options.postprocess, seconds, lungs)
    return Analysis(ct, prob, heat, labels, nodules, seconds, crop, outside_lungs)


def predict_maps(ct: Volume, network, inference: InferenceOptions, progress: ProgressFn | None = None,
                 cancel: CancelFn | None = None, whole_image: bool = False):
    """The network's (probability, heatmap) uint8 maps on ``ct``'s own grid, the seconds spent,
    and the region it ran on. ``whole_image`` skips the lung crop (for nodule crops, which hold
    no lungs to find)."""
    from glance.infer import predict
    from glance.preprocess import full_crop, lung_crop

    model, card, _ = network
    prep = card.prep
    seconds: dict[str, float] = {}
    canon, grid = canonical_volume(ct)
    spacing = tuple(grid.canonical_spacing)
    with _timed(seconds, "preprocess"):
        use_lungs = prep.lung_crop and not whole_image
        crop = lung_crop(canon.array, spacing) if use_lungs else full_crop(canon.array.shape)
    log.info("region: slices %s, rows %s, columns %s of %s", crop.z, crop.y, crop.x, canon.array.shape)
    maps = predict(canon.array, spacing, crop, model, prep, inference, progress, cancel)
    seconds["preprocess"] += maps.seconds["preprocess"]
    seconds["model"] = maps.seconds["model"]
    prob = np.ascontiguousarray(grid.to_original(maps.prob))
    heat = np.ascontiguousarray(grid.to_original(maps.heatmap))
    return prob, heat, seconds, asdict(crop)


def algorithm_info(name: str, version: str, cfg: PostprocessConfig):
    from glance.report import AlgorithmInfo

    return AlgorithmInfo(name=name, version=version, thresholds=threshold_values(cfg))


def write_result(folder: Path, analysis: Analysis, algorithm, report: dict, snapshots: bool = True) -> None:
    """Write every output file of a result into ``folder`` (a temporary folder the caller swaps in)."""
    from glance.io import write_image
    from glance.report import write_csv, write_report_json, write_snapshots
    from glance.scene import build_scene, save_scene_files

    seconds: dict[str, float] = {}
    a = analysis
    with _timed(seconds, "scene"):
        nodes = build_scene(a.ct, a.labels, a.nodules, algorithm)
        save_scene_files(nodes, folder)
        nodes.scene.Clear(0)
    with _timed(seconds, "export"):
        (folder / MAPS_DIR).mkdir(exist_ok=True)
        write_image((a.prob, a.ct), folder / MAPS_DIR / PROB_FILE)
        write_image((a.heatmap, a.ct), folder / MAPS_DIR / HEAT_FILE)
        write_csv(a.nodules, folder / "nodules.csv")
        if snapshots and a.nodules:
            write_snapshots(a.ct, a.labels, a.nodules, folder / "snapshots")
        seg_path = _write_dicom_seg(folder, a, algorithm)
    report.update({
        "nodules": [n.to_dict() for n in a.nodules],
        "n_nodules": len(a.nodules),
        "n_dropped_outside_lungs": a.outside_lungs,
        "dicom_seg": seg_path.name if seg_path else None,
    })
    report.setdefault("seconds", {}).update({k: round(v, 3) for k, v in {**a.seconds, **seconds}.items()})
    write_report_json(folder / REPORT_FILE, report)


def _write_dicom_seg(folder: Path, a: Analysis, algorithm) -> Path | None:
    from glance.dicomseg import dicom_seg_unavailable, write_dicom_seg

    files = a.ct.metadata.get("files")
    if a.ct.metadata.get("format") != "dicom" or not files:
        return None
    if not a.nodules:
        log.info("no nodules found: no DICOM-SEG written")
        return None
    if any(f is None for f in files):
        log.warning("DICOM-SEG not written: the series had interpolated (missing) slices")
        return None
    reason = dicom_seg_unavailable()
    if reason is not None:  # e.g. Slicer 5.10: pydicom 2.4 with numpy 2, which no highdicom supports
        log.warning("DICOM-SEG not written: %s", reason)
        return None
    return write_dicom_seg([Path(f) for f in files], a.ct, a.labels, a.nodules, folder / SEG_DICOM_FILE, algorithm)


def base_report(ct: Volume, card, folder: Path, options: SegmentOptions, device: str) -> dict:
    meta = ct.metadata
    return {
        "glance_version": __version__,
        "coordinate_system": "LPS (DICOM patient coordinates, mm); Slicer nodes use RAS",
        "model": {"name": card.name, "version": card.version, "folder": str(folder),
                  "weights_sha256": card.weights_sha256, "intended_use": card.intended_use},
        "thresholds": threshold_values(options.postprocess) | {"source": options.threshold_sources},
        "postprocess": asdict(options.postprocess),
        "device": device,
        "test_time_flips": options.inference.tta,
        "snapshots": options.snapshots,
        "input": {
            "path": meta.get("source"), "format": meta.get("format"),
            "series_uid": meta.get("series_uid"), "study_uid": meta.get("study_uid"),
            "frame_of_reference_uid": meta.get("frame_of_reference_uid"),
            "shape_kji": list(ct.shape), "spacing_ijk_mm": list(ct.spacing),
            "origin_lps_mm": list(ct.origin), "direction": ct.direction.tolist(),
        },
    }


def run_segment(ct: Volume, out_dir: Path, options: SegmentOptions, force: bool = False,
                progress: ProgressFn | None = None, cancel: CancelFn | None = None,
                extra_files: Callable[[Path], None] | None = None) -> tuple[Analysis, dict]:
    """Segment ``ct`` and publish the result folder ``out_dir`` atomically."""
    from glance.infer import device_description
    from glance.io import OutputFolder

    with OutputFolder(out_dir, force=force) as tmp:
        t = time.perf_counter()
        network = load_network(options)
        load_seconds = time.perf_counter() - t
        model, card, folder = network
        options = with_model_thresholds(options, card)
        device = device_description(next(model.parameters()).device)
        log.info("model %s@%s on %s", card.name, card.version, device)
        analysis = segment_volume(ct, network, options, progress, cancel)
        analysis.seconds["load_model"] = load_seconds
        report = base_report(ct, card, folder, options, device)
        if extra_files is not None:
            extra_files(tmp)
        algorithm = algorithm_info(card.name, card.version, options.postprocess)
        write_result(tmp, analysis, algorithm, report, options.snapshots)
    return analysis, report
