"""``glance average``: one model from the mean of the weights of several runs ("model soup").

Runs fine-tuned from the same weights on the same data end in nearby minima; the mean of their
weights often generalises better than any one of them (Wortsman et al., "Model soups", 2022; the
same idea as stochastic weight averaging along one run). It costs no training: average, calibrate
on the validation patients, compare.

Only models that can be averaged honestly are accepted: the same network config and preprocessing
(otherwise the tensors do not correspond) and the same patient split (seed, fractions, held-out
patients), so the average has trained on no patient that any one of them held out. Floating-point
tensors are averaged in float32; integer buffers (BatchNorm's batch counters) are taken from the
first model. The average is uncalibrated: its card has no thresholds and no metrics until
``glance calibrate --write`` and an evaluation give it some.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from glance.errors import GlanceError

log = logging.getLogger(__name__)

SPLIT_KEYS = ("seed", "split", "held_out")


def _split_of(card) -> dict:
    cfg = (card.training or {}).get("config") or {}
    return {k: (list(cfg[k]) if isinstance(cfg.get(k), (list, tuple)) else cfg.get(k)) for k in SPLIT_KEYS}


def _check_compatible(cards: list, names: list[str]) -> None:
    first = cards[0]
    for card, name in zip(cards[1:], names[1:]):
        if card.config != first.config or card.preprocessing != first.preprocessing:
            raise GlanceError(f"{name}: network config or preprocessing differs from {names[0]}'s: cannot average")
        if _split_of(card) != _split_of(first):
            raise GlanceError(f"{name}: trained on another patient split than {names[0]} "
                              f"({_split_of(card)} vs {_split_of(first)}): averaging would mix held-out patients")
    if any(v is None for v in _split_of(first).values()):
        raise GlanceError(f"{names[0]}: its card does not record the training split: cannot check the average")


def mean_state(states: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Element-wise mean of same-shaped state dicts (float32); integer tensors from the first."""
    out = {}
    for key, first in states[0].items():
        if first.is_floating_point():
            out[key] = torch.stack([s[key].float() for s in states]).mean(dim=0)
        else:
            out[key] = first.clone()
    return out


def average_models(models: list[str], out: str | Path, name: str | None = None,
                   version: str = "0.0.0") -> Path:
    """Write the mean of ``models`` (registered names, NAME@VERSION or folders; at least two) to ``out``."""
    from glance.model.card import ModelCard, provenance
    from glance.model.weights import load_model, save_model
    from glance.registry import resolve_model

    if len(models) < 2:
        raise GlanceError("averaging needs at least two models")
    if (Path(out) / "card.json").exists():
        raise GlanceError(f"{out}: already holds a model; choose a new folder")
    folders = [resolve_model(m) for m in models]
    loaded = [load_model(f) for f in folders]
    cards = [card for _, card in loaded]
    _check_compatible(cards, [str(f) for f in folders])
    network = loaded[0][0]
    network.load_state_dict(mean_state([net.state_dict() for net, _ in loaded]))
    first = cards[0]
    sources = [{"model": str(f), "name": c.name, "version": c.version, "weights_sha256": c.weights_sha256,
                "steps": c.training.get("steps"), "base_model": c.training.get("base_model")}
               for f, c in zip(folders, cards)]
    training = {"config": first.training.get("config", {}), "data": first.training.get("data", {}),
                "averaged_from": sources, "split": first.training.get("split"),
                "method": "uniform mean of the weights (float32), integer buffers from the first model"}
    card = ModelCard(name or first.name, version, config=first.config, preprocessing=first.preprocessing,
                     training=training, provenance=provenance(averaged_models=len(models)))
    log.info("averaged %d models into %s", len(models), out)
    return save_model(network, out, card)
