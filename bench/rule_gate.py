"""What post-processing rule 8 (a finding must lie against the lungs) changes, at the model's thresholds.

    python bench/lung_gate.py [--model glance-small] [--phantoms 128] [--held-out-phantoms 8] [--skip-scans]

The network runs once per case; its maps are post-processed with the rule and without it
(``--keep-outside-lungs``), and the reported nodules are matched to the reference by the FROC's
rule (LUNA16: centre within the nodule's radius; a second report of a found nodule is neither a
hit nor a false positive). Data:
- the validation phantoms of ``phantom:N`` as the model's calibration split them (nodules of every
  attachment, juxta-pleural included: the rule must not lose one);
- with ``--held-out-phantoms N``, also the N unseen phantoms that ``glance evaluate`` and
  ``bench/evaluate_shipped.py`` score (seeds never trained on);
- LIDC-IDRI-0001 and -0003 (always held out), unless ``--skip-scans``.
Writes bench/results/lung_gate.json (bench/results/ is git-ignored).
"""

from __future__ import annotations

import argparse
import json
import logging
from dataclasses import replace
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"


def count(loaded, nodules) -> dict:
    """Reported nodules, reference nodules, found, false positives (``glance evaluate``'s matching)."""
    from glance_training.evaluate import reference_findings, reported_outcome
    from glance_training.froc import Candidate

    outcome = reported_outcome([Candidate(tuple(n.centre_lps), n.confidence) for n in nodules],
                               *reference_findings(loaded))
    return {"reported": outcome["n_reported"], "nodules": outcome["n_nodules"],
            "found": len(outcome["found"]), "false_positives": outcome["n_false_positives"]}


def main() -> None:
    from glance.infer import InferenceOptions
    from glance.pipeline import SegmentOptions, analyse_maps, load_network, predict_maps, with_model_thresholds
    from glance_training.evaluate import EVALUATION_SEED_OFFSET, split_cases, training_split

    ap = argparse.ArgumentParser()
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
    seed = int(((network[1].training or {}).get("config") or {}).get("seed", 0))
    sources = [(f"phantom:{args.phantoms}", "val", seed)]
    if args.held_out_phantoms:
        sources.append((f"phantom:{args.held_out_phantoms}", "all", seed + EVALUATION_SEED_OFFSET))
    if not args.skip_scans:
        sources += [(f"lidc:{DATA / 'LIDC-IDRI-0001'}", "test", seed), (f"lidc:{DATA / 'scans'}", "test", seed)]
    result = {"model": str(args.model), "thresholds": [options.postprocess.seg_threshold,
                                                       options.postprocess.det_threshold], "cases": {}}
    for spec_text, which, source_seed in sources:
        _, cases = split_cases(spec_text, which, 0, split, source_seed)
        for case in cases:
            loaded = case.load()
            prob, heat, _, _ = predict_maps(loaded.ct, network, options.inference)
            result["cases"][f"{which}:{loaded.case_id}"] = {
                rule: count(loaded, analyse_maps(loaded.ct, prob, heat,
                                                 replace(options.postprocess, require_lung_contact=on))[1])
                for rule, on in (("without_rule", False), ("with_rule", True))}
    totals = {}
    for group, prefix in (("validation phantoms", "val:"), ("held-out phantoms", "all:"), ("scans", "test:")):
        rows = [v for k, v in result["cases"].items() if k.startswith(prefix)]
        if rows:
            totals[group] = {rule: {key: sum(r[rule][key] for r in rows) for key in rows[0][rule]} | {"cases": len(rows)}
                             for rule in ("without_rule", "with_rule")}
    result["totals"] = totals
    out = ROOT / "bench" / "results"
    out.mkdir(parents=True, exist_ok=True)
    (out / "lung_gate.json").write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
