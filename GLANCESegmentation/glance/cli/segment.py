"""``glance segment``: find, segment and measure lung nodules in a chest CT."""

from __future__ import annotations

import argparse
import logging
import signal
import sys
from pathlib import Path

log = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("input", nargs="?", help="DICOM folder or file, NRRD, NIfTI, MHD/MHA")
    parser.add_argument("--example", action="store_true", help="run on the built-in synthetic phantom")
    parser.add_argument("--out", help="result folder (default: glance-example with --example)")
    parser.add_argument("--force", action="store_true", help="replace an existing result folder")
    parser.add_argument("--series", help="SeriesInstanceUID when the folder holds several series")
    add_model_arguments(parser)
    add_threshold_arguments(parser)
    add_lung_argument(parser)
    parser.add_argument("--max-voxels", type=int, help="refuse larger volumes (default: sized to this machine)")
    parser.add_argument("--no-snapshots", action="store_true", help="skip the per-nodule PNG snapshots")
    parser.add_argument("--progress-lines", action="store_true",
                        help="print 'PROGRESS k/N' lines on stdout instead of a progress bar")


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", help="model name, NAME@VERSION or folder (default: glance-small)")
    parser.add_argument("--device", default="auto", help="auto, cpu or cuda (default auto)")
    parser.add_argument("--batch", type=int, default=8, help="slices per batch (default 8)")
    parser.add_argument("--precision", default="auto", choices=["auto", "fp32", "fp16", "bf16"],
                        help="auto: fp16 autocast on GPU, fp32 on CPU")
    parser.add_argument("--threads", type=int, default=0, help="CPU threads (default: torch's choice)")
    add_tta_argument(parser)


def add_tta_argument(parser: argparse.ArgumentParser, more: str = "") -> None:
    parser.add_argument("--tta", action="store_true",
                        help="average the network over the four in-plane flips (4x the model time)" + more)


def add_threshold_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--seg-threshold", type=float,
                        help="nodule probability threshold (default: the model's calibrated value, else 0.5)")
    parser.add_argument("--det-threshold", type=float,
                        help="centre heatmap threshold (default: the model's calibrated value, else 0.3)")
    parser.add_argument("--outline-fraction", type=float,
                        help="outline each nodule at this fraction of its own peak probability, 0 = off "
                             "(default: the model's calibrated value, else 0)")


def add_lung_argument(parser: argparse.ArgumentParser) -> None:
    # Tri-state: not given keeps what the result had (refilter) or the default (segment), so that
    # refilter can turn the rule back on with --no-keep-outside-lungs.
    parser.add_argument("--keep-outside-lungs", action=argparse.BooleanOptionalAction, default=None,
                        help="also report findings that do not touch the lungs (dropped by default: they lie in "
                             "the mediastinum, bone or abdomen); for a CT whose field of view cuts the lungs")


def threshold_arguments(args: argparse.Namespace) -> dict[str, float | None]:
    """The thresholds given on the command line (None where not given), checked."""
    from glance.errors import GlanceError

    given = {}
    for flag in ("seg_threshold", "det_threshold"):
        value = getattr(args, flag)
        if value is not None and not 0.0 < value < 1.0:
            raise GlanceError(f"--{flag.replace('_', '-')} must be between 0 and 1, got {value}")
        given[flag] = value
    fraction = args.outline_fraction
    if fraction is not None and not 0.0 <= fraction < 1.0:
        raise GlanceError(f"--outline-fraction must be at least 0 and below 1, got {fraction}")
    given["outline_fraction"] = fraction
    return given


def postprocess_config(args: argparse.Namespace, base=None):
    from dataclasses import replace

    from glance.postprocess import PostprocessConfig

    given = {k: v for k, v in threshold_arguments(args).items() if v is not None}
    if getattr(args, "keep_outside_lungs", None) is not None:
        given["require_lung_contact"] = not args.keep_outside_lungs
    return replace(base or PostprocessConfig(), **given)


def progress_reporter(lines: bool):
    """A progress callback: 'PROGRESS k/N' lines for the Slicer module, else a terminal bar."""
    if lines:
        def report(done: int, total: int) -> None:
            print(f"PROGRESS {done}/{total}", flush=True)
        return report, lambda: None
    from tqdm import tqdm

    bar = tqdm(desc="slices", unit="slice", disable=None, file=sys.stderr)

    def update(done: int, total: int) -> None:
        bar.total = total
        bar.n = done
        bar.refresh()
    return update, bar.close


def _terminate_as_cancel(signum, frame):
    from glance.errors import Cancelled

    raise Cancelled("stopped by a termination signal")


def run(args: argparse.Namespace) -> int:
    from glance.errors import GlanceError
    from glance.infer import InferenceOptions
    from glance.pipeline import SegmentOptions, run_segment

    if args.example == bool(args.input):
        raise GlanceError("give an INPUT image or folder, or --example")
    if args.batch < 1:
        raise GlanceError(f"--batch must be at least 1, got {args.batch}")
    out = Path(args.out or ("glance-example" if args.example else ""))
    if not args.out and not args.example:
        raise GlanceError("--out DIR is required")
    signal.signal(signal.SIGTERM, _terminate_as_cancel)
    options = SegmentOptions(
        model=args.model,
        inference=InferenceOptions(args.device, args.batch, args.precision, args.threads, args.tta),
        **threshold_arguments(args),
        postprocess=postprocess_config(args),
        series_uid=args.series,
        max_voxels=args.max_voxels,
        snapshots=not args.no_snapshots,
    )
    ct, extra = _example() if args.example else (_read(args.input, options), None)
    progress, close = progress_reporter(args.progress_lines)
    try:
        analysis, report = run_segment(ct, out, options, args.force, progress, extra_files=extra)
    finally:
        close()
    _summary(analysis, report, out)
    return 0


def _read(path: str, options):
    from glance.errors import InputError
    from glance.io import read_volume

    if not Path(path).exists():
        raise InputError(f"{path}: no such file or folder")
    return read_volume(path, options.series_uid, options.max_voxels)


def _example():
    """The built-in phantom, and a writer that adds its CT and ground truth to the result."""
    from glance.io import atomic_write_text, write_image
    from glance.phantom import make_example_phantom

    phantom = make_example_phantom(seed=0)

    def extra(folder: Path) -> None:
        write_image(phantom.ct, folder / "example_ct.nrrd")
        atomic_write_text(folder / "example_ground_truth.json", phantom.to_json())
    return phantom.ct, extra


def print_outside_lungs(dropped: int | None) -> None:
    """Say how many findings rule 8 held back, so that a CT whose field of view cuts the lungs is noticed."""
    if dropped:
        print(f"{dropped} finding(s) away from the lungs not reported (--keep-outside-lungs reports them)")


def _summary(analysis, report: dict, out: Path) -> None:
    n = len(analysis.nodules)
    print(f"{n} nodule{'s' if n != 1 else ''} found; results in {out}")
    print_outside_lungs(analysis.outside_lungs)
    for nod in analysis.nodules:
        left, post, sup = nod.centre_lps
        print(f"  {nod.name}: {nod.long_axis_mm:.1f} x {nod.short_axis_mm:.1f} mm, {nod.volume_mm3:.0f} mm3, "
              f"{nod.nodule_type}, confidence {nod.confidence:.2f}, at LPS ({left:.1f}, {post:.1f}, {sup:.1f}) mm")
    seconds = report.get("seconds", {})
    print("seconds: " + ", ".join(f"{k} {v:.2f}" for k, v in seconds.items()))
