"""``glance bench``: wall seconds per stage of "Segment nodules", slices per second and peak memory,
on each available device, with a plain U-Net of similar size through the same model stage as the
ratio baseline. Numbers depend on the machine; nothing here is a test."""

from __future__ import annotations

import argparse
import json
import resource
import sys
import tempfile
import time
from pathlib import Path

UNET_DIMS = (48, 96, 192, 288)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from glance.cli.segment import add_tta_argument

    parser.add_argument("--input", help="CT to time (default: the built-in example phantom)")
    parser.add_argument("--model", help="model name or folder (default: glance-small)")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--precision", default="auto", choices=["auto", "fp32", "fp16", "bf16"])
    add_tta_argument(parser)
    parser.add_argument("--no-baseline", action="store_true", help="skip the U-Net comparison")
    parser.add_argument("--json", action="store_true", help="one JSON object per device on stdout")


def _peak_rss_mb() -> float:
    kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return kb / 1024 if sys.platform != "darwin" else kb / 2**20


def _baseline_seconds(ct, network, options) -> tuple[float, int]:
    """Model-stage seconds of a plain U-Net (paper Table 4's baseline) on the same slices."""
    from glance.infer import predict
    from glance.model import build_model, config_for
    from glance.pipeline import canonical_volume
    from glance.preprocess import lung_crop

    model, card, _ = network
    # Wider stages bring the U-Net to GLANCE-small's parameter count (2.77 M vs 2.92 M).
    unet = build_model(config_for("small", "unet", dims=UNET_DIMS, in_channels=model.cfg.in_channels)).eval()
    unet.to(next(model.parameters()).device)
    canon, grid = canonical_volume(ct)
    spacing = tuple(grid.canonical_spacing)
    maps = predict(canon.array, spacing, lung_crop(canon.array, spacing), unet, card.prep, options.inference)
    return maps.seconds["model"], sum(p.numel() for p in unet.parameters())


def bench_device(ct, read_seconds: float, device: str, args) -> dict:
    from glance.infer import InferenceOptions, device_description
    from glance.pipeline import SegmentOptions, algorithm_info, load_network, segment_volume, write_result

    inference = InferenceOptions(device, args.batch, args.precision, tta=args.tta)
    options = SegmentOptions(model=args.model, inference=inference)
    network = load_network(options)
    model, card, _ = network
    t = time.perf_counter()
    analysis = segment_volume(ct, network, options)
    total = time.perf_counter() - t
    with tempfile.TemporaryDirectory() as tmp:
        t = time.perf_counter()
        write_result(Path(tmp), analysis, algorithm_info(card.name, card.version, options.postprocess),
                     {}, snapshots=True)
        write_seconds = time.perf_counter() - t
    seconds = {"read": read_seconds, **analysis.seconds}
    n_slices = analysis.crop["z"][1] - analysis.crop["z"][0]
    result = {
        "device": device_description(next(model.parameters()).device),
        "model": f"{card.name}@{card.version}",
        "test_time_flips": args.tta,
        "params": sum(p.numel() for p in model.parameters()),
        "volume_kji": list(ct.shape),
        "slices_through_model": n_slices,
        "seconds": {k: round(v, 3) for k, v in seconds.items()},
        "seconds_scene_and_export": round(write_seconds, 3),
        "seconds_end_to_end": round(read_seconds + total + write_seconds, 3),
        "model_slices_per_s": round(n_slices / max(analysis.seconds["model"], 1e-9), 2),
        "nodules": len(analysis.nodules),
        "peak_rss_mb": round(_peak_rss_mb(), 1),
    }
    if not args.no_baseline:
        unet_seconds, unet_params = _baseline_seconds(ct, network, options)
        result["baseline_unet"] = {"params": unet_params, "model_seconds": round(unet_seconds, 3),
                                   "glance_over_unet": round(analysis.seconds["model"] / unet_seconds, 3)}
    return result


def run(args: argparse.Namespace) -> int:
    import torch

    from glance.io import read_volume

    t = time.perf_counter()
    if args.input:
        ct = read_volume(args.input)
    else:
        from glance.phantom import make_example_phantom

        ct = make_example_phantom(seed=0).ct
    read_seconds = time.perf_counter() - t
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    for device in devices:
        result = bench_device(ct, read_seconds, device, args)
        if args.json:
            print(json.dumps(result), flush=True)
            continue
        print(f"{result['device']}: {result['model']} on {result['volume_kji']} (k, j, i), "
              f"{result['slices_through_model']} slices through the model")
        for stage, s in {**result["seconds"], "scene+export": result["seconds_scene_and_export"]}.items():
            print(f"  {stage:<14}{s:>8.2f} s")
        print(f"  end to end    {result['seconds_end_to_end']:>8.2f} s; model {result['model_slices_per_s']} "
              f"slices/s; peak RSS {result['peak_rss_mb']:.0f} MB")
        if "baseline_unet" in result:
            b = result["baseline_unet"]
            print(f"  plain U-Net ({b['params'] / 1e6:.2f} M params): model {b['model_seconds']:.2f} s; "
                  f"GLANCE/U-Net time ratio {b['glance_over_unet']:.2f}")
    return 0
