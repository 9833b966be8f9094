"""Why each phantom nodule is missed or poorly outlined: the network or the post-processing.

    python bench/miss_causes.py [--model glance-small] [--phantoms 128] [--split val|train|all]
                                [--max-cases N] [--out bench/results/miss_causes.json]

For each reference nodule of the phantoms (the model's own split of ``phantom:N`` for ``val`` and
``train``; the unseen phantoms of ``glance evaluate`` for ``all``), at the model's thresholds:
- ``found``: a reported nodule overlaps it (``glance evaluate``'s per-nodule Dice > 0);
- otherwise the first cause that explains the miss:
  ``no_segmentation`` (no voxel of the nodule reaches the segmentation threshold),
  ``no_centre`` (no heatmap value inside the nodule reaches the detection threshold),
  ``rule_lungs`` / ``rule_size`` / ``rule_neck`` (found once that rule is switched off, in this order),
  ``post_other`` (segmented and centred, but dropped by rule 4's support test or merged away).
Every nodule records the highest probability and heatmap value inside it (how far below the
thresholds a miss lies). For found nodules it records Dice and the outline's volume ratio (reported / reference), so a
threshold that outlines too much or too little shows as a ratio away from 1.
Rows are grouped by nodule kind and size. Writes the JSON (bench/results/ is git-ignored).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
from collections import Counter, defaultdict
from dataclasses import replace
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]

# (cause, PostprocessConfig change that switches the rule off), tried in order
RULES_OFF = (("rule_lungs", {"require_lung_contact": False}), ("rule_size", {"min_diameter_mm": 0.0}),
             ("rule_neck", {"neck_ratio": math.inf}))


def _overlapping_label(labels: np.ndarray, gt: np.ndarray) -> int:
    hits = labels[gt]
    hits = hits[hits > 0]
    return int(np.bincount(hits).argmax()) if hits.size else 0


def _miss_cause(ct, prob, heat, gt_mask, cfg, lungs) -> str:
    from glance.pipeline import nodule_labels
    from glance.postprocess import raw_threshold

    if prob[gt_mask].max() < raw_threshold(cfg.seg_threshold, prob.dtype):
        return "no_segmentation"
    if heat[gt_mask].max() < raw_threshold(cfg.det_threshold, heat.dtype):
        return "no_centre"
    changes: dict = {}
    for cause, change in RULES_OFF:
        changes |= change
        if _overlapping_label(nodule_labels(ct, prob, heat, replace(cfg, **changes), lungs=lungs), gt_mask):
            return cause
    return "post_other"


def _summary(rows: list[dict]) -> dict:
    found = [r for r in rows if r["cause"] == "found"]
    return {"nodules": len(rows), "found": len(found),
            "dice_all": float(np.mean([r["dice"] for r in rows])) if rows else None,
            "dice_found": float(np.mean([r["dice"] for r in found])) if found else None,
            "volume_ratio_median": float(np.median([r["volume_ratio"] for r in found])) if found else None,
            "causes": dict(Counter(r["cause"] for r in rows if r["cause"] != "found"))}


def main() -> None:
    from glance.infer import InferenceOptions
    from glance.pipeline import SegmentOptions, ct_lungs, load_network, nodule_labels, predict_maps
    from glance.pipeline import with_model_thresholds
    from glance.postprocess import _unit  # a map's values as probabilities, whatever its encoding
    from glance_training.evaluate import _size_group, model_split_cases
    from glance_training.metrics import score_nodules

    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="glance-small")
    ap.add_argument("--phantoms", type=int, default=128)
    ap.add_argument("--split", default="val", choices=("val", "train", "all"))
    ap.add_argument("--max-cases", type=int, default=0)
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "miss_causes.json")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    options = SegmentOptions(model=args.model, inference=InferenceOptions("cpu", 8))
    network = load_network(options)
    options = with_model_thresholds(options, network[1])
    cfg = options.postprocess
    _, cases = model_split_cases(network[1], f"phantom:{args.phantoms}", args.split, args.max_cases)
    rows = []
    for case in cases:
        loaded = case.load()
        prob, heat, _, _ = predict_maps(loaded.ct, network, options.inference)
        lungs = ct_lungs(loaded.ct)
        labels = nodule_labels(loaded.ct, prob, heat, cfg, lungs=lungs)
        spacing_kji = tuple(reversed(loaded.ct.spacing))
        scores = {s.gt_label: s for s in score_nodules(labels, loaded.labels, spacing_kji)}
        for nodule in loaded.nodules:
            gt_mask = loaded.labels == nodule.label
            score = scores[nodule.label]
            found = score.pred_label > 0
            rows.append({"case": loaded.case_id, "label": nodule.label, "kind": nodule.kind,
                         "diameter_mm": nodule.diameter_mm, "dice": score.scores.dice,
                         "volume_ratio": float((labels == score.pred_label).sum() / gt_mask.sum()) if found else 0.0,
                         "prob_max": float(_unit(prob[gt_mask]).max()),
                         "heat_max": float(_unit(heat[gt_mask]).max()),
                         "cause": "found" if found else _miss_cause(loaded.ct, prob, heat, gt_mask, cfg, lungs)})
        logging.getLogger("miss_causes").warning("%s: %d nodules", loaded.case_id, len(loaded.nodules))
    groups: dict[str, list[dict]] = defaultdict(list)
    for r in rows:
        groups[f"kind: {r['kind']}"].append(r)
        groups[f"size: {_size_group(r['diameter_mm'])}"].append(r)
    result = {"model": args.model, "split": args.split, "thresholds": [cfg.seg_threshold, cfg.det_threshold],
              "all": _summary(rows), "groups": {k: _summary(v) for k, v in sorted(groups.items())}, "nodules": rows}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps({k: v for k, v in result.items() if k != "nodules"}, indent=1))


if __name__ == "__main__":
    main()
