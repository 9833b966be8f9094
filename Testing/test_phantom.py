"""The synthetic chest CT phantom: tissue HU, nodules present and measured, determinism, CLI output."""

from __future__ import annotations

import json

import numpy as np
import pytest
import SimpleITK as sitk
from scipy import ndimage

from glance.phantom import NoduleMix, PhantomConfig, make_phantom
from glance.phantom.anatomy import Tissue
from glance.phantom.vessels import grow_tree

SIZE, SPACING = (128, 128, 40), (2.0, 2.0, 2.0)


def _make(seed: int = 1, n: int = 5, diam=(10.0, 20.0), **kw):
    cfg = PhantomConfig(SIZE, SPACING, seed, n, mix=NoduleMix(diameter_mm=diam, **kw), vessel_points=600)
    return make_phantom(config=cfg)


@pytest.fixture(scope="module")
def phantom():
    return _make()


def _eroded(p, tissue):
    return ndimage.binary_erosion(p.tissue == tissue)


def test_grid_and_types(phantom):
    assert phantom.ct.array.dtype == np.int16
    assert phantom.ct.shape == (40, 128, 128)
    assert phantom.labels.dtype == np.uint16 and phantom.labels.shape == phantom.ct.shape
    assert phantom.ct.spacing == SPACING
    assert len(phantom.nodules) == 5
    assert sorted(np.unique(phantom.labels)) == list(range(6))


@pytest.mark.parametrize("tissue,lo,hi", [
    (Tissue.LUNG, -950, -850), (Tissue.FAT, -130, -60), (Tissue.MUSCLE, 10, 80),
    (Tissue.HEART, 10, 80), (Tissue.MEDIASTINUM, -130, -50), (Tissue.AIRWAY, -1050, -900),
])
def test_tissue_median_hu_in_range(phantom, tissue, lo, hi):
    inner = _eroded(phantom, tissue)
    assert inner.sum() > 50
    assert lo <= np.median(phantom.ct.array[inner]) <= hi


def test_bones_are_dense(phantom):
    bone = np.isin(phantom.tissue, [Tissue.BONE_CORTEX, Tissue.BONE_MARROW])
    assert bone.sum() > 1000
    assert phantom.ct.array[bone].mean() > 400  # ribs, spine, sternum
    # The lung texture is not flat: its SD exceeds the noise alone would not (noise 18 HU, texture 22 HU).
    assert phantom.ct.array[_eroded(phantom, Tissue.LUNG)].std() > 20


def test_each_nodule_is_visible_and_measured(phantom):
    ct = phantom.ct.array.astype(float)
    for n in phantom.nodules:
        lab = phantom.labels == n.id
        assert lab.sum() == n.label_voxels > 0
        ring = (ndimage.binary_dilation(lab, iterations=3) & ~ndimage.binary_dilation(lab)
                & (phantom.tissue == Tissue.LUNG))
        contrast = ct[lab].mean() - ct[ring].mean()
        assert contrast > 150, (n.id, n.nodule_type, contrast)
        label_mm3 = lab.sum() * np.prod(phantom.ct.spacing)
        assert abs(label_mm3 - n.volume_mm3) <= 0.10 * n.volume_mm3, (n.id, label_mm3, n.volume_mm3)
        # The JSON centre is where the label is.
        kk, jj, ii = np.nonzero(lab)
        assert np.allclose(n.centre_ijk, (ii.mean(), jj.mean(), kk.mean()), atol=0.6)
        assert np.allclose(phantom.ct.ijk_to_lps(np.array(n.centre_ijk)), n.centre_lps, atol=1e-6)
        assert 3.0 <= n.diameter_mm <= 30.0


def test_ground_glass_hu_range():
    p = _make(seed=3, n=4, type_weights=(0, 0, 1))
    assert len(p.nodules) >= 3
    for n in p.nodules:
        assert n.nodule_type == "ground-glass"
        assert -750 <= n.mean_hu <= -300
        core = ndimage.binary_erosion(p.labels == n.id)
        if core.sum() > 5:
            assert -800 < np.median(p.ct.array[core]) < -250


def test_attachments_touch_what_they_claim():
    p = _make(seed=5, n=6, attachment_weights=(0, 0.5, 0.5))
    kinds = {n.attachment for n in p.nodules}
    assert kinds == {"juxta-vascular", "juxta-pleural"}
    wall = np.isin(p.tissue, [Tissue.FAT, Tissue.MUSCLE, Tissue.BONE_MARROW, Tissue.BONE_CORTEX, Tissue.CARTILAGE])
    for n in p.nodules:
        near = ndimage.binary_dilation(p.labels == n.id, iterations=2)
        if n.attachment == "juxta-pleural":
            assert (near & wall).any(), n.id
        else:
            assert (near & (p.tissue == Tissue.VESSEL)).any(), n.id


def test_same_seed_same_bytes_different_seed_differs(phantom):
    again = _make()
    assert again.ct.array.tobytes() == phantom.ct.array.tobytes()
    assert again.labels.tobytes() == phantom.labels.tobytes()
    assert again.to_json() == phantom.to_json()
    other = _make(seed=2)
    assert other.ct.array.tobytes() != phantom.ct.array.tobytes()


def test_zero_nodules():
    p = _make(n=0)
    assert p.nodules == [] and not p.labels.any()
    assert json.loads(p.to_json())["nodules"] == []


