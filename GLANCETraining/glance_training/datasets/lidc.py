"""LIDC-IDRI: CT series with their reader XML, as cases with 50 % consensus nodule masks.

Each reader XML is one case. Its CT is the DICOM series in the same folder (TCIA
layout ``LIDC-IDRI-XXXX/<study>/<series>/*.dcm`` + ``NNN.xml``), or a volume file
beside it named by the XML's prefix (``LIDC-IDRI-0003_072.xml`` ->
``LIDC-IDRI-0003.nrrd``). Parsing, nodule grouping, the >= 3 mm rule and the
consensus are :func:`glance.io.lidc_xml.read_lidc_nodules`; this module only turns
its nodules into cases. The patient id is the ``LIDC-IDRI-XXXX`` found in the path.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path

import numpy as np

from glance.errors import InputError
from glance.volume import Volume

from .cases import VOLUME_SUFFIXES, Annotation, Case, CaseList, volume_loader

log = logging.getLogger(__name__)

_PATIENT = re.compile(r"LIDC-IDRI-\d{4}")


class _LidcAnnotations:
    """Reads the XML once per loaded CT and serves both the label map and the findings."""

    def __init__(self, xml: Path, clevel: float):
        self.xml = xml
        self.clevel = clevel
        self._cache: tuple[int, list] | None = None

    def _nodules(self, ct: Volume) -> list:
        if self._cache is None or self._cache[0] != id(ct):
            from glance.io.lidc_xml import read_lidc_nodules

            self._cache = (id(ct), read_lidc_nodules(self.xml, ct, clevel=self.clevel))
        return self._cache[1]

    def labels(self, ct: Volume) -> np.ndarray:
        from glance.io.lidc_xml import lidc_label_map

        return lidc_label_map(self._nodules(ct), ct.shape)

    def findings(self, ct: Volume, labels: np.ndarray | None) -> list[Annotation]:
        nodules = self._nodules(ct)
        self._cache = None  # the label map is built; do not keep the masks alive
        return [
            Annotation(tuple(n.centroid_lps), float(n.mean_diameter_mm or 0.0), label=n.index)
            for n in nodules
        ]


def lidc_cases(root: str | Path, name: str = "lidc-idri", clevel: float = 0.5) -> CaseList:
    """One lazy case per LIDC reader XML under ``root`` that has its CT beside it."""
    root = Path(root)
    if not root.exists():
        raise InputError(f"{root}: no such LIDC-IDRI folder")
    xmls = [root] if root.is_file() else sorted(root.rglob("*.xml"))
    cases = []
    for xml in xmls:
        ct_path = _ct_of(xml)
        if ct_path is None:
            log.warning("%s: no CT beside this XML, skipped", xml)
            continue
        patient = _patient_id(xml)
        case_id = f"{patient}/{xml.stem}"
        ann = _LidcAnnotations(xml, clevel)
        cases.append(Case(case_id, patient, name, volume_loader(ct_path), ann.labels, ann.findings,
                          metadata={"xml": str(xml), "ct": str(ct_path)}))
    if not cases:
        raise InputError(f"{root}: no LIDC XML with its CT")
    log.info("%s: %d LIDC cases", root, len(cases))
    return CaseList(name, cases)


def _ct_of(xml: Path) -> Path | None:
    folder = xml.parent
    if any(p.suffix.lower() == ".dcm" for p in folder.iterdir()):
        return folder
    prefix = xml.stem.split("_")[0]
    for suffix in VOLUME_SUFFIXES:
        candidate = folder / f"{prefix}{suffix}"
        if candidate.is_file():
            return candidate
    return None


def _patient_id(xml: Path) -> str:
    for part in reversed(xml.parts):
        if m := _PATIENT.search(part):
            return m.group(0)
    return xml.parent.name

