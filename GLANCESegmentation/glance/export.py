"""Export a reviewed result: the accepted nodules as DICOM-SEG, and the review kept in ``nodules.csv``.

The reading workflow segments a CT that Slicer loaded from DICOM, the reader
accepts or rejects each nodule, and "Export DICOM-SEG" writes only the accepted
ones, referencing the very CT instances the reader saw. Everything comes from
the result folder the engine wrote (``glance segment`` / ``glance refilter``):

- the instance label map: ``nodules.seg.nrrd`` (Slicer's file, one shared
  layer, segment ``Nodule_<label>`` stored with label value = nodule label);
- the nodules and the algorithm: ``report.json`` (``nodules``, ``model``,
  ``thresholds``);
- the CT grid: the DICOM source files themselves, which must be the grid the
  result was computed on (checked, else :class:`InputError`).
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Sequence
from dataclasses import fields
from functools import partial
from pathlib import Path

import numpy as np

from glance.errors import InputError
from glance.io.seg_nrrd import DIRECTION_TOLERANCE, GRID_TOLERANCE_MM, Segment, place_on_grid, read_seg_nrrd
from glance.nodule import Nodule
from glance.report import AlgorithmInfo, write_csv
from glance.volume import Volume

log = logging.getLogger(__name__)



def export_dicom_seg(result_dir: str | os.PathLike, source_files: Sequence[str | os.PathLike],
                     out_path: str | os.PathLike, accepted: Sequence[int]) -> Path | None:
    """Write the ``accepted`` nodule labels of the result in ``result_dir`` as a DICOM-SEG at ``out_path``.

    ``source_files`` are the CT's DICOM instances (any order). ``nodules.csv`` is
    rewritten with the accepted flags first, so the review is kept even when
    nothing is exported. Returns the SEG path, or None when no accepted nodule has voxels.
    """
    from glance.dicomseg import write_dicom_seg
    from glance.pipeline import REPORT_FILE
    from glance.scene import CSV_FILE, SEGMENTATION_FILE

    result_dir = Path(result_dir)
    report = _read_report(result_dir / REPORT_FILE)
    nodules = [_nodule(d) for d in report.get("nodules", [])]
    unknown = sorted(set(int(a) for a in accepted) - {n.label for n in nodules})
    if unknown:
        raise InputError(f"{result_dir}: no nodule with label {unknown[0]} in this result")
    accepted = sorted(int(a) for a in accepted)
    write_csv(nodules, result_dir / CSV_FILE, accepted=accepted)

    ct, ordered_files = read_source_ct(source_files)
    _check_result_grid(ct, report, result_dir)
    labels = labels_on_grid(result_dir / SEGMENTATION_FILE, ct)
    model = report.get("model") or {}
    thresholds = report.get("thresholds") or {}  # the probabilities, beside where they came from ("source")
    algorithm = AlgorithmInfo(str(model.get("name", "unknown")), str(model.get("version", "unknown")),
                              {k: float(v) for k, v in thresholds.items() if isinstance(v, int | float)})
    return write_dicom_seg(ordered_files, ct, labels, nodules, Path(out_path), algorithm, accepted=accepted)


def _read_report(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise InputError(f"{path}: not a readable GLANCE report ({exc})") from None


def _nodule(d: dict) -> Nodule:
    """A Nodule from its ``report.json`` dict (``Nodule.to_dict``; ``name`` is derived)."""
    known = {f.name for f in fields(Nodule)}
    return Nodule(**{k: v for k, v in d.items() if k in known})


def read_source_ct(source_files: Sequence[str | os.PathLike]) -> tuple[Volume, list[Path]]:
    """The CT of exactly these DICOM files, and the files in slice (k) order.

    The series is read from the files' folder by its SeriesInstanceUID (the
    reader orders and checks the slices); a folder holding more instances of the
    series than were given is refused, since the SEG must reference what was shown.
    """
    import pydicom

    from glance.io import read_volume

    files = [Path(f) for f in source_files]
    if not files:
        raise InputError("no DICOM source files: the CT was not loaded from DICOM")
    missing = [f for f in files if not f.is_file()]
    if missing:
        raise InputError(f"{missing[0]}: DICOM source file not found")
    try:
        series_uid = str(pydicom.dcmread(files[0], stop_before_pixels=True).SeriesInstanceUID)
    except Exception as exc:  # pydicom raises many types for a bad file
        raise InputError(f"{files[0]}: not a readable DICOM image ({exc})") from None
    folder = Path(os.path.commonpath([str(f.resolve().parent) for f in files]))
    ct = read_volume(folder, series_uid)
    ordered = [Path(f) if f else None for f in ct.metadata.get("files", [])]
    if any(f is None for f in ordered):
        raise InputError(f"{folder}: the series has missing slices; a DICOM-SEG cannot reference them")
    if {f.resolve() for f in ordered} != {f.resolve() for f in files}:
        raise InputError(f"{folder}: holds {len(ordered)} instances of series {series_uid}, "
                         f"{len(files)} were given; export from a folder with only this series")
    return ct, ordered


def _check_result_grid(ct: Volume, report: dict, result_dir: Path) -> None:
    """The result must have been computed on this CT's grid."""
    grid = report.get("input") or {}
    if not grid:
        return
    same = (
        list(grid.get("shape_kji", [])) == list(ct.shape)
        and np.allclose(grid.get("spacing_ijk_mm"), ct.spacing, atol=1e-3)
        and np.allclose(grid.get("origin_lps_mm"), ct.origin, atol=GRID_TOLERANCE_MM)
        and np.allclose(grid.get("direction"), ct.direction, atol=DIRECTION_TOLERANCE)
    )
    if not same:
        raise InputError(f"{result_dir}: the result was computed on another grid than this DICOM series")


def labels_on_grid(seg_path: Path, ct: Volume) -> np.ndarray:
    """The nodule instance map of a GLANCE ``.seg.nrrd`` on ``ct``'s grid (uint16, value = nodule label).

    Slicer may store the labelmap cropped to the segments' extent; it is pasted
    back by its origin (:func:`glance.io.place_on_grid`, which refuses any other
    grid). Label values are mapped to nodule labels through the segment IDs
    (``Nodule_<label>``), so the result does not rely on how Slicer numbered the layer.
    """
    if not seg_path.is_file():
        raise InputError(f"{seg_path}: missing from the result folder")
    seg = read_seg_nrrd(seg_path)
    if len(seg.layers) > 1:
        raise InputError(f"{seg_path}: segments on several layers (overlapping); not a GLANCE result")
    return place_on_grid(seg.instance_map(partial(_nodule_label, seg_path)), ct)


def _nodule_label(seg_path: Path, segment: Segment) -> int:
    """The nodule label of a GLANCE segment, from its ID ``Nodule_<label>``."""
    from glance.scene import segment_id

    prefix = segment_id(0)[:-1]  # "Nodule_"
    number = segment.id[len(prefix):]
    if not segment.id.startswith(prefix) or not number.isdigit():
        raise InputError(f"{seg_path}: segment {segment.id!r} is not a GLANCE nodule")
    return int(number)
