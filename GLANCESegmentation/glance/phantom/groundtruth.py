"""Ground truth of a phantom (or of a real CT with inserted nodules), and writing it all out.

The instance label map lives on the CT grid (0 = background, n = nodule n); a
voxel belongs to a nodule when at least half of it is nodule. The JSON gives,
per nodule, the centre (occupancy-weighted, in voxel index and LPS mm), the
design diameter, the true volume (sum of partial-volume fractions times the
voxel volume, so it does not depend on the 50 % rule), type and attachment.
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from glance.volume import Volume

log = logging.getLogger(__name__)

FORMATS = {"dicom": None, "nrrd": ".nrrd", "nifti": ".nii.gz"}


@dataclass
class PhantomNodule:
    id: int
    centre_ijk: tuple[float, float, float]
    centre_lps: tuple[float, float, float]
    diameter_mm: float
    volume_mm3: float
    label_voxels: int
    nodule_type: str  # solid | part-solid | ground-glass | unknown (real nodules)
    shape: str  # round | ellipsoid | lobulated | spiculated | real
    attachment: str  # isolated | juxta-vascular | juxta-pleural | unknown
    mean_hu: float  # design HU (solid part), or measured mean for real nodules
    source: str = "synthetic"  # synthetic | lidc-crop:<patient>:<n> | lidc-xml | label-map
    extra: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        d = asdict(self)
        for key in ("centre_ijk", "centre_lps"):
            d[key] = [round(float(v), 3) for v in d[key]]
        for key in ("diameter_mm", "volume_mm3", "mean_hu"):
            d[key] = round(float(d[key]), 3)
        return d


def claim_voxels(labels_box: np.ndarray, weights: np.ndarray, nid: int) -> np.ndarray | None:
    """Label ``nid`` on the voxels at least half inside the nodule that no other nodule holds, and return
    them; None, with nothing labelled, when there are none: a nodule without voxels has no centre or
    volume, so its caller skips it and leaves the CT as it was."""
    inside = (weights >= 0.5) & (labels_box == 0)
    if not inside.any():
        return None
    labels_box[inside] = nid
    return inside


def measure(nid: int, weights: np.ndarray, box, ct: Volume, label_voxels: int, **fields) -> PhantomNodule:
    """A PhantomNodule from its partial-volume ``weights`` on ``box`` of the CT grid."""
    (k0, _), (j0, _), (i0, _) = box
    w = weights.astype(np.float64)
    total = float(w.sum())
    kk, jj, ii = np.indices(w.shape)
    centre = (float((ii * w).sum() / total + i0), float((jj * w).sum() / total + j0),
              float((kk * w).sum() / total + k0))
    lps = ct.ijk_to_lps(np.asarray(centre))
    return PhantomNodule(id=nid, centre_ijk=centre, centre_lps=tuple(float(v) for v in lps),
                         volume_mm3=total * float(np.prod(ct.spacing)), label_voxels=label_voxels, **fields)


@dataclass
class Phantom:
    ct: Volume  # int16 HU
    labels: np.ndarray  # uint16 instance map on the CT grid
    nodules: list[PhantomNodule]
    tissue: np.ndarray | None = None  # uint8 tissue classes (synthetic phantoms only)
    info: dict = field(default_factory=dict)  # seed, settings, source scan

    def to_json(self) -> str:
        doc = {
            "info": self.info,
            "grid": {
                "size_ijk": list(self.ct.shape[::-1]),
                "spacing": list(self.ct.spacing),
                "origin": list(self.ct.origin),
                "direction": self.ct.direction.reshape(-1).tolist(),
            },
            "nodules": [n.to_dict() for n in self.nodules],
        }
        return json.dumps(doc, indent=1, sort_keys=False) + "\n"

    def write(self, folder: str | Path, fmt: str = "nrrd", uid_seed: str | None = None) -> dict[str, Path]:
        """Write the CT, ``labels`` (same grid) and ``nodules.json`` into ``folder`` (which must exist)."""
        from glance.io import atomic_write_text, write_image

        folder = Path(folder)
        if fmt not in FORMATS:
            raise ValueError(f"unknown format {fmt!r} (use {', '.join(FORMATS)})")
        paths: dict[str, Path] = {}
        if fmt == "dicom":
            from glance.io.dicom_write import DicomSeriesInfo, write_dicom_series

            info = DicomSeriesInfo(slice_thickness=self.info.get("slice_thickness_mm"),
                                   pixel_padding_value=self.info.get("padding_hu"))
            seed = uid_seed or f"glance-phantom-{self.info.get('seed')}"
            paths["ct"] = write_dicom_series(self.ct, folder / "ct", seed, info).folder
            label_suffix = ".nrrd"
        else:
            paths["ct"] = write_image(self.ct, folder / f"ct{FORMATS[fmt]}")
            label_suffix = FORMATS[fmt]
        paths["labels"] = write_image((self.labels, self.ct), folder / f"labels{label_suffix}")
        paths["nodules"] = folder / "nodules.json"
        atomic_write_text(paths["nodules"], self.to_json())
        log.info("wrote %s", ", ".join(str(p) for p in paths.values()))
        return paths
