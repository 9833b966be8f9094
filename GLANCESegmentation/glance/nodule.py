"""The result type of "Segment nodules": one measured nodule.

Positions are LPS mm (engine convention); ``glance.scene`` converts to RAS.
``label`` is the value of this nodule in the instance label map written on the
input grid (1..N, ordered by decreasing confidence).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field


@dataclass
class Nodule:
    label: int
    centre_lps: tuple[float, float, float]
    centre_ijk: tuple[float, float, float]
    long_axis_mm: float
    short_axis_mm: float
    volume_mm3: float
    mean_hu: float
    median_hu: float
    nodule_type: str  # "solid" | "part-solid" | "ground-glass"
    confidence: float
    # Axial slice (k index on the input grid) where the long axis was measured, and
    # the axis end points in LPS mm, so a viewer can draw the calipers.
    axial_slice: int = -1
    long_axis_lps: tuple[tuple[float, float, float], tuple[float, float, float]] | None = None
    short_axis_lps: tuple[tuple[float, float, float], tuple[float, float, float]] | None = None
    # Bounding box on the input grid, (k0, j0, i0, k1, j1, i1), end exclusive.
    bbox: tuple[int, int, int, int, int, int] | None = None
    extra: dict = field(default_factory=dict)

    @property
    def name(self) -> str:
        return f"Nodule {self.label}"

    def to_dict(self) -> dict:
        d = asdict(self)
        d["name"] = self.name
        return d
