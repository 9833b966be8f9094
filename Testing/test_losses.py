"""Training targets and the GLANCE loss on hand-computed cases (glance_training.targets/losses)."""

from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from glance_training.losses import GlanceLoss, LossConfig, centernet_focal_loss, distillation_loss
from glance_training.targets import (
    SliceTargets,
    center_heatmap,
    downsample_mask,
    heatmap_sigma,
    make_targets,
    mask_pyramid,
)


class Output(NamedTuple):
    seg: torch.Tensor
    heatmap: torch.Tensor
    aux: tuple = ()


# ---------------------------------------------------------------- targets


def test_heatmap_peak_and_value_at_sigma():
    hm = center_heatmap([[10, 12]], [12.0], (32, 32))  # sigma = 12 / 6 = 2 px
    assert hm[10, 12].item() == 1.0 and hm.max().item() == 1.0
    assert hm[12, 12].item() == pytest.approx(math.exp(-0.5), abs=1e-6)
    assert hm[10, 10].item() == pytest.approx(math.exp(-0.5), abs=1e-6)
    assert hm[11, 13].item() == pytest.approx(math.exp(-2 / 8), abs=1e-6)
    # Small nodules keep sigma = 1 px.
    small = center_heatmap([[5, 5]], [3.0], (12, 12))
    assert small[5, 6].item() == pytest.approx(math.exp(-0.5), abs=1e-6)
    assert heatmap_sigma(torch.tensor([3.0, 12.0, 30.0])).tolist() == pytest.approx([1.0, 2.0, 5.0])


def test_a_wider_sigma_floor_widens_only_the_small_nodules_peaks():
    labels = np.zeros((24, 24), np.int64)
    labels[5, 5] = 1  # one pixel: equivalent diameter 1.13 px, sigma at the floor
    labels[12:24, 12:24] = 2  # 12 x 12 px: equivalent diameter 13.5 px, sigma 2.26 px
    sharp, wide = make_targets(labels).heatmap[0, 0], make_targets(labels, min_sigma_px=2.0).heatmap[0, 0]
    assert sharp[5, 6].item() == pytest.approx(math.exp(-1 / 2), abs=1e-6)
    assert wide[5, 6].item() == pytest.approx(math.exp(-1 / 8), abs=1e-6)
    assert sharp[5, 5].item() == wide[5, 5].item() == 1.0
    assert torch.equal(sharp[14:, 14:], wide[14:, 14:])  # the large nodule's sigma is above both floors
    with pytest.raises(ValueError, match="sigma"):
        heatmap_sigma(torch.tensor([3.0]), 0.0)


def test_heatmap_subpixel_centre_rounds_to_a_peak_of_one():
    hm = center_heatmap(np.array([[7.4, 3.6]]), np.array([6.0]), (16, 16))
    assert hm[7, 4].item() == 1.0


def test_overlapping_gaussians_combine_by_max():
    a = center_heatmap([[10, 10]], [18.0], (24, 24))
    b = center_heatmap([[10, 14]], [12.0], (24, 24))
    both = center_heatmap([[10, 10], [10, 14]], [18.0, 12.0], (24, 24))
    assert torch.equal(both, torch.maximum(a, b))
    assert both.max().item() == 1.0 and both[10, 12].item() < a[10, 12].item() + b[10, 12].item()
    assert center_heatmap(np.zeros((0, 2)), [], (4, 5)).shape == (4, 5)


def test_make_targets_from_instance_labels():
    labels = np.zeros((2, 32, 32), np.int64)
    labels[0, 4:15, 4:15] = 1  # 11 x 11 square: centroid (9, 9), area 121
    labels[0, 25:28, 25:28] = 4  # 3 x 3: centroid (26, 26), sigma 1
    labels[1, 20:23, 5:8] = 1  # centroid (21, 6)
    t = make_targets(labels)
    assert isinstance(t, SliceTargets)
    assert t.mask.shape == t.heatmap.shape == (2, 1, 32, 32) and t.mask.dtype == torch.float32
    assert t.mask.sum().item() == 121 + 9 + 9
    sigma = 2 * math.sqrt(121 / math.pi) / 6  # equivalent-circle diameter / 6
    assert t.heatmap[0, 0, 9, 9].item() == 1.0
    assert t.heatmap[0, 0, 11, 9].item() == pytest.approx(math.exp(-4 / (2 * sigma**2)), abs=1e-6)
    assert t.heatmap[0, 0, 26, 26].item() == 1.0
    assert t.heatmap[0, 0, 26, 27].item() == pytest.approx(math.exp(-0.5), abs=1e-6)
    # Sample 1 holds only its own nodule: no peak where sample 0 has one.
    assert t.heatmap[1, 0, 21, 6].item() == 1.0 and t.heatmap[1, 0, 9, 9].item() < 1e-6
    assert int((t.heatmap == 1.0).sum()) == 3


