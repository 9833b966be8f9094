"""The training loss of GLANCE (paper eq. 9-10 plus deep supervision).

    L = w_seg * (Dice + BCE)(seg) + w_det * focal(heatmap) + w_deep * mean_i (Dice + BCE)(aux_i)

with w_seg = 1.0, w_det = 0.3, w_deep = 0.3 (paper: lambda_seg, lambda_det, "x 0.3").

* Dice (eq. 10): 1 - (2 sum(p*y) + eps) / (sum(p) + sum(y) + eps) on p = sigmoid(logits),
  computed **per sample** and averaged over the batch (each slice weighs the same, like the
  per-nodule Dice it is evaluated with), eps = 1.0 by default so an empty slice with an
  empty prediction scores ~0 instead of 0/0. ``batch_dice=True`` sums over the batch instead.
  This is exactly ``monai.losses.DiceLoss(smooth_nr=eps, smooth_dr=eps)`` on p.
* BCE: ``binary_cross_entropy_with_logits``, mean over pixels.
* Optional targets (see :class:`GlanceLoss`): ``ignore`` pixels are zeroed in p and y for
  Dice and left out of the BCE mean and the focal sum; samples with ``mask_valid`` = 0 are
  left out of Dice, BCE and deep supervision (those terms are 0 when no sample has a mask).
* Focal: the CenterNet penalty-reduced pixel-wise focal loss (alpha = 2, beta = 4),
  summed over the batch and divided by max(1, number of peaks), peaks being pixels whose
  target is exactly 1 (``glance_training.targets`` puts exactly 1.0 at each centre):
    -(1-p)^alpha log p                 where y = 1
    -(1-y)^beta p^alpha log(1-p)       elsewhere
  MONAI's FocalLoss is the RetinaNet form, not this one, so it is written out here.
* Deep supervision: Dice + BCE of each auxiliary logit map against the mask pooled to its
  size (``targets.downsample_mask``, max pooling by default), averaged over the heads;
  0 when the model returns no auxiliary heads (eval mode).

Losses are computed in float32 whatever the autocast dtype of the logits.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from glance_training.targets import downsample_mask

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class LossConfig:
    seg_weight: float = 1.0
    det_weight: float = 0.3
    deep_weight: float = 0.3
    dice_eps: float = 1.0
    batch_dice: bool = False
    focal_alpha: float = 2.0
    focal_beta: float = 4.0
    aux_downsample: Literal["max", "area"] = "max"


def centernet_focal_loss(
    logits: torch.Tensor,
    target: torch.Tensor,
    alpha: float = 2.0,
    beta: float = 4.0,
    keep: torch.Tensor | None = None,
) -> torch.Tensor:
    """CenterNet's penalty-reduced focal loss, normalised by the number of peaks (>= 1).

    ``keep`` (optional, broadcastable 0/1): pixels with 0 are left out (excluded findings).
    """
    logits, target = logits.float(), target.float()
    # logsigmoid keeps log p and log(1-p) finite for saturated logits.
    log_p, log_not_p = F.logsigmoid(logits), F.logsigmoid(-logits)
    p = log_p.exp()
    peak = target == 1.0
    positive = (1.0 - p) ** alpha * log_p
    negative = (1.0 - target) ** beta * p**alpha * log_not_p
    per_pixel = torch.where(peak, positive, negative)
    if keep is not None:
        per_pixel = per_pixel * keep
        peak = peak & (keep > 0)
    return -per_pixel.sum() / peak.sum().clamp(min=1)


def distillation_loss(output: Any, teacher: torch.Tensor, det_weight: float = 0.3) -> torch.Tensor:
    """BCE(seg logits, teacher seg) + det_weight * BCE(heatmap logits, teacher heatmap), mean over pixels.

    ``teacher`` [B,2,H,W] holds a teacher's probabilities (seg, heatmap), e.g. a model averaged over
    flips (``glance.infer.mean_over_flips``). BCE against soft targets is smallest, with zero gradient,
    where the student's probabilities equal the teacher's. Every pixel counts, masks or not: the
    teacher has an answer where the readers drew none.
    """
    if teacher.shape[1] != 2 or teacher.shape[-2:] != output.seg.shape[-2:]:
        raise ValueError(f"teacher maps {tuple(teacher.shape)} do not fit logits {tuple(output.seg.shape)}")
    teacher = teacher.float()
    seg = F.binary_cross_entropy_with_logits(output.seg.float(), teacher[:, :1])
    heat = F.binary_cross_entropy_with_logits(output.heatmap.float(), teacher[:, 1:])
    return seg + det_weight * heat


def _field(obj: Any, name: str, default: Any = None) -> Any:
    """``obj.name`` or ``obj[name]``: targets may be a dataclass, a NamedTuple or a dict."""
    return obj.get(name, default) if isinstance(obj, dict) else getattr(obj, name, default)


class GlanceLoss(nn.Module):
    """(model output, targets) -> (total loss, detached components for logging).

    ``output``: anything with ``.seg`` [B,1,H,W], ``.heatmap`` [B,1,H,W] and ``.aux`` (a
    tuple of [B,1,h_i,w_i]) logits. ``targets``: anything with ``.mask`` and ``.heatmap``
    [B,1,H,W] (e.g. ``targets.SliceTargets``) or a dict with those keys (a collated batch of
    ``datasets.slices.SliceDataset``). Optional entries, used when present:

    * ``ignore`` [B,1,H,W]: pixels (excluded findings) left out of every term;
    * ``mask_valid`` [B]: samples whose case has no nodule masks (e.g. LUNA16, centres only)
      are left out of the segmentation and deep-supervision terms; their heatmap still counts.
    """

    def __init__(self, config: LossConfig = LossConfig()) -> None:
        super().__init__()
        from monai.losses import DiceLoss

        self.config = config
        # Probabilities are formed here (sigmoid, then ignored pixels zeroed), so MONAI gets
        # sigmoid=False; its formula is then exactly eq. 10.
        self.dice = DiceLoss(
            sigmoid=False, smooth_nr=config.dice_eps, smooth_dr=config.dice_eps, batch=config.batch_dice
        )

    def seg_terms(
        self, logits: torch.Tensor, mask: torch.Tensor, keep: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(Dice, BCE) of one logit map against a mask of its shape; ``keep`` = 0 drops pixels."""
        if logits.shape != mask.shape:
            raise ValueError(f"logits {tuple(logits.shape)} and mask {tuple(mask.shape)} differ in shape")
        logits, mask = logits.float(), mask.float()
        if keep is None:
            return self.dice(torch.sigmoid(logits), mask), F.binary_cross_entropy_with_logits(logits, mask)
        dice = self.dice(torch.sigmoid(logits) * keep, mask * keep)
        bce = F.binary_cross_entropy_with_logits(logits, mask, reduction="none")
        return dice, (bce * keep).sum() / keep.sum().clamp(min=1.0)

    def forward(self, output: Any, targets: Any) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        cfg = self.config
        mask, heatmap = _field(targets, "mask"), _field(targets, "heatmap")
        if mask is None or heatmap is None:
            raise ValueError("targets need a mask and a heatmap")
        if output.heatmap.shape != heatmap.shape:
            raise ValueError(
                f"heatmap logits {tuple(output.heatmap.shape)} and target {tuple(heatmap.shape)} differ"
            )
        ignore = _field(targets, "ignore")
        keep = None if ignore is None else 1.0 - ignore.float()
        focal = centernet_focal_loss(output.heatmap, heatmap, cfg.focal_alpha, cfg.focal_beta, keep)

        aux = tuple(output.aux or ())
        valid = _field(targets, "mask_valid")
        rows = slice(None) if valid is None else torch.as_tensor(valid, device=mask.device).reshape(-1) > 0.5
        # A batch without masks still touches the seg and aux logits (times 0): DDP expects
        # every parameter to get a gradient in every step.
        dice = bce = deep = (output.seg.float().sum() + sum(a.float().sum() for a in aux)) * 0.0
        if valid is None or bool(rows.any()):
            seg_keep = None if keep is None else keep[rows]
            dice, bce = self.seg_terms(output.seg[rows], mask[rows], seg_keep)
            ignore_rows = None if ignore is None else ignore[rows]
            deep = self._deep_supervision(tuple(a[rows] for a in aux), mask[rows], ignore_rows)
        total = cfg.seg_weight * (dice + bce) + cfg.det_weight * focal + cfg.deep_weight * deep
        parts = {"dice": dice, "bce": bce, "focal": focal, "deep": deep, "total": total}
        return total, {k: v.detach() for k, v in parts.items()}

    def _deep_supervision(
        self, aux: tuple[torch.Tensor, ...], mask: torch.Tensor, ignore: torch.Tensor | None
    ) -> torch.Tensor:
        """Mean (Dice + BCE) of the auxiliary heads; a cell touching an ignored pixel is ignored."""
        total = mask.new_zeros((), dtype=torch.float32)
        for logits in aux:
            size = tuple(logits.shape[-2:])
            small = downsample_mask(mask.float(), size, self.config.aux_downsample)
            keep = None if ignore is None else 1.0 - downsample_mask(ignore.float(), size, "max")
            total = total + sum(self.seg_terms(logits, small, keep)) / len(aux)
        return total
