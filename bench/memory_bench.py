"""Peak memory of `glance segment`: a 512 x 512 x 1000 CT end to end, and the hostile inputs
that claim the most memory (a gzip bomb NRRD, DICOM headers claiming 65535 x 65535 slices).

Each case runs as its own `python -m glance.cli segment` process; its peak RSS
comes from os.wait4 (the kernel's ru_maxrss of that one child).

Run from the repository root:
    python bench/memory_bench.py                      # full: 1000 slices, network at 0.7 mm
    python bench/memory_bench.py --slices 300 --network-spacing 2.8   # quicker, smaller network input
The large CT is LIDC-IDRI-0003 from ../shared/data repeated along the slice axis
(the phantom if that is absent), written uncompressed. The model is an untrained
`small` GLANCE network (memory does not depend on the weights' values).
Writes bench/results/memory_bench.json (bench/results/ is git-ignored).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "Testing"))  # the robustness suite's input generator

from robustness.make_inputs import DATA, base_sources, gzip_bomb_nrrd, huge_rows_columns, ram_bytes  # noqa: E402

OUT = ROOT / "bench" / "results"
LIMIT_GB = 4.0


def run_measured(argv: list[str], threads: int) -> dict:
    """Run `glance ARGV`; exit code, seconds, peak RSS (MB) and the last stderr line."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    start = time.perf_counter()
    with tempfile.TemporaryFile("w+") as err:
        proc = subprocess.Popen([sys.executable, "-m", "glance.cli", *argv], stdout=subprocess.DEVNULL,
                                stderr=err, env=env)
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
        err.seek(0)
        lines = err.read().splitlines()
    return {"exit": proc.returncode, "seconds": round(time.perf_counter() - start, 1),
            "peak_rss_mb": round(usage.ru_maxrss / 1024), "stderr_last": lines[-1][:300] if lines else ""}


def large_ct(path: Path, n_slices: int) -> tuple[int, int, int]:
    """A 512 x 512 x ``n_slices`` int16 CT (real LIDC-IDRI-0003 slices repeated), uncompressed NRRD."""
    import SimpleITK as sitk

    source = DATA / "scans" / "LIDC-IDRI-0003.nrrd"
    if source.is_file():
        image = sitk.ReadImage(str(source))
        base = sitk.GetArrayFromImage(image)
        spacing, origin = image.GetSpacing(), image.GetOrigin()
    else:
        from glance.phantom import make_phantom

        ct = make_phantom((512, 512, 40), (0.7, 0.7, 1.25), seed=0).ct
        base, spacing, origin = ct.array, ct.spacing, ct.origin
    reps = -(-n_slices // base.shape[0])
    array = np.concatenate([base, base[::-1]] * (reps // 2 + 1))[:n_slices]  # mirrored: no jump at the seams
    image = sitk.GetImageFromArray(np.ascontiguousarray(array))
    image.SetSpacing(spacing)
    image.SetOrigin(origin)
    sitk.WriteImage(image, str(path), useCompression=False)
    return tuple(int(s) for s in image.GetSize())


def save_model(folder: Path, network_spacing: float) -> Path:
    from glance.model import build_model, config_for
    from glance.model.weights import ModelCard, Preprocessing, save_model

    prep = Preprocessing(pixel_spacing_mm=network_spacing)
    card = ModelCard(name="memory-bench", version="0", config={},
                     preprocessing={**prep.__dict__, "window_hu": list(prep.window_hu)})
    return save_model(build_model(config_for("small")), folder, card)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--slices", type=int, default=1000)
    parser.add_argument("--network-spacing", type=float, default=0.7, help="model card pixel_spacing_mm")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--skip-large", action="store_true", help="only the hostile cases")
    args = parser.parse_args()

    results: dict = {"ram_gb": round(ram_bytes() / 2**30, 1), "limit_gb": LIMIT_GB}
    with tempfile.TemporaryDirectory(dir=os.environ.get("GLANCE_BENCH_TMP")) as tmp:
        tmp = Path(tmp)
        model = save_model(tmp / "model", args.network_spacing)
        common = ["--model", str(model), "--device", "cpu", "--no-snapshots", "--threads", str(args.threads)]

        results["baseline (missing input, imports only)"] = run_measured(
            ["segment", str(tmp / "missing.nrrd"), "--out", str(tmp / "o0"), *common], args.threads)

        bomb = gzip_bomb_nrrd(tmp / "bomb.nrrd", ram_bytes() + (1 << 30))
        results["gzip bomb NRRD"] = {
            "file_mb": round(bomb.stat().st_size / 2**20, 1),
            "inflates_to_gb": round((ram_bytes() + (1 << 30)) / 2**30, 1),
            **run_measured(["segment", str(bomb), "--out", str(tmp / "o1"), *common], args.threads)}
        bomb.unlink()

        sources = base_sources(tmp / "sources")
        huge = huge_rows_columns(tmp / "huge", sources).path
        results["DICOM Rows/Columns 65535 x 65535"] = run_measured(
            ["segment", str(huge), "--out", str(tmp / "o2"), *common], args.threads)

        if not args.skip_large:
            size = large_ct(tmp / "large.nrrd", args.slices)
            run = run_measured(["segment", str(tmp / "large.nrrd"), "--out", str(tmp / "o3"), *common], args.threads)
            results[f"{size[0]} x {size[1]} x {size[2]} CT, network at {args.network_spacing} mm"] = {
                **run, "under_limit": run["exit"] == 0 and run["peak_rss_mb"] < LIMIT_GB * 1024}

    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "memory_bench.json").write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
