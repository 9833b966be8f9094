"""``glance model-info``: parameters and FLOPs per component of a configuration."""

from __future__ import annotations

import argparse
import json


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from glance.model.config import ABLATIONS, PRESETS

    parser.add_argument("--config", default="small", choices=sorted(PRESETS), help="preset (default small)")
    parser.add_argument("--ablation", default="full", choices=sorted(ABLATIONS),
                        help="paper Table 4/6 variant (default full)")
    parser.add_argument("--size", type=int, default=512, help="slice size in pixels (default 512)")
    parser.add_argument("--json", action="store_true", help="one JSON object on stdout")


def run(args: argparse.Namespace) -> int:
    from glance.errors import GlanceError
    from glance.model.complexity import model_info

    if not 32 <= args.size <= 4096:
        raise GlanceError(f"--size must be between 32 and 4096, got {args.size}")
    info = model_info(args.config, args.ablation, args.size)
    if args.json:
        print(json.dumps(info.to_dict(), indent=2))
        return 0
    print(f"GLANCE {info.config_name}: {info.params / 1e6:.2f} M parameters, "
          f"{info.gflops_per_slice:.2f} GFLOPs per {args.size}x{args.size} slice")
    print(f"  {'component':<14}{'params':>12}{'GFLOPs':>10}")
    for name, cost in info.components.items():
        print(f"  {name:<14}{cost.params:>12,}{cost.gflops:>10.3f}")
    if info.dual_stream_ratio:
        r = info.dual_stream_ratio
        print(f"  dual-stream ratio F_GLANCE/F_single (eq. 1-2): {r['ratio']:.3f} = 1 + "
              f"{r['global_stream_term']:.3f} (global stream) + {r['fusion_term']:.3f} (CSCF) "
              f"+ {r['ratio'] - 1 - r['global_stream_term'] - r['fusion_term']:.3f} (gate inputs)")
    return 0
