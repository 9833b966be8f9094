"""Nodules of an LIDC-IDRI reader XML, as consensus masks on the CT grid.

An LIDC XML holds up to four reading sessions; each reader outlines every
nodule >= 3 mm slice by slice (``unblindedReadNodule`` with ``characteristics``;
smaller ones carry a single point and no characteristics, and are skipped).
We follow pylidc (the reference the shared data was made with):

- a reader's mask is the filled contour polygon on its slice, without the
  contour pixels themselves (LIDC draws the outline just outside the nodule),
  minus any exclusion contours;
- marks of different readers belong to one nodule when the closest points of
  their contours are within the slice thickness (connected components of that
  graph); the tolerance shrinks while a group would hold two marks of one
  reader or more marks than readers;
- the nodule mask is the 50 % consensus: voxels marked by at least half of the
  readers who marked that nodule.

Contour (x, y) are DICOM (column, row) = Volume index (i, j); the slice is
found from ``imageZposition`` (or the SOP instance UID when the Volume's
metadata lists them as ``sop_instance_uids``).
"""

from __future__ import annotations

import logging
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from scipy.sparse.csgraph import connected_components
from scipy.spatial.distance import cdist

from glance.errors import InputError
from glance.volume import Volume

log = logging.getLogger(__name__)

_NS = {"l": "http://www.nih.gov"}


@dataclass
class _Contour:
    z: float
    sop_uid: str
    inclusion: bool
    xy: np.ndarray  # (n, 2) int: column, row


@dataclass
class _Mark:
    """One reader's outline of one nodule."""

    reader: int
    nodule_id: str
    contours: list[_Contour]


@dataclass
class LidcNodule:
    index: int  # 1-based, ordered by centroid slice like pylidc
    n_readers: int
    bbox: tuple[int, int, int, int, int, int]  # (k0, j0, i0, k1, j1, i1), end exclusive
    mask: np.ndarray  # bool, the consensus mask inside bbox
    centroid_ijk: tuple[float, float, float]
    centroid_lps: tuple[float, float, float]
    volume_mm3: float
    n_voxels: int
    reader_diameters_mm: list[float] = field(default_factory=list)
    reader_ids: list[int] = field(default_factory=list)

    @property
    def mean_diameter_mm(self) -> float | None:
        return float(np.mean(self.reader_diameters_mm)) if self.reader_diameters_mm else None

    def paint(self, labels: np.ndarray, value: int) -> None:
        """Write ``value`` into ``labels`` (the full CT grid) where the consensus mask is set."""
        k0, j0, i0, k1, j1, i1 = self.bbox
        labels[k0:k1, j0:j1, i0:i1][self.mask] = value

    def to_dict(self) -> dict:
        return {
            "index": self.index,
            "n_readers": self.n_readers,
            "bbox": list(self.bbox),
            "centroid_ijk": [round(v, 3) for v in self.centroid_ijk],
            "centroid_lps": [round(v, 3) for v in self.centroid_lps],
            "volume_mm3": round(self.volume_mm3, 2),
            "n_voxels": self.n_voxels,
            "mean_diameter_mm": None if self.mean_diameter_mm is None else round(self.mean_diameter_mm, 2),
            "reader_diameters_mm": [round(d, 2) for d in self.reader_diameters_mm],
        }


def read_lidc_nodules(xml_path: str | Path, volume: Volume, clevel: float = 0.5) -> list[LidcNodule]:
    """The >= 3 mm nodules of an LIDC reader XML as consensus masks on ``volume``'s grid."""
    xml_path = Path(xml_path)
    marks = _parse_marks(xml_path)
    if not marks:
        return []
    slice_of = _slice_locator(volume, xml_path)
    pix_masks = [_rasterise(m, slice_of, volume.shape) for m in marks]
    tol = float(volume.metadata.get("slice_thickness", volume.spacing[2]))
    clusters = _cluster(marks, slice_of, volume, tol)
    nodules = [_consensus(clusters[c], marks, pix_masks, volume, clevel) for c in range(len(clusters))]
    nodules = [n for n in nodules if n is not None]
    nodules.sort(key=lambda n: n.centroid_ijk[2])
    for idx, n in enumerate(nodules, start=1):
        n.index = idx
    log.info("%s: %d marks from %d readers -> %d nodules", xml_path.name, len(marks),
             len({m.reader for m in marks}), len(nodules))
    return nodules