def test_make_targets_with_given_diameters():
    labels = torch.zeros(16, 16, dtype=torch.int64)
    labels[7:10, 7:10] = 2
    t = make_targets(labels, diameter_px=torch.tensor([0.0, 0.0, 24.0]))  # sigma 4
    assert t.heatmap[0, 0, 8, 12].item() == pytest.approx(math.exp(-0.5), abs=1e-6)


def test_downsampled_masks():
    mask = torch.zeros(1, 1, 8, 8)
    mask[0, 0, 1, 2] = 1.0  # one pixel
    assert downsample_mask(mask, (4, 4), "max")[0, 0].nonzero().tolist() == [[0, 1]]
    area = downsample_mask(mask, (4, 4), "area")
    assert area[0, 0, 0, 1].item() == 0.25 and area.sum().item() == 0.25
    pyramid = mask_pyramid(mask, [(4, 4), (2, 2), (1, 1)])
    assert [p.shape[-1] for p in pyramid] == [4, 2, 1] and all(p.max().item() == 1.0 for p in pyramid)
    with pytest.raises(ValueError):
        downsample_mask(mask, (4, 4), "mean")


# ---------------------------------------------------------------- losses


@pytest.fixture(scope="module")
def loss_fn():
    return GlanceLoss()


def _mask(b=2, n=16):
    m = torch.zeros(b, 1, n, n)
    m[0, 0, 3:9, 4:10] = 1  # 36 px
    m[-1, 0, 10:12, 10:14] = 1  # 8 px
    return m


def test_dice_of_perfect_and_fully_wrong_predictions(loss_fn):
    m = _mask()
    perfect, _ = loss_fn.seg_terms(torch.where(m > 0, 60.0, -60.0), m)
    assert perfect.item() == pytest.approx(0.0, abs=1e-6)
    wrong, _ = loss_fn.seg_terms(torch.where(m > 0, -60.0, 60.0), m)
    # No overlap: per sample 1 - eps / (|P| + |G| + eps), |P| + |G| = 256 pixels, eps = 1.
    assert wrong.item() == pytest.approx(1 - 1 / 257, abs=1e-6)


def test_dice_eq10_per_sample_by_hand(loss_fn):
    m = _mask()
    dice, _ = loss_fn.seg_terms(torch.zeros_like(m), m)  # p = 0.5 everywhere
    per_sample = [1 - (2 * 0.5 * g + 1) / (0.5 * 256 + g + 1) for g in (36, 8)]
    assert dice.item() == pytest.approx(sum(per_sample) / 2, abs=1e-6)
    batch = GlanceLoss(LossConfig(batch_dice=True, dice_eps=1e-5))
    dice_b, _ = batch.seg_terms(torch.zeros_like(m), m)
    assert dice_b.item() == pytest.approx(1 - (2 * 0.5 * 44 + 1e-5) / (0.5 * 512 + 44 + 1e-5), abs=1e-6)


def test_bce_matches_torch_reference(loss_fn):
    torch.manual_seed(0)
    logits = torch.randn(2, 1, 16, 16) * 3
    m = _mask()
    _, bce = loss_fn.seg_terms(logits, m)
    ref = F.binary_cross_entropy(torch.sigmoid(logits.double()), m.double())
    assert bce.item() == pytest.approx(ref.item(), rel=1e-5)


