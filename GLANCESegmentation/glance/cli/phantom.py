"""``glance phantom``: write a synthetic chest CT, or a real CT with inserted nodules, with ground truth.

Output folder: the CT (``ct/`` DICOM series, or ``ct.nrrd`` / ``ct.nii.gz``),
``labels.nrrd`` (or ``labels.nii.gz``; 0 = background, n = nodule n),
``nodules.json``, and ``preview.png`` with ``--preview``.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from glance.errors import InputError

log = logging.getLogger(__name__)


def _triple(kind: type, name: str):
    def parse(text: str):
        parts = text.lower().replace(",", "x").split("x")
        try:
            values = tuple(kind(p) for p in parts)
        except ValueError:
            values = ()
        if len(values) != 3 or any(v <= 0 for v in values):
            raise argparse.ArgumentTypeError(f"{name} must look like AxBxC with positive numbers, got {text!r}")
        return values

    return parse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", required=True, type=Path, help="output folder")
    parser.add_argument("--seed", type=int, default=0, help="random seed: the same seed gives the same bytes")
    parser.add_argument("--nodules", type=int, default=4, help="number of nodules to make (0 allowed)")
    parser.add_argument("--shape", type=_triple(int, "--shape"), default=(512, 512, 240),
                        help="grid size columns x rows x slices (default 512x512x240)")
    parser.add_argument("--spacing", type=_triple(float, "--spacing"), default=(0.7, 0.7, 1.25),
                        help="voxel spacing in mm, column x row x slice (default 0.7x0.7x1.25)")
    parser.add_argument("--slice-thickness", type=float, default=None,
                        help="nominal slice thickness in mm (0.625-2.5 typical; default = slice spacing)")
    parser.add_argument("--noise", type=float, default=18.0, help="image noise SD in HU (default 18)")
    parser.add_argument("--diameter", type=_pair, default=(4.0, 25.0), help="nodule diameter range mm, e.g. 4-25")
    parser.add_argument("--format", choices=("dicom", "nrrd", "nifti"), default="nrrd", help="CT output format")
    parser.add_argument("--example", action="store_true", help="the small built-in example (256x256x64)")
    parser.add_argument("--insert-into", type=Path, metavar="CT_PATH",
                        help="insert nodules into this real CT (DICOM folder, NRRD, NIfTI) instead")
    parser.add_argument("--nodule-source", choices=("synthetic", "real", "mixed"), default="synthetic",
                        help="with --insert-into: synthetic nodules, real LIDC crops, or both")
    parser.add_argument("--crops", type=Path, help="real nodule crops (.npz, e.g. lidc_nodule_crops_64.npz)")
    parser.add_argument("--lidc-xml", type=Path, help="with --insert-into: the scan's LIDC XML (its own nodules)")
    parser.add_argument("--existing-labels", type=Path, help="with --insert-into: label map of the scan's own nodules")
    parser.add_argument("--preview", action="store_true", help="also write preview.png (axial slices with outlines)")
    parser.add_argument("--force", action="store_true", help="replace an earlier GLANCE output folder")


def _pair(text: str) -> tuple[float, float]:
    try:
        lo, hi = (float(v) for v in text.replace(",", "-").split("-"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"--diameter must look like 4-25, got {text!r}") from None
    if not 0 < lo <= hi:
        raise argparse.ArgumentTypeError(f"--diameter needs 0 < low <= high, got {text!r}")
    return lo, hi


def run(args: argparse.Namespace) -> int:
    from glance.io import OutputFolder

    if args.nodules < 0:
        raise InputError("--nodules cannot be negative")
    phantom = _insert(args) if args.insert_into else _synthesise(args)
    with OutputFolder(args.out, args.force) as work:
        phantom.write(work, args.format)
        if args.preview:
            from glance.phantom.preview import write_preview

            ks = [round(n.centre_ijk[2]) for n in phantom.nodules]
            write_preview(phantom.ct, phantom.labels, work / "preview.png", ks)
    print(f"{args.out}: CT {phantom.ct.shape[::-1]} at {tuple(round(s, 3) for s in phantom.ct.spacing)} mm, "
          f"{len(phantom.nodules)} nodules")
    for n in phantom.nodules:
        c = ", ".join(f"{v:.1f}" for v in n.centre_lps)
        print(f"  {n.id}: {n.nodule_type} {n.shape} {n.attachment}, {n.diameter_mm:.1f} mm, "
              f"{n.volume_mm3:.0f} mm3 at LPS ({c}) [{n.source}]")
    return 0


def _synthesise(args):
    from glance.phantom import NoduleMix, PhantomConfig, ScannerConfig, make_example_phantom, make_phantom

    if args.example:
        return make_example_phantom(args.seed)
    scanner = ScannerConfig(slice_thickness_mm=args.slice_thickness, noise_hu=args.noise)
    cfg = PhantomConfig(args.shape, args.spacing, args.seed, args.nodules, scanner,
                        NoduleMix(diameter_mm=args.diameter))
    try:
        return make_phantom(config=cfg)
    except ValueError as exc:
        raise InputError(str(exc)) from exc


def _insert(args):
    from glance.io import read_volume
    from glance.io.image_read import read_label_map
    from glance.phantom.insert import (InsertConfig, existing_from_labels, existing_from_lidc, insert_nodules,
                                       load_crops)
    from glance.phantom.placement import NoduleMix

    ct = read_volume(args.insert_into)
    existing, labels = [], None
    xml = args.lidc_xml or _find_lidc_xml(args.insert_into)
    if args.existing_labels:
        existing, labels = existing_from_labels(read_label_map(args.existing_labels), ct)
    elif xml is not None:
        existing, labels = existing_from_lidc(xml, ct)
    else:
        log.warning("%s: no LIDC XML or label map found; the scan's own nodules are not labelled", args.insert_into)
    crops = load_crops(args.crops) if args.crops else None
    cfg = InsertConfig(args.nodules, args.seed, args.nodule_source, mix=NoduleMix(diameter_mm=args.diameter))
    return insert_nodules(ct, cfg, crops, existing, labels)


def _find_lidc_xml(ct_path: Path) -> Path | None:
    """An LIDC XML in a DICOM folder, or ``<stem>_*.xml`` beside an image file."""
    candidates = sorted(ct_path.glob("*.xml")) if ct_path.is_dir() else sorted(
        ct_path.parent.glob(ct_path.name.split(".")[0] + "_*.xml"))
    for path in candidates:
        with open(path, "rb") as f:
            if b"LidcReadMessage" in f.read(2000):
                return path
    return None
