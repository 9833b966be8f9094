"""Training targets for 2-D slices: nodule mask, centre heatmap, deep-supervision masks.

Heatmap (paper: "a Gaussian of radius proportional to the nodule diameter at each annotated
centroid", CenterNet-style):

* centre = the centroid of the nodule's cross-section on the slice, rounded to the nearest
  pixel, so the peak is exactly 1.0 on that pixel (the focal loss counts pixels == 1 as
  peaks);
* sigma = max(1, diameter_px / 6) pixels: about 99 % of the Gaussian's mass lies within
  3 sigma = the nodule radius, and a micronodule still gets a few positive-ish pixels
  (the floor is ``min_sigma_px``, a training option: a wider floor spares a small nodule's
  neighbouring pixels the focal loss's negative penalty);
* diameter_px = the equivalent-circle diameter 2*sqrt(area/pi) of the cross-section unless
  the caller passes the nodule's own diameter (e.g. the annotated 3-D diameter);
* overlapping Gaussians combine by element-wise max (not sum), so values stay in [0, 1].

Everything is torch and vectorised over nodules and the batch; numpy inputs are accepted.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Literal, Sequence

import numpy as np
import torch
import torch.nn.functional as F

log = logging.getLogger(__name__)

SIGMA_PER_DIAMETER = 1.0 / 6.0
MIN_SIGMA_PX = 1.0


@dataclass
class SliceTargets:
    """Targets of a batch of slices, both float32 [B, 1, H, W] on one device."""

    mask: torch.Tensor  # 0/1 nodule mask
    heatmap: torch.Tensor  # centre heatmap in [0, 1], peaks exactly 1


def heatmap_sigma(diameter_px: torch.Tensor, min_sigma_px: float = MIN_SIGMA_PX) -> torch.Tensor:
    """Gaussian sigma (pixels) for nodules of the given diameters (pixels)."""
    if not min_sigma_px > 0:
        raise ValueError(f"the heatmap's minimum sigma must be positive, got {min_sigma_px}")
    return torch.clamp(diameter_px * SIGMA_PER_DIAMETER, min=min_sigma_px)


def _gaussians(centres: torch.Tensor, sigma: torch.Tensor, shape: tuple[int, int]) -> torch.Tensor:
    """[N, H, W] Gaussians with peak 1 at the integer (row, col) pixels ``centres`` [N, 2]."""
    h, w = shape
    rows = torch.arange(h, device=centres.device, dtype=torch.float32)
    cols = torch.arange(w, device=centres.device, dtype=torch.float32)
    two_var = 2.0 * sigma.to(torch.float32)[:, None] ** 2
    # Separable: an outer product of two 1-D Gaussians per nodule.
    g_rows = torch.exp(-((rows[None, :] - centres[:, 0:1]) ** 2) / two_var)
    g_cols = torch.exp(-((cols[None, :] - centres[:, 1:2]) ** 2) / two_var)
    return g_rows[:, :, None] * g_cols[:, None, :]


def _tensor(x, device: torch.device | str | None) -> torch.Tensor:
    t = x if torch.is_tensor(x) else torch.as_tensor(np.asarray(x))
    return t.to(device) if device is not None else t


def center_heatmap(
    centres: torch.Tensor | np.ndarray | Sequence[Sequence[float]],
    diameters_px: torch.Tensor | np.ndarray | Sequence[float],
    shape: tuple[int, int],
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """[H, W] heatmap of Gaussians at ``centres`` (N x (row, col) pixels, rounded), max-combined."""
    centres_t = _tensor(centres, device).to(torch.float32).reshape(-1, 2).round()
    diam = torch.as_tensor(diameters_px, dtype=torch.float32, device=centres_t.device).reshape(-1)
    if diam.numel() != centres_t.shape[0]:
        raise ValueError(f"{centres_t.shape[0]} centres but {diam.numel()} diameters")
    if centres_t.shape[0] == 0:
        return torch.zeros(shape, dtype=torch.float32, device=centres_t.device)
    return _gaussians(centres_t, heatmap_sigma(diam), shape).amax(dim=0)


@dataclass(frozen=True)
class Instances:
    """Per-instance geometry of a batch of label maps, G instances in all."""

    batch_index: torch.Tensor  # [G] sample of each instance
    label: torch.Tensor  # [G] label value in that sample
    centre: torch.Tensor  # [G, 2] centroid (row, col), pixels
    area: torch.Tensor  # [G] pixels


def instance_geometry(labels: torch.Tensor) -> Instances:
    """Centroid and area of every instance (label > 0) of ``labels`` [B, H, W]."""
    b, h, w = labels.shape
    labels = labels.to(torch.int64)
    n_labels = int(labels.max().item()) + 1 if labels.numel() else 1
    # One id per (sample, label) so a single bincount covers the whole batch.
    ids = (torch.arange(b, device=labels.device)[:, None, None] * n_labels + labels).reshape(-1)
    axis = dict(device=labels.device, dtype=torch.float64)
    grid_r, grid_c = torch.meshgrid(torch.arange(h, **axis), torch.arange(w, **axis), indexing="ij")
    rows, cols = grid_r.reshape(-1).repeat(b), grid_c.reshape(-1).repeat(b)
    size = b * n_labels
    area = torch.bincount(ids, minlength=size).to(torch.float64)
    sum_r = torch.bincount(ids, weights=rows, minlength=size)
    sum_c = torch.bincount(ids, weights=cols, minlength=size)
    present = (area > 0) & (torch.arange(size, device=labels.device) % n_labels != 0)
    idx = torch.nonzero(present).reshape(-1)
    centre = torch.stack([sum_r[idx] / area[idx], sum_c[idx] / area[idx]], dim=1)
    return Instances(idx // n_labels, idx % n_labels, centre.to(torch.float32), area[idx].to(torch.float32))


def make_targets(
    labels: torch.Tensor | np.ndarray,
    diameter_px: torch.Tensor | np.ndarray | None = None,
    device: torch.device | str | None = None,
    min_sigma_px: float = MIN_SIGMA_PX,
) -> SliceTargets:
    """Mask and heatmap targets from instance label maps.

    ``labels``: [H, W] or [B, H, W] integer instance labels (0 = background; one value per
    nodule; a binary mask holding several nodules must be split first, e.g. with
    ``scipy.ndimage.label``). ``diameter_px``: optional nodule diameters in pixels indexed by
    label value, [L] for every sample or [B, L]; default: each cross-section's
    equivalent-circle diameter. ``min_sigma_px``: the Gaussians' smallest sigma.
    """
    lab = _tensor(labels, device)
    if lab.ndim == 2:
        lab = lab[None]
    if lab.ndim != 3:
        raise ValueError(f"labels must be [H, W] or [B, H, W], got shape {tuple(lab.shape)}")
    b, h, w = lab.shape
    inst = instance_geometry(lab)
    if diameter_px is None:
        diam = 2.0 * torch.sqrt(inst.area / torch.pi)
    else:
        table = torch.as_tensor(diameter_px, dtype=torch.float32, device=lab.device)
        table = table.expand(b, -1) if table.ndim == 1 else table
        diam = table[inst.batch_index, inst.label]
    heatmap = torch.zeros(b, h, w, dtype=torch.float32, device=lab.device)
    if inst.label.numel():
        gauss = _gaussians(torch.round(inst.centre), heatmap_sigma(diam, min_sigma_px), (h, w))
        index = inst.batch_index[:, None].expand(-1, h * w)
        heatmap.view(b, h * w).scatter_reduce_(0, index, gauss.view(-1, h * w), reduce="amax")
    mask = (lab > 0).to(torch.float32)
    return SliceTargets(mask=mask[:, None], heatmap=heatmap[:, None])


def downsample_mask(
    mask: torch.Tensor, size: tuple[int, int], mode: Literal["max", "area"] = "max"
) -> torch.Tensor:
    """Mask [B, 1, H, W] pooled to ``size`` for a deep-supervision head.

    ``max`` (default) keeps every nodule present at coarse scales (a 4-pixel nodule is still
    a positive cell at stride 16, which is what the auxiliary heads are for: small-object
    recall); ``area`` gives the soft covered fraction of each cell.
    """
    if mode == "max":
        return F.adaptive_max_pool2d(mask, size)
    if mode == "area":
        return F.adaptive_avg_pool2d(mask, size)
    raise ValueError(f"unknown downsampling mode {mode!r} (max or area)")


def mask_pyramid(
    mask: torch.Tensor, sizes: Sequence[tuple[int, int]], mode: Literal["max", "area"] = "max"
) -> list[torch.Tensor]:
    """The mask downsampled to each auxiliary head's size."""
    return [downsample_mask(mask, tuple(s), mode) for s in sizes]
