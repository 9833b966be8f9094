"""Nodule insertion into a real CT (LIDC-IDRI-0003): ground truth, blending, untouched background."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from scipy import ndimage

from glance.phantom.insert import InsertConfig, existing_from_lidc, insert_nodules, load_crops, noise_sd
from glance.phantom.placement import NoduleMix
from glance.volume import Volume

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
SCAN = DATA / "scans" / "LIDC-IDRI-0003.nrrd"
CROPS = DATA / "lidc-nodule-crops" / "lidc_nodule_crops_64.npz"

pytestmark = pytest.mark.skipif(not (SCAN.exists() and CROPS.exists()), reason="shared LIDC data absent")


@pytest.fixture(scope="module")
def scan():
    from glance.io import read_volume

    return read_volume(SCAN)


@pytest.fixture(scope="module")
def inserted(scan):
    existing, labels = existing_from_lidc(DATA / "scans" / "LIDC-IDRI-0003_072.xml", scan)
    cfg = InsertConfig(n_nodules=3, seed=7, source="mixed", mix=NoduleMix(diameter_mm=(8.0, 18.0)))
    return insert_nodules(scan, cfg, load_crops(CROPS), existing, labels)


def test_existing_nodules_kept_and_labelled(scan, inserted):
    from glance.io.image_read import read_label_map

    ref = read_label_map(DATA / "scans" / "LIDC-IDRI-0003_consensus50-label.nrrd").array
    assert [n.source for n in inserted.nodules[:4]] == ["lidc-xml"] * 4
    own = np.where(inserted.labels <= 4, inserted.labels, 0)
    assert np.array_equal(own, ref.astype(np.uint16))
    assert np.array_equal(inserted.ct.array[ref > 0], scan.array[ref > 0])


def test_three_nodules_inserted_with_sources(inserted):
    new = inserted.nodules[4:]
    assert [n.id for n in new] == [5, 6, 7]
    assert new[0].source == "synthetic" and new[2].source == "synthetic"
    assert new[1].source.startswith("lidc-crop:LIDC-IDRI-")


def test_voxels_outside_inserted_nodules_unchanged(scan, inserted):
    changed = inserted.ct.array != scan.array
    assert changed.any()
    footprint = np.zeros(scan.shape, bool)
    for n in inserted.nodules[4:]:
        k0, j0, i0, k1, j1, i1 = n.extra["footprint_bbox"]
        footprint[k0:k1, j0:j1, i0:i1] = True
        assert (inserted.labels[k0:k1, j0:j1, i0:i1] == n.id).sum() == n.label_voxels
    assert not (changed & ~footprint).any()
    # Synthetic nodules without thin spicules change only voxels within a few voxels of their labels.
    plain = [n.id for n in inserted.nodules[4:] if n.shape not in ("spiculated", "real")]
    assert plain
    near = ndimage.binary_dilation(np.isin(inserted.labels, plain), iterations=4)
    plain_fp = np.zeros(scan.shape, bool)
    for n in inserted.nodules[4:]:
        if n.id in plain:
            k0, j0, i0, k1, j1, i1 = n.extra["footprint_bbox"]
            plain_fp[k0:k1, j0:j1, i0:i1] = True
    assert not (changed & plain_fp & ~near).any()
    assert inserted.ct.array.dtype == np.int16 and inserted.ct.spacing == scan.spacing
    assert inserted.ct.origin == scan.origin


def test_inserted_nodules_visible_and_measured(scan, inserted):
    ct = inserted.ct.array.astype(float)
    lung = scan.array < -500
    for n in inserted.nodules[4:]:
        lab = inserted.labels == n.id
        assert lab.sum() == n.label_voxels > 0
        ring = ndimage.binary_dilation(lab, iterations=4) & ~ndimage.binary_dilation(lab, iterations=2) & lung
        assert ct[lab].mean() - ct[ring].mean() > 100, n
        if n.source == "synthetic":
            label_mm3 = lab.sum() * np.prod(scan.spacing)
            assert abs(label_mm3 - n.volume_mm3) <= 0.10 * n.volume_mm3
        assert np.allclose(scan.ijk_to_lps(np.array(n.centre_ijk)), n.centre_lps)


def test_real_crop_keeps_its_volume(inserted):
    crops = {c.name: c for c in load_crops(CROPS)}
    (real,) = [n for n in inserted.nodules if n.source.startswith("lidc-crop")]
    crop = crops[real.source.split(":", 1)[1]]
    crop_mm3 = crop.mask.sum() * np.prod(crop.spacing)
    # Same native spacing here (0003 crop into 0003) unless cut by the chest wall.
    assert real.label_voxels * np.prod(inserted.ct.spacing) <= 1.1 * crop_mm3
    if real.attachment == "isolated":
        assert real.label_voxels * np.prod(inserted.ct.spacing) == pytest.approx(crop_mm3, rel=0.1)


def test_deterministic(scan, inserted):
    cfg = InsertConfig(n_nodules=3, seed=7, source="mixed", mix=NoduleMix(diameter_mm=(8.0, 18.0)))
    existing, labels = existing_from_lidc(DATA / "scans" / "LIDC-IDRI-0003_072.xml", scan)
    again = insert_nodules(scan, cfg, load_crops(CROPS), existing, labels)
    assert again.ct.array.tobytes() == inserted.ct.array.tobytes()
    assert again.to_json() == inserted.to_json()


def test_noise_estimate_on_known_noise():
    rng = np.random.default_rng(0)
    arr = (40 + rng.normal(0, 12, (8, 64, 64))).round().astype(np.int16)
    assert noise_sd(Volume(arr, (1, 1, 1))) == pytest.approx(12, rel=0.1)


def test_nodule_with_no_voxel_in_the_lung_is_skipped_and_leaves_the_ct_alone():
    """A nodule whose every voxel falls outside the lung mask used to come back with no labelled
    voxel and a NaN centre (0/0 weights), a finding without a mask; it is now skipped untouched.
    The placer sees lung everywhere, the drawing sees none: the one case that reaches the guard."""
    from glance.phantom.grid import Grid
    from glance.phantom.insert import _insert_synthetic, _VoxelPlacer

    ct = Volume(np.full((40, 40, 40), -850, np.int16), (1.0, 1.0, 1.0), (0.0, 0.0, 0.0))
    lung_everywhere = np.ones(ct.shape, bool)
    placer = _VoxelPlacer(Grid.of(ct), lung_everywhere, np.zeros(ct.shape, bool), ct.array,
                          np.random.default_rng(0))
    out = ct.array.astype(np.float32)
    labels = np.zeros(ct.shape, np.uint16)
    cfg = InsertConfig(mix=NoduleMix(diameter_mm=(8.0, 8.0)))
    made = _insert_synthetic(out, labels, np.zeros(ct.shape, bool), placer, cfg, False, 1, ct,
                             np.random.default_rng(1))
    assert made is None
    assert not labels.any()
    np.testing.assert_array_equal(out, ct.array.astype(np.float32))
