"""Multi-Receptive Grouped Atrous Mixer (paper Algorithm 2, eq. 5-6) and its gates (Table 6).

F_l = X + sum_i alpha_i * ReLU(BN(GroupedAtrousConv_{d_i}(X))). The branch
weights alpha come from a gate; the paper's gate is a softmax over an MLP on
[GAP(X) || GAP(F_g)], so global evidence steers which receptive field the local
stream uses. The other gates are the controls of Table 6.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn


def _gap(x: Tensor) -> Tensor:
    return x.mean(dim=(2, 3))


def _mlp(c_in: int, hidden: int, c_out: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(c_in, hidden), nn.ReLU(inplace=True), nn.Linear(hidden, c_out))


class GlobalLocalGate(nn.Module):
    """alpha = softmax(W2 ReLU(W1 [GAP(X) || GAP(F_g)])) (eq. 6)."""

    def __init__(self, dim: int, n: int, hidden: int) -> None:
        super().__init__()
        self.mlp = _mlp(2 * dim, hidden, n)

    def forward(self, x: Tensor, context: Tensor, branches: list[Tensor]) -> Tensor:
        return torch.softmax(self.mlp(torch.cat([_gap(x), _gap(context)], dim=1)), dim=1)


class LocalSEGate(nn.Module):
    """Squeeze-excite on the local input only: softmax(MLP(GAP(X)))."""

    def __init__(self, dim: int, n: int, hidden: int) -> None:
        super().__init__()
        self.mlp = _mlp(dim, hidden, n)

    def forward(self, x: Tensor, context: Tensor, branches: list[Tensor]) -> Tensor:
        return torch.softmax(self.mlp(_gap(x)), dim=1)


class UniformGate(nn.Module):
    """alpha_i = 1/N."""

    def __init__(self, dim: int, n: int, hidden: int) -> None:
        super().__init__()
        self.n = n

    def forward(self, x: Tensor, context: Tensor, branches: list[Tensor]) -> Tensor:
        return x.new_full((x.shape[0], self.n), 1.0 / self.n)


class StaticGate(nn.Module):
    """Learned input-independent scalars, softmax-normalised."""

    def __init__(self, dim: int, n: int, hidden: int) -> None:
        super().__init__()
        self.logits = nn.Parameter(torch.zeros(n))

    def forward(self, x: Tensor, context: Tensor, branches: list[Tensor]) -> Tensor:
        return torch.softmax(self.logits, dim=0).expand(x.shape[0], -1)


class AttentionGate(nn.Module):
    """Scaled dot-product attention: a query from the global stream scores each branch."""

    def __init__(self, dim: int, n: int, hidden: int) -> None:
        super().__init__()
        self.query = nn.Linear(dim, hidden)
        self.key = nn.Linear(dim, hidden)
        self.scale = 1.0 / math.sqrt(hidden)

    def forward(self, x: Tensor, context: Tensor, branches: list[Tensor]) -> Tensor:
        q = self.query(_gap(context))  # (B, h)
        k = self.key(torch.stack([_gap(u) for u in branches], dim=1))  # (B, N, h)
        return torch.softmax((k @ q.unsqueeze(-1)).squeeze(-1) * self.scale, dim=1)


GATES: dict[str, type[nn.Module]] = {
    "global_local": GlobalLocalGate,
    "local_se": LocalSEGate,
    "uniform": UniformGate,
    "static": StaticGate,
    "attention": AttentionGate,
}


class MRGAM(nn.Module):
    """The local stream at one scale: X^(k) (and F_g^(k) for the gate) -> F_l^(k)."""

    def __init__(self, dim: int, dilations: tuple[int, ...], groups: int, gate: str, gate_reduction: int) -> None:
        super().__init__()
        self.branches = nn.ModuleList(
            nn.Sequential(
                nn.Conv2d(dim, dim, 3, padding=d, dilation=d, groups=groups, bias=False),
                nn.BatchNorm2d(dim),
                nn.ReLU(inplace=True),
            )
            for d in dilations
        )
        hidden = max(8, dim // gate_reduction)
        n = len(dilations)
        if gate == "conv1x1":
            # No gating: the branches are mixed by a learned 1x1 conv.
            self.gate = None
            self.mix = nn.Sequential(nn.Conv2d(n * dim, dim, 1, bias=False), nn.BatchNorm2d(dim))
        else:
            self.gate = GATES[gate](dim, n, hidden)
            self.mix = None

    def forward(self, x: Tensor, context: Tensor | None = None) -> Tensor:
        branches = [b(x) for b in self.branches]
        if self.gate is None:
            return x + self.mix(torch.cat(branches, dim=1))
        alpha = self.gate(x, x if context is None else context, branches)
        mixed = sum(alpha[:, i, None, None, None] * u for i, u in enumerate(branches))
        return x + mixed

    def branch_weights(self, x: Tensor, context: Tensor | None = None) -> Tensor | None:
        """alpha (B, N) for inspection; None for the un-gated 1x1 mixing."""
        if self.gate is None:
            return None
        return self.gate(x, x if context is None else context, [b(x) for b in self.branches])
