"""Cross-Scale Consensus Fusion (paper eq. 7).

Z = BN([F_g || F_l]);  F_c = gamma (.) Conv1x1(Z) + (F_g + F_l),
with gamma a channel gate from a squeeze-excite on Z. F_c feeds both streams
of the next stage and is the decoder's skip at this scale.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn


class CSCF(nn.Module):
    def __init__(self, dim: int, reduction: int) -> None:
        super().__init__()
        self.norm = nn.BatchNorm2d(2 * dim)
        self.proj = nn.Conv2d(2 * dim, dim, 1, bias=False)
        hidden = max(8, 2 * dim // reduction)
        self.se = nn.Sequential(
            nn.AdaptiveAvgPool2d(1),
            nn.Conv2d(2 * dim, hidden, 1),
            nn.ReLU(inplace=True),
            nn.Conv2d(hidden, dim, 1),
            nn.Sigmoid(),
        )

    def forward(self, f_g: Tensor, f_l: Tensor) -> Tensor:
        z = self.norm(torch.cat([f_g, f_l], dim=1))
        return self.se(z) * self.proj(z) + (f_g + f_l)