def test_focal_loss_hand_computed():
    # p = sigmoid(logits) = 0.75, 0.5, 0.25. Targets: a peak (y=1), a penalty-reduced
    # negative (y=0.5) and a plain negative (y=0). Per pixel:
    #   y=1,   p=0.75: -(1-0.75)^2 ln 0.75          = 0.0625 ln(4/3)
    #   y=0.5, p=0.5:  -(1-0.5)^4 0.5^2 ln(1-0.5)   = 0.015625 ln 2
    #   y=0,   p=0.25: -(1-0)^4 0.25^2 ln(1-0.25)    = 0.0625 ln(4/3)
    logits = torch.tensor([math.log(3), 0.0, math.log(1 / 3)]).reshape(1, 1, 1, 3)
    target = torch.tensor([1.0, 0.5, 0.0]).reshape(1, 1, 1, 3)
    expected = 0.125 * math.log(4 / 3) + 0.015625 * math.log(2)
    assert centernet_focal_loss(logits, target).item() == pytest.approx(expected, rel=1e-6)
    # Two peaks: twice the sum divided by 2.
    two = torch.cat([logits, logits], dim=0), torch.cat([target, target], dim=0)
    assert centernet_focal_loss(*two).item() == pytest.approx(expected, rel=1e-6)
    # No peak (first pixel y=0, p=0.75: 0.75^2 ln 4): the sum divided by 1.
    no_peak = torch.tensor([0.0, 0.5, 0.0]).reshape(1, 1, 1, 3)
    assert centernet_focal_loss(logits, no_peak).item() == pytest.approx(
        0.5625 * math.log(4) + 0.015625 * math.log(2) + 0.0625 * math.log(4 / 3), rel=1e-6
    )
    saturated = centernet_focal_loss(torch.tensor([[[[-200.0, 200.0]]]]), torch.tensor([[[[1.0, 0.0]]]]))
    assert torch.isfinite(saturated) and saturated.item() > 100


def _batch():
    labels = np.zeros((2, 16, 16), np.int64)
    labels[0, 3:9, 4:10] = 1
    labels[1, 10:13, 10:13] = 1
    return make_targets(labels)


def test_total_is_the_weighted_sum_and_deep_supervision_by_hand(loss_fn):
    torch.manual_seed(1)
    t = _batch()
    aux = (torch.randn(2, 1, 8, 8), torch.randn(2, 1, 4, 4))
    out = Output(torch.randn(2, 1, 16, 16), torch.randn(2, 1, 16, 16), aux)
    total, parts = loss_fn(out, t)
    assert total.item() == pytest.approx(
        1.0 * (parts["dice"] + parts["bce"]).item() + 0.3 * parts["focal"].item() + 0.3 * parts["deep"].item(),
        rel=1e-6,
    )

    def dice_bce(logits, target):
        p = torch.sigmoid(logits)
        dims = (1, 2, 3)
        dice = 1 - (2 * (p * target).sum(dims) + 1) / (p.sum(dims) + target.sum(dims) + 1)
        return dice.mean() + F.binary_cross_entropy_with_logits(logits, target)

    small = [F.max_pool2d(t.mask, 2), F.max_pool2d(t.mask, 4)]
    deep = (dice_bce(aux[0], small[0]) + dice_bce(aux[1], small[1])) / 2
    assert parts["deep"].item() == pytest.approx(deep.item(), rel=1e-5)
    assert parts["dice"].item() + parts["bce"].item() == pytest.approx(dice_bce(out.seg, t.mask).item(), rel=1e-5)
    assert parts["focal"].item() == pytest.approx(centernet_focal_loss(out.heatmap, t.heatmap).item(), rel=1e-6)


def test_eval_output_without_aux_and_dict_targets(loss_fn):
    t = _batch()
    out = Output(torch.zeros(2, 1, 16, 16), torch.zeros(2, 1, 16, 16), ())
    total, parts = loss_fn(out, {"mask": t.mask, "heatmap": t.heatmap})
    assert parts["deep"].item() == 0.0
    assert total.item() == pytest.approx((parts["dice"] + parts["bce"] + 0.3 * parts["focal"]).item(), rel=1e-6)
    with pytest.raises(ValueError):
        loss_fn(Output(torch.zeros(2, 1, 8, 8), torch.zeros(2, 1, 16, 16)), t)


def test_gradients_reach_every_head(loss_fn):
    t = _batch()
    seg = torch.randn(2, 1, 16, 16, requires_grad=True)
    hm = torch.randn(2, 1, 16, 16, requires_grad=True)
    aux = torch.randn(2, 1, 8, 8, requires_grad=True)
    total, parts = loss_fn(Output(seg, hm, (aux,)), t)
    assert not parts["total"].requires_grad
    total.backward()
    for g in (seg.grad, hm.grad, aux.grad):
        assert g is not None and torch.isfinite(g).all() and g.abs().sum().item() > 0


