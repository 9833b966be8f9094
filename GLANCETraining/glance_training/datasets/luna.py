"""LUNA16 and Tianchi: ``.mhd``/``.raw`` scans plus nodule centres and diameters in CSV.

Layout (both challenges): scans ``<seriesuid>.mhd`` anywhere under the root
(LUNA16 ships ``subset0`` .. ``subset9``), ``annotations.csv`` with columns
``seriesuid,coordX,coordY,coordZ,diameter_mm`` (world mm, which is ITK's LPS) and,
for LUNA16, ``annotations_excluded.csv`` with the same columns: findings neither
counted as hits nor as false positives (non-nodules, nodules < 3 mm, readers'
disagreements). There are no nodule masks: cases carry centres and diameters only.

LUNA16 scans are LIDC-IDRI series, named by SeriesInstanceUID; the patient id is
the series uid unless ``patient_ids`` maps it (use
:func:`glance_training.datasets.crops.lidc_series_patients` so the LIDC patients
held out for testing stay held out here too).
"""

from __future__ import annotations

import csv
import logging
from collections import defaultdict
from collections.abc import Mapping
from pathlib import Path

from glance.errors import InputError

from .cases import Annotation, Case, CaseList, volume_loader

log = logging.getLogger(__name__)

CSV_COLUMNS = ("seriesuid", "coordX", "coordY", "coordZ", "diameter_mm")


def read_annotation_csv(path: Path, excluded: bool = False) -> dict[str, list[Annotation]]:
    """{seriesuid: findings} from a LUNA16/Tianchi annotation CSV."""
    out: dict[str, list[Annotation]] = defaultdict(list)
    with open(path, newline="") as fh:
        reader = csv.DictReader(fh)
        missing = [c for c in CSV_COLUMNS if c not in (reader.fieldnames or [])]
        if missing:
            raise InputError(f"{path}: missing column(s) {', '.join(missing)}")
        for n, row in enumerate(reader, start=2):
            try:
                centre = (float(row["coordX"]), float(row["coordY"]), float(row["coordZ"]))
                diameter = float(row["diameter_mm"])
            except ValueError as exc:
                raise InputError(f"{path}: line {n}: {exc}") from exc
            # annotations_excluded.csv uses -1 for findings without a size.
            out[row["seriesuid"].strip()].append(Annotation(centre, max(diameter, 0.0), excluded=excluded))
    return dict(out)


def _find_csv(root: Path, name: str) -> Path | None:
    direct = root / name
    if direct.is_file():
        return direct
    found = sorted(root.rglob(name))
    return found[0] if found else None


def luna_cases(
    root: str | Path,
    annotations: str | Path | None = None,
    excluded: str | Path | None = None,
    name: str = "luna16",
    patient_ids: Mapping[str, str] | None = None,
) -> CaseList:
    """One lazy case per ``.mhd`` scan under ``root``, with its annotated and excluded findings."""
    root = Path(root)
    if not root.is_dir():
        raise InputError(f"{root}: not a {name} folder")
    ann_path = Path(annotations) if annotations else _find_csv(root, "annotations.csv")
    if ann_path is None or not ann_path.is_file():
        raise InputError(f"{root}: annotations.csv not found")
    exc_path = Path(excluded) if excluded else _find_csv(root, "annotations_excluded.csv")
    positives = read_annotation_csv(ann_path)
    negatives = read_annotation_csv(exc_path, excluded=True) if exc_path and exc_path.is_file() else {}
    scans = sorted(root.rglob("*.mhd"))
    if not scans:
        raise InputError(f"{root}: no .mhd scans")
    patient_ids = patient_ids or {}
    cases = []
    for mhd in scans:
        uid = mhd.name[: -len(".mhd")]
        nodules = positives.get(uid, []) + negatives.get(uid, [])
        cases.append(Case(uid, patient_ids.get(uid, uid), name, volume_loader(mhd), None, nodules,
                          metadata={"path": str(mhd)}))
    unmatched = set(positives) - {c.case_id for c in cases}
    if unmatched:
        log.warning("%s: %d annotated series have no scan here", ann_path, len(unmatched))
    log.info("%s: %d scans, %d nodules", root, len(cases), sum(len(v) for v in positives.values()))
    return CaseList(name, cases)


def tianchi_cases(root: str | Path, annotations: str | Path | None = None, name: str = "tianchi") -> CaseList:
    """Tianchi (Alibaba lung-nodule challenge): the LUNA16 layout, no excluded list."""
    return luna_cases(root, annotations, excluded=None, name=name)

