"""``glance average``: one model from the mean of the weights of several runs (``glance_training.average``)."""

from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("models", nargs="+", metavar="MODEL",
                        help="two or more models (name, NAME@VERSION or folder) with the same network and "
                             "the same patient split")
    parser.add_argument("--out", required=True, help="new folder for the averaged model")
    parser.add_argument("--name", help="its name (default: the first model's)")
    parser.add_argument("--version", default="0.0.0", help="its version (default 0.0.0)")


def run(args: argparse.Namespace) -> int:
    from glance_training.average import average_models

    folder = average_models(args.models, args.out, args.name, args.version)
    print(f"averaged {len(args.models)} models into {folder}; calibrate it before use: "
          f"glance calibrate --model {folder} --data ... --write")
    return 0
