"""Global Context Transformer stream (paper Algorithm 1, eq. 3-4).

Stage k: the embedding X^(k) (plus a learned position embedding at stage 1)
is flattened to tokens and passed through pre-norm transformer blocks
(MHSA + GELU MLP, each with a residual). Early, high-resolution stages use
spatial-reduction attention (keys/values pooled by a strided conv, as in PVT)
or non-overlapping windows; later stages use full global attention.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from glance.model.layers import ConvBNAct


class ConvEmbed(nn.Module):
    """Overlapping strided conv embedding: F_c^(k-1) (or the image) -> X^(k)."""

    def __init__(self, c_in: int, c_out: int, stride: int) -> None:
        super().__init__()
        # Kernel larger than the stride so neighbouring tokens overlap.
        self.proj = ConvBNAct(c_in, c_out, k=2 * stride - 1 if stride > 2 else 3, stride=stride, act=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.proj(x)


class PositionEmbedding(nn.Module):
    """Learned position embedding on a fixed grid, resized bilinearly to any input size."""

    def __init__(self, dim: int, grid: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(1, dim, grid, grid))
        nn.init.trunc_normal_(self.weight, std=0.02)

    def forward(self, x: Tensor) -> Tensor:
        # Always resized (an identity at the native grid) so the graph has no
        # shape-dependent branch and exports with dynamic sizes.
        pe = F.interpolate(self.weight, size=x.shape[-2:], mode="bilinear", align_corners=False)
        return x + pe


class Attention(nn.Module):
    """Multi-head self-attention on a (B, C, H, W) map; full, spatial-reduction or windowed."""

    def __init__(self, dim: int, heads: int, sr_ratio: int, kind: str, window: int) -> None:
        super().__init__()
        self.heads = heads
        self.sr_ratio = sr_ratio
        self.kind = kind if sr_ratio > 1 else "full"
        self.window = window
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(dim, 2 * dim)
        self.proj = nn.Linear(dim, dim)
        if self.kind == "sr":
            self.reduce = nn.Conv2d(dim, dim, sr_ratio, stride=sr_ratio)
            self.reduce_norm = nn.LayerNorm(dim)

    def forward(self, x: Tensor) -> Tensor:
        if self.kind == "window":
            return self._windowed(x)
        b, c, h, w = x.shape
        tokens = x.flatten(2).transpose(1, 2)
        if self.kind == "sr":
            kv_src = self.reduce_norm(self.reduce(x).flatten(2).transpose(1, 2))
        else:
            kv_src = tokens
        out = self._attend(tokens, kv_src)
        return out.transpose(1, 2).reshape(b, c, h, w)

    def _attend(self, tokens: Tensor, kv_src: Tensor) -> Tensor:
        b, n, c = tokens.shape
        d = c // self.heads
        q = self.q(tokens).reshape(b, n, self.heads, d).transpose(1, 2)
        k, v = self.kv(kv_src).reshape(b, -1, 2, self.heads, d).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(q, k, v)  # softmax(QK^T / sqrt(d)) V, eq. 4
        return self.proj(out.transpose(1, 2).reshape(b, n, c))

    def _windowed(self, x: Tensor) -> Tensor:
        b, c, h, w = x.shape
        s = self.window
        ph, pw = (-h) % s, (-w) % s
        xp = F.pad(x, (0, pw, 0, ph))
        hp, wp = h + ph, w + pw
        win = xp.reshape(b, c, hp // s, s, wp // s, s).permute(0, 2, 4, 3, 5, 1).reshape(-1, s * s, c)
        out = self._attend(win, win)
        out = out.reshape(b, hp // s, wp // s, s, s, c).permute(0, 5, 1, 3, 2, 4).reshape(b, c, hp, wp)
        return out[:, :, :h, :w]


class TransformerBlock(nn.Module):
    """Pre-norm MHSA and GELU MLP, each with a residual (Algorithm 1, lines 14-19)."""

    def __init__(self, dim: int, heads: int, sr_ratio: int, kind: str, window: int, mlp_ratio: float) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, heads, sr_ratio, kind, window)
        self.norm2 = nn.LayerNorm(dim)
        hidden = int(dim * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))

    def forward(self, x: Tensor) -> Tensor:
        b, c, h, w = x.shape
        t = x.flatten(2).transpose(1, 2)
        y = self.norm1(t).transpose(1, 2).reshape(b, c, h, w)
        t = t + self.attn(y).flatten(2).transpose(1, 2)
        t = t + self.mlp(self.norm2(t))
        return t.transpose(1, 2).reshape(b, c, h, w)


class GCTStage(nn.Module):
    """The global stream at one scale: X^(k) -> F_g^(k)."""

    def __init__(self, dim: int, depth: int, heads: int, sr_ratio: int, kind: str, window: int,
                 mlp_ratio: float, pos_grid: int | None) -> None:
        super().__init__()
        self.pos = PositionEmbedding(dim, pos_grid) if pos_grid else None
        self.blocks = nn.Sequential(*[
            TransformerBlock(dim, heads, sr_ratio, kind, window, mlp_ratio) for _ in range(depth)
        ])

    def forward(self, x: Tensor, context: Tensor | None = None) -> Tensor:
        if self.pos is not None:
            x = self.pos(x)
        return self.blocks(x)
