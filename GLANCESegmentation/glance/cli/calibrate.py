"""``glance calibrate``: choose a model's default thresholds on its validation patients."""

from __future__ import annotations

import argparse
import json


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from glance.cli.segment import add_tta_argument

    parser.add_argument("--model", help="model name, NAME@VERSION or folder (default: glance-small)")
    parser.add_argument("--data", action="append", default=[], metavar="KIND:PATH",
                        help="labelled data, repeatable (same kinds as glance train); its validation "
                             "patients are used")
    parser.add_argument("--split", default="val", choices=["val", "all"],
                        help="val: the model's validation patients (default); all: every case (for data "
                             "the model never trained on)")
    parser.add_argument("--target-sensitivity", type=float, default=0.9,
                        help="detection threshold: the highest keeping this share of the nodules found at the "
                             "lowest one")
    parser.add_argument("--max-fp-per-scan", type=float, default=1.0,
                        help="then raise the detection threshold until the validation volumes average at most "
                             "this many false positives per scan (default 1)")
    parser.add_argument("--min-outline-gain", type=float, default=0.0,
                        help="keep rule 9 off unless its best outline fraction raises the validation Dice by at "
                             "least this (default 0: any gain)")
    parser.add_argument("--write", action="store_true", help="store the thresholds in the model's card")
    parser.add_argument("--out", help="also write the full calibration curves to this JSON file")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--max-cases", type=int, default=0, help="use at most this many cases per source")
    add_tta_argument(parser, more="; --write stores the result as the card's with_flips thresholds")


def run(args: argparse.Namespace) -> int:
    from glance.io import atomic_write_text
    from glance.registry import resolve_model
    from glance_training.calibrate import CalibrationConfig, calibrate, write_to_card

    cfg = CalibrationConfig(args.model, args.data, args.split, args.target_sensitivity, args.max_fp_per_scan,
                            device=args.device, batch=args.batch, max_cases=args.max_cases, tta=args.tta,
                            min_outline_gain=args.min_outline_gain)
    result = calibrate(cfg)
    if args.out:
        atomic_write_text(args.out, json.dumps(result.to_dict(), indent=2) + "\n")
    if args.write:
        path = write_to_card(resolve_model(args.model), result)
        print(f"thresholds written to {path}")
    print(json.dumps(result.card_entry(), indent=2))
    return 0