def test_vessel_tree_tapers_by_murrays_law():
    rng = np.random.default_rng(0)
    pts = rng.uniform(-50, 50, (800, 3))
    tree = grow_tree(np.zeros(3), pts, 6.0, rng)
    # Branch radius follows r^3 ~ territory: deeper generations are thinner.
    by_gen = [tree.r0[tree.generation == g].mean() for g in range(1, 6)]
    assert all(a > b for a, b in zip(by_gen, by_gen[1:]))
    assert tree.r0.max() <= 6.0 and tree.r1.min() < 1.0
    # The two first branches share the root's r^3 exactly (Murray's law).
    first = tree.generation == 1
    assert np.isclose((tree.r0[first] ** 3).sum(), 6.0**3)


def test_cli_writes_ct_labels_json_preview(tmp_path):
    from glance.cli import main

    out = tmp_path / "ph"
    args = ["phantom", "--out", str(out), "--shape", "96x96x24", "--spacing", "3x3x3", "--nodules", "2",
            "--diameter", "9-15", "--format", "nifti", "--preview", "--seed", "4"]
    assert main(args) == 0
    doc = json.loads((out / "nodules.json").read_text())
    ct = sitk.ReadImage(str(out / "ct.nii.gz"))
    labels = sitk.GetArrayFromImage(sitk.ReadImage(str(out / "labels.nii.gz")))
    assert ct.GetSize() == (96, 96, 24) and np.allclose(ct.GetSpacing(), (3, 3, 3))
    assert sorted(np.unique(labels)) == list(range(len(doc["nodules"]) + 1))
    for n in doc["nodules"]:
        assert (labels == n["id"]).sum() == n["label_voxels"]
        assert {"id", "centre_ijk", "centre_lps", "diameter_mm", "volume_mm3", "nodule_type", "attachment"} <= n.keys()
    assert (out / "preview.png").stat().st_size > 1000
    # Same seed, same files.
    out2 = tmp_path / "ph2"
    assert main(args[:2] + [str(out2)] + args[3:]) == 0
    for name in ("ct.nii.gz", "labels.nii.gz", "nodules.json"):
        assert (out / name).read_bytes() == (out2 / name).read_bytes(), name


def test_cli_rejects_bad_shape(capsys):
    from glance.cli import main

    with pytest.raises(SystemExit):
        main(["phantom", "--out", "x", "--shape", "12x-3"])


def test_a_nodule_with_no_voxel_in_the_lungs_is_skipped_not_listed(monkeypatch):
    # Regression: such a nodule was listed with an empty mask and a NaN centre (0/0 weights), and
    # training crashed aiming a patch at it. Here one is placed in the air outside the body.
    from dataclasses import replace

    import glance.phantom.generate as generate

    real = generate.place_nodules

    def with_one_outside(n, grid, *args, **kw):
        specs = real(n, grid, *args, **kw)
        corner = np.array([grid.axis_mm(a)[3] for a in range(3)])
        return [specs[0], replace(specs[1], centre=corner), *specs[1:]]

    plain = _make(n=3)
    monkeypatch.setattr(generate, "place_nodules", with_one_outside)
    p = _make(n=3)
    assert len(p.nodules) == len(plain.nodules) == 3
    assert [n.id for n in p.nodules] == [1, 2, 3] and set(np.unique(p.labels)) == {0, 1, 2, 3}
    assert all(np.isfinite(n.centre_lps).all() and n.label_voxels > 0 for n in p.nodules)
    assert np.array_equal(p.ct.array, plain.ct.array) and np.array_equal(p.labels, plain.labels)


def _shell_tissues(p, n) -> set[Tissue]:
    lab = p.labels == n.id
    if n.shape == "spiculated":  # a spicule may end against a bronchus or a rib; its body may not
        lab = ndimage.binary_opening(lab, iterations=2)
    shell = ndimage.binary_dilation(lab) & ~lab  # the voxels touching it
    return {Tissue(int(t)) for t in np.unique(p.tissue[shell])}


def _assert_nodules_clear_of_bone_and_airways(p):
    for n in p.nodules:
        around = _shell_tissues(p, n)
        assert not around & {Tissue.AIRWAY, Tissue.AIRWAY_WALL}, (p.info["seed"], n.id, n.attachment, around)
        if n.attachment != "juxta-pleural":  # only a pleural nodule may lie against the chest wall (and its ribs)
            assert not around & {Tissue.BONE_CORTEX, Tissue.BONE_MARROW, Tissue.CARTILAGE}, (
                p.info["seed"], n.id, n.attachment, around)


def test_nodules_keep_clear_of_bone_and_airways(phantom):
    _assert_nodules_clear_of_bone_and_airways(phantom)


def test_no_nodule_is_cut_by_a_vertebra_or_a_bronchus():
    # The training and evaluation phantoms' size; with this seed, placement used to put an "isolated" 7 mm
    # nodule against a transverse process (a third of its surface bone) and a juxta-vascular one against a
    # bronchus, and draw only the parts of them that lay in lung.
    p = make_phantom(config=PhantomConfig((352, 352, 96), (0.9, 0.9, 1.5), seed=2968811710, n_nodules=10))
    assert len(p.nodules) == 10
    _assert_nodules_clear_of_bone_and_airways(p)
