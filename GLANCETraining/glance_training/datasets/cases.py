"""The one case type every training data set yields, and the reader of local reviewed cases.

A :class:`Case` is cheap: ids plus loaders. Nothing is read from disk until
:meth:`Case.load`, so a source of 1000 LUNA scans costs a file listing, and a
training loop holds only the few cases its sampler has cached.

Local cases are what the segmentation module exports after review: one folder per
case holding the CT (DICOM series, NRRD, NIfTI, MHD/MHA) and its nodule
segmentation as a Slicer ``.seg.nrrd`` (:func:`glance.io.read_seg_nrrd`; segment n of the
file becomes label n + 1, the later segment winning where two overlap), a DICOM-SEG, or a
label-map volume (NRRD/NIfTI/MHA whose file name contains ``label``, ``mask`` or ``seg``).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Protocol, runtime_checkable

import numpy as np

from glance.errors import InputError
from glance.volume import Volume

log = logging.getLogger(__name__)

VOLUME_SUFFIXES = (".nrrd", ".nhdr", ".nii", ".nii.gz", ".mha", ".mhd")
LABEL_NAME_HINTS = ("label", "mask", "seg")


@dataclass(frozen=True)
class Annotation:
    """One annotated finding of a case, in patient coordinates.

    ``excluded`` marks findings a detector is neither rewarded nor penalised for
    (LUNA16's annotations_excluded.csv, LNDb non-nodules and nodules < 3 mm).
    ``label`` is the finding's value in the case's instance label map, 0 when the
    finding has a centre and diameter but no mask.
    """

    centre_lps: tuple[float, float, float]
    diameter_mm: float
    excluded: bool = False
    label: int = 0
    kind: str = ""  # what the finding is, where the source says (phantoms: "solid, juxta-vascular")


@dataclass
class LoadedCase:
    """A case read into memory: CT, instance label map on the CT grid (or None), findings."""

    case_id: str
    patient_id: str
    source: str
    ct: Volume
    labels: np.ndarray | None
    nodules: list[Annotation]


LabelsLoader = Callable[[Volume], "np.ndarray | None"]
NodulesLoader = Callable[[Volume, "np.ndarray | None"], "list[Annotation]"]


@dataclass
class Case:
    """A lazily loaded case.

    ``ct`` is a Volume or a function returning one. ``labels`` is an instance map
    (uint16, 0 = background, n = finding n) on the CT grid, a function of the
    loaded CT returning one, or None when the source has no masks. ``nodules`` is a
    list, or a function of (CT, labels) for sources whose findings are only known
    once the images are read (LIDC XML, label maps).
    """

    case_id: str
    patient_id: str
    source: str
    ct: Volume | Callable[[], Volume]
    labels: np.ndarray | LabelsLoader | None = None
    nodules: Sequence[Annotation] | NodulesLoader = field(default_factory=list)
    metadata: dict = field(default_factory=dict)
    sampling_weight: float = 1.0  # relative chance of being drawn within its source (data spec case_weights)
    # Relative chance of each finding (by label) on a nodule slice of this case; unlisted ones weigh 1.
    nodule_weights: dict[int, float] = field(default_factory=dict)

    def load(self) -> LoadedCase:
        ct = self.ct() if callable(self.ct) else self.ct
        labels = self.labels(ct) if callable(self.labels) else self.labels
        if labels is not None and labels.shape != ct.shape:
            raise InputError(f"{self.case_id}: label map {labels.shape} does not match the CT grid {ct.shape}")
        nodules = self.nodules(ct, labels) if callable(self.nodules) else list(self.nodules)
        return LoadedCase(self.case_id, self.patient_id, self.source, ct, labels, nodules)


@runtime_checkable
class CaseSource(Protocol):
    """A sized, indexable, iterable collection of lazy cases."""

    name: str

    def __len__(self) -> int: ...

    def __getitem__(self, index: int) -> Case: ...

    def __iter__(self) -> Iterator[Case]: ...


class CaseList:
    """The concrete :class:`CaseSource`: a named list of lazy cases."""

    def __init__(self, name: str, cases: Sequence[Case]):
        self.name = name
        self._cases = list(cases)

    def __len__(self) -> int:
        return len(self._cases)

    def __getitem__(self, index: int) -> Case:
        return self._cases[index]

    def __iter__(self) -> Iterator[Case]:
        return iter(self._cases)

    def __repr__(self) -> str:
        return f"CaseList({self.name!r}, {len(self)} cases)"

    @property
    def patient_ids(self) -> list[str]:
        return [c.patient_id for c in self._cases]


def volume_loader(path: Path) -> Callable[[], Volume]:
    """A picklable loader of one CT (DataLoader workers may be spawned, not forked)."""
    return partial(read_volume, Path(path))


def read_volume(path: Path, series_uid: str | None = None) -> Volume:
    """The engine's reader (validation, HU, LPS geometry), imported when first needed."""
    from glance.io import read_volume as engine_read

    return engine_read(path, series_uid=series_uid)


def nodules_from_labels(ct: Volume, labels: np.ndarray | None) -> list[Annotation]:
    """One finding per label value: centroid and equivalent-sphere diameter of its voxels."""
    if labels is None:
        return []
    import cc3d

    stats = cc3d.statistics(np.ascontiguousarray(labels))
    counts, centroids = stats["voxel_counts"], stats["centroids"]
    voxel_mm3 = float(np.prod(ct.spacing))
    out = []
    for value in range(1, len(counts)):
        if counts[value] == 0:
            continue
        k, j, i = centroids[value]
        centre = ct.ijk_to_lps(np.array([i, j, k]))
        diameter = 2.0 * (3.0 * counts[value] * voxel_mm3 / (4.0 * np.pi)) ** (1.0 / 3.0)
        out.append(Annotation(tuple(float(v) for v in centre), float(diameter), label=value))
    return out


def resample_labels(labels: Volume, ct: Volume) -> np.ndarray:
    """A label volume on its own grid, on ``ct``'s grid: pasted where the voxels coincide, else nearest neighbour."""
    from glance.io import place_on_grid

    return place_on_grid(labels, ct, resample=True)


# --- local cases folder ------------------------------------------------------------------


@dataclass(frozen=True)
class _LocalFiles:
    case_id: str
    ct: Path  # a volume file or a DICOM folder
    segmentation: Path
    kind: str  # "seg.nrrd" | "dicom-seg" | "labelmap"


def local_cases(root: str | Path, name: str = "local",
                patient_of: Callable[[str], str] | None = None) -> CaseList:
    """Reviewed cases in ``root``: each sub-folder one case (or ``root`` itself if it holds one).

    The case and patient id is the folder name: the split is by patient, so a site
    with several scans per patient names the folders ``<patient>`` or passes
    ``patient_of`` (case folder name -> patient id).
    """
    root = Path(root)
    if not root.is_dir():
        raise InputError(f"{root}: not a folder of cases")
    folders = [root] if _find_segmentation(root) else sorted(p for p in root.iterdir() if p.is_dir())
    cases = []
    for folder in folders:
        files = _case_files(folder)
        if files is None:
            log.warning("%s: no CT + segmentation pair found, skipped", folder)
            continue
        cases.append(_local_case(files, name, patient_of(files.case_id) if patient_of else files.case_id))
    if not cases:
        raise InputError(f"{root}: no case folder with a CT and a segmentation")
    log.info("%s: %d local cases", root, len(cases))
    return CaseList(name, cases)


def _local_case(files: _LocalFiles, source: str, patient_id: str) -> Case:
    load_labels = partial(read_segmentation, files.segmentation, files.kind)
    return Case(files.case_id, patient_id, source, volume_loader(files.ct), load_labels, nodules_from_labels,
                metadata={"ct": str(files.ct), "segmentation": str(files.segmentation)})


def read_segmentation(path: Path, kind: str, ct: Volume) -> np.ndarray:
    """Instance label map of a segmentation file on ``ct``'s grid."""
    if kind == "seg.nrrd":
        from glance.io import read_seg_nrrd

        return resample_labels(read_seg_nrrd(path).instance_map(), ct)
    if kind == "dicom-seg":
        from glance.dicomseg import read_dicom_seg

        return np.asarray(read_dicom_seg(path, ct), dtype=np.uint16)
    from glance.io import read_label_map

    return resample_labels(read_label_map(path), ct)


def _has_suffix(path: Path, suffixes: Sequence[str]) -> bool:
    name = path.name.lower()
    return any(name.endswith(s) for s in suffixes)


def _find_segmentation(folder: Path) -> tuple[Path, str] | None:
    files = sorted(p for p in folder.iterdir() if p.is_file())
    for p in files:
        if p.name.lower().endswith(".seg.nrrd"):
            return p, "seg.nrrd"
    for p in files:
        if _has_suffix(p, VOLUME_SUFFIXES) and any(h in p.name.lower() for h in LABEL_NAME_HINTS):
            return p, "labelmap"
    for p in files:
        if _is_dicom_seg(p):
            return p, "dicom-seg"
    return None


def _is_dicom_seg(path: Path) -> bool:
    if path.suffix.lower() not in (".dcm", "") or path.name.startswith("."):
        return False
    import pydicom

    try:
        ds = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=["Modality"])
    except Exception:  # not DICOM: any pydicom error means "no"
        return False
    return str(ds.get("Modality", "")) == "SEG"


def _case_files(folder: Path) -> _LocalFiles | None:
    found = _find_segmentation(folder)
    if found is None:
        return None
    seg, kind = found
    volumes = [
        p for p in sorted(folder.iterdir())
        if p.is_file() and p != seg and _has_suffix(p, VOLUME_SUFFIXES)
        and not p.name.lower().endswith(".seg.nrrd")
        and not any(h in p.name.lower() for h in LABEL_NAME_HINTS)
        and not p.name.lower().endswith(".raw")
    ]
    if volumes:
        if len(volumes) > 1:
            log.warning("%s: several CT volumes, using %s", folder, volumes[0].name)
        return _LocalFiles(folder.name, volumes[0], seg, kind)
    dicom_dirs = [d for d in sorted(folder.iterdir()) if d.is_dir()]
    if any(p.suffix.lower() == ".dcm" and p != seg for p in folder.iterdir() if p.is_file()):
        return _LocalFiles(folder.name, folder, seg, kind)  # DICOM series beside its DICOM-SEG
    if dicom_dirs:
        return _LocalFiles(folder.name, dicom_dirs[0], seg, kind)
    return None
