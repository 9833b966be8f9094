"""``glance models``: the shipped and locally trained model versions."""

from __future__ import annotations

import argparse
import json


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="JSON list on stdout")


def run(args: argparse.Namespace) -> int:
    from glance.registry import list_models, user_models_dir

    entries = list_models()
    if args.json:
        print(json.dumps([{"name": e.name, "version": e.version, "path": str(e.path), "shipped": e.shipped,
                           "metrics": e.card.get("metrics", {})} for e in entries], indent=2))
        return 0
    if not entries:
        print("no models found")
    for e in entries:
        print(f"{e.ref:<28} {'shipped' if e.shipped else 'site   '}  {e.path}")
    print(f"site-trained models are stored in {user_models_dir()}")
    return 0
