"""The model card: the JSON beside a model's weights, readable without torch.

A model version is a folder holding ``card.json`` and ``model.safetensors``
(``glance.model.weights`` reads and writes the weights). The card records the
network config, the preprocessing the weights expect, training data, metrics,
the calibrated thresholds and provenance. Listing models, choosing one and
showing its card (the registry, the Slicer module) need only this module, so
none of them loads torch.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

from glance.errors import ModelError
from glance.model.config import GlanceConfig

CARD_FORMAT = "glance-model-card"
CARD_VERSION = 1
CARD_FILE = "card.json"
WEIGHTS_FILE = "model.safetensors"
NOT_FOR_CLINICAL_USE = (
    "Research software. Not a medical device and not for clinical use: every finding "
    "must be reviewed by a qualified radiologist."
)
THRESHOLD_KEYS = ("segmentation", "detection")
OUTLINE_KEY = "outline_fraction"  # post-processing rule 9; absent = 0 (off)


@dataclass
class Preprocessing:
    window_hu: tuple[float, float] = (-1000.0, 400.0)
    pixel_spacing_mm: float = 0.7  # in-plane resampling before the network
    context_slices: int = 0  # k: the network sees 2k+1 neighbouring slices
    lung_crop: bool = True


@dataclass
class ModelCard:
    name: str
    version: str
    config: dict
    preprocessing: dict = field(default_factory=lambda: asdict(Preprocessing()))
    training: dict = field(default_factory=dict)
    metrics: dict = field(default_factory=dict)
    # Calibrated operating point: {"segmentation": p, "detection": h, "calibration": {...how}}.
    # Empty for an uncalibrated model, which then runs at PostprocessConfig's defaults.
    thresholds: dict = field(default_factory=dict)
    provenance: dict = field(default_factory=dict)
    intended_use: str = NOT_FOR_CLINICAL_USE
    weights_file: str = WEIGHTS_FILE
    weights_sha256: str = ""
    dtype: str = "float16"
    format: str = CARD_FORMAT
    card_version: int = CARD_VERSION

    @property
    def glance_config(self) -> GlanceConfig:
        return GlanceConfig.from_dict(self.config)

    @property
    def prep(self) -> Preprocessing:
        return Preprocessing(**{**self.preprocessing, "window_hu": tuple(self.preprocessing["window_hu"])})

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, sort_keys=False) + "\n"


def read_card(directory: str | Path) -> ModelCard:
    path = Path(directory) / CARD_FILE
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ModelError(f"{path}: no model card") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ModelError(f"{path}: unreadable model card ({exc})") from None
    if not isinstance(data, dict) or data.get("format") != CARD_FORMAT:
        raise ModelError(f"{path}: not a GLANCE model card")
    if data.get("card_version") != CARD_VERSION:
        raise ModelError(f"{path}: card version {data.get('card_version')!r} is not supported "
                         f"(this GLANCE reads version {CARD_VERSION})")
    try:
        card = ModelCard(**data)
        card.glance_config  # validates the config
        recommended_thresholds(card.thresholds)
        recommended_thresholds(card.thresholds, flips=True)
    except (TypeError, ValueError) as exc:
        raise ModelError(f"{path}: invalid model card ({exc})") from None
    return card


def provenance(**extra) -> dict:
    """The provenance block of a card written now: package versions and the UTC time."""
    import time

    import torch

    import glance

    return {"glance_version": glance.__version__, "torch": torch.__version__,
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), **extra}


def write_card(directory: str | Path, card: ModelCard) -> Path:
    """Write ``card`` as the ``card.json`` of ``directory``, atomically (a reader never sees half a card)."""
    from glance.io.atomic import atomic_write_text

    path = Path(directory) / CARD_FILE
    atomic_write_text(path, card.to_json())
    return path


FLIPS_KEY = "with_flips"  # the operating point calibrated on flip-averaged maps (``--tta``)


def uses_flip_thresholds(thresholds: dict, flips: bool) -> bool:
    """Whether a run (with flip averaging when ``flips``) takes the card's ``with_flips`` operating point."""
    return flips and thresholds.get(FLIPS_KEY) is not None


def recommended_thresholds(thresholds: dict, flips: bool = False) -> dict[str, float]:
    """The card's calibrated ``{"segmentation": p, "detection": h, "outline_fraction": f}`` (any may be
    absent). With ``flips``, those of its ``with_flips`` entry when it has one (calibrated on
    flip-averaged maps).

    Raises ValueError for a value that is not a probability strictly between 0 and 1."""
    if not isinstance(thresholds, dict):
        raise ValueError("thresholds must be an object")
    if uses_flip_thresholds(thresholds, flips):
        return recommended_thresholds(thresholds[FLIPS_KEY])
    found = {}
    for key in THRESHOLD_KEYS:
        value = thresholds.get(key)
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 < value < 1.0:
            raise ValueError(f"thresholds.{key} must be a number between 0 and 1, got {value!r}")
        found[key] = float(value)
    outline = thresholds.get(OUTLINE_KEY)
    if outline is not None:
        if isinstance(outline, bool) or not isinstance(outline, (int, float)) or not 0.0 <= outline < 1.0:
            raise ValueError(f"thresholds.{OUTLINE_KEY} must be a number from 0 to below 1, got {outline!r}")
        found[OUTLINE_KEY] = float(outline)
    return found


def card_text(value) -> str:
    """One line for any card value: cards are free-form JSON written by people and other tools."""
    if isinstance(value, dict):
        return "; ".join(f"{key}: {_nested(item)}" for key, item in value.items())
    if isinstance(value, (list, tuple)):
        return ", ".join(_nested(item) for item in value)
    if isinstance(value, bool) or value is None:
        return {True: "yes", False: "no", None: "none"}[value]
    if isinstance(value, float):
        return f"{value:.4g}"
    return " ".join(str(value).split())  # no line breaks inside a table cell


def _nested(value) -> str:
    text = card_text(value)
    return f"({text})" if isinstance(value, (dict, list, tuple)) and value else text
