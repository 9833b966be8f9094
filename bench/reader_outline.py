"""Where the LIDC readers' outline lies: the HU of a reader mask's contour pixels against the rings
inside and outside it, and the Dice a perfect segmentation without the contour line can reach.

The max-slice crops' masks are "polygon fill plus the contour pixels" (their README). If the
readers drew the contour on the first pixels outside the nodule, those pixels are mostly lung:
their HU sits nearer the ring outside the mask than the 50 % partial-volume level, and the
interior (mask minus contour, ``outline_interior``) is the nodule. The Dice between the interior
and the drawn mask is then the ceiling of a segmentation that stops at the nodule's 50 % boundary,
when it is scored against the drawn masks.

Run from the repository root:  python bench/reader_outline.py [--data ../shared/data/lidc-maxslice-crops]
Prints a summary and writes bench/results/reader_outline.json (bench/results/ is git-ignored).
Every crop is used (training, validation and test patients alike): nothing is fitted here.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
from scipy import ndimage

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "bench" / "results"
SIZE_GROUPS_MM = ((0, 6), (6, 10), (10, 20), (20, 100))  # equivalent diameter of the drawn mask


def rings(mask: np.ndarray) -> dict[str, np.ndarray]:
    """The drawn mask's contour pixels, the ring just inside them, the rest of the interior, and the
    ring just outside the mask (all 4-connected, the convention ``outline_interior`` removes)."""
    from glance_training.datasets.crops import outline_interior

    cross = ndimage.generate_binary_structure(2, 1)
    interior = outline_interior(mask)
    core = ndimage.binary_erosion(interior, structure=cross)
    outside = ndimage.binary_dilation(mask, structure=cross) & ~mask
    return {"core": core, "first_inner_ring": interior & ~core, "contour": mask & ~interior, "outside_ring": outside}


def dice(a: np.ndarray, b: np.ndarray) -> float:
    return 2.0 * np.count_nonzero(a & b) / (np.count_nonzero(a) + np.count_nonzero(b))


def measure(hu: np.ndarray, masks: np.ndarray, spacing: np.ndarray) -> dict:
    from glance_training.datasets.crops import outline_interior

    ring_hu: dict[str, list[float]] = {name: [] for name in ("core", "first_inner_ring", "contour", "outside_ring")}
    ceiling, contour_share, diameter = [], [], []
    for image, drawn, s in zip(hu, masks.astype(bool), spacing):
        parts = rings(drawn)
        interior = outline_interior(drawn)
        ceiling.append(dice(interior, drawn))
        contour_share.append(np.count_nonzero(parts["contour"]) / np.count_nonzero(drawn))
        diameter.append(2.0 * np.sqrt(np.count_nonzero(drawn) / np.pi) * float(s))
        if parts["core"].any():  # rings need a core to be told apart
            for name, region in parts.items():
                ring_hu[name].append(float(image[region].mean()))
    ceiling, diameter = np.array(ceiling), np.array(diameter)
    by_size = {f"{lo}-{hi} mm": {"crops": int(np.count_nonzero(sel)),
                                 "dice_ceiling_mean": round(float(ceiling[sel].mean()), 3)}
               for lo, hi in SIZE_GROUPS_MM if (sel := (diameter >= lo) & (diameter < hi)).any()}
    return {
        "crops": len(masks),
        "crops_with_rings": len(ring_hu["core"]),
        "ring_hu_median": {k: round(float(np.median(v)), 1) for k, v in ring_hu.items()},
        "ring_hu_mean": {k: round(float(np.mean(v)), 1) for k, v in ring_hu.items()},
        "contour_share_of_mask_median": round(float(np.median(contour_share)), 3),
        "dice_interior_vs_drawn": {"mean": round(float(ceiling.mean()), 3),
                                   "median": round(float(np.median(ceiling)), 3)},
        "by_size": by_size,
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "lidc-maxslice-crops"))
    args = ap.parse_args()
    from glance_training.datasets.crops import MAXSLICE_FILE

    path = Path(args.data)
    path = path / MAXSLICE_FILE if path.is_dir() else path
    if not path.is_file():
        print(f"{path}: not found", file=sys.stderr)
        return 2
    with np.load(path, allow_pickle=False) as z:
        result = measure(z["image_hu"], z["mask"], z["spacing_mm"])
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "reader_outline.json").write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
