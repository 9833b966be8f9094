"""Held-out accuracy of a model against the targets of the weights issue, from the real data at hand.

    python bench/evaluate_shipped.py [--model glance-small] [--phantoms 8] [--update-card]

Three evaluations, none on a patient the model trained on (the split comes from the model card):
1. segmentation on the real LIDC max-slice crops of the test split (target: Dice >= 0.80 per nodule);
2. detection and segmentation on the two real full scans (LIDC-IDRI-0001, -0003: always held out;
   target: every nodule marked by >= 3 of 4 readers found at <= 1 false positive per scan);
3. phantoms generated from seeds the training never used (target: Dice >= 0.85, sensitivity >= 0.95
   at <= 1 FP per scan).
Reports go to bench/results/evaluation/<name>/; --update-card writes the numbers into the model card.
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"


def _sens_at(detection: dict, fp: float) -> float:
    points = {p["fp_per_scan"]: p["sensitivity"] for p in detection["operating_points"]}
    return points[fp]


SCANS = {"LIDC-IDRI-0001": (DATA / "LIDC-IDRI-0001", DATA / "LIDC-IDRI-0001" / "LIDC-IDRI-0001_annotations.json"),
         "LIDC-IDRI-0003": (DATA / "scans" / "LIDC-IDRI-0003.nrrd", DATA / "scans" / "LIDC-IDRI-0003_annotations.json")}


def reader_nodules_found(folder: Path) -> list[dict]:
    """What a radiologist sees at the default thresholds (the card's calibrated ones): each reference nodule found or not (its
    centre within its radius of a reported nodule centre), and the false positives per scan."""
    import numpy as np

    from glance.io import read_volume
    from glance.pipeline import SegmentOptions, load_network, segment_volume

    options = SegmentOptions(model=str(folder))
    network = load_network(options)
    rows = []
    for patient, (ct_path, ann_path) in SCANS.items():
        refs = json.loads(ann_path.read_text())["nodules_all_clusters"]
        found = segment_volume(read_volume(ct_path), network, options).nodules
        centres = np.array([n.centre_lps for n in found]).reshape(-1, 3)
        used = set()
        for ref in refs:
            d = np.linalg.norm(centres - np.asarray(ref["centroid_lps_mm"]), axis=1) if len(centres) else []
            hits = [i for i, v in enumerate(d) if v < ref["consensus50_equiv_sphere_diam_mm"] / 2]
            used.update(hits)
            rows.append({"scan": patient, "nodule": ref["nodule_index"], "readers": ref["n_readers"],
                         "diameter_mm": ref["mean_reader_diameter_mm"], "found": bool(hits)})
        rows.append({"scan": patient, "false_positives": len(found) - len(used)})
    return rows


def main() -> None:
    from glance.model.weights import read_card
    from glance.registry import resolve_model
    from glance_training.evaluate import EvaluateConfig, evaluate

    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="glance-small")
    ap.add_argument("--phantoms", type=int, default=8)
    ap.add_argument("--max-crops", type=int, default=0)
    ap.add_argument("--update-card", action="store_true")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    folder = resolve_model(args.model)
    out = ROOT / "bench" / "results" / "evaluation" / folder.name
    runs = {
        "crops": EvaluateConfig(str(folder), [f"maxslice:{DATA / 'lidc-maxslice-crops'}"], "test",
                                str(out / "crops"), max_cases=args.max_crops),
        "full_scans": EvaluateConfig(str(folder), [f"lidc:{DATA / 'LIDC-IDRI-0001'}", f"lidc:{DATA / 'scans'}"],
                                     "test", str(out / "full_scans")),
        # Phantom seeds are offset from the training seed inside evaluate(): never trained on.
        "phantoms": EvaluateConfig(str(folder), [f"phantom:{args.phantoms}"], "all", str(out / "phantoms")),
    }
    results = {name: evaluate(cfg) for name, cfg in runs.items()}
    at_default = reader_nodules_found(folder)
    summary = {
        "thresholds": results["full_scans"]["thresholds"],
        "crops_dice_per_nodule": results["crops"]["segmentation_per_nodule"]["dice"],
        "crops_n": results["crops"]["n_nodules_scored"],
        "full_scans": {
            "detection_cpm": results["full_scans"]["detection"]["cpm"],
            "sensitivity_at_1fp": _sens_at(results["full_scans"]["detection"], 1.0),
            "n_nodules": results["full_scans"]["detection"]["n_nodules"],
            "n_detected_any_fp": results["full_scans"]["detection"]["n_detected"],
            "dice_per_nodule": results["full_scans"].get("segmentation_per_nodule", {}).get("dice"),
        },
        "phantoms": {
            "dice_per_nodule": results["phantoms"]["segmentation_per_nodule"]["dice"],
            "sensitivity_at_1fp": _sens_at(results["phantoms"]["detection"], 1.0),
            "cpm": results["phantoms"]["detection"]["cpm"],
            "n_nodules": results["phantoms"]["detection"]["n_nodules"],
            "n_scans": results["phantoms"]["detection"]["n_scans"],
        },
        "full_scans_at_default_thresholds": at_default,
        "command": "python bench/evaluate_shipped.py " + " ".join(
            f"--{k.replace('_', '-')}" + ("" if v is True else f" {v}")
            for k, v in vars(args).items() if v not in (False, 0, None)),
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    print(json.dumps(summary, indent=2))
    if args.update_card:
        from glance.io import atomic_write_text

        card = read_card(folder)
        card.metrics.update({"held_out": summary})
        atomic_write_text(folder / "card.json", card.to_json())


if __name__ == "__main__":
    main()
