"""The "Segment nodules" pipeline on inputs whose right answers are known.

Post-processing, measurement, scene and export are driven by maps computed from
a known label map on grids with flipped, permuted and oblique directions; the
inference step is checked with an oracle network whose output is its input.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from torch import nn

from glance.infer import InferenceOptions, predict
from glance.model.glance import GlanceOutput
from glance.model.weights import Preprocessing
from glance.pipeline import Analysis, algorithm_info, analyse_maps, canonical_volume, write_result
from glance.postprocess import PostprocessConfig
from glance.preprocess import Crop, full_crop, lung_crop, window
from glance.volume import Volume


def _rotation(deg: float) -> np.ndarray:
    a = np.radians(deg)
    return np.array([[np.cos(a), -np.sin(a), 0], [np.sin(a), np.cos(a), 0], [0, 0, 1]])


DIRECTIONS = {
    "identity": np.eye(3),
    "flipped_i_k": np.diag([-1.0, 1.0, -1.0]),
    "coronal": np.array([[1.0, 0, 0], [0, 0, -1], [0, 1, 0]]),  # k runs anterior->posterior
    "oblique": _rotation(20) @ np.diag([1.0, -1.0, 1.0]),
}


def _ball(shape, centre, radius_vox):
    k, j, i = np.indices(shape)
    return (k - centre[0]) ** 2 + (j - centre[1]) ** 2 + (i - centre[2]) ** 2 <= radius_vox ** 2


def _known_case(direction: np.ndarray):
    """A CT with two spheres (labels 1, 2) and maps made from them; heatmap peaks at their centres."""
    shape = (40, 48, 44)
    spacing = (0.8, 0.8, 0.8)
    labels = np.zeros(shape, np.uint16)
    centres = [(12, 14, 15), (27, 30, 28)]
    radii = [5, 3.5]
    for n, (c, r) in enumerate(zip(centres, radii), start=1):
        labels[_ball(shape, c, r)] = n
    hu = np.full(shape, -850, np.int16)
    hu[labels > 0] = 40
    ct = Volume(hu, spacing, (-20.0, 30.0, -100.0), direction)
    prob = np.where(labels > 0, 250, 5).astype(np.uint8)
    heat = np.zeros(shape, np.uint8)
    for c, peak in zip(centres, (230, 200)):
        g = np.exp(-0.5 * sum((np.indices(shape)[a] - c[a]) ** 2 for a in range(3)) / 2.0 ** 2)
        heat = np.maximum(heat, (g * peak).astype(np.uint8))
    return ct, labels, prob, heat, centres


@pytest.mark.parametrize("name", sorted(DIRECTIONS))
def test_nodules_are_reported_at_their_patient_position(name):
    ct, labels, prob, heat, centres = _known_case(DIRECTIONS[name])
    found_labels, nodules, _ = analyse_maps(ct, prob, heat, PostprocessConfig())
    assert len(nodules) == 2
    assert np.array_equal(found_labels > 0, labels > 0)  # back on the input grid, voxel for voxel
    # Stronger heatmap peak first: the big sphere is nodule 1.
    for nodule, c, truth in zip(nodules, centres, (1, 2)):
        expected = ct.ijk_to_lps(np.argwhere(labels == truth).mean(axis=0)[::-1])
        np.testing.assert_allclose(nodule.centre_lps, expected, atol=1e-6)
        np.testing.assert_allclose(nodule.centre_ijk, np.asarray(c, float)[::-1], atol=1e-6)
        assert np.array_equal(found_labels == nodule.label, labels == truth)
        assert nodule.volume_mm3 == pytest.approx((labels == truth).sum() * 0.8 ** 3)
        assert nodule.mean_hu == 40 and nodule.nodule_type == "solid"
    k0, j0, i0, k1, j1, i1 = nodules[0].bbox
    assert (k0, j0, i0, k1, j1, i1) == (7, 9, 10, 18, 20, 21)


@pytest.mark.parametrize("name", sorted(DIRECTIONS))
def test_a_finding_outside_the_lungs_is_not_reported(name, tmp_path):
    ct, labels, prob, heat, _ = _known_case(DIRECTIONS[name])
    # Soft tissue with an air-filled lung box around sphere 1 only (1.6 mm voxels: 54 ml of lung);
    # sphere 2 lies two slices beyond the box, in the "mediastinum".
    hu = np.full(ct.shape, 40, np.int16)
    hu[2:23, 2:27, 2:27] = -850
    hu[labels > 0] = 40
    chest = Volume(hu, (1.6, 1.6, 1.6), ct.origin, ct.direction)
    found, nodules, outside = analyse_maps(chest, prob, heat, PostprocessConfig())
    assert len(nodules) == 1 and np.array_equal(found > 0, labels == 1) and outside == 1
    _, both, unchecked = analyse_maps(chest, prob, heat, PostprocessConfig(require_lung_contact=False))
    assert len(both) == 2 and unchecked is None
    # The report says how many findings the rule held back, so that a reader knows to look.
    cfg = PostprocessConfig()
    write_result(tmp_path, Analysis(chest, prob, heat, found, nodules, outside_lungs=outside),
                 algorithm_info("m", "1", cfg), {"input": {"path": "x"}}, snapshots=False)
    assert json.loads((tmp_path / "report.json").read_text())["n_dropped_outside_lungs"] == 1


@pytest.mark.parametrize("name", ["flipped_i_k", "coronal"])
def test_canonical_volume_keeps_every_voxel_position(name):
    ct, *_ = _known_case(DIRECTIONS[name])
    canon, grid = canonical_volume(ct)
    rng = np.random.default_rng(0)
    for kji in rng.integers(0, ct.shape, size=(20, 3)):
        c = np.argwhere(grid.to_canonical(np.arange(ct.array.size).reshape(ct.shape)) ==
                        np.ravel_multi_index(tuple(kji), ct.shape))[0]
        np.testing.assert_allclose(canon.ijk_to_lps(c[::-1]), ct.ijk_to_lps(kji[::-1]), atol=1e-9)
    # Canonical axes follow LPS S, P, L.
    assert canon.direction[2, 2] > 0.9 and canon.direction[1, 1] > 0.9 and canon.direction[0, 0] > 0.9


def test_result_folder_files(tmp_path):
    ct, labels, prob, heat, _ = _known_case(DIRECTIONS["flipped_i_k"])
    cfg = PostprocessConfig()
    found, nodules, _ = analyse_maps(ct, prob, heat, cfg)
    analysis = Analysis(ct, prob, heat, found, nodules, {"model": 1.0})
    report = {"input": {"path": "x"}}
    write_result(tmp_path, analysis, algorithm_info("m", "1", cfg), report)
    names = sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*") if p.is_file())
    assert names == ["maps/centre_heatmap.nrrd", "maps/nodule_probability.nrrd", "nodules.csv",
                     "nodules.mrk.json", "nodules.seg.nrrd", "report.json",
                     "snapshots/nodule_01.png", "snapshots/nodule_02.png"]
    data = json.loads((tmp_path / "report.json").read_text())
    assert data["n_nodules"] == 2 and data["dicom_seg"] is None
    np.testing.assert_allclose(data["nodules"][0]["centre_lps"], nodules[0].centre_lps)
    markups = json.loads((tmp_path / "nodules.mrk.json").read_text())["markups"][0]
    assert markups["coordinateSystem"] == "LPS"
    np.testing.assert_allclose(markups["controlPoints"][0]["position"], nodules[0].centre_lps, atol=1e-3)


class OracleNet(nn.Module):
    """Returns its (centre-channel) input as both probability maps: logit(x)."""

    def __init__(self):
        super().__init__()
        self.anchor = nn.Parameter(torch.zeros(1))

    def forward(self, x):
        c = x.shape[1] // 2
        logit = torch.logit(x[:, c:c + 1].clamp(1e-6, 1 - 1e-6)) + 0 * self.anchor
        return GlanceOutput(logit, logit, ())


def _phantomish(shape=(12, 64, 72)):
    rng = np.random.default_rng(3)
    hu = rng.integers(-1100, 300, size=shape).astype(np.int16)
    return hu


def test_inference_places_every_slice_exactly():
    hu = _phantomish()
    crop = Crop((2, 10), (5, 50), (7, 70))
    prep = Preprocessing(pixel_spacing_mm=0.7)
    maps = predict(hu, (2.5, 0.7, 0.7), crop, OracleNet(), prep, InferenceOptions(batch=3))
    expected = np.zeros(hu.shape, np.uint8)
    expected[crop.slices] = np.floor(window(hu[crop.slices], -1000, 400) * 255 + 0.5)
    assert np.abs(maps.prob.astype(int) - expected).max() <= 1  # float32 round trip of the logit
    assert np.array_equal(maps.prob == 0, expected == 0) or (maps.prob[expected == 0] <= 1).all()
    assert np.array_equal(maps.prob, maps.heatmap)


def test_inference_resamples_in_plane_and_back():
    hu = np.zeros((4, 60, 80), np.int16) - 1000
    hu[:, 20:40, 30:50] = 400  # a bright square survives the round trip away from its edges
    prep = Preprocessing(pixel_spacing_mm=0.5)  # 1.0 mm pixels -> twice the size inside the network
    maps = predict(hu, (1.0, 1.0, 1.0), full_crop(hu.shape), OracleNet(), prep, InferenceOptions())
    assert (maps.prob[:, 22:38, 32:48] >= 254).all()
    assert (maps.prob[:, :18] <= 1).all() and (maps.prob[:, :, :28] <= 1).all()


def test_context_slices_reach_the_network():
    seen = []

    class Spy(OracleNet):
        def forward(self, x):
            seen.append(x.shape[1])
            return super().forward(x)

    hu = _phantomish((5, 32, 32))
    prep = Preprocessing(pixel_spacing_mm=1.0, context_slices=2)
    maps = predict(hu, (1.0, 1.0, 1.0), full_crop(hu.shape), Spy(), prep, InferenceOptions(batch=2))
    assert seen == [5, 5, 5]  # 2k+1 channels, three batches of at most 2 slices
    expected = np.floor(window(hu, -1000, 400) * 255 + 0.5)
    assert np.abs(maps.prob.astype(int) - expected).max() <= 1  # the centre channel is the slice itself


def test_flip_averaging_undoes_each_flip():
    # The oracle is flip-equivariant, so averaging over flips must give back the plain maps; a flip
    # not undone would blur this random, asymmetric image into the mean of its mirror images.
    hu = _phantomish((3, 30, 34))
    prep = Preprocessing(pixel_spacing_mm=1.0)
    plain = predict(hu, (1.0, 1.0, 1.0), full_crop(hu.shape), OracleNet(), prep, InferenceOptions())
    flipped = predict(hu, (1.0, 1.0, 1.0), full_crop(hu.shape), OracleNet(), prep, InferenceOptions(tta=True))
    assert np.abs(plain.prob.astype(int) - flipped.prob).max() <= 1


class RampNet(OracleNet):
    """Ignores the image: probability rises from 0 to 1 across the columns, heatmap across the rows."""

    def forward(self, x):
        n, _, h, w = x.shape
        cols = torch.linspace(0, 1, w).clamp(1e-6, 1 - 1e-6).expand(n, 1, h, w)
        rows = torch.linspace(0, 1, h).clamp(1e-6, 1 - 1e-6)[:, None].expand(n, 1, h, w)
        return GlanceOutput(torch.logit(cols) + 0 * self.anchor, torch.logit(rows), ())


def test_flip_averaging_cancels_a_position_bias():
    # Each ramp and its mirror image add up to 1 everywhere: the mean over the four flips is 0.5.
    hu = _phantomish((2, 20, 24))
    prep = Preprocessing(pixel_spacing_mm=1.0)
    plain = predict(hu, (1.0, 1.0, 1.0), full_crop(hu.shape), RampNet(), prep, InferenceOptions())
    assert plain.prob[:, :, 0].max() == 0 and plain.prob[:, :, -1].min() == 255
    maps = predict(hu, (1.0, 1.0, 1.0), full_crop(hu.shape), RampNet(), prep, InferenceOptions(tta=True))
    assert set(np.unique(maps.prob)) <= {127, 128} and set(np.unique(maps.heatmap)) <= {127, 128}


def test_cancel_between_batches():
    from glance.errors import Cancelled

    calls = []
    hu = _phantomish((6, 16, 16))
    with pytest.raises(Cancelled):
        predict(hu, (1.0, 1.0, 1.0), full_crop(hu.shape), OracleNet(), Preprocessing(pixel_spacing_mm=1.0),
                InferenceOptions(batch=2), progress=lambda d, n: calls.append((d, n)),
                cancel=lambda: len(calls) >= 2)
    assert calls == [(2, 6), (4, 6)]


def test_lung_crop_finds_the_lungs():
    shape = (30, 100, 120)
    hu = np.full(shape, -1000, np.int16)  # outside air
    k, j, i = np.indices(shape)
    body = ((j - 50) / 45) ** 2 + ((i - 60) / 55) ** 2 <= 1
    hu[body] = 20
    lung = body & (((j - 50) / 25) ** 2 + ((i - 35) / 15) ** 2 <= 1) & (k >= 5) & (k < 25)
    hu[lung] = -850
    crop = lung_crop(hu, (2.0, 1.0, 1.0))
    assert crop.z == (0, 30)  # 5..25 plus a 10 mm margin (5 slices), clipped
    assert crop.y[0] <= 25 and crop.y[1] >= 75 and crop.x[0] <= 20 and crop.x[1] >= 50
    assert crop.x[1] <= 62  # the margin is 10 mm, not the whole body
    assert lung_crop(np.full(shape, 20, np.int16), (2.0, 1.0, 1.0)) == full_crop(shape)
