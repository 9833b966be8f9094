"""Step 7 (export, files for people): ``nodules.csv``, ``report.json`` and PNG snapshots.

Also home of the small things every exporter shares: which algorithm produced
the result (:class:`AlgorithmInfo`), the colour of each nodule (the same in the
Slicer segments, the fiducials and the snapshots) and the CSV/table columns.
Positions are LPS mm; the column names say so.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from glance.io.atomic import atomic_path, atomic_write_text
from glance.io.geometry import canonical_grid
from glance.nodule import Nodule
from glance.volume import Volume

log = logging.getLogger(__name__)

REPORT_FILE = "report.json"

# Column order of nodules.csv and of the Slicer measurement table (glance.scene).
CSV_COLUMNS = (
    "label",
    "name",
    "centre_lps_L_mm",
    "centre_lps_P_mm",
    "centre_lps_S_mm",
    "long_axis_mm",
    "short_axis_mm",
    "volume_mm3",
    "mean_hu",
    "median_hu",
    "type",
    "confidence",
    "accepted",
)

# Distinct, saturated colours (none grey, so a contour never looks like CT pixels;
# none pure yellow, which marks the centre cross in the snapshots).
NODULE_COLOURS = (
    (230, 25, 75),
    (60, 180, 75),
    (0, 130, 200),
    (245, 130, 48),
    (145, 30, 180),
    (70, 240, 240),
    (240, 50, 230),
    (210, 245, 60),
    (0, 128, 128),
    (170, 110, 40),
)
CROSS_COLOUR = (255, 255, 0)
LUNG_WINDOW_HU = (-1350.0, 150.0)  # level -600, width 1500


@dataclass
class AlgorithmInfo:
    """The model and settings that produced a result; written into every export."""

    name: str
    version: str
    thresholds: dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def nodule_colour(label: int) -> tuple[int, int, int]:
    """RGB 0-255 colour of nodule ``label`` (1-based), cycling through the palette."""
    return NODULE_COLOURS[(int(label) - 1) % len(NODULE_COLOURS)]


def csv_rows(nodules: Sequence[Nodule], accepted: Sequence[int] | None = None) -> list[dict]:
    """One dict per nodule (label order) with the CSV/table columns, values rounded for display."""
    rows = []
    for n in sorted(nodules, key=lambda n: n.label):
        rows.append(
            {
                "label": int(n.label),
                "name": n.name,
                "centre_lps_L_mm": round(float(n.centre_lps[0]), 2),
                "centre_lps_P_mm": round(float(n.centre_lps[1]), 2),
                "centre_lps_S_mm": round(float(n.centre_lps[2]), 2),
                "long_axis_mm": round(float(n.long_axis_mm), 2),
                "short_axis_mm": round(float(n.short_axis_mm), 2),
                "volume_mm3": round(float(n.volume_mm3), 1),
                "mean_hu": round(float(n.mean_hu), 1),
                "median_hu": round(float(n.median_hu), 1),
                "type": n.nodule_type,
                "confidence": round(float(n.confidence), 4),
                "accepted": int(accepted is None or n.label in accepted),
            }
        )
    return rows


def write_csv(nodules: Sequence[Nodule], path: Path, accepted: Sequence[int] | None = None) -> Path:
    """Write ``nodules.csv``: one row per nodule, centre in LPS mm; all accepted unless given."""
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=CSV_COLUMNS, lineterminator="\n")
    writer.writeheader()
    writer.writerows(csv_rows(nodules, accepted))
    atomic_write_text(path, buf.getvalue())
    return Path(path)


def read_csv(path: Path) -> list[dict]:
    """Rows of a ``nodules.csv`` with numbers parsed back (the inverse of :func:`write_csv`)."""
    with open(path, newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    for row in rows:
        for key in CSV_COLUMNS:
            if key in ("name", "type") or key not in row:
                continue
            row[key] = int(row[key]) if key in ("label", "accepted") else float(row[key])
    return rows


def _json_default(obj):
    # numpy scalars/arrays, paths and dataclasses appear in payloads built by the pipeline.
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return dataclasses.asdict(obj)
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


def write_report_json(path: Path, payload: dict) -> Path:
    """Write ``report.json`` (indented, UTF-8) atomically."""
    atomic_write_text(path, json.dumps(payload, indent=2, default=_json_default) + "\n")
    return Path(path)


def dropped_outside_lungs(result_folder: Path) -> int | None:
    """How many findings post-processing rule 8 held back as away from the lungs in a result folder
    (its ``report.json``); None when the rule was off, or the report predates the count or is unreadable."""
    try:
        report = json.loads((Path(result_folder) / REPORT_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    value = report.get("n_dropped_outside_lungs") if isinstance(report, dict) else None
    return value if isinstance(value, int) else None


# ---------------------------------------------------------------- snapshots


def _axial_view(ct: Volume, mask: np.ndarray, centre_ijk: Sequence[float]) -> tuple:
    """Axial slice through the nodule's largest cross-section, in radiological display order.

    Uses the canonical axial grid (glance.io.geometry): rows run anterior ->
    posterior, columns right -> left. Returns (hu 2D, mask 2D, centre (row, col)
    in slice pixels, (row mm, col mm) pixel size).
    """
    grid = canonical_grid(ct)
    hu, m = grid.to_canonical(ct.array), grid.to_canonical(mask)
    lps = ct.index_to_lps @ np.array([*centre_ijk, 1.0])
    centre = (np.linalg.inv(grid.index_to_lps) @ lps)[:3]
    areas = m.sum(axis=(1, 2))
    index = int(np.argmax(areas)) if areas.any() else int(np.clip(round(centre[0]), 0, hu.shape[0] - 1))
    return hu[index], m[index], (float(centre[1]), float(centre[2])), grid.canonical_spacing[1:]


def _crop(a: np.ndarray, centre: tuple[float, float], half: tuple[int, int], fill) -> np.ndarray:
    """A (2*half+1)-sized window of ``a`` around ``centre``, padded with ``fill`` outside."""
    r, c = int(round(centre[0])), int(round(centre[1]))
    hr, hc = half
    padded = np.pad(a, ((hr, hr), (hc, hc)), constant_values=fill)
    return padded[r : r + 2 * hr + 1, c : c + 2 * hc + 1]


def _snapshot(ct: Volume, mask: np.ndarray, nodule: Nodule, size: int, margin_mm: float):
    from PIL import Image, ImageDraw
    from scipy import ndimage

    hu, m, centre, spacing = _axial_view(ct, mask, nodule.centre_ijk)
    half_mm = max(margin_mm, 1.5 * float(nodule.long_axis_mm))
    half = (int(np.ceil(half_mm / spacing[0])), int(np.ceil(half_mm / spacing[1])))
    hu = _crop(hu, centre, half, fill=LUNG_WINDOW_HU[0])
    m = _crop(m, centre, half, fill=False)

    lo, hi = LUNG_WINDOW_HU
    grey = np.clip((hu.astype(np.float32) - lo) / (hi - lo) * 255.0, 0, 255).astype(np.uint8)
    # Each axis is scaled on its own, so the physically square window becomes square pixels.
    image = Image.fromarray(grey).resize((size, size), Image.Resampling.BILINEAR).convert("RGB")
    big = np.asarray(Image.fromarray(m.astype(np.uint8) * 255).resize((size, size), Image.Resampling.NEAREST)) > 0
    contour = big & ~ndimage.binary_erosion(big, iterations=2)
    rgb = np.array(image)
    rgb[contour] = nodule_colour(nodule.label)
    image = Image.fromarray(rgb)

    draw = ImageDraw.Draw(image)
    # Window pixel p covers output pixels [p, p+1) * scale; the centre's sub-pixel
    # offset from the window centre is kept.
    scale = (size / m.shape[0], size / m.shape[1])
    cy = (half[0] + centre[0] - round(centre[0]) + 0.5) * scale[0]
    cx = (half[1] + centre[1] - round(centre[1]) + 0.5) * scale[1]
    arm = max(4, size // 40)
    draw.line([(cx - arm, cy), (cx + arm, cy)], fill=CROSS_COLOUR, width=1)
    draw.line([(cx, cy - arm), (cx, cy + arm)], fill=CROSS_COLOUR, width=1)
    text = f"{nodule.name}: {nodule.long_axis_mm:.1f} x {nodule.short_axis_mm:.1f} mm"
    draw.text((4, 4), text, fill=(255, 255, 255))
    return image


def write_snapshots(
    ct: Volume,
    labels: np.ndarray,
    nodules: Sequence[Nodule],
    out_dir: Path,
    size: int = 256,
    margin_mm: float = 15.0,
) -> list[Path]:
    """One PNG per nodule (``nodule_01.png``...): lung-window axial crop, contour and centre cross.

    The crop is a square of at least ``2 * margin_mm`` (or three long axes) around
    the centre, on the slice where the nodule is largest, scaled to ``size`` pixels.
    """
    if labels.shape != ct.array.shape:
        raise ValueError(f"label map shape {labels.shape} does not match CT {ct.array.shape}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for nodule in sorted(nodules, key=lambda n: n.label):
        image = _snapshot(ct, labels == nodule.label, nodule, size, margin_mm)
        path = out_dir / f"nodule_{nodule.label:02d}.png"
        with atomic_path(path) as tmp:
            image.save(tmp, format="PNG")
        paths.append(path)
    log.info("wrote %d snapshot(s) to %s", len(paths), out_dir)
    return paths
