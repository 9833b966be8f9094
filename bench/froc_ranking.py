"""How the candidates' ranking score changes the FROC, on the model's validation phantoms.

    python bench/froc_ranking.py [--model glance-small] [--phantoms 128] [--tta] [--max-cases N]
                                 [--out bench/results/froc_ranking[-tta].json]

Which nodules ``glance segment`` reports depends only on its thresholds; the FROC (and CPM) depends on
how the candidates are ranked. This scores the same candidates of the validation phantoms of the
model's own split (``phantom:N``, as ``glance calibrate`` uses them; never test data) under each
ranking below, at the model card's thresholds (``--tta``: flip-averaged maps and the card's
``with_flips`` thresholds), and prints CPM with its bootstrap 95 % interval and the sensitivity at
each FP rate. Writes the JSON (bench/results/ is git-ignored).
"""

from __future__ import annotations

import json
import logging

from val_phantoms import arguments, load, result_path

RANKINGS = {
    "heatmap peak": lambda c: c.detection_score,
    "heatmap peak x mean probability": lambda c: c.detection_score * c.mean_probability,
    "mean probability": lambda c: c.mean_probability,
}


def main() -> None:
    from glance.pipeline import ct_lungs, predict_maps
    from glance_training.evaluate import froc_candidates, reference_findings, scored_candidates
    from glance_training.froc import evaluate_froc

    args = arguments(__doc__.splitlines()[0])
    logging.basicConfig(level=logging.WARNING)
    val = load(args)
    cfg, cases = val.postprocess, val.cases
    candidates: dict[str, dict] = {name: {} for name in RANKINGS}
    nodules, excluded = {}, {}
    for case in cases:
        loaded = case.load()
        prob, heat, _, _ = predict_maps(loaded.ct, val.network, val.options.inference)
        found = froc_candidates(loaded, prob, heat, cfg, ct_lungs(loaded.ct))  # once; then each ranking
        nodules[loaded.case_id], excluded[loaded.case_id] = reference_findings(loaded)
        for name, rank in RANKINGS.items():
            candidates[name][loaded.case_id] = scored_candidates(found, rank)
    scans = sorted(nodules)
    result = {"model": args.model, "tta": args.tta, "split": "val", "scans": len(scans),
              "thresholds": [cfg.seg_threshold, cfg.det_threshold], "rankings": {}}
    for name in RANKINGS:
        froc = evaluate_froc(candidates[name], nodules, excluded, scans=scans)
        result["rankings"][name] = {
            "cpm": froc.cpm, "cpm_ci": froc.cpm_ci, "n_nodules": froc.n_nodules,
            "sensitivity": {f"{p.fp_per_scan:g}": p.sensitivity for p in froc.operating_points}}
    out = result_path(args, "froc_ranking")
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