def lidc_label_map(nodules: list[LidcNodule], shape: tuple[int, int, int]) -> np.ndarray:
    """Instance label map (uint16): nodule ``n.index`` where its consensus mask is set."""
    labels = np.zeros(shape, dtype=np.uint16)
    for n in nodules:
        n.paint(labels, n.index)
    return labels


# --- parsing -------------------------------------------------------------------------


def _parse_marks(xml_path: Path) -> list[_Mark]:
    try:
        root = ET.parse(xml_path).getroot()
    except (OSError, ET.ParseError) as exc:
        raise InputError(f"{xml_path}: not a readable LIDC XML ({exc})") from exc
    if not root.tag.endswith("LidcReadMessage"):
        raise InputError(f"{xml_path}: not an LIDC reader XML (root element {root.tag})")
    marks: list[_Mark] = []
    for reader, session in enumerate(root.findall("l:readingSession", _NS)):
        for nod in session.findall("l:unblindedReadNodule", _NS):
            # Nodules < 3 mm carry no characteristics and only a centre point.
            if nod.find("l:characteristics", _NS) is None:
                continue
            contours = [_parse_roi(roi) for roi in nod.findall("l:roi", _NS)]
            contours = [c for c in contours if len(c.xy)]
            if contours:
                marks.append(_Mark(reader, nod.findtext("l:noduleID", "", _NS).strip(), contours))
    return marks


def _parse_roi(roi: ET.Element) -> _Contour:
    xs = [int(e.findtext("l:xCoord", namespaces=_NS)) for e in roi.findall("l:edgeMap", _NS)]
    ys = [int(e.findtext("l:yCoord", namespaces=_NS)) for e in roi.findall("l:edgeMap", _NS)]
    return _Contour(
        z=float(roi.findtext("l:imageZposition", "nan", _NS)),
        sop_uid=roi.findtext("l:imageSOP_UID", "", _NS).strip(),
        inclusion=roi.findtext("l:inclusion", "TRUE", _NS).strip().upper() == "TRUE",
        xy=np.stack([xs, ys], axis=1) if xs else np.zeros((0, 2), int),
    )


def _slice_locator(volume: Volume, xml_path: Path):
    """A function contour -> k index on ``volume``."""
    uids = volume.metadata.get("sop_instance_uids")
    by_uid = {u: k for k, u in enumerate(uids)} if uids else {}
    nk = volume.shape[0]
    slice_z = volume.ijk_to_lps(np.stack([np.zeros(nk), np.zeros(nk), np.arange(nk)], axis=1))[:, 2]
    half = abs(volume.spacing[2] * volume.direction[2, 2]) / 2 + 1e-3

    def slice_of(c: _Contour) -> int:
        if c.sop_uid in by_uid:
            return by_uid[c.sop_uid]
        k = int(np.argmin(np.abs(slice_z - c.z)))
        if abs(slice_z[k] - c.z) > half:
            raise InputError(f"{xml_path}: contour at z={c.z} mm matches no slice of the CT")
        return k

    return slice_of


# --- one reader's mask ----------------------------------------------------------------


def _inside_polygon(xy: np.ndarray, px: np.ndarray, py: np.ndarray) -> np.ndarray:
    """Even-odd point-in-polygon test for integer pixel points (vectorised over points x edges)."""
    x1, y1 = xy[:, 0].astype(float), xy[:, 1].astype(float)
    x2, y2 = np.roll(x1, -1), np.roll(y1, -1)
    px, py = px[:, None].astype(float), py[:, None].astype(float)
    crosses = (y1 > py) != (y2 > py)
    with np.errstate(divide="ignore", invalid="ignore"):
        x_at = x1 + (py - y1) * (x2 - x1) / (y2 - y1)
    return np.logical_xor.reduce(crosses & (px < x_at), axis=1)


