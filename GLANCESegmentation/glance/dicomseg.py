"""Step 7 (export for PACS): the nodule instance map as a binary DICOM Segmentation (highdicom).

One segment per nodule (label order = by confidence), coded as
Morphologically Altered Structure / Nodule in Lung, algorithm type AUTOMATIC
with the model's name and version; frames reference the source CT instances and
only frames where a segment is present are stored. ``read_dicom_seg`` maps a
SEG on the CT grid back to an instance map (readback checks, training data).
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from glance import __version__
from glance.errors import GlanceError, InputError
from glance.io.atomic import atomic_path
from glance.nodule import Nodule
from glance.report import AlgorithmInfo, nodule_colour
from glance.volume import Volume

log = logging.getLogger(__name__)

MANUFACTURER = "GLANCE"
SERIES_DESCRIPTION = "GLANCE lung nodules (research use, not for clinical use)"
CONTENT_LABEL = "GLANCE_NODULES"  # CS: upper case, at most 16 characters
# Tolerance (mm) when checking that the source files lie on the CT grid.
_POSITION_TOLERANCE_MM = 0.05
_ORIENTATION_TOLERANCE = 1e-4
# sRGB (IEC 61966-2-1, 4-digit matrix as in pixelmed and highdicom) to CIE XYZ, and the D65 white point.
_SRGB_TO_XYZ = np.array([[0.4124, 0.3576, 0.1805], [0.2126, 0.7152, 0.0722], [0.0193, 0.1192, 0.9505]])
_D65_WHITE = np.array([95.047, 100.0, 108.883])


@functools.cache
def dicom_seg_unavailable() -> str | None:
    """Why no DICOM SEG can be written with the installed packages (one line); None when it can.

    Inside Slicer the packages Slicer ships (pydicom, numpy) are never replaced, so where
    they rule out every highdicom release the export is refused with this reason instead.
    """
    import pydicom

    try:
        import pydicom.pixels  # new in pydicom 3
    except ImportError:
        # pydicom 2.x (Slicer 5.10 ships 2.4.4): only highdicom <= 0.22 accepts it, and 0.22 still
        # uses numpy.float_, which numpy 2 removed; Slicer 5.10 ships numpy 2.
        if not hasattr(np, "float_"):
            return (
                f"DICOM SEG export needs pydicom >= 3 here: no highdicom release supports "
                f"pydicom {pydicom.__version__} together with numpy {np.__version__}"
            )
    try:
        import highdicom  # noqa: F401
    except Exception as err:  # not installed, or a release that needs a newer pydicom than this one
        first_line = (str(err).strip().splitlines() or [type(err).__name__])[0]
        return f"DICOM SEG export needs highdicom, which cannot be imported here ({first_line})"
    return None


def _codes():
    from pydicom.sr.coding import Code

    return {
        "category": Code("49755003", "SCT", "Morphologically Altered Structure"),
        "type": Code("27925004", "SCT", "Nodule"),
        "region": Code("39607008", "SCT", "Lung"),
        "family": Code("123110", "DCM", "Artificial Intelligence"),
    }


def _read_sources(source_files: Sequence[Path], ct: Volume) -> list:
    """Read the CT instances (headers only) and check that file k is slice k of ``ct``."""
    import pydicom

    nk, nj, ni = ct.shape
    if len(source_files) != nk:
        raise InputError(f"{len(source_files)} source files for a CT of {nk} slices")
    datasets = []
    for k, path in enumerate(source_files):
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        expected = ct.ijk_to_lps([0.0, 0.0, float(k)])
        position = np.array(ds.ImagePositionPatient, dtype=float)
        orientation = np.array(ds.ImageOrientationPatient, dtype=float)
        if (int(ds.Rows), int(ds.Columns)) != (nj, ni):
            raise InputError(f"{path}: {ds.Rows}x{ds.Columns} pixels, the CT has {nj}x{ni}")
        if np.abs(position - expected).max() > _POSITION_TOLERANCE_MM:
            raise InputError(f"{path}: ImagePositionPatient {position.tolist()} is not slice {k} of the CT")
        if np.abs(orientation - ct.direction[:, :2].T.ravel()).max() > _ORIENTATION_TOLERANCE:
            raise InputError(f"{path}: ImageOrientationPatient differs from the CT's direction")
        datasets.append(ds)
    return datasets


def _segment_description(number: int, nodule: Nodule, algorithm: AlgorithmInfo, codes: dict):
    import highdicom as hd

    identification = hd.AlgorithmIdentificationSequence(
        name=algorithm.name,
        family=codes["family"],
        version=algorithm.version,
        source=MANUFACTURER,
        parameters={k: str(v) for k, v in algorithm.thresholds.items()} or None,
    )
    rgb = nodule_colour(nodule.label)
    # CIELabColor.from_rgb is new in highdicom 0.27 (display_color in 0.24); without them
    # (0.22 is the last release for pydicom 2) the attribute is set below, to the same value.
    from_rgb = getattr(hd.color.CIELabColor, "from_rgb", None)
    description = hd.seg.SegmentDescription(
        segment_number=number,
        segment_label=nodule.name,
        segmented_property_category=codes["category"],
        segmented_property_type=codes["type"],
        algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
        algorithm_identification=identification,
        tracking_id=nodule.name,
        tracking_uid=hd.UID(),
        anatomic_regions=[codes["region"]],
        **({"display_color": from_rgb(*rgb)} if from_rgb else {}),
    )
    if from_rgb is None:
        description.RecommendedDisplayCIELabValue = list(dicom_cielab(rgb))
    return description


def dicom_cielab(rgb: Sequence[float]) -> tuple[int, int, int]:
    """RGB 0-255 (sRGB) as a DICOM RecommendedDisplayCIELabValue: CIE L*a*b* (D65) scaled to 0-65535.

    The same conversion and scaling as highdicom's ``CIELabColor.from_rgb`` (0.27+),
    which is used whenever present; this one serves older releases (0.22 with pydicom 2).
    """
    linear = np.asarray(rgb, dtype=float) / 255.0
    linear = np.where(linear > 0.04045, ((linear + 0.055) / 1.055) ** 2.4, linear / 12.92) * 100
    xyz = _SRGB_TO_XYZ @ linear / _D65_WHITE
    f = np.where(xyz >= (6 / 29) ** 3, np.cbrt(xyz), xyz * 841 / 108 + 4 / 29)
    lab = (116 * f[1] - 16, 500 * (f[0] - f[1]), 200 * (f[1] - f[2]))
    # PS3.3 C.10.7.1.1: L* 0..100 and a*, b* -128..127 map linearly onto 0..0xFFFF.
    return (round(lab[0] * 0xFFFF / 100), round((lab[1] + 128) * 0xFFFF / 255), round((lab[2] + 128) * 0xFFFF / 255))


def write_dicom_seg(
    source_files: Sequence[Path],
    ct: Volume,
    labels: np.ndarray,
    nodules: Sequence[Nodule],
    out_path: Path,
    algorithm: AlgorithmInfo,
    accepted: Sequence[int] | None = None,
    series_number: int = 901,
) -> Path | None:
    """Write the nodules (all, or the ``accepted`` labels) as a binary DICOM SEG at ``out_path``.

    ``source_files`` are the CT instances in k order of ``ct`` (checked).
    Segment n is the n-th written nodule in label order. Returns the path, or
    None (and no file) when there is no nodule to write. Raises GlanceError
    (and writes nothing) when the installed packages cannot write a SEG, see
    :func:`dicom_seg_unavailable`.
    """
    if labels.shape != ct.shape:
        raise ValueError(f"label map shape {labels.shape} does not match CT grid {ct.shape}")
    chosen = [n for n in sorted(nodules, key=lambda n: n.label) if accepted is None or n.label in accepted]
    present = set(np.unique(labels).tolist())
    for n in chosen:
        if n.label not in present:
            log.warning("%s has no voxels in the label map; left out of the DICOM SEG", n.name)
    chosen = [n for n in chosen if n.label in present]
    if not chosen:
        log.info("no nodules to export: DICOM SEG not written (%s)", out_path)
        return None
    sources = _read_sources(source_files, ct)
    reason = dicom_seg_unavailable()
    if reason is not None:
        raise GlanceError(f"{out_path}: {reason}")
    import highdicom as hd

    codes = _codes()
    # Segment numbers 1..M; every other label (rejected, unknown) becomes background.
    lut = np.zeros(int(labels.max()) + 1, dtype=np.uint16)
    for number, nodule in enumerate(chosen, start=1):
        lut[nodule.label] = number
    seg = hd.seg.Segmentation(
        source_images=sources,
        pixel_array=lut[labels],
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=[_segment_description(i, n, algorithm, codes) for i, n in enumerate(chosen, start=1)],
        series_instance_uid=hd.UID(),
        series_number=series_number,
        sop_instance_uid=hd.UID(),
        instance_number=1,
        manufacturer=MANUFACTURER,
        manufacturer_model_name=algorithm.name,
        software_versions=f"glance {__version__}",
        device_serial_number=algorithm.version,  # the "device" is the model; its version identifies it
        content_label=CONTENT_LABEL,
        content_description=f"{algorithm.name} {algorithm.version} lung nodules",
        content_creator_name="GLANCE^Automatic",
        omit_empty_frames=True,
    )
    seg.SeriesDescription = SERIES_DESCRIPTION
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(out_path) as tmp:
        seg.save_as(tmp)
    log.info("wrote DICOM SEG with %d segment(s), %d frame(s): %s", len(chosen), int(seg.NumberOfFrames), out_path)
    return out_path


def read_dicom_seg(path: Path, ct: Volume) -> np.ndarray:
    """A DICOM SEG on ``ct``'s grid as a uint16 instance map; value = segment number.

    Where segments overlap the lowest segment number wins. A SEG on another grid
    (other orientation, pixel size or slice positions) raises InputError.
    """
    import highdicom as hd

    try:
        seg = hd.seg.segread(path)
    except Exception as exc:  # pydicom/highdicom raise many types for a bad file
        raise InputError(f"{path}: not a readable DICOM SEG ({exc})") from exc
    nk, nj, ni = ct.shape
    if (int(seg.Rows), int(seg.Columns)) != (nj, ni):
        raise InputError(f"{path}: {seg.Rows}x{seg.Columns} frames, the CT has {nj}x{ni}")
    frames = seg.pixel_array.reshape(-1, nj, ni)
    threshold = 0.5 * float(getattr(seg, "MaximumFractionalValue", 1))
    out = np.zeros(ct.shape, dtype=np.uint16)
    shared = seg.SharedFunctionalGroupsSequence[0]
    placed = []
    for f, group in enumerate(seg.PerFrameFunctionalGroupsSequence):
        # A functional group that is the same for all frames sits in the shared sequence.
        def item(keyword: str):
            return (group if keyword in group else shared)[keyword][0]

        number = int(item("SegmentIdentificationSequence").ReferencedSegmentNumber)
        orientation = np.array(item("PlaneOrientationSequence").ImageOrientationPatient, dtype=float)
        if np.abs(orientation - ct.direction[:, :2].T.ravel()).max() > _ORIENTATION_TOLERANCE:
            raise InputError(f"{path}: frame orientation differs from the CT's")
        position = np.array(item("PlanePositionSequence").ImagePositionPatient, dtype=float)
        i, j, k = ct.lps_to_ijk(position)
        slice_k = int(round(k))
        if abs(i) > 1e-2 or abs(j) > 1e-2 or abs(k - slice_k) > 1e-2 or not 0 <= slice_k < nk:
            raise InputError(f"{path}: frame {f + 1} at {position.tolist()} is not a slice of the CT")
        placed.append((number, slice_k, f))
    # Highest numbers first, so lower (more confident) segments overwrite them.
    for number, slice_k, f in sorted(placed, reverse=True):
        out[slice_k][frames[f] > threshold] = number
    return out
