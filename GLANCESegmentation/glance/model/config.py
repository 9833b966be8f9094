"""Network configuration: one frozen dataclass, named presets and the paper's ablations.

Every row of the paper's Table 4 (streams and fusion) and Table 6 (MRGAM branch
gate) is a field value here, so an ablation is ``config_for("small", ablation=...)``
and nothing else changes: same stem, embeddings, decoder, heads and training.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields, replace
from typing import Literal

# What a stream of the dual-stream encoder can be (Table 4):
#   gct      - Global Context Transformer (Algorithm 1)
#   mrgam    - Multi-Receptive Grouped Atrous Mixer (Algorithm 2, eq. 5-6)
#   plain    - a plain 3x3 conv-BN-ReLU block (the "conv" control streams)
#   identity - the stream passes the stage embedding X^(k) through unchanged
#   none     - the stream does not exist (single-stream encoder)
StreamKind = Literal["gct", "mrgam", "plain", "identity", "none"]
# How the two streams meet at each scale:
#   cscf - Cross-Scale Consensus Fusion (eq. 7); the fused map feeds both streams
#   none - no exchange: each stream keeps its own embedding chain; the decoder
#          skip is the plain sum F_g + F_l ("w/o CSCF" in Table 4)
FusionKind = Literal["cscf", "none"]
# MRGAM branch weighting (Table 6).
GateKind = Literal["global_local", "uniform", "local_se", "static", "conv1x1", "attention"]


@dataclass(frozen=True)
class GlanceConfig:
    in_channels: int = 1  # 1, or 2k+1 neighbouring slices (2.5D)
    # Encoder stages at strides 4, 8, 16, 32.
    dims: tuple[int, int, int, int] = (32, 64, 128, 192)
    gct_depths: tuple[int, int, int, int] = (1, 1, 1, 1)
    heads: tuple[int, int, int, int] = (1, 2, 4, 6)
    # Spatial-reduction ratio of keys/values per stage; 1 = full global attention.
    sr_ratios: tuple[int, int, int, int] = (8, 4, 1, 1)
    attention: Literal["sr", "window"] = "sr"  # early-stage attention kind
    window: int = 8  # window side for attention="window" at stages with sr_ratio > 1
    mlp_ratio: float = 4.0
    pos_embed_grid: int = 128  # stage-1 grid of the learned position embedding (512 / 4)
    # MRGAM.
    dilations: tuple[int, ...] = (1, 3, 5)
    mrgam_groups: int = 4
    gate: GateKind = "global_local"
    gate_reduction: int = 4
    # CSCF squeeze-excite reduction (paper: r = 16).
    se_reduction: int = 16
    # Streams and fusion (Table 4). "unet" replaces the whole encoder by a plain U-Net one.
    global_stream: StreamKind = "gct"
    local_stream: StreamKind = "mrgam"
    fusion: FusionKind = "cscf"
    encoder: Literal["disco", "unet"] = "disco"
    # Full-resolution stem at strides 1 and 2 feeding two extra decoder skips, so both heads
    # predict at the input resolution (a 3 mm nodule is ~1 pixel at stride 4).
    # Narrow at strides 2 and 1: those levels dominate the decoder's FLOPs.
    stem_dims: tuple[int, int] = (8, 16)
    # Decoder widths at strides 16, 8, 4, 2, 1.
    decoder_dims: tuple[int, int, int, int, int] = (128, 64, 32, 16, 8)
    upsample: Literal["bilinear", "transposed"] = "bilinear"
    deep_supervision: bool = True  # auxiliary seg heads at strides 16, 8, 4, 2

    STRIDE = 32  # the network's total stride: inputs are padded to a multiple of it

    def __post_init__(self) -> None:
        _check(self.in_channels >= 1 and self.in_channels % 2 == 1,
               f"in_channels must be 1 or 2k+1, got {self.in_channels}")
        for name in ("dims", "gct_depths", "heads", "sr_ratios"):
            _check(len(getattr(self, name)) == 4, f"{name} needs 4 values (one per stage)")
        for dim, h in zip(self.dims, self.heads):
            _check(dim % h == 0, f"stage width {dim} is not divisible by {h} heads")
            _check(dim % self.mrgam_groups == 0,
                   f"stage width {dim} is not divisible by {self.mrgam_groups} MRGAM groups")
        _check(len(self.dilations) >= 1, "MRGAM needs at least one dilation")
        _check(len(self.decoder_dims) == 5, "decoder_dims needs 5 values (strides 16..1)")
        _check(not (self.global_stream == "none" and self.local_stream == "none"),
               "at least one encoder stream is needed")

    @property
    def two_streams(self) -> bool:
        return self.encoder == "disco" and "none" not in (self.global_stream, self.local_stream)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "GlanceConfig":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        _check(not unknown, f"unknown config keys: {', '.join(unknown)}")
        values = {k: tuple(v) if isinstance(v, list) else v for k, v in data.items()}
        return cls(**values)


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise ValueError(message)


PRESETS: dict[str, GlanceConfig] = {
    # CPU default: ~3 M parameters.
    "small": GlanceConfig(),
    # GPU: wider and deeper, same topology.
    "base": GlanceConfig(
        dims=(64, 128, 256, 384),
        gct_depths=(1, 2, 3, 2),
        heads=(1, 2, 4, 8),
        mrgam_groups=8,
        stem_dims=(16, 32),
        decoder_dims=(256, 128, 64, 32, 16),
    ),
}

# Table 4 rows and Table 6 gates, as overrides of a preset.
ABLATIONS: dict[str, dict] = {
    "full": {},
    "no_cscf": {"fusion": "none"},
    "no_mrgam": {"local_stream": "identity"},
    "no_gct": {"global_stream": "identity"},
    "two_local_streams": {"global_stream": "mrgam"},  # w/o GCT, w/ CSCF
    "conv_transformer": {"local_stream": "plain"},  # w/o MRGAM, w/ CSCF
    "mrgam_only": {"global_stream": "none"},  # w/o GCT & w/o CSCF
    "gct_only": {"local_stream": "none"},  # w/o MRGAM & w/o CSCF
    "dual_plain": {"global_stream": "plain", "local_stream": "plain"},  # w/o GCT & w/o MRGAM
    "unet": {"encoder": "unet"},
    "gate_uniform": {"gate": "uniform"},
    "gate_local_se": {"gate": "local_se"},
    "gate_static": {"gate": "static"},
    "gate_conv1x1": {"gate": "conv1x1"},
    "gate_attention": {"gate": "attention"},
}


def config_for(preset: str = "small", ablation: str = "full", **overrides) -> GlanceConfig:
    """A preset with an ablation and any field overrides applied."""
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose from {', '.join(PRESETS)}")
    if ablation not in ABLATIONS:
        raise ValueError(f"unknown ablation {ablation!r}; choose from {', '.join(ABLATIONS)}")
    return replace(PRESETS[preset], **ABLATIONS[ablation], **overrides)