def test_ignored_pixels_do_not_count(loss_fn):
    torch.manual_seed(2)
    t = _batch()
    ignore = torch.zeros_like(t.mask)
    ignore[:, :, 12:16, 0:4] = 1.0  # an excluded finding, away from the nodules
    seg, hm, aux = torch.randn(2, 1, 16, 16), torch.randn(2, 1, 16, 16), torch.randn(2, 1, 8, 8)
    targets = {"mask": t.mask, "heatmap": t.heatmap, "ignore": ignore}
    _, parts = loss_fn(Output(seg, hm, (aux,)), targets)
    # Whatever the network predicts inside the ignored region changes nothing.
    seg2, hm2, aux2 = seg.clone(), hm.clone(), aux.clone()
    seg2[:, :, 12:16, 0:4] = 30.0
    hm2[:, :, 12:16, 0:4] = 30.0
    aux2[:, :, 6:8, 0:2] = 30.0
    _, parts2 = loss_fn(Output(seg2, hm2, (aux2,)), targets)
    for name in parts:
        assert parts2[name].item() == pytest.approx(parts[name].item(), rel=1e-6), name
    keep = ignore == 0
    ref_bce = F.binary_cross_entropy_with_logits(seg[keep], t.mask[keep])
    assert parts["bce"].item() == pytest.approx(ref_bce.item(), rel=1e-5)


def test_samples_without_masks_only_train_the_heatmap(loss_fn):
    torch.manual_seed(3)
    t = _batch()
    seg = torch.randn(2, 1, 16, 16, requires_grad=True)
    hm = torch.randn(2, 1, 16, 16, requires_grad=True)
    targets = {"mask": t.mask, "heatmap": t.heatmap, "mask_valid": torch.tensor([1.0, 0.0])}
    _, parts = loss_fn(Output(seg, hm), targets)
    dice0, bce0 = loss_fn.seg_terms(seg[:1], t.mask[:1])
    assert parts["dice"].item() == pytest.approx(dice0.item(), rel=1e-6)
    assert parts["bce"].item() == pytest.approx(bce0.item(), rel=1e-6)
    assert parts["focal"].item() == pytest.approx(centernet_focal_loss(hm, t.heatmap).item(), rel=1e-6)
    none_valid = dict(targets, mask_valid=torch.tensor([0.0, 0.0]))
    total, parts = loss_fn(Output(seg, hm), none_valid)
    assert parts["dice"].item() == parts["bce"].item() == parts["deep"].item() == 0.0
    total.backward()
    assert seg.grad is not None and seg.grad.abs().sum().item() == 0.0  # in the graph, for DDP
    assert hm.grad.abs().sum().item() > 0


def test_distillation_loss_is_log2_at_even_odds_and_stationary_at_the_teacher():
    teacher = torch.rand(2, 2, 5, 5) * 0.9 + 0.05
    # Logits 0 (p = 0.5): each pixel costs -t log 0.5 - (1 - t) log 0.5 = log 2 whatever the teacher says.
    even = Output(torch.zeros(2, 1, 5, 5), torch.zeros(2, 1, 5, 5), ())
    assert distillation_loss(even, teacher, det_weight=0.3).item() == pytest.approx(1.3 * math.log(2), abs=1e-6)
    # At the teacher's own logits the gradient is zero (d/dz = sigmoid(z) - t), and nowhere else.
    z = torch.logit(teacher).clone().requires_grad_(True)
    distillation_loss(Output(z[:, :1], z[:, 1:], ()), teacher).backward()
    assert z.grad.abs().max() < 1e-7
    w = torch.zeros_like(teacher, requires_grad=True)
    distillation_loss(Output(w[:, :1], w[:, 1:], ()), teacher).backward()
    expected = (0.5 - teacher) / 50  # mean over the 2 x 1 x 5 x 5 pixels of each map
    expected[:, 1:] *= 0.3
    assert torch.allclose(w.grad, expected, atol=1e-7)
    with pytest.raises(ValueError, match="teacher maps"):
        distillation_loss(even, teacher[:, :1])
