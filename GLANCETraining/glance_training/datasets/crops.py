"""The two real LIDC-IDRI crop sets of ``shared/data`` as cases.

- ``lidc-nodule-crops``: 64^3 HU crops with their 50 % consensus masks, native spacing,
  centred (index 32) on the rounded consensus centroid. With ``index.csv`` each crop
  gets its true LPS position, so a crop case has the geometry of its scan.
- ``lidc-maxslice-crops``: 2287 axial 71x71 crops, one reader's mask each, from 740
  patients. A crop is a one-slice case: no 3D context and no known slice thickness
  (the slice spacing is set to the in-plane spacing and ``metadata["two_d"]`` is True);
  its position is crop-local (origin 0). A slice sampler asking for neighbouring
  slices gets this slice repeated.

  Outline convention: the source's masks hold the polygon fill *plus the contour pixels*, and
  LIDC readers drew the contour just outside the nodule. ``bench/reader_outline.py`` measures it
  on the 2287 crops (medians over crops): the contour pixels are at -660 HU, near the lung around
  them (-754); the first ring inside them is at -462, the 50 % level between the core (-165) and
  the lung. The contour is a third of a median crop's mask. ``outline="interior"`` drops it (the
  mask's 4-connected boundary), which puts the reference where the phantom's (voxels at least
  half nodule) and a volumetry tool's are; ``outline="drawn"`` (default) keeps the masks as drawn.

The npz arrays are read once per source on first use (about 35 MB for the max-slice
set), not per case.
"""

from __future__ import annotations

import csv
import logging
from functools import partial
from pathlib import Path

import numpy as np

from glance.errors import InputError
from glance.volume import Volume

from .cases import Annotation, Case, CaseList

log = logging.getLogger(__name__)

NODULE_CROPS_FILE = "lidc_nodule_crops_64.npz"
MAXSLICE_FILE = "lidc_maxslice_71px.npz"
_MAXSLICE_KEYS = ("image_hu", "mask", "spacing_mm", "patient_id")
OUTLINES = ("drawn", "interior")


class _NpzArrays:
    """Arrays of one npz, decompressed on first access and then shared by all its cases."""

    def __init__(self, path: Path, keys: tuple[str, ...]):
        self.path = path
        self.keys = keys
        self._arrays: dict[str, np.ndarray] | None = None

    def __getitem__(self, key: str) -> np.ndarray:
        if self._arrays is None:
            with np.load(self.path, allow_pickle=False) as z:
                self._arrays = {k: z[k] for k in self.keys}
        return self._arrays[key]

    def __getstate__(self) -> dict:
        # Workers re-read the file rather than receive a pickled copy of the arrays.
        return {"path": self.path, "keys": self.keys, "_arrays": None}


def _find(folder: Path, name: str) -> Path:
    path = folder / name if folder.is_dir() else folder
    if not path.is_file():
        raise InputError(f"{path}: crop file not found")
    return path


# --- 3D nodule crops ---------------------------------------------------------------------


def nodule_crop_cases(folder: str | Path, name: str = "lidc-nodule-crops") -> CaseList:
    """The 64^3 consensus-mask crops (``lidc_nodule_crops_64.npz`` + ``index.csv``)."""
    folder = Path(folder)
    npz = _find(folder, NODULE_CROPS_FILE)
    rows = _read_index(npz.parent / "index.csv")
    arrays = _NpzArrays(npz, ("hu", "mask", "spacing_xyz"))
    cases = []
    for n, row in enumerate(rows):
        case_id = f"{row['patient_id']}/nodule{row['nodule_index']}"
        cases.append(Case(case_id, row["patient_id"], name, partial(_nodule_crop_volume, arrays, n, row),
                          partial(_nodule_crop_labels, arrays, n),
                          partial(_nodule_crop_findings, float(row["mean_reader_diameter_mm"])),
                          metadata={"series_uid": row["series_uid"], "n_readers": int(row["n_readers"])}))
    return CaseList(name, cases)


