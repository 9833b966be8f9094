"""Benchmark of the chest CT phantom: time and peak memory, HU histograms against real scans, previews.

Run from the repository root:  python bench/phantom_bench.py [--size 512x512x300] [--skip-real]
Writes bench/results/phantom_bench.json and PNG previews next to it (bench/results/ is git-ignored).
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"
OUT = ROOT / "bench" / "results"

# HU windows whose histogram peak (mode, 10 HU bins) we compare.
WINDOWS = {"air": (-1100, -960), "lung": (-960, -500), "fat": (-200, -40), "soft_tissue": (-40, 120),
           "bone": (300, 1500)}


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _hu_summary(hu: np.ndarray, body_only: bool = True) -> dict:
    a = hu[::2, ::2, ::2].astype(np.int32)
    a = a[a > -1100] if body_only else a.ravel()  # drop padding outside the FOV
    out = {}
    for name, (lo, hi) in WINDOWS.items():
        sel = a[(a >= lo) & (a < hi)]
        counts, edges = np.histogram(sel, bins=np.arange(lo, hi + 10, 10))
        out[name] = {"peak_hu": float(edges[np.argmax(counts)] + 5) if len(sel) else None,
                     "fraction": round(float(len(sel)) / len(a), 4)}
    return out


def bench_phantom(size, spacing) -> tuple[dict, object]:
    from glance.phantom import PhantomConfig, ScannerConfig, make_phantom

    rss0 = _peak_rss_mb()
    t = time.perf_counter()
    cfg = PhantomConfig(size, spacing, seed=0, n_nodules=6, scanner=ScannerConfig(slice_thickness_mm=1.25))
    p = make_phantom(config=cfg)
    seconds = time.perf_counter() - t
    return {"size_ijk": list(size), "spacing": list(spacing), "seconds": round(seconds, 2),
            "peak_rss_mb": round(_peak_rss_mb(), 1), "rss_before_mb": round(rss0, 1),
            "ct_mb": round(p.ct.array.nbytes / 2**20, 1), "n_nodules": len(p.nodules)}, p


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--size", default="512x512x300")
    ap.add_argument("--spacing", default="0.7x0.7x1.0")
    ap.add_argument("--skip-real", action="store_true")
    args = ap.parse_args()
    size = tuple(int(v) for v in args.size.split("x"))
    spacing = tuple(float(v) for v in args.spacing.split("x"))
    OUT.mkdir(parents=True, exist_ok=True)
    from glance.phantom.preview import write_preview

    results: dict = {}
    results["phantom"], p = bench_phantom(size, spacing)
    print(json.dumps(results["phantom"]), flush=True)
    write_preview(p.ct, p.labels, OUT / "phantom_preview.png", [round(n.centre_ijk[2]) for n in p.nodules])
    results["histograms"] = {"phantom": _hu_summary(p.ct.array)}
    del p
    if not args.skip_real and DATA.exists():
        from glance.io import read_volume
        from glance.phantom.insert import InsertConfig, existing_from_lidc, insert_nodules, load_crops

        scans = {"LIDC-IDRI-0001": (DATA / "LIDC-IDRI-0001", DATA / "LIDC-IDRI-0001" / "069.xml"),
                 "LIDC-IDRI-0003": (DATA / "scans" / "LIDC-IDRI-0003.nrrd", DATA / "scans" / "LIDC-IDRI-0003_072.xml")}
        for name, (path, xml) in scans.items():
            ct = read_volume(path)
            results["histograms"][name] = _hu_summary(ct.array)
            t = time.perf_counter()
            existing, labels = existing_from_lidc(xml, ct)
            ins = insert_nodules(ct, InsertConfig(n_nodules=3, seed=1, source="real"),
                                 load_crops(DATA / "lidc-nodule-crops" / "lidc_nodule_crops_64.npz"), existing, labels)
            results[f"insert_real_{name}"] = {"seconds": round(time.perf_counter() - t, 2),
                                               "nodules": [n.to_dict() for n in ins.nodules]}
            write_preview(ins.ct, ins.labels, OUT / f"insert_real_{name}.png",
                          [round(n.centre_ijk[2]) for n in ins.nodules[len(existing):]])
    results["peak_rss_mb_total"] = round(_peak_rss_mb(), 1)
    (OUT / "phantom_bench.json").write_text(json.dumps(results, indent=1))
    print(json.dumps(results["histograms"], indent=1))
    print(f"results in {OUT}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
