"""LNDb: ``LNDb-XXXX.mhd`` scans, per-radiologist masks and a findings CSV.

Layout of the LNDb challenge release:
- scans ``LNDb-0001.mhd`` (+ ``.raw``) anywhere under the root;
- masks ``LNDb-0001_rad1.mhd``: one per radiologist, voxel value = that reader's
  ``FindingID`` (only nodules >= 3 mm are outlined);
- ``trainNodules.csv``: ``LNDbID,RadID,FindingID,x,y,z,Nodule,Volume,Text``, one row per
  reader finding, centre in world mm (ITK, i.e. LPS), ``Nodule`` 1 for a nodule and 0
  for a non-nodule, ``Volume`` in mm^3; or the merged ``trainNodules_gt.csv``
  (``RadID`` and ``RadFindingID`` list the readers, ``AgrLevel`` their number).

Findings of different readers are the same nodule when their centres are closer
than the larger radius or 3 mm (the rule of the LNDb organisers' merging script).
A merged nodule's mask is the 50 % consensus of its readers' masks, as for LIDC;
non-nodules and nodules under 3 mm are kept as excluded findings without masks.
"""

from __future__ import annotations

import csv
import logging
import math
import re
from collections import defaultdict
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import numpy as np

from glance.errors import InputError
from glance.volume import Volume

from .cases import Annotation, Case, CaseList, resample_labels, volume_loader

log = logging.getLogger(__name__)

CSV_COLUMNS = ("LNDbID", "RadID", "FindingID", "x", "y", "z", "Nodule", "Volume")
MIN_DIAMETER_MM = 3.0
_SCAN = re.compile(r"^LNDb-(\d+)\.mhd$", re.IGNORECASE)
_MASK = re.compile(r"^LNDb-(\d+)_rad(\d+)\.mhd$", re.IGNORECASE)


@dataclass
class _Finding:
    """A nodule or non-nodule as seen by one or more readers."""

    readers: list[tuple[int, int]]  # (RadID, FindingID)
    centres: list[tuple[float, float, float]]
    volumes: list[float]
    nodule: bool

    @property
    def centre(self) -> tuple[float, float, float]:
        return tuple(float(v) for v in np.mean(self.centres, axis=0))

    @property
    def diameter(self) -> float:
        return float(np.mean([equivalent_diameter(v) for v in self.volumes]))


def equivalent_diameter(volume_mm3: float) -> float:
    return 2.0 * (3.0 * max(volume_mm3, 0.0) / (4.0 * math.pi)) ** (1.0 / 3.0)


def read_lndb_csv(path: Path) -> dict[int, list[_Finding]]:
    """{LNDbID: findings}, merged across readers."""
    with open(path, newline="") as fh:
        reader = csv.DictReader(fh)
        cols = reader.fieldnames or []
        missing = [c for c in CSV_COLUMNS if c not in cols]
        if missing:
            raise InputError(f"{path}: missing column(s) {', '.join(missing)}")
        merged_file = "RadFindingID" in cols
        per_scan: dict[int, list[_Finding]] = defaultdict(list)
        for n, row in enumerate(reader, start=2):
            try:
                finding = _row_finding(row, merged_file)
                scan = int(row["LNDbID"])
            except ValueError as exc:
                raise InputError(f"{path}: line {n}: {exc}") from exc
            per_scan[scan].append(finding)
    if merged_file:
        return dict(per_scan)
    return {scan: _merge(findings) for scan, findings in per_scan.items()}


def _row_finding(row: dict, merged_file: bool) -> _Finding:
    centre = (float(row["x"]), float(row["y"]), float(row["z"]))
    if merged_file:
        rads = [int(float(r)) for r in str(row["RadID"]).split(",")]
        finds = [int(float(f)) for f in str(row["RadFindingID"]).split(",")]
        if len(rads) != len(finds):
            raise ValueError("RadID and RadFindingID list different numbers of readers")
        readers = list(zip(rads, finds))
    else:
        readers = [(int(float(row["RadID"])), int(float(row["FindingID"])))]
    nodule = int(float(row["Nodule"])) == 1
    return _Finding(readers, [centre], [float(row["Volume"])], nodule)


