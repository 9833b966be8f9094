"""Small convolutional building blocks shared by the stem, plain streams and decoder."""

from __future__ import annotations

from torch import Tensor, nn


class ConvBNAct(nn.Sequential):
    """k x k conv (no bias) -> BatchNorm -> ReLU (or no activation)."""

    def __init__(self, c_in: int, c_out: int, k: int = 3, stride: int = 1, act: bool = True) -> None:
        layers: list[nn.Module] = [
            nn.Conv2d(c_in, c_out, k, stride=stride, padding=k // 2, bias=False),
            nn.BatchNorm2d(c_out),
        ]
        if act:
            layers.append(nn.ReLU(inplace=True))
        super().__init__(*layers)


class ResidualBlock(nn.Module):
    """Two 3x3 conv-BN(-ReLU) units with a residual shortcut: the paper's R (eq. 8)."""

    def __init__(self, c_in: int, c_out: int) -> None:
        super().__init__()
        self.body = nn.Sequential(ConvBNAct(c_in, c_out), ConvBNAct(c_out, c_out, act=False))
        self.shortcut = nn.Identity() if c_in == c_out else ConvBNAct(c_in, c_out, 1, act=False)
        self.act = nn.ReLU(inplace=True)

    def forward(self, x: Tensor) -> Tensor:
        return self.act(self.body(x) + self.shortcut(x))


class PlainStream(nn.Module):
    """A plain residual conv block used as an encoder stream in the Table 4 controls."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.block = ResidualBlock(dim, dim)

    def forward(self, x: Tensor, context: Tensor | None = None) -> Tensor:
        return self.block(x)


class IdentityStream(nn.Module):
    """A stream that passes the stage embedding through (the "w/o GCT"/"w/o MRGAM" rows)."""

    def forward(self, x: Tensor, context: Tensor | None = None) -> Tensor:
        return x
