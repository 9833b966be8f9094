"""Parameters and forward FLOPs per component, and the paper's dual-stream ratio (eq. 1-2).

FLOPs are counted by ``torch.utils.flop_counter.FlopCounterMode`` on a real
forward pass: 2 x multiply-accumulates of convolutions, matmuls/linears and
attention (scaled_dot_product_attention); element-wise ops (norms,
activations, additions) are not counted, the usual convention in papers.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import torch
from torch import nn

from glance.model.config import GlanceConfig, config_for
from glance.model.cscf import CSCF
from glance.model.gct import ConvEmbed, GCTStage
from glance.model.glance import GlanceNet, Stem, UNetEncoder, build_model
from glance.model.layers import PlainStream
from glance.model.mrgam import MRGAM
from glance.model.prd import PRD, Heads

# Component names by module type; the first match walking down from the root wins.
COMPONENTS: tuple[tuple[type[nn.Module], str], ...] = (
    (GCTStage, "GCT"),
    (MRGAM, "MRGAM"),
    (CSCF, "CSCF"),
    (PRD, "PRD"),
    (Heads, "heads"),
    (Stem, "stem"),
    (ConvEmbed, "embed"),
    (PlainStream, "plain"),
    (UNetEncoder, "unet_encoder"),
)


@dataclass
class ComponentCost:
    params: int = 0
    gflops: float = 0.0


@dataclass
class ModelComplexity:
    config_name: str
    size: tuple[int, int]
    params: int
    gflops_per_slice: float
    components: dict[str, ComponentCost] = field(default_factory=dict)
    dual_stream_ratio: dict | None = None

    def to_dict(self) -> dict:
        return asdict(self)


def _component_of(model: nn.Module) -> dict[str, str]:
    """Module path -> component name, for the top-most classified modules."""
    found: dict[str, str] = {}
    for path, module in model.named_modules():
        if any(path.startswith(p + ".") for p in found):
            continue
        for kind, name in COMPONENTS:
            if isinstance(module, kind):
                found[path] = name
                break
    return found


def measure(model: GlanceNet, size: tuple[int, int], config_name: str = "custom") -> ModelComplexity:
    from torch.utils.flop_counter import FlopCounterMode

    model = model.eval()
    x = torch.zeros(1, model.cfg.in_channels, *size)
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(x)
    per_module = counter.get_flop_counts()
    root = type(model).__name__
    total = sum(per_module.get("Global", {}).values())
    comps: dict[str, ComponentCost] = {}
    for path, name in _component_of(model).items():
        cost = comps.setdefault(name, ComponentCost())
        cost.params += sum(p.numel() for p in model.get_submodule(path).parameters())
        cost.gflops += sum(per_module.get(f"{root}.{path}", {}).values()) / 1e9
    params = sum(p.numel() for p in model.parameters())
    return ModelComplexity(config_name, tuple(size), params, total / 1e9, comps)


def dual_stream_ratio(cfg: GlanceConfig, size: tuple[int, int]) -> dict:
    """F_GLANCE / F_single (eq. 1-2), with F_single the same network with only the local
    (MRGAM, CNN-style) stream: what the second stream, global attention and fusion add."""
    full = measure(build_model(cfg), size)
    single_cfg = GlanceConfig.from_dict({**cfg.to_dict(), "global_stream": "none"})
    single = measure(build_model(single_cfg), size)
    f_single = single.gflops_per_slice
    gct = full.components.get("GCT", ComponentCost()).gflops
    cscf = full.components.get("CSCF", ComponentCost()).gflops
    return {
        "f_glance_gflops": full.gflops_per_slice,
        "f_single_gflops": f_single,
        "ratio": full.gflops_per_slice / f_single,
        "global_stream_term": gct / f_single,
        "fusion_term": cscf / f_single,
    }


def model_info(preset: str = "small", ablation: str = "full", size: int = 512) -> ModelComplexity:
    cfg = config_for(preset, ablation)
    info = measure(build_model(cfg), (size, size), preset if ablation == "full" else f"{preset}/{ablation}")
    if cfg.two_streams and cfg.global_stream == "gct":
        info.dual_stream_ratio = dual_stream_ratio(cfg, (size, size))
    return info
