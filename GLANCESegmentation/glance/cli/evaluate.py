"""``glance evaluate``: score a model on labelled data (segmentation per nodule, detection FROC/CPM).

Writes evaluation.json, nodules.csv, froc.png and, for full scans, the FROC's candidates
in LUNA16's format (candidates.csv + seriesuids.csv) for the official LUNA16 script."""

from __future__ import annotations

import argparse
import json

from glance.cli.segment import add_threshold_arguments, add_tta_argument, threshold_arguments


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from glance_training.evaluate import SPLIT_CHOICES  # light: numpy and the standard library

    parser.add_argument("--model", help="model name, NAME@VERSION or folder (default: glance-small)")
    parser.add_argument("--data", action="append", default=[], metavar="KIND:PATH",
                        help="labelled data, repeatable: KIND:PATH[,NAME=VALUE ...] with the kinds of glance "
                             "train (luna:DIR,annotations=CSV,excluded=CSV names LUNA16's CSVs when they are "
                             "not in DIR, beside it or in CSVFILES/)")
    parser.add_argument("--cases", action="append", default=[], metavar="DIR",
                        help="reviewed cases exported from Slicer (same as --data local:DIR)")
    parser.add_argument("--split", default="test", choices=SPLIT_CHOICES,
                        help="patients to score, by the model's training split (default test; train and all "
                             "include patients it trained on: for telling under- from over-fitting only)")
    parser.add_argument("--out", default="glance-evaluation", help="report folder")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--batch", type=int, default=8)
    add_tta_argument(parser)
    add_threshold_arguments(parser)
    parser.add_argument("--bootstrap", type=int, default=1000, help="bootstrap resamples for the CPM interval")
    parser.add_argument("--max-cases", type=int, default=0, help="score at most this many cases per source")
    parser.add_argument("--progress-lines", action="store_true")


def run(args: argparse.Namespace) -> int:
    from glance_training.evaluate import EvaluateConfig, evaluate

    thresholds = threshold_arguments(args)
    cfg = EvaluateConfig(args.model, args.data + [f"local:{d}" for d in args.cases], args.split, args.out,
                         args.device, args.batch, thresholds["seg_threshold"], thresholds["det_threshold"],
                         args.bootstrap, args.max_cases, args.tta, outline_fraction=thresholds["outline_fraction"])
    emit = (lambda line: print(line, flush=True)) if args.progress_lines else None
    report = evaluate(cfg, emit)
    summary = {k: report[k] for k in ("model", "n_nodules_scored") if k in report}
    if "segmentation_per_nodule" in report:
        summary["dice_per_nodule"] = report["segmentation_per_nodule"]["dice"]
        summary["dice_per_found_nodule"] = report["segmentation_per_found_nodule"]["dice"]
        summary["n_nodules_missed"] = report["n_nodules_missed"]
        summary["by_size"] = report["by_size"]
    if "detection" in report:
        d = report["detection"]
        summary["cpm"] = d["cpm"]
        summary["cpm_ci"] = d["cpm_ci"]
        summary["sensitivity_at_fp"] = {p["fp_per_scan"]: p["sensitivity"] for p in d["operating_points"]}
        summary["at_default_thresholds"] = {k: v for k, v in report["at_default_thresholds"].items() if k != "scans"}
    print(json.dumps(summary, indent=2))
    print(f"report in {args.out}/evaluation.json")
    if "detection" in report:
        print(f"FROC candidates (LUNA16 format) in {args.out}/candidates.csv, scans in {args.out}/seriesuids.csv")
    return 0
