"""A PNG montage of a few axial slices with nodule outlines, for a person to look at.

Tiles: the axial slice through each nodule's centre (up to ``max_nodule_tiles``),
then evenly spaced slices, then one coronal reformat through the image centre,
all in a lung window, each resampled to square pixels. Nodule outlines are the
label boundary, coloured per nodule, with the nodule number beside them.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from scipy.ndimage import binary_erosion

from glance.volume import Volume

_COLOURS = [(255, 64, 64), (64, 220, 64), (80, 160, 255), (255, 200, 0), (255, 64, 255), (0, 230, 230),
            (255, 140, 0), (180, 120, 255)]


def _window(a: np.ndarray, lo: float = -1350.0, hi: float = 150.0) -> np.ndarray:
    return (np.clip((a.astype(np.float32) - lo) / (hi - lo), 0, 1) * 255).astype(np.uint8)


def _tile(image2d: np.ndarray, labels2d: np.ndarray, px_w: float, px_h: float, size: int, caption: str):
    from PIL import Image, ImageDraw

    rgb = np.repeat(_window(image2d)[..., None], 3, axis=2)
    for lab in np.unique(labels2d[labels2d > 0]):
        m = labels2d == lab
        edge = m & ~binary_erosion(m)
        rgb[edge] = _COLOURS[(int(lab) - 1) % len(_COLOURS)]
    h, w = image2d.shape
    scale = size / max(w * px_w, h * px_h)
    img = Image.fromarray(rgb).resize((max(1, round(w * px_w * scale)), max(1, round(h * px_h * scale))),
                                      Image.Resampling.NEAREST)
    tile = Image.new("RGB", (size, size), (0, 0, 0))
    tile.paste(img, ((size - img.width) // 2, (size - img.height) // 2))
    draw = ImageDraw.Draw(tile)
    draw.text((4, 4), caption, fill=(255, 255, 255))
    for lab in np.unique(labels2d[labels2d > 0]):
        jj, ii = np.nonzero(labels2d == lab)
        x = (size - img.width) // 2 + (ii.max() + 2) * px_w * scale
        y = (size - img.height) // 2 + jj.min() * px_h * scale
        draw.text((x, y), str(int(lab)), fill=_COLOURS[(int(lab) - 1) % len(_COLOURS)])
    return tile


def write_preview(ct: Volume, labels: np.ndarray, path: str | Path, centres_k: list[int] | None = None,
                  n_even: int = 3, max_nodule_tiles: int = 6, tile: int = 320, columns: int = 4) -> Path:
    """Write the montage PNG to ``path`` (atomically) and return the path."""
    from PIL import Image

    from glance.io.atomic import atomic_path

    arr = ct.array
    nk = arr.shape[0]
    si, sj, sk = ct.spacing
    ks = list(dict.fromkeys(int(k) for k in (centres_k or [])[:max_nodule_tiles]))
    ks += [int(k) for k in np.linspace(0, nk - 1, n_even + 2)[1:-1] if int(k) not in ks]
    tiles = [_tile(arr[k], labels[k], si, sj, tile, f"axial k={k}") for k in ks]
    jc = arr.shape[1] // 2
    tiles.append(_tile(arr[::-1, jc, :], labels[::-1, jc, :], si, sk, tile, f"coronal j={jc}"))
    rows = -(-len(tiles) // columns)
    sheet = Image.new("RGB", (columns * tile, rows * tile), (0, 0, 0))
    for n, t in enumerate(tiles):
        sheet.paste(t, ((n % columns) * tile, (n // columns) * tile))
    path = Path(path)
    with atomic_path(path) as tmp:
        sheet.save(tmp, format="PNG")
    return path
