"""Model weights: safetensors files checked against their model card. Loading never unpickles.

A model version is a folder holding ``card.json`` (``glance.model.card``) and
``model.safetensors``. The card records the SHA-256 of the weights file, so a
card and weights that do not belong together are refused.
"""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path

import torch

from glance.errors import ModelError
from glance.model.card import (
    CARD_FILE,
    CARD_FORMAT,
    CARD_VERSION,
    NOT_FOR_CLINICAL_USE,
    WEIGHTS_FILE,
    ModelCard,
    Preprocessing,
    read_card,
    recommended_thresholds,
    write_card,
)
from glance.model.glance import GlanceNet

# The card's names stay importable from here, where they lived before glance.model.card.
__all__ = [
    "CARD_FILE", "CARD_FORMAT", "CARD_VERSION", "NOT_FOR_CLINICAL_USE", "WEIGHTS_FILE", "ModelCard",
    "Preprocessing", "load_model", "read_card", "recommended_thresholds", "save_model",
]  # fmt: skip

log = logging.getLogger(__name__)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def save_model(model: GlanceNet, directory: str | Path, card: ModelCard, dtype: torch.dtype = torch.float16) -> Path:
    """Write ``model.safetensors`` and ``card.json`` into ``directory`` (atomically per file)."""
    from safetensors.torch import save_file

    from glance.io.atomic import atomic_path

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    state = {k: _cast(v, dtype).contiguous() for k, v in model.state_dict().items()}
    weights = directory / card.weights_file
    with atomic_path(weights) as tmp:
        save_file(state, str(tmp), metadata={"format": CARD_FORMAT, "name": card.name, "version": card.version})
    card.config = model.cfg.to_dict()
    card.dtype = str(dtype).removeprefix("torch.")
    card.weights_sha256 = _sha256(weights)
    write_card(directory, card)
    return directory


def _cast(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    # Integer buffers (BatchNorm's num_batches_tracked) keep their type.
    return t.to(dtype) if t.is_floating_point() else t


def load_model(directory: str | Path, device: str | torch.device = "cpu") -> tuple[GlanceNet, ModelCard]:
    """Build the network from the card and load its weights (float32, eval mode)."""
    directory = Path(directory)
    card = read_card(directory)
    weights = directory / Path(card.weights_file).name  # never follow a path out of the folder
    state = _read_weights(weights, card)
    model = GlanceNet(card.glance_config)
    _check_state(model, state, weights)
    model.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in state.items()})
    return model.to(device).eval(), card


def _read_weights(weights: Path, card: ModelCard) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    if not weights.is_file():
        raise ModelError(f"{weights}: weights file missing")
    if card.weights_sha256 and _sha256(weights) != card.weights_sha256:
        raise ModelError(f"{weights}: does not match its model card (SHA-256 differs)")
    try:
        return load_file(str(weights))
    except (SafetensorError, OSError, ValueError) as exc:
        raise ModelError(f"{weights}: not a valid safetensors file ({exc})") from None


def _check_state(model: GlanceNet, state: dict[str, torch.Tensor], weights: Path) -> None:
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        raise ModelError(f"{weights}: weights do not match the card's config "
                         f"({len(missing)} missing, {len(unexpected)} unexpected tensors, "
                         f"e.g. {(missing + unexpected)[0]})")
    for key, tensor in expected.items():
        if tuple(state[key].shape) != tuple(tensor.shape):
            raise ModelError(f"{weights}: tensor {key} has shape {tuple(state[key].shape)}, "
                             f"the card's config needs {tuple(tensor.shape)}")