def _rasterise(mark: _Mark, slice_of, shape) -> dict[int, tuple[np.ndarray, np.ndarray]]:
    """{k: (j, i) pixel indices} of one reader's mask (filled polygon minus its outline)."""
    per_slice: dict[int, set] = {}
    for inclusion in (True, False):
        for c in (c for c in mark.contours if c.inclusion == inclusion):
            k = slice_of(c)
            x0, y0 = c.xy.min(axis=0)
            x1, y1 = c.xy.max(axis=0)
            gy, gx = np.mgrid[y0:y1 + 1, x0:x1 + 1]
            gx, gy = gx.ravel(), gy.ravel()
            inside = _inside_polygon(c.xy, gx, gy) if len(c.xy) > 2 else np.zeros(gx.shape, bool)
            region = set(zip(gy[inside].tolist(), gx[inside].tolist()))
            outline = set(zip(c.xy[:, 1].tolist(), c.xy[:, 0].tolist()))
            cur = per_slice.setdefault(k, set())
            if inclusion:
                cur |= region
            else:
                cur -= region
            cur -= outline
    out = {}
    for k, pts in per_slice.items():
        pts = [(j, i) for j, i in pts if 0 <= j < shape[1] and 0 <= i < shape[2]]
        if pts:
            arr = np.asarray(pts)
            out[k] = (arr[:, 0], arr[:, 1])
    return out


def _reader_diameter(mark: _Mark, spacing) -> float:
    """Largest in-plane distance between outline points of any one contour (pylidc's diameter)."""
    best = 0.0
    for c in mark.contours:
        if c.inclusion and len(c.xy) > 1:
            pts = c.xy * np.asarray(spacing[:2])
            best = max(best, float(cdist(pts, pts).max()))
    return best


# --- grouping and consensus -------------------------------------------------------------


def _cluster(marks: list[_Mark], slice_of, volume: Volume, tol: float) -> list[list[int]]:
    pts = []
    for m in marks:
        ijk = np.concatenate([np.c_[c.xy, np.full(len(c.xy), slice_of(c))] for c in m.contours])
        pts.append(volume.ijk_to_lps(ijk))
    n = len(marks)
    dist = np.zeros((n, n))
    for a in range(n):
        for b in range(a + 1, n):
            dist[a, b] = dist[b, a] = cdist(pts[a], pts[b]).min()
    readers = np.array([m.reader for m in marks])
    max_group = len(set(readers.tolist()))
    while True:
        _, cid = connected_components(dist <= tol, directed=False)
        groups = [np.flatnonzero(cid == c).tolist() for c in np.unique(cid)]
        ok = all(len(g) <= max_group and len(set(readers[g].tolist())) == len(g) for g in groups)
        if ok or tol < 0.1:
            if not ok:
                log.warning("could not separate all LIDC marks into one-per-reader groups")
            return groups
        tol *= 0.9


def _consensus(group: list[int], marks, pix_masks, volume: Volume, clevel: float) -> LidcNodule | None:
    ks = [k for g in group for k in pix_masks[g]]
    if not ks:
        return None
    js = np.concatenate([pix_masks[g][k][0] for g in group for k in pix_masks[g]])
    is_ = np.concatenate([pix_masks[g][k][1] for g in group for k in pix_masks[g]])
    k0, j0, i0 = min(ks), int(js.min()), int(is_.min())
    k1, j1, i1 = max(ks) + 1, int(js.max()) + 1, int(is_.max()) + 1
    votes = np.zeros((k1 - k0, j1 - j0, i1 - i0), dtype=np.uint8)
    for g in group:
        for k, (j, i) in pix_masks[g].items():
            votes[k - k0, j - j0, i - i0] += 1
    mask = votes >= clevel * len(group)
    if not mask.any():
        return None
    kk, jj, ii = np.nonzero(mask)
    centroid = (float(ii.mean() + i0), float(jj.mean() + j0), float(kk.mean() + k0))
    nvox = int(mask.sum())
    return LidcNodule(
        index=0,
        n_readers=len(group),
        bbox=(k0, j0, i0, k1, j1, i1),
        mask=mask,
        centroid_ijk=centroid,
        centroid_lps=tuple(float(v) for v in volume.ijk_to_lps(np.asarray(centroid))),
        volume_mm3=nvox * float(np.prod(volume.spacing)),
        n_voxels=nvox,
        reader_diameters_mm=[_reader_diameter(marks[g], volume.spacing) for g in group],
        reader_ids=[marks[g].reader for g in group],
    )
