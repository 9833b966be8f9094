"""CPU (and GPU when present) seconds per slice of the network alone, per preset and batch size.

    python bench/model_speed.py [--size 512] [--batches 1 8] [--repeat 3] [--threads N]

Prints one JSON line per (preset, device, batch, precision). Not a test: numbers depend on the machine.
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from glance.model import build_model, config_for


def time_forward(model, x, repeat: int, autocast_dtype=None) -> float:
    device_type = x.device.type
    ctx = (torch.autocast(device_type, dtype=autocast_dtype) if autocast_dtype
           else torch.autocast(device_type, enabled=False))
    with torch.inference_mode(), ctx:
        model(x)  # warm-up (oneDNN primitive creation, cuDNN autotune)
        if device_type == "cuda":
            torch.cuda.synchronize()
        best = float("inf")
        for _ in range(repeat):
            t = time.perf_counter()
            model(x)
            if device_type == "cuda":
                torch.cuda.synchronize()
            best = min(best, time.perf_counter() - t)
    return best / x.shape[0]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--presets", nargs="+", default=["small", "base"])
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--threads", type=int, default=0)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    for preset in args.presets:
        for device in devices:
            model = build_model(config_for(preset)).eval().to(device)
            variants = [("fp32", None, torch.contiguous_format), ("fp32-cl", None, torch.channels_last)]
            variants.append(("bf16-cl", torch.bfloat16, torch.channels_last) if device == "cpu"
                            else ("fp16", torch.float16, torch.channels_last))
            for batch in args.batches:
                for name, dtype, fmt in variants:
                    m = model.to(memory_format=fmt)
                    x = torch.rand(batch, 1, args.size, args.size, device=device).to(memory_format=fmt)
                    s = time_forward(m, x, args.repeat, dtype)
                    print(json.dumps({"preset": preset, "device": device, "batch": batch, "precision": name,
                                      "size": args.size, "threads": torch.get_num_threads(),
                                      "s_per_slice": round(s, 4), "slices_per_s": round(1 / s, 1)}), flush=True)


if __name__ == "__main__":
    main()
