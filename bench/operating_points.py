"""What the detection threshold buys and costs, on the model's validation phantoms.

    python bench/operating_points.py [--model glance-small] [--phantoms 128] [--tta] [--max-cases N]
                                     [--out bench/results/operating_points[-tta].json]

``glance segment`` reports the nodules whose centre heatmap peaks at or above the detection
threshold; a nodule it does not report counts as Dice 0. This runs the pipeline on the validation
phantoms of the model's own split (``phantom:N``, as ``glance calibrate`` uses them; never test data)
at the card's segmentation threshold and outline fraction (``--tta``: flip-averaged maps and the
card's ``with_flips`` entry) and, for each detection threshold of the calibration grid, prints the
mean per-nodule Dice (misses count 0), the share of nodules found and the false positives per scan
(reported nodules whose centre hits no reference nodule by the LUNA16 rule). Writes the JSON
(bench/results/ is git-ignored).
"""

from __future__ import annotations

import json
import logging
from dataclasses import replace

import numpy as np
from val_phantoms import arguments, load, result_path


def main() -> None:
    from glance.pipeline import ct_lungs, nodule_labels, predict_maps
    from glance_training.calibrate import DET_GRID
    from glance_training.evaluate import froc_inputs
    from glance_training.froc import match_scan
    from glance_training.metrics import score_nodules

    args = arguments(__doc__.splitlines()[0])
    logging.basicConfig(level=logging.WARNING)
    val = load(args)
    card_cfg, cases = val.postprocess, val.cases
    grid = [t for t in DET_GRID if t <= 0.6]
    dice = {t: [] for t in grid}
    fps = {t: [] for t in grid}
    for case in cases:
        loaded = case.load()
        prob, heat, _, _ = predict_maps(loaded.ct, val.network, val.options.inference)
        lungs = ct_lungs(loaded.ct)
        spacing_kji = tuple(reversed(loaded.ct.spacing))
        # The FROC candidates come from the low froc_det_threshold whatever the detection threshold: once.
        fp_scores = np.asarray(match_scan(*froc_inputs(loaded, prob, heat, card_cfg, "detection_score",
                                                       lungs)).fp_scores)
        for t in grid:
            pred = nodule_labels(loaded.ct, prob, heat, replace(card_cfg, det_threshold=t), lungs)
            dice[t] += [s.scores.dice for s in score_nodules(pred, loaded.labels, spacing_kji)]
            fps[t].append(int(np.sum(fp_scores >= t)))
    result = {"model": args.model, "tta": args.tta, "split": "val", "scans": len(cases),
              "segmentation": card_cfg.seg_threshold, "outline_fraction": card_cfg.outline_fraction,
              "card_detection": card_cfg.det_threshold, "by_detection_threshold": {}}
    for t in grid:
        d = np.asarray(dice[t])
        result["by_detection_threshold"][f"{t:g}"] = {
            "dice": float(d.mean()), "found": float(np.mean(d > 0)), "n_nodules": int(d.size),
            "fp_per_scan": float(np.mean(fps[t]))}
    out = result_path(args, "operating_points")
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
