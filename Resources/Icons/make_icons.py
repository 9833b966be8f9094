"""Draw the extension and module icons (128 x 128 PNG) with Pillow.

Run from anywhere: ``python Resources/Icons/make_icons.py``. Writes
``Resources/Icons/GLANCE.png`` (extension icon, the index requires 128 x 128),
``GLANCESegmentation/Resources/Icons/GLANCESegmentation.png`` and
``GLANCETraining/Resources/Icons/GLANCETraining.png``. Drawing is deterministic,
so re-running it reproduces the committed files.
"""

from __future__ import annotations

from pathlib import Path

from PIL import Image, ImageDraw

SIZE = 128
SCALE = 4  # draw large, downsample: anti-aliased edges without extra dependencies
REPO = Path(__file__).resolve().parents[2]

BACKGROUND = (18, 42, 74)
LUNG = (176, 196, 214)
NODULE = (230, 25, 75)  # nodule colour 1 of glance.report.NODULE_COLOURS
CROSS = (255, 255, 0)
CURVE = (60, 180, 75)


def _canvas() -> tuple[Image.Image, ImageDraw.ImageDraw, float]:
    s = SCALE
    image = Image.new("RGBA", (SIZE * s, SIZE * s), (0, 0, 0, 0))
    draw = ImageDraw.Draw(image)
    draw.rounded_rectangle((2 * s, 2 * s, (SIZE - 2) * s, (SIZE - 2) * s), radius=22 * s, fill=BACKGROUND)
    return image, draw, s


def _lungs(draw: ImageDraw.ImageDraw, s: float) -> None:
    # Axial view: two lungs either side of the mediastinum.
    draw.ellipse((18 * s, 24 * s, 60 * s, 106 * s), fill=LUNG)
    draw.ellipse((68 * s, 24 * s, 110 * s, 106 * s), fill=LUNG)


def _nodule(draw: ImageDraw.ImageDraw, s: float, cx: float, cy: float, r: float) -> None:
    draw.ellipse(((cx - r) * s, (cy - r) * s, (cx + r) * s, (cy + r) * s), fill=NODULE)
    arm = r + 9
    w = int(2 * s)
    draw.line(((cx - arm) * s, cy * s, (cx - r - 2) * s, cy * s), fill=CROSS, width=w)
    draw.line(((cx + r + 2) * s, cy * s, (cx + arm) * s, cy * s), fill=CROSS, width=w)
    draw.line((cx * s, (cy - arm) * s, cx * s, (cy - r - 2) * s), fill=CROSS, width=w)
    draw.line((cx * s, (cy + r + 2) * s, cx * s, (cy + arm) * s), fill=CROSS, width=w)


def _finish(image: Image.Image, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    image.resize((SIZE, SIZE), Image.Resampling.LANCZOS).save(path, format="PNG", optimize=True)
    return path


def extension_icon() -> Image.Image:
    image, draw, s = _canvas()
    _lungs(draw, s)
    _nodule(draw, s, 86, 56, 9)
    return image


def segmentation_icon() -> Image.Image:
    image, draw, s = _canvas()
    _lungs(draw, s)
    _nodule(draw, s, 40, 70, 10)
    return image


def training_icon() -> Image.Image:
    image, draw, s = _canvas()
    _lungs(draw, s)
    # A falling loss curve across the lungs: the model learning.
    # Screen y grows downwards: high at the first epoch, flattening low.
    points = [(16 + 8 * i, 28 + 72 * (1 - 0.7**i)) for i in range(13)]
    draw.line([(x * s, y * s) for x, y in points], fill=CURVE, width=int(5 * s), joint="curve")
    return image


def main() -> list[Path]:
    return [
        _finish(extension_icon(), REPO / "Resources" / "Icons" / "GLANCE.png"),
        _finish(segmentation_icon(), REPO / "GLANCESegmentation" / "Resources" / "Icons" / "GLANCESegmentation.png"),
        _finish(training_icon(), REPO / "GLANCETraining" / "Resources" / "Icons" / "GLANCETraining.png"),
    ]


if __name__ == "__main__":
    for written in main():
        print(written)
