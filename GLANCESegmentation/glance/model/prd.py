"""Pyramid Refinement Decoder and dual heads (paper eq. 8, Algorithm 3).

D^(k) = R(Up(D^(k+1)) || skip^(k)), from the bottleneck at stride 32 down to
stride 1: the four consensus maps F_c at strides 16, 8, 4 and then the stem's
features at strides 2 and 1, so both 1x1 heads (nodule probability, centre
heatmap) predict at the full input resolution. Auxiliary 1x1 segmentation
heads on the intermediate decoder stages give deep supervision (training only).
"""

from __future__ import annotations

import math

from torch import Tensor, nn

from glance.model.layers import ConvBNAct, ResidualBlock

# Initial heatmap bias so that sigmoid = 0.01 everywhere: the focal loss starts
# near its optimum for the overwhelmingly empty background (CenterNet practice).
HEATMAP_PRIOR = 0.01


class Up(nn.Module):
    """Reduce channels at the coarse scale (cheap), then upsample x2."""

    def __init__(self, c_in: int, c_out: int, mode: str) -> None:
        super().__init__()
        if mode == "transposed":
            self.op = nn.Sequential(nn.ConvTranspose2d(c_in, c_out, 2, stride=2, bias=False),
                                    nn.BatchNorm2d(c_out), nn.ReLU(inplace=True))
        else:
            self.op = nn.Sequential(ConvBNAct(c_in, c_out, 1),
                                    nn.Upsample(scale_factor=2, mode="bilinear", align_corners=False))

    def forward(self, x: Tensor) -> Tensor:
        return self.op(x)


class DecoderStage(nn.Module):
    def __init__(self, c_in: int, c_skip: int, c_out: int, mode: str) -> None:
        super().__init__()
        self.up = Up(c_in, c_out, mode)
        self.refine = ResidualBlock(c_out + c_skip, c_out)

    def forward(self, x: Tensor, skip: Tensor) -> Tensor:
        import torch

        return self.refine(torch.cat([self.up(x), skip], dim=1))


class PRD(nn.Module):
    """Decoder from the stride-32 bottleneck to stride 1; returns every stage's output."""

    def __init__(self, bottleneck: int, skips: tuple[int, ...], widths: tuple[int, ...], mode: str) -> None:
        super().__init__()
        chans = (bottleneck, *widths)
        self.stages = nn.ModuleList(
            DecoderStage(chans[i], skips[i], widths[i], mode) for i in range(len(widths))
        )

    def forward(self, bottleneck: Tensor, skips: list[Tensor]) -> list[Tensor]:
        outs, d = [], bottleneck
        for stage, skip in zip(self.stages, skips):
            d = stage(d, skip)
            outs.append(d)
        return outs


class Heads(nn.Module):
    """1x1 heads: nodule logits and centre-heatmap logits at full resolution, plus aux seg heads."""

    def __init__(self, width: int, aux_widths: tuple[int, ...]) -> None:
        super().__init__()
        self.seg = nn.Conv2d(width, 1, 1)
        self.heatmap = nn.Conv2d(width, 1, 1)
        nn.init.constant_(self.heatmap.bias, -math.log((1 - HEATMAP_PRIOR) / HEATMAP_PRIOR))
        self.aux = nn.ModuleList(nn.Conv2d(w, 1, 1) for w in aux_widths)

    def forward(self, full: Tensor, intermediate: list[Tensor], with_aux: bool) -> tuple[Tensor, Tensor, tuple]:
        aux = tuple(h(x) for h, x in zip(self.aux, intermediate)) if with_aux else ()
        return self.seg(full), self.heatmap(full), aux
