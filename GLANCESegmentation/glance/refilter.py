"""Re-thresholding a finished result from its saved probability maps (no network).

The result folder keeps both network outputs on the input grid
(``maps/*.nrrd``, uint8), so changing a threshold only re-runs post-processing,
measurement, scene and export: a second or two instead of the model.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

from glance.errors import InputError
from glance.pipeline import (EXAMPLE_CT_FILE, HEAT_FILE, MAPS_DIR, PROB_FILE, THRESHOLD_FIELDS, Analysis,
                             algorithm_info, analyse_maps, threshold_values, write_result)
from glance.postprocess import PostprocessConfig
from glance.volume import Volume

log = logging.getLogger(__name__)


def _input_ct(folder: Path, report: dict) -> Volume:
    from glance.io import read_volume

    example = folder / EXAMPLE_CT_FILE
    if example.is_file():
        return read_volume(example)
    source = (report.get("input") or {}).get("path")
    if not source or not Path(source).exists():
        raise InputError(f"{folder}: the input CT {source!r} is no longer there; run 'glance segment' again")
    ct = read_volume(source, (report.get("input") or {}).get("series_uid"))
    if list(ct.shape) != report["input"]["shape_kji"]:
        raise InputError(f"{source}: changed since the result was made (shape {ct.shape})")
    return ct


def _read_map(path: Path, ct: Volume):
    from glance.io import read_label_map

    if not path.is_file():
        raise InputError(f"{path}: missing; this result cannot be re-thresholded")
    m = read_label_map(path)
    if m.shape != ct.shape:
        raise InputError(f"{path}: grid {m.shape} does not match the CT {ct.shape}")
    return m.array.astype("uint8", copy=False)


def refilter(folder: Path, report: dict, cfg: PostprocessConfig, requested: frozenset[str] = frozenset()) -> Analysis:
    """Rewrite the result in ``folder`` for new thresholds; the old result stays until the new one is complete.

    ``requested``: the thresholds ("segmentation", "detection", "outline_fraction") this call sets; the others keep
    the source the report gave them."""
    from glance.io import OutputFolder

    folder = Path(folder)
    ct = _input_ct(folder, report)
    prob = _read_map(folder / MAPS_DIR / PROB_FILE, ct)
    heat = _read_map(folder / MAPS_DIR / HEAT_FILE, ct)
    seconds: dict[str, float] = {}
    labels, nodules, outside_lungs = analyse_maps(ct, prob, heat, cfg, seconds)
    analysis = Analysis(ct, prob, heat, labels, nodules, seconds, outside_lungs=outside_lungs)
    model = report.get("model", {})
    before = (report.get("thresholds") or {}).get("source") or {}
    sources = {key: "requested" if key in requested else before.get(key, "unknown") for key, _ in THRESHOLD_FIELDS}
    report.update({"thresholds": threshold_values(cfg) | {"source": sources},
                   "postprocess": cfg.__dict__.copy(), "refiltered": True})
    with OutputFolder(folder, force=True) as tmp:
        for keep in ("example_ct.nrrd", "example_ground_truth.json"):
            if (folder / keep).is_file():
                shutil.copy2(folder / keep, tmp / keep)
        algorithm = algorithm_info(model.get("name", "unknown"), model.get("version", "unknown"), cfg)
        write_result(tmp, analysis, algorithm, report, snapshots=bool(report.get("snapshots", True)))
    return analysis
