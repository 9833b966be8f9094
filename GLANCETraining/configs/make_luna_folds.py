"""Write the 10 training configs of the LUNA16 10-fold protocol (see docs/training.md).

Fold k trains on the nine other subsets (``luna:<root>/subsetN``, N != k) plus the LIDC-IDRI
series with their nodule masks (``lidc:``), and is evaluated on subset k with
``glance evaluate --split all``. LUNA16 has nodule centres only; the LIDC masks supervise the
segmentation head, without which the pipeline keeps no detection (a candidate needs
segmentation support). The split is patient-level: every patient with a scan in subset k is
in ``held_out``, both under its LIDC patient id (its LIDC series) and under the series uids of
its scans in other subsets (a LUNA16 case's patient id is its series uid), so no scan of a
fold's test patients is trained on. ``split`` is (1, 0, 0): everything else trains; there is
no validation subset (LUNA16 has no masks to score, and the protocol selects no epoch: the
model of the last epoch is evaluated).

``luna:<root>/subsetN`` finds ``annotations.csv`` and ``annotations_excluded.csv`` beside the subsets
(in <root>, <root>/CSVFILES or <root>/evaluationScript/annotations), as LUNA16 ships them.

    python GLANCETraining/configs/make_luna_folds.py --luna /data/LUNA16 --lidc /data/LIDC-IDRI \\
        [--base GLANCETraining/configs/lidc-full-gpu.json] [--out runs/luna16-folds]
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import sys
from pathlib import Path

log = logging.getLogger("make_luna_folds")

N_SUBSETS = 10
BASE = Path(__file__).with_name("lidc-full-gpu.json")
LIDC_WEIGHT = 9.0  # the LIDC series (masks) weigh as much as the nine LUNA16 subsets together
_SUBSET = re.compile(r"subset(\d+)$")


def luna_scans(root: Path) -> dict[int, list[str]]:
    """{subset number: series uids of its .mhd scans}, for subset0 .. subset9 under ``root``."""
    scans = {}
    for folder in sorted(Path(root).iterdir()):
        m = _SUBSET.match(folder.name)
        if m and folder.is_dir():
            scans[int(m.group(1))] = sorted(p.name[: -len(".mhd")] for p in folder.glob("*.mhd"))
    if sorted(scans) != list(range(N_SUBSETS)):
        raise SystemExit(f"{root}: expected folders subset0 .. subset{N_SUBSETS - 1}, found {sorted(scans)}")
    return scans


def series_patients_from_dicom(root: Path) -> dict[str, str]:
    """{SeriesInstanceUID: PatientID} from the first DICOM file of every series folder under ``root``."""
    import pydicom

    out = {}
    for folder, _, files in os.walk(root):
        first = next((f for f in sorted(files) if f.lower().endswith(".dcm")), None)
        if first:
            ds = pydicom.dcmread(Path(folder) / first, stop_before_pixels=True,
                                 specific_tags=["SeriesInstanceUID", "PatientID"])
            out[str(ds.SeriesInstanceUID)] = str(ds.PatientID)
    return out


def held_out_for(fold: int, scans: dict[int, list[str]], series_patients: dict[str, str],
                 reserved: tuple[str, ...] = ()) -> list[str]:
    """The patients of subset ``fold`` (and ``reserved`` ones): LIDC ids plus the uids of all their scans."""
    patients = set(reserved)
    unmapped = []
    for uid in scans[fold]:
        if uid in series_patients:
            patients.add(series_patients[uid])
        else:
            unmapped.append(uid)
    if unmapped:
        log.warning("fold %d: %d scans have no known patient; only those scans are held out", fold, len(unmapped))
    uids = {uid for subset in scans.values() for uid in subset if series_patients.get(uid) in patients}
    return sorted(patients) + sorted(uids | set(unmapped))


def fold_config(base: dict, fold: int, luna_root: str, lidc_root: str, held_out: list[str]) -> dict:
    """The base config trained on every subset but ``fold``, with ``fold``'s patients held out."""
    data = [f"luna:{luna_root}/subset{n}" for n in range(N_SUBSETS) if n != fold]
    data.append(f"lidc:{lidc_root}@{LIDC_WEIGHT:g}")
    return {**base, "name": f"glance-luna16-fold{fold}", "data": data, "split": [1.0, 0.0, 0.0],
            "held_out": held_out}


def fold_configs(base: dict, luna_root: str, lidc_root: str, scans: dict[int, list[str]],
                 series_patients: dict[str, str]) -> list[dict]:
    reserved = tuple(base.get("held_out", ()))
    return [fold_config(base, k, luna_root, lidc_root, held_out_for(k, scans, series_patients, reserved))
            for k in range(N_SUBSETS)]


def write_configs(configs: list[dict], out: Path) -> list[Path]:
    """fold0.json .. fold9.json in ``out``, each checked by TrainConfig.from_json."""
    from glance.io import atomic_write_text
    from glance_training.train import TrainConfig

    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for k, cfg in enumerate(configs):
        path = out / f"fold{k}.json"
        atomic_write_text(path, json.dumps(cfg, indent=2) + "\n")
        TrainConfig.from_json(path)
        paths.append(path)
    return paths


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--luna", type=Path, default=Path("/data/LUNA16"), help="folder holding subset0 .. subset9")
    ap.add_argument("--lidc", type=Path, default=Path("/data/LIDC-IDRI"),
                    help="LIDC-IDRI DICOM + XML (training masks; its headers map series to patients)")
    ap.add_argument("--base", type=Path, default=BASE, help="hyper-parameters (default lidc-full-gpu.json)")
    ap.add_argument("--out", type=Path, default=Path("runs/luna16-folds"))
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    base = json.loads(args.base.read_text(encoding="utf-8"))
    scans = luna_scans(args.luna)
    series_patients = series_patients_from_dicom(args.lidc)
    log.info("%d LUNA16 scans, %d LIDC series", sum(map(len, scans.values())), len(series_patients))
    # Absolute paths: the configs are used from other folders (symlinks kept as the user named them).
    luna, lidc = str(args.luna.absolute()), str(args.lidc.absolute())
    paths = write_configs(fold_configs(base, luna, lidc, scans, series_patients), args.out)
    for path in paths:
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
