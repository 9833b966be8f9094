"""GLANCE assembly: stem, dual-stream encoder (DiSCo), PRD decoder and heads.

Input: (B, C, H, W) windowed CT slices in [0, 1], any H and W (padded to the
network stride internally, outputs cropped back). Output: ``GlanceOutput``
with nodule and heatmap logits at (B, 1, H, W) and, in training mode with
deep supervision, the auxiliary logits at strides 16, 8, 4 and 2.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from glance.model.config import GlanceConfig
from glance.model.cscf import CSCF
from glance.model.gct import ConvEmbed, GCTStage
from glance.model.layers import ConvBNAct, IdentityStream, PlainStream, ResidualBlock
from glance.model.mrgam import MRGAM
from glance.model.prd import PRD, Heads


class GlanceOutput(NamedTuple):
    seg: Tensor
    heatmap: Tensor
    aux: tuple[Tensor, ...]


def _make_stream(kind: str, cfg: GlanceConfig, k: int) -> nn.Module | None:
    dim = cfg.dims[k]
    if kind == "gct":
        return GCTStage(dim, cfg.gct_depths[k], cfg.heads[k], cfg.sr_ratios[k], cfg.attention,
                        cfg.window, cfg.mlp_ratio, cfg.pos_embed_grid if k == 0 else None)
    if kind == "mrgam":
        return MRGAM(dim, cfg.dilations, cfg.mrgam_groups, cfg.gate, cfg.gate_reduction)
    if kind == "plain":
        return PlainStream(dim)
    if kind == "identity":
        return IdentityStream()
    return None


class DiscoStage(nn.Module):
    """One scale of the Dual-Stream Context Encoder: embed, two streams, fuse."""

    def __init__(self, cfg: GlanceConfig, k: int, c_in: int) -> None:
        super().__init__()
        stride = 4 if k == 0 else 2
        self.embed = ConvEmbed(c_in, cfg.dims[k], stride)
        self.global_stream = _make_stream(cfg.global_stream, cfg, k)
        self.local_stream = _make_stream(cfg.local_stream, cfg, k)
        two = self.global_stream is not None and self.local_stream is not None
        self.fusion = CSCF(cfg.dims[k], cfg.se_reduction) if two and cfg.fusion == "cscf" else None
        # Without fusion the streams never exchange: the local one needs its own embedding chain.
        self.embed_local = ConvEmbed(c_in, cfg.dims[k], stride) if two and cfg.fusion == "none" else None

    def forward(self, prev_g: Tensor, prev_l: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Returns (input of the next global stage, of the next local stage, decoder skip)."""
        x = self.embed(prev_g)
        if self.local_stream is None:
            f = self.global_stream(x)
            return f, f, f
        if self.global_stream is None:
            f = self.local_stream(x)
            return f, f, f
        f_g = self.global_stream(x)
        if self.fusion is not None:
            f_c = self.fusion(f_g, self.local_stream(x, f_g))
            return f_c, f_c, f_c
        f_l = self.local_stream(self.embed_local(prev_l), f_g)
        return f_g, f_l, f_g + f_l


class DiscoEncoder(nn.Module):
    def __init__(self, cfg: GlanceConfig) -> None:
        super().__init__()
        chans = (cfg.in_channels, *cfg.dims[:-1])
        self.stages = nn.ModuleList(DiscoStage(cfg, k, chans[k]) for k in range(4))

    def forward(self, image: Tensor, stem: list[Tensor]) -> list[Tensor]:
        g = loc = image
        skips = []
        for stage in self.stages:
            g, loc, skip = stage(g, loc)
            skips.append(skip)
        return skips


class UNetEncoder(nn.Module):
    """The baseline U-Net encoder (Table 4, last row): max-pool + residual conv blocks."""

    def __init__(self, cfg: GlanceConfig) -> None:
        super().__init__()
        chans = (cfg.stem_dims[1], *cfg.dims)
        self.stages = nn.ModuleList(
            nn.Sequential(nn.MaxPool2d(2), ResidualBlock(chans[k], chans[k + 1])) for k in range(4)
        )

    def forward(self, image: Tensor, stem: list[Tensor]) -> list[Tensor]:
        x, skips = stem[-1], []
        for stage in self.stages:
            x = stage(x)
            skips.append(x)
        return skips


class Stem(nn.Module):
    """Light full- and half-resolution features for the last two decoder skips."""

    def __init__(self, c_in: int, dims: tuple[int, int]) -> None:
        super().__init__()
        self.stride1 = ConvBNAct(c_in, dims[0])
        self.stride2 = ConvBNAct(dims[0], dims[1], stride=2)

    def forward(self, x: Tensor) -> list[Tensor]:
        full = self.stride1(x)
        return [full, self.stride2(full)]


class GlanceNet(nn.Module):
    def __init__(self, cfg: GlanceConfig | None = None) -> None:
        super().__init__()
        self.cfg = cfg or GlanceConfig()
        c = self.cfg
        self.stem = Stem(c.in_channels, c.stem_dims)
        self.encoder = DiscoEncoder(c) if c.encoder == "disco" else UNetEncoder(c)
        skips = (c.dims[2], c.dims[1], c.dims[0], c.stem_dims[1], c.stem_dims[0])
        self.decoder = PRD(c.dims[3], skips, c.decoder_dims, c.upsample)
        self.heads = Heads(c.decoder_dims[-1], c.decoder_dims[:-1] if c.deep_supervision else ())

    def forward(self, x: Tensor) -> GlanceOutput:
        h, w = x.shape[-2:]
        s = GlanceConfig.STRIDE
        # Zero is -1000 HU after windowing: padding looks like air outside the body.
        x = F.pad(x, (0, (-w) % s, 0, (-h) % s))
        stem = self.stem(x)
        enc = self.encoder(x, stem)
        dec = self.decoder(enc[3], [enc[2], enc[1], enc[0], stem[1], stem[0]])
        seg, heatmap, aux = self.heads(dec[-1], dec[:-1], self.training and self.cfg.deep_supervision)
        # Aux maps at stride s cover ceil(h / s) x ceil(w / s) of the real image.
        aux = tuple(a[..., : -(-h // (s >> i)), : -(-w // (s >> i))] for i, a in enumerate(aux, start=1))
        return GlanceOutput(seg[..., :h, :w], heatmap[..., :h, :w], aux)

    def mrgam_modules(self) -> list[MRGAM]:
        return [m for m in self.modules() if isinstance(m, MRGAM)]


def build_model(cfg: GlanceConfig | None = None) -> GlanceNet:
    torch.manual_seed(0)  # identical initial weights for a config: reproducible ablations
    return GlanceNet(cfg)
