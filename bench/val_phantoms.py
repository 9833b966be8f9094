"""Shared set-up of the bench scripts that study a model on its own validation phantoms.

The validation phantoms of the model's own split of ``phantom:N`` are the ones ``glance calibrate``
chose the card's thresholds on; these scripts never touch test data.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


@dataclass
class ValPhantoms:
    options: object  # glance.pipeline.SegmentOptions
    network: tuple  # from glance.pipeline.load_network: (model, card, folder)
    postprocess: object  # glance.postprocess.PostprocessConfig at the card's thresholds (with_flips for --tta)
    cases: list


def arguments(description: str) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=description)
    ap.add_argument("--model", default="glance-small")
    ap.add_argument("--phantoms", type=int, default=128)
    ap.add_argument("--tta", action="store_true", help="flip-averaged maps and the card's with_flips thresholds")
    ap.add_argument("--max-cases", type=int, default=0)
    ap.add_argument("--out", type=Path)
    return ap.parse_args()


def load(args: argparse.Namespace) -> ValPhantoms:
    from glance.infer import InferenceOptions
    from glance.pipeline import SegmentOptions, load_network, with_model_thresholds
    from glance_training.evaluate import model_split_cases

    options = SegmentOptions(model=args.model, inference=InferenceOptions("cpu", 8, tta=args.tta))
    network = load_network(options)
    cfg = with_model_thresholds(options, network[1]).postprocess
    _, cases = model_split_cases(network[1], f"phantom:{args.phantoms}", "val", args.max_cases)
    return ValPhantoms(options, network, cfg, cases)


def result_path(args: argparse.Namespace, name: str) -> Path:
    """``--out``, else bench/results/NAME[-tta].json (bench/results/ is git-ignored), its folder made."""
    out = args.out or ROOT / "bench" / "results" / f"{name}{'-tta' if args.tta else ''}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    return out
