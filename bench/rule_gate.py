"""What one post-processing rule changes, at the model's thresholds: the rule off, then on.

    python bench/rule_gate.py --rule lungs|neck [--model glance-small] [--phantoms 128]
                              [--held-out-phantoms 8] [--skip-scans]

Rules: ``lungs`` is rule 8 (a finding must lie against the lungs; off = ``--keep-outside-lungs``);
``neck`` is rule 5's neck test (two seeds in one component are one nodule unless a neck parts them;
off = the distance test alone, as before it). The network runs once per case; its maps are
post-processed both ways; the reported nodules are matched to the reference by the FROC's rule
(LUNA16: centre within the nodule's radius; a second report of a found nodule is neither a hit nor a
false positive) and their outlines scored per reference nodule (Dice; a missed nodule scores 0).
Data:
- the validation phantoms of ``phantom:N`` as the model's calibration split them (nodules of every
  attachment, juxta-pleural included);
- with ``--held-out-phantoms N``, also the N unseen phantoms that ``glance evaluate`` and
  ``bench/evaluate_shipped.py`` score (seeds never trained on);
- LIDC-IDRI-0001 and -0003 (always held out), unless ``--skip-scans``.
Writes bench/results/rule_gate-RULE.json (bench/results/ is git-ignored).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
from dataclasses import replace
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"


# rule -> (PostprocessConfig field, value with the rule off, value with it on)
RULES = {"lungs": ("require_lung_contact", False, True), "neck": ("neck_ratio", math.inf, 0.8)}


def count(loaded, labels, nodules) -> dict:
    """Reported nodules, reference nodules, found, false positives (``glance evaluate``'s matching),
    and the sum of the reference nodules' Dice (``glance evaluate``'s per-nodule scoring)."""
    from glance_training.evaluate import reference_findings, reported_outcome
    from glance_training.froc import Candidate
    from glance_training.metrics import score_nodules

    outcome = reported_outcome([Candidate(tuple(n.centre_lps), n.confidence) for n in nodules],
                               *reference_findings(loaded))
    spacing_kji = tuple(reversed(loaded.ct.spacing))
    scores = [] if loaded.labels is None else score_nodules(labels, loaded.labels, spacing_kji)
    return {"reported": outcome["n_reported"], "nodules": outcome["n_nodules"],
            "found": len(outcome["found"]), "false_positives": outcome["n_false_positives"],
            "outlined": len(scores), "dice_sum": float(sum(s.scores.dice for s in scores))}


def _total(rows: list[dict]) -> dict:
    total = {key: sum(r[key] for r in rows) for key in rows[0]} | {"cases": len(rows)}
    total["dice_mean"] = total.pop("dice_sum") / max(total["outlined"], 1)
    return total


def main() -> None:
    from glance.infer import InferenceOptions
    from glance.pipeline import (SegmentOptions, analyse_maps, ct_lungs, load_network, predict_maps,
                                 with_model_thresholds)
    from glance_training.evaluate import evaluation_seed, split_cases, training_seed, training_split

    ap = argparse.ArgumentParser()
    ap.add_argument("--rule", required=True, choices=sorted(RULES))
    ap.add_argument("--model", default="glance-small")
    ap.add_argument("--phantoms", type=int, default=128, help="phantom:N of the model's training data")
    ap.add_argument("--held-out-phantoms", type=int, default=0, help="also the N unseen phantoms of evaluate")
    ap.add_argument("--skip-scans", action="store_true")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    options = SegmentOptions(model=args.model, inference=InferenceOptions("cpu", 8))
    network = load_network(options)
    options = with_model_thresholds(options, network[1])
    split = training_split(network[1])
    seed = training_seed(network[1])
    sources = [(f"phantom:{args.phantoms}", "val", seed)]
    if args.held_out_phantoms:
        sources.append((f"phantom:{args.held_out_phantoms}", "all", evaluation_seed(network[1], "all")))
    if not args.skip_scans:
        sources += [(f"lidc:{DATA / 'LIDC-IDRI-0001'}", "test", seed), (f"lidc:{DATA / 'scans'}", "test", seed)]
    field, off, on = RULES[args.rule]
    result = {"rule": args.rule, "model": str(args.model),
              "thresholds": [options.postprocess.seg_threshold, options.postprocess.det_threshold], "cases": {}}
    for spec_text, which, source_seed in sources:
        _, cases = split_cases(spec_text, which, 0, split, source_seed)
        for case in cases:
            loaded = case.load()
            prob, heat, _, _ = predict_maps(loaded.ct, network, options.inference)
            lungs = ct_lungs(loaded.ct)  # once for both settings (unused where rule 8 is off)
            result["cases"][f"{which}:{loaded.case_id}"] = {
                setting: count(loaded, *analyse_maps(loaded.ct, prob, heat, replace(options.postprocess,
                                                     **{field: value}), lungs=lungs)[:2])
                for setting, value in (("without_rule", off), ("with_rule", on))}
    totals = {}
    for group, prefix in (("validation phantoms", "val:"), ("held-out phantoms", "all:"), ("scans", "test:")):
        rows = [v for k, v in result["cases"].items() if k.startswith(prefix)]
        if rows:
            totals[group] = {setting: _total([r[setting] for r in rows]) for setting in ("without_rule", "with_rule")}
    result["totals"] = totals
    out = ROOT / "bench" / "results"
    out.mkdir(parents=True, exist_ok=True)
    (out / f"rule_gate-{args.rule}.json").write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