def _merge(findings: list[_Finding]) -> list[_Finding]:
    """Greedy merge of single-reader findings, in file order (as the LNDb script does)."""
    merged: list[_Finding] = []
    for f in findings:
        rad = f.readers[0][0]
        radius = equivalent_diameter(f.volumes[0]) / 2
        for m in merged:
            if m.nodule != f.nodule or rad in {r for r, _ in m.readers}:
                continue
            other = max(equivalent_diameter(v) for v in m.volumes) / 2
            if math.dist(f.centres[0], m.centre) < max(radius, other, MIN_DIAMETER_MM):
                m.readers += f.readers
                m.centres += f.centres
                m.volumes += f.volumes
                break
        else:
            merged.append(_Finding(list(f.readers), list(f.centres), list(f.volumes), f.nodule))
    return merged


def lndb_cases(root: str | Path, csv_path: str | Path | None = None, name: str = "lndb") -> CaseList:
    """One lazy case per ``LNDb-XXXX.mhd`` under ``root``; patient id ``LNDb-XXXX``."""
    root = Path(root)
    if not root.is_dir():
        raise InputError(f"{root}: not an LNDb folder")
    if csv_path is None:
        found = sorted(root.rglob("trainNodules.csv")) or sorted(root.rglob("trainNodules_gt.csv"))
        if not found:
            raise InputError(f"{root}: trainNodules.csv not found")
        csv_path = found[0]
    findings = read_lndb_csv(Path(csv_path))
    scans: dict[int, Path] = {}
    masks: dict[int, dict[int, Path]] = defaultdict(dict)
    for p in sorted(root.rglob("*.mhd")):
        if m := _SCAN.match(p.name):
            scans[int(m.group(1))] = p
        elif m := _MASK.match(p.name):
            masks[int(m.group(1))][int(m.group(2))] = p
    if not scans:
        raise InputError(f"{root}: no LNDb-XXXX.mhd scans")
    cases = [_case(lnd, scans[lnd], masks.get(lnd, {}), findings.get(lnd, []), name) for lnd in sorted(scans)]
    log.info("%s: %d scans, %d findings", root, len(cases), sum(len(v) for v in findings.values()))
    return CaseList(name, cases)


def _case(lnd: int, scan: Path, masks: dict[int, Path], findings: list[_Finding], source: str) -> Case:
    case_id = f"LNDb-{lnd:04d}"
    # Masks exist only for outlined nodules; others keep label 0 (centre only).
    annotations = []
    n_outlined = 0
    for f in findings:
        excluded = not f.nodule or f.diameter < MIN_DIAMETER_MM
        label = 0
        if not excluded and any(rad in masks for rad, _ in f.readers):
            n_outlined += 1
            label = n_outlined
        annotations.append(Annotation(f.centre, f.diameter, excluded, label))

    labelled = [(a.label, f) for a, f in zip(annotations, findings) if a.label]
    load_labels = partial(consensus_labels, masks=masks, labelled=labelled) if masks else None
    return Case(case_id, case_id, source, volume_loader(scan), load_labels, annotations,
                metadata={"path": str(scan)})


def consensus_labels(ct: Volume, masks: dict[int, Path], labelled: list[tuple[int, _Finding]]) -> np.ndarray:
    """Instance map: label n where at least half of finding n's readers outlined the voxel."""
    from glance.io import read_label_map

    reader_masks = {rad: resample_labels(read_label_map(path), ct) for rad, path in masks.items()}
    labels = np.zeros(ct.shape, dtype=np.uint16)
    for value, finding in labelled:
        votes = np.zeros(ct.shape, dtype=np.uint8)
        for rad, fid in finding.readers:
            if rad in reader_masks:
                votes += reader_masks[rad] == fid
        labels[(votes >= 0.5 * len(finding.readers)) & (votes > 0)] = value
    return labels
