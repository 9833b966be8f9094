"""2D / 2.5D slice sampling: shapes, windowing, resampling, over-sampling ratio, determinism,
and image/mask alignment under augmentation, on small synthetic cases with known answers."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch

from glance.volume import Volume
from glance_training.datasets import Annotation, Case, CaseList, SliceDataset, SliceSamplingConfig, nodules_from_labels

NODULE_HU = 400  # windows to exactly 1.0
LUNG_HU = -800


def cube_case(name="cube", spacing=(0.5, 0.5, 2.0), shape=(12, 120, 120), box=np.s_[4:8, 50:70, 40:60]) -> Case:
    """Lung-density volume with one bright box nodule (label 1) and a soft-tissue rim."""
    hu = np.full(shape, LUNG_HU, np.int16)
    hu[:, :4, :] = 40
    hu[box] = NODULE_HU
    labels = np.zeros(shape, np.uint16)
    labels[box] = 1
    return Case(name, name, "synthetic", Volume(hu, spacing), labels, nodules_from_labels)


def config(**kw) -> SliceSamplingConfig:
    base = dict(patch_size=32, pixel_spacing_mm=1.0, samples_per_epoch=64, augment=False, seed=7)
    base.update(kw)
    return SliceSamplingConfig(**base)


def test_shapes_ranges_and_targets_of_a_nodule_sample():
    ds = SliceDataset(CaseList("s", [cube_case()]), config(context_slices=2, positive_prob=1.0))
    for i in range(8):
        s = ds[i]
        assert s["image"].shape == (5, 32, 32) and s["image"].dtype == torch.float32
        assert s["mask"].shape == s["heatmap"].shape == s["ignore"].shape == (1, 32, 32)
        assert 0.0 <= s["image"].min() and s["image"].max() <= 1.0
        assert set(torch.unique(s["mask"]).tolist()) <= {0.0, 1.0}
        assert bool(s["positive"]) and s["mask_valid"] == 1.0 and s["case_id"] == "cube"
        # Lung is (-800 + 1000) / 1400 and the nodule (400 HU) 1.0. Downsampled 2x, rim pixels
        # of the image are blends; the nearest-neighbour mask holds every pure-nodule pixel and
        # only pixels with nodule in them.
        centre = s["image"][2]
        assert torch.isclose(centre.min(), torch.tensor(200 / 1400), atol=1e-6)
        inside = s["mask"][0] == 1
        assert torch.all(inside[centre > 0.999])
        assert torch.all(centre[inside] > 200 / 1400 + 0.1)
        assert s["mask"].sum() > 0 and s["heatmap"].max() == 1.0
        peak = torch.nonzero(s["heatmap"][0] == 1.0)[0]
        assert s["mask"][0, peak[0], peak[1]] == 1.0  # the centre peak lies on the nodule


def test_in_plane_resampling_to_the_target_spacing():
    # A 20 x 20 pixel nodule at 0.5 mm is 10 x 10 mm: 10 x 10 pixels at 1.0 mm.
    ds = SliceDataset(CaseList("s", [cube_case()]), config(positive_prob=1.0, max_shift_fraction=0.1))
    for i in range(6):
        mask = ds[i]["mask"][0]
        rows, cols = torch.nonzero(mask, as_tuple=True)
        assert rows.max() - rows.min() + 1 in (10, 11) and cols.max() - cols.min() + 1 in (10, 11)
        assert 90 <= mask.sum() <= 121


def test_neighbour_slices_are_clamped_at_the_volume_ends():
    shape = (3, 64, 64)
    # Each slice holds one value, so a channel tells which slice it was taken from.
    hu = np.stack([np.full(shape[1:], -1000 + 300 * k, np.int16) for k in range(3)])
    labels = np.zeros(shape, np.uint16)
    labels[:, 28:36, 28:36] = 1
    case = Case("ramp", "ramp", "synthetic", Volume(hu, (1.0, 1.0, 1.0)), labels, nodules_from_labels)
    ds = SliceDataset(CaseList("s", [case]), config(context_slices=2, positive_prob=1.0, max_shift_fraction=0.0))
    seen = set()
    for i in range(30):
        img = ds[i]["image"]
        slice_of = np.rint(img[:, 16, 16].numpy() * 1400 / 300).astype(int)  # back to slice index
        k = slice_of[2]
        np.testing.assert_array_equal(slice_of, np.clip(np.arange(k - 2, k + 3), 0, 2))
        seen.add(int(k))
    assert seen == {0, 1, 2}


def test_2d_crop_is_replicated_and_placed_with_a_random_shift():
    crop = np.full((1, 71, 71), LUNG_HU, np.int16)
    crop[0, 30:41, 30:41] = NODULE_HU
    labels = (crop == NODULE_HU).astype(np.uint16)
    case = Case("crop", "P", "crops", Volume(crop, (0.7, 0.7, 0.7), metadata={"two_d": True}), labels,
                nodules_from_labels)
    ds = SliceDataset(CaseList("c", [case]), config(patch_size=128, pixel_spacing_mm=0.7, context_slices=1,
                                                     positive_prob=1.0))
    centres = []
    for i in range(10):
        s = ds[i]
        assert torch.equal(s["image"][0], s["image"][1]) and torch.equal(s["image"][1], s["image"][2])
        assert s["mask"].sum() == 121  # same spacing: the 11 x 11 nodule is unchanged
        assert (s["image"][1] == 0).sum() >= 128 * 128 - 72 * 72  # padding outside the crop is air
        centres.append(torch.nonzero(s["mask"][0]).float().mean(0))
    spread = torch.stack(centres).std(0)
    assert torch.all(spread > 3)  # the nodule is not always in the same place


def test_positive_share_is_close_to_p():
    cases = CaseList("s", [cube_case(f"c{n}") for n in range(3)])
    p, n = 0.3, 1000
    ds = SliceDataset(cases, config(patch_size=16, positive_prob=p, samples_per_epoch=n, max_shift_fraction=0.1))
    drawn = [ds[i] for i in range(n)]
    share = np.mean([bool(s["positive"]) for s in drawn])
    assert abs(share - p) < 4 * np.sqrt(p * (1 - p) / n)  # 4 standard errors: 0.058
    # Positives show the nodule; negatives are lung slices centred on lung pixels.
    assert all(s["mask"].sum() > 0 for s in drawn if s["positive"])
    negatives = [s for s in drawn if not s["positive"]]
    assert np.mean([s["mask"].sum().item() == 0 for s in negatives]) > 0.8


def test_nodule_slices_pick_a_cases_nodules_by_weight(caplog):
    # Two nodules told apart by density: label 1 at 400 HU (window 1.0), label 2 at 0 HU (1000 / 1400).
    case = cube_case()
    hu, labels = case.ct.array.copy(), case.labels.copy()
    hu[4:8, 80:100, 80:100], labels[4:8, 80:100, 80:100] = 0, 2
    case = Case("two", "two", "synthetic", Volume(hu, case.ct.spacing), labels, nodules_from_labels)
    cfg = config(positive_prob=1.0, max_shift_fraction=0.0, samples_per_epoch=400)

    def share_of_label_2(c: Case) -> float:
        ds = SliceDataset(CaseList("s", [c]), cfg)
        centres = np.array([float(ds[i]["image"][0, 16, 16]) for i in range(len(ds))])
        assert np.all(np.isclose(centres, 1.0) | np.isclose(centres, 1000 / 1400))
        return float(np.mean(np.isclose(centres, 1000 / 1400)))

    assert 0.45 <= share_of_label_2(case) <= 0.55  # unweighted: one in two
    assert 0.86 <= share_of_label_2(replace(case, nodule_weights={2: 9.0})) <= 0.94  # 9 : 1 (sd 0.015)
    assert 0.06 <= share_of_label_2(replace(case, nodule_weights={1: 9.0, 2: 1.0})) <= 0.14
    with caplog.at_level("WARNING"):
        share_of_label_2(replace(case, nodule_weights={2: 1.0, 5: 3.0}))
    assert "two: nodule weights for label(s) [5], which the case does not have" in caplog.text


def test_samples_are_a_function_of_seed_epoch_and_index_only():
    cases = CaseList("s", [cube_case("a"), cube_case("b", box=np.s_[2:6, 30:50, 60:80])])
    cfg = config(augment=True, affine_prob=1.0, elastic_prob=1.0, positive_prob=0.5, samples_per_case=2)
    first = SliceDataset(cases, cfg)
    second = SliceDataset(cases, cfg)
    order_a = [first[i] for i in range(10)]
    order_b = {i: second[i] for i in reversed(range(10))}  # another order, another cache history
    for i in range(10):
        for key in ("image", "mask", "heatmap", "positive"):
            assert torch.equal(order_a[i][key], order_b[i][key]), (i, key)
    other_seed = SliceDataset(cases, replace(cfg, seed=8))
    assert not all(torch.equal(order_a[i]["image"], other_seed[i]["image"]) for i in range(10))
    first.set_epoch(1)
    assert not all(torch.equal(order_a[i]["image"], first[i]["image"]) for i in range(10))


def test_dataloader_workers_give_the_same_samples():
    cases = CaseList("s", [cube_case()])
    cfg = config(augment=True, affine_prob=1.0, samples_per_epoch=8)
    direct = torch.stack([SliceDataset(cases, cfg)[i]["image"] for i in range(8)])
    loader = torch.utils.data.DataLoader(SliceDataset(cases, cfg), batch_size=2, num_workers=2)
    batched = torch.cat([b["image"] for b in loader])
    assert torch.equal(direct, batched)


def test_flips_mirror_image_and_targets_together():
    # Only the mirrors run, so each sample is exactly the plain one mirrored along the axes drawn.
    cases = CaseList("s", [cube_case(spacing=(1.0, 1.0, 2.0))])
    cfg = config(patch_size=48, augment=True, affine_prob=0.0, elastic_prob=0.0, positive_prob=1.0,
                 samples_per_epoch=32)
    plain = SliceDataset(cases, replace(cfg, augment=False))
    both = SliceDataset(cases, replace(cfg, flip_prob=1.0))
    for i in range(4):
        for key in ("image", "mask", "ignore"):
            assert torch.equal(both[i][key], torch.flip(plain[i][key], dims=(-2, -1))), (i, key)
        # The heatmap is redrawn from the mirrored mask: its peak (1 at the rounded centroid) may round
        # the other way, so it lies within a pixel of the mirrored one.
        peak = torch.nonzero(both[i]["heatmap"][0] == 1.0)
        mirrored = 47 - torch.nonzero(plain[i]["heatmap"][0] == 1.0)
        assert len(peak) == 1 and torch.all((peak - mirrored).abs() <= 1), (i, peak, mirrored)
    assert all(torch.equal(SliceDataset(cases, cfg)[i]["image"], plain[i]["image"]) for i in range(4))  # 0: off
    half = SliceDataset(cases, replace(cfg, flip_prob=0.5))
    seen = set()
    for i in range(32):
        s, before = half[i], plain[i]
        matches = [dims for dims in ((), (-2,), (-1,), (-2, -1))
                   if torch.equal(s["image"], torch.flip(before["image"], dims=dims) if dims else before["image"])
                   and torch.equal(s["mask"], torch.flip(before["mask"], dims=dims) if dims else before["mask"])]
        assert len(matches) == 1, i  # the soft-tissue rim makes the four mirror images distinct
        seen.add(matches[0])
    assert seen == {(), (-2,), (-1,), (-2, -1)}
    with pytest.raises(ValueError, match="flip_prob"):
        SliceSamplingConfig(flip_prob=1.5)


def test_augmentation_keeps_mask_and_image_aligned():
    # Native spacing = target spacing, so only the augmentation moves pixels: a 20 x 20 bright square.
    cases = CaseList("s", [cube_case(spacing=(1.0, 1.0, 2.0))])
    cfg = config(patch_size=48, augment=True, affine_prob=1.0, elastic_prob=1.0, positive_prob=1.0,
                 max_shift_fraction=0.1)
    ds = SliceDataset(cases, cfg)
    plain = SliceDataset(cases, replace(cfg, augment=False))
    rotated = 0
    for i in range(12):
        s, before = ds[i], plain[i]
        bright = s["image"][0] > (200 / 1400 + 1.0) / 2  # nearer the nodule than the lung value
        mask = s["mask"][0] > 0
        iou = (bright & mask).sum() / (bright | mask).sum()
        assert iou > 0.9, (i, iou)
        # Had the mask not moved with the image, it would still be the un-augmented one.
        still = before["mask"][0] > 0
        assert iou > (bright & still).sum() / (bright | still).sum() or torch.equal(mask, still)
        peak = torch.nonzero(s["heatmap"][0] == 1.0)
        assert len(peak) == 1 and mask[peak[0, 0], peak[0, 1]]
        # A rotated square's mask is no longer an axis-aligned box (proof the transform ran).
        rows, cols = torch.nonzero(mask, as_tuple=True)
        box = (rows.max() - rows.min() + 1) * (cols.max() - cols.min() + 1)
        rotated += int(box > 1.1 * mask.sum())
    assert rotated >= 4


def test_centre_only_and_excluded_findings_give_heatmap_and_ignore_discs():
    hu = np.full((10, 80, 80), LUNG_HU, np.int16)
    hu[:, :3, :] = 40
    vol = Volume(hu, (1.0, 1.0, 2.0), origin=(-40.0, -40.0, 0.0))
    centre = tuple(vol.ijk_to_lps(np.array([40.0, 40.0, 5.0])))
    excluded = tuple(vol.ijk_to_lps(np.array([50.0, 40.0, 5.0])))
    case = Case("luna", "luna", "luna16", vol, None,
                [Annotation(centre, 8.0), Annotation(excluded, 6.0, excluded=True)])
    ds = SliceDataset(CaseList("l", [case]), config(patch_size=48, positive_prob=1.0, max_shift_fraction=0.0))
    for i in range(6):
        s = ds[i]
        assert s["mask_valid"] == 0.0 and s["mask"].sum() == 0  # no mask in LUNA16: loss must skip it
        peak = torch.nonzero(s["heatmap"][0] == 1.0)
        assert len(peak) == 1
        # The patch is centred on the nodule (no shift): the peak is within a pixel of the centre.
        assert torch.all((peak[0].float() - 23.5).abs() <= 1.0)
        # The excluded finding 10 mm to the left is an ignore disc of radius <= 3 mm.
        ignore = s["ignore"][0]
        assert 0 < ignore.sum() <= np.pi * 3.5**2
        rows, cols = torch.nonzero(ignore, as_tuple=True)
        assert abs(cols.float().mean() - 33.5) <= 1.0 and abs(rows.float().mean() - 23.5) <= 1.0


def test_invalid_configs_are_refused():
    with pytest.raises(ValueError):
        SliceSamplingConfig(positive_prob=1.5)
    with pytest.raises(ValueError):
        SliceSamplingConfig(context_slices=-1)
    with pytest.raises(ValueError, match="heatmap_min_sigma_px"):
        SliceSamplingConfig(heatmap_min_sigma_px=0.0)
    with pytest.raises(ValueError):
        SliceDataset(CaseList("empty", []), config())
