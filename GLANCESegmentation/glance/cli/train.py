"""``glance train``: train or fine-tune a model; the finished run becomes a registered version."""

from __future__ import annotations

import argparse
from dataclasses import replace
from pathlib import Path

# Flags that override the config file field of the same name.
_OVERRIDES = {"name": str, "preset": str, "ablation": str, "base_model": str, "epochs": int,
              "steps_per_epoch": int, "batch": int, "lr": float, "device": str, "seed": int,
              "context_slices": int, "patch_size": int, "workers": int}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", nargs="?", help="training config JSON (fields of TrainConfig)")
    parser.add_argument("--data", action="append", default=[], metavar="KIND:PATH[,NAME=VALUE][@WEIGHT]",
                        help="training data source, repeatable (maxslice:, crops3d:, local:, lidc:, luna:, "
                             "tianchi:, lndb:, phantom:N); options: luna:DIR,annotations=CSV,excluded=CSV "
                             "and tianchi:DIR,annotations=CSV (see glance_training/data.py)")
    parser.add_argument("--cases", action="append", default=[], metavar="DIR",
                        help="reviewed cases exported from Slicer (same as --data local:DIR)")
    for name, kind in _OVERRIDES.items():
        parser.add_argument(f"--{name.replace('_', '-')}", type=kind, default=None)
    parser.add_argument("--run-dir", help="checkpoints, history.csv and curves.png (default: a new folder)")
    parser.add_argument("--resume", action="store_true", help="continue the run in --run-dir")
    parser.add_argument("--out", help="write the model version to this folder instead of the registry")
    parser.add_argument("--no-calibrate", dest="calibrate", action="store_false", default=None,
                        help="do not choose the new model's thresholds on the validation patients")
    parser.add_argument("--progress-lines", action="store_true", help="PROGRESS and METRIC lines on stdout")


def build_config(args: argparse.Namespace):
    from glance_training.train import TrainConfig

    cfg = TrainConfig.from_json(args.config) if args.config else TrainConfig()
    overrides = {k: getattr(args, k) for k in (*_OVERRIDES, "calibrate") if getattr(args, k) is not None}
    data = list(cfg.data) + list(args.data) + [f"local:{d}" for d in args.cases]
    cfg = replace(cfg, **overrides, data=data)
    return cfg


def _check(cfg) -> None:
    from glance.errors import GlanceError
    from glance_training.train import sampling_config

    if not cfg.data:
        raise GlanceError("no training data: give --data KIND:PATH (or --cases DIR, or a config file)")
    for name in ("epochs", "steps_per_epoch", "batch"):
        if getattr(cfg, name) < 1:
            raise GlanceError(f"--{name.replace('_', '-')} must be at least 1")
    sampling_config(cfg)  # its fields' ranges, checked before any data is read


def run(args: argparse.Namespace) -> int:
    from glance.errors import GlanceError
    from glance.runner import new_run_dir
    from glance_training.train import Trainer, register

    cfg = build_config(args)
    _check(cfg)
    if args.resume and not args.run_dir:
        raise GlanceError("--resume needs --run-dir")
    run_dir = Path(args.run_dir) if args.run_dir else new_run_dir(cfg.name)
    emit = (lambda line: print(line, flush=True)) if args.progress_lines else None
    trainer = Trainer(cfg, run_dir, emit)
    if args.resume:
        trainer.load_checkpoint()
    trainer.fit()
    if trainer.dist.main:
        folder = register(trainer, Path(args.out) if args.out else None)
        print(f"trained {cfg.name}: {trainer.epoch} epochs; model in {folder}; run in {run_dir}")
    return 0
