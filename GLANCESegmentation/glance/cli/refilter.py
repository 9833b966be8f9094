"""``glance refilter``: re-threshold a finished result from its saved maps, without the network."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from glance.cli.segment import (add_lung_argument, add_threshold_arguments, postprocess_config, print_outside_lungs,
                                threshold_arguments)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("result", help="a folder written by 'glance segment'")
    add_threshold_arguments(parser)
    add_lung_argument(parser)


def run(args: argparse.Namespace) -> int:
    from dataclasses import fields

    from glance.errors import InputError
    from glance.pipeline import REPORT_FILE, THRESHOLD_FIELDS
    from glance.postprocess import PostprocessConfig
    from glance.refilter import refilter

    folder = Path(args.result)
    try:
        report = json.loads((folder / REPORT_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise InputError(f"{folder}: not a GLANCE result folder ({exc})") from None
    saved = report.get("postprocess", {})
    base = PostprocessConfig(**{f.name: saved[f.name] for f in fields(PostprocessConfig) if f.name in saved})
    cfg = postprocess_config(args, base)
    given = threshold_arguments(args)
    requested = frozenset(key for key, flag in THRESHOLD_FIELDS if given[flag] is not None)
    analysis = refilter(folder, report, cfg, requested)
    n = len(analysis.nodules)
    print(f"{n} nodule{'s' if n != 1 else ''} at segmentation threshold {cfg.seg_threshold}, "
          f"detection threshold {cfg.det_threshold}; results in {folder}")
    print_outside_lungs(analysis.outside_lungs)
    return 0