def _read_index(path: Path) -> list[dict]:
    if not path.is_file():
        raise InputError(f"{path}: index.csv of the crops not found")
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def _nodule_crop_volume(arrays: _NpzArrays, n: int, row: dict) -> Volume:
    hu = arrays["hu"][n]
    spacing = tuple(float(s) for s in arrays["spacing_xyz"][n])
    centre_lps = np.array([float(v) for v in row["crop_center_lps_mm"].split()])
    # Voxel 32 of each axis is the crop centre; the LIDC scans here are axial, direction identity.
    half = np.array([hu.shape[2] // 2, hu.shape[1] // 2, hu.shape[0] // 2])
    origin = centre_lps - half * np.asarray(spacing)
    return Volume(hu, spacing, tuple(origin), np.eye(3), {"patient_id": row["patient_id"]})


def _nodule_crop_labels(arrays: _NpzArrays, n: int, ct: Volume) -> np.ndarray:
    return (arrays["mask"][n] > 0).astype(np.uint16)


def _nodule_crop_findings(diameter: float, ct: Volume, labels: np.ndarray) -> list[Annotation]:
    """The index's mean reader diameter, centred on the consensus mask's centroid."""
    kk, jj, ii = np.nonzero(labels)
    centre = ct.ijk_to_lps(np.array([ii.mean(), jj.mean(), kk.mean()]))
    return [Annotation(tuple(float(v) for v in centre), diameter, label=1)]


# --- 2D max-slice crops --------------------------------------------------------------------


def maxslice_crop_cases(folder: str | Path, name: str = "lidc-maxslice-crops", outline: str = "drawn") -> CaseList:
    """The 71x71 single-reader max-slice crops, one one-slice case each, with masks as the readers
    drew them or their interior (module docstring). The outline does not change the cases or their
    patients, so a split is the same for both."""
    if outline not in OUTLINES:
        raise InputError(f"outline={outline!r}: expected one of {', '.join(OUTLINES)}")
    npz = _find(Path(folder), MAXSLICE_FILE)
    arrays = _NpzArrays(npz, _MAXSLICE_KEYS)
    with np.load(npz, allow_pickle=False) as z:  # ids only: cheap members of the archive
        patients = z["patient_id"].astype(str)
        readings = z["reading_id"]
    cases = [
        Case(f"{pid}/reading{int(rid)}", str(pid), name, partial(_maxslice_volume, arrays, n),
             partial(_maxslice_labels, arrays, n, outline), partial(_maxslice_findings, arrays, n),
             metadata={"two_d": True})
        for n, (pid, rid) in enumerate(zip(patients, readings))
    ]
    log.info("%s: %d crops from %d patients, %s outlines", npz, len(cases), len(set(patients)), outline)
    return CaseList(name, cases)


def _maxslice_volume(arrays: _NpzArrays, n: int) -> Volume:
    s = float(arrays["spacing_mm"][n])
    return Volume(arrays["image_hu"][n][None], (s, s, s), metadata={"two_d": True})


def _maxslice_labels(arrays: _NpzArrays, n: int, outline: str, ct: Volume) -> np.ndarray:
    mask = arrays["mask"][n] > 0
    if outline == "interior":
        mask = outline_interior(mask)
    return mask[None].astype(np.uint16)


def outline_interior(mask: np.ndarray) -> np.ndarray:
    """A 2D reader mask without its contour pixels (those with a 4-neighbour outside the mask).
    A mask too thin to have an interior is kept as drawn: the nodule is then no wider than its
    outline, and an empty reference would make it vanish from the data."""
    from scipy import ndimage

    inside = ndimage.binary_erosion(mask, structure=ndimage.generate_binary_structure(2, 1), border_value=0)
    return inside if inside.any() else mask


def _maxslice_findings(arrays: _NpzArrays, n: int, ct: Volume, labels: np.ndarray) -> list[Annotation]:
    _, jj, ii = np.nonzero(labels)
    centre = ct.ijk_to_lps(np.array([ii.mean(), jj.mean(), 0.0]))
    # Equivalent-circle diameter of the outline on its largest slice, as the index reports it.
    diameter = 2.0 * np.sqrt(len(ii) / np.pi) * ct.spacing[0]
    return [Annotation(tuple(float(v) for v in centre), float(diameter), label=1)]


def lidc_series_patients(folder: str | Path) -> dict[str, str]:
    """{SeriesInstanceUID: LIDC patient id} from the max-slice crop set (740 patients).

    LUNA16 names scans by LIDC series uid; mapping them to patients keeps the split
    by patient across LUNA16 and the LIDC-derived sets.
    """
    npz = _find(Path(folder), MAXSLICE_FILE)
    with np.load(npz, allow_pickle=False) as z:
        return dict(zip(z["series_uid"].astype(str).tolist(), z["patient_id"].astype(str).tolist()))
