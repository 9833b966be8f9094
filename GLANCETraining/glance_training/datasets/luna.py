"""LUNA16 and Tianchi: ``.mhd``/``.raw`` scans plus nodule centres and diameters in CSV.

Layout (both challenges): scans ``<seriesuid>.mhd`` anywhere under the root
(LUNA16 ships ``subset0`` .. ``subset9``), ``annotations.csv`` with columns
``seriesuid,coordX,coordY,coordZ,diameter_mm`` (world mm, which is ITK's LPS) and,
for LUNA16, ``annotations_excluded.csv`` with the same columns: findings neither
counted as hits nor as false positives (non-nodules, nodules < 3 mm, readers'
disagreements). There are no nodule masks: cases carry centres and diameters only.

Where the CSVs are found when not given explicitly (first match wins): in the scan
folder itself, its ``CSVFILES/`` (some mirrors) or ``evaluationScript/annotations/``
(the official evaluation package, which holds ``annotations_excluded.csv``);
anywhere under the scan folder; then the same three places in its parent, so
``subset3`` finds the CSVs that LUNA16 puts beside ``subset0`` .. ``subset9``.

LUNA16 scans are LIDC-IDRI series, named by SeriesInstanceUID; the patient id is
the series uid unless ``patient_ids`` maps it (use
:func:`glance_training.datasets.crops.lidc_series_patients` so the LIDC patients
held out for testing stay held out here too). Each case's ``metadata["seriesuid"]``
is the uid LUNA16's CSVs and evaluation script use.
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


def read_luna_csv(path: str | Path, value_column: str) -> dict[str, list[tuple[tuple[float, float, float], float]]]:
    """{seriesuid: [((coordX, coordY, coordZ), value)]} from a LUNA16-style CSV (annotations:
    ``diameter_mm``; candidates: ``probability``), checked: one line names a bad file."""
    out: dict[str, list] = defaultdict(list)
    with open(path, newline="") as fh:
        reader = csv.DictReader(fh)
        columns = ("seriesuid", "coordX", "coordY", "coordZ", value_column)
        missing = [c for c in columns if c not in (reader.fieldnames or [])]
        if missing:
            raise InputError(f"{path}: missing column(s) {', '.join(missing)}")
        for n, row in enumerate(reader, start=2):
            try:
                centre = (float(row["coordX"]), float(row["coordY"]), float(row["coordZ"]))
                value = float(row[value_column])
            except (TypeError, ValueError) as exc:
                raise InputError(f"{path}: line {n}: {exc}") from None
            out[row["seriesuid"].strip()].append((centre, value))
    return dict(out)


def read_annotation_csv(path: Path, excluded: bool = False) -> dict[str, list[Annotation]]:
    """{seriesuid: findings} from a LUNA16/Tianchi annotation CSV."""
    # annotations_excluded.csv uses -1 for findings without a size; 0 is this package's
    # "unknown size" (the FROC then uses LUNA16's 10 mm).
    return {uid: [Annotation(centre, max(diameter, 0.0), excluded=excluded) for centre, diameter in rows]
            for uid, rows in read_luna_csv(path, "diameter_mm").items()}


# Folders (relative to a scan folder and to its parent) where distributions put the CSVs.
CSV_PLACES = (".", "CSVFILES", "evaluationScript/annotations")


def find_annotation_csv(root: str | Path, name: str) -> Path | None:
    """``name`` (``annotations.csv``, ...) for the scans under ``root``: see the module docstring."""
    root = Path(root)
    for place in CSV_PLACES:
        if (root / place / name).is_file():
            return root / place / name
    found = sorted(p for p in root.rglob(name) if p.is_file())
    if found:
        return found[0]
    for place in CSV_PLACES:
        if (root.parent / place / name).is_file():
            return root.parent / place / name
    return None


def _explicit_csv(path: str | Path, what: str) -> Path:
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: no such {what} file")
    return path


def luna_cases(
    root: str | Path,
    annotations: str | Path | None = None,
    excluded: str | Path | None = None,
    name: str = "luna16",
    patient_ids: Mapping[str, str] | None = None,
    find_excluded: bool = True,
) -> CaseList:
    """One lazy case per ``.mhd`` scan under ``root``, with its annotated and excluded findings.

    ``annotations`` / ``excluded``: the CSVs, else looked up (module docstring);
    ``find_excluded=False`` skips the lookup of ``annotations_excluded.csv``.
    """
    root = Path(root)
    if not root.is_dir():
        raise InputError(f"{root}: not a {name} folder")
    if annotations:
        ann_path = _explicit_csv(annotations, "annotations")
    else:
        ann_path = find_annotation_csv(root, "annotations.csv")
        if ann_path is None:
            raise InputError(f"{root}: annotations.csv not found (looked in the folder, under it, in its "
                             f"{'/ and '.join(CSV_PLACES[1:])}/ and the same beside the folder); "
                             f"give its path with annotations=PATH")
    if excluded:
        exc_path = _explicit_csv(excluded, "excluded-annotations")
    else:
        exc_path = find_annotation_csv(root, "annotations_excluded.csv") if find_excluded else None
        if exc_path is None and find_excluded:
            log.warning("%s: annotations_excluded.csv not found: candidates on excluded findings will count "
                        "as false positives", root)
    log.info("%s: annotations %s, excluded findings %s", root, ann_path, exc_path or "none")
    positives = read_annotation_csv(ann_path)
    negatives = read_annotation_csv(exc_path, excluded=True) if exc_path else {}
    scans = sorted(root.rglob("*.mhd"))
    if not scans:
        raise InputError(f"{root}: no .mhd scans")
    patient_ids = patient_ids or {}
    cases = []
    for mhd in scans:
        uid = mhd.name[: -len(".mhd")]
        nodules = positives.get(uid, []) + negatives.get(uid, [])
        cases.append(Case(uid, patient_ids.get(uid, uid), name, volume_loader(mhd), None, nodules,
                          metadata={"path": str(mhd), "seriesuid": uid}))
    unmatched = set(positives) - {c.case_id for c in cases}
    if unmatched:
        log.info("%s: %d annotated series have no scan here", ann_path, len(unmatched))
    log.info("%s: %d scans, %d nodules", root, len(cases), sum(len(v) for v in positives.values()))
    return CaseList(name, cases)


def tianchi_cases(root: str | Path, annotations: str | Path | None = None, name: str = "tianchi") -> CaseList:
    """Tianchi (Alibaba lung-nodule challenge): the LUNA16 layout, no excluded list."""
    return luna_cases(root, annotations, name=name, find_excluded=False)

