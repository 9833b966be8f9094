"""Model versions by name: the shipped ones (read-only) and the ones a site trains.

A model version is a folder with ``card.json`` (``glance.model.card``) +
``model.safetensors`` (``glance.model.weights``). Listing, resolving and
describing models reads only the cards, so none of it imports torch. Shipped versions live in the extension's
``Resources/models/<folder>``; a site's versions go to the per-user data
folder (``GLANCE_HOME`` overrides it). Names address versions: ``NAME`` is the
newest version of NAME, ``NAME@VERSION`` one version, and a path is a folder.
"""

from __future__ import annotations

import logging
import os
import re
import sys
from dataclasses import dataclass
from pathlib import Path

from glance.errors import ModelError

log = logging.getLogger(__name__)

DEFAULT_MODEL = "glance-small"
_PACKAGE = Path(__file__).resolve().parent


@dataclass(frozen=True)
class ModelEntry:
    name: str
    version: str
    path: Path
    card: dict
    shipped: bool

    @property
    def ref(self) -> str:
        return f"{self.name}@{self.version}"


def shipped_models_dirs() -> list[Path]:
    """Where shipped versions may be: the source tree and the installed Slicer module."""
    candidates = [_PACKAGE.parents[1] / "Resources" / "models", _PACKAGE.parent / "Resources" / "models"]
    return [p for p in candidates if p.is_dir()]


def user_models_dir() -> Path:
    """The per-user folder for versions trained at this site (created on first registration)."""
    if os.environ.get("GLANCE_HOME"):
        return Path(os.environ["GLANCE_HOME"]) / "models"
    if sys.platform == "win32":
        base = Path(os.environ.get("LOCALAPPDATA", Path.home() / "AppData" / "Local"))
    elif sys.platform == "darwin":
        base = Path.home() / "Library" / "Application Support"
    else:
        base = Path(os.environ.get("XDG_DATA_HOME", Path.home() / ".local" / "share"))
    return base / "glance" / "models"


def _entries(root: Path, shipped: bool) -> list[ModelEntry]:
    from glance.model.card import read_card

    found = []
    for folder in sorted(p for p in root.iterdir() if (p / "card.json").is_file()):
        try:
            card = read_card(folder)
        except ModelError as exc:
            log.warning("skipping %s", exc)
            continue
        found.append(ModelEntry(card.name, card.version, folder, card.__dict__, shipped))
    return found


def list_models() -> list[ModelEntry]:
    entries = [e for d in shipped_models_dirs() for e in _entries(d, True)]
    user = user_models_dir()
    if user.is_dir():
        entries += _entries(user, False)
    return sorted(entries, key=lambda e: (e.name, _version_key(e.version)))


def _version_key(version: str) -> tuple:
    return tuple(int(p) if p.isdigit() else p for p in re.split(r"[.\-+]", version))


def resolve_model(ref: str | None = None) -> Path:
    """Folder of the model named by ``ref`` (default: the newest shipped ``glance-small``)."""
    ref = ref or DEFAULT_MODEL
    if Path(ref).is_dir():
        return Path(ref)
    name, _, version = ref.partition("@")
    matches = [e for e in list_models() if e.name == name and (not version or e.version == version)]
    if not matches:
        known = ", ".join(sorted({e.ref for e in list_models()})) or "none"
        raise ModelError(f"no model {ref!r} (known: {known}); train one with 'glance train'")
    return matches[-1].path


def next_version_dir(name: str) -> tuple[str, Path]:
    """A new, unused (version, folder) for a site-trained model; shipped names are refused."""
    if any(e.shipped and e.name == name for e in list_models()):
        raise ModelError(f"{name!r} is a shipped model name; choose another name for a site model")
    existing = [e.version for e in list_models() if e.name == name]
    version = f"{len(existing) + 1}.0.0"
    while (user_models_dir() / f"{name}-{version}").exists():
        version = f"{int(version.split('.')[0]) + 1}.0.0"
    return version, user_models_dir() / f"{name}-{version}"


def default_thresholds(model_ref: str | None = None, flips: bool = False) -> tuple[float, float]:
    """(segmentation, detection) thresholds a run of ``model_ref`` uses when none are given
    (``flips``: a run with flip averaging, ``--tta``)."""
    from glance.model.card import read_card

    return operating_thresholds(read_card(resolve_model(model_ref)).thresholds, flips)


def operating_thresholds(thresholds: dict, flips: bool = False) -> tuple[float, float]:
    """A card's calibrated (segmentation, detection) thresholds; the engine's default for any it lacks."""
    from glance.model.card import recommended_thresholds
    from glance.runner import DEFAULT_DET_THRESHOLD, DEFAULT_SEG_THRESHOLD

    calibrated = recommended_thresholds(thresholds, flips)
    return calibrated.get("segmentation", DEFAULT_SEG_THRESHOLD), calibrated.get("detection", DEFAULT_DET_THRESHOLD)


# Card fields a reader of the summary does not need: identity (shown as its title) and file bookkeeping.
_UNSHOWN_CARD_FIELDS = ("name", "version", "format", "card_version", "weights_file", "thresholds", "intended_use")


def card_summary(card: dict) -> list[tuple[str, str]]:
    """(field, one line of text) rows describing a registered model's card, intended use and thresholds first."""
    from glance.model.card import card_text

    rows = [("intended use", card_text(card.get("intended_use", ""))),
            ("thresholds", thresholds_text(card.get("thresholds") or {}))]
    # What a reader weighs first; the network config and file details last.
    first = ("metrics", "training", "preprocessing", "provenance")
    keys = [k for k in first if k in card] + [k for k in card if k not in first and k not in _UNSHOWN_CARD_FIELDS]
    return rows + [(key, card_text(card[key])) for key in keys]


def thresholds_text(thresholds: dict) -> str:
    """The thresholds a run uses with this card, whether each is calibrated, and how it was calibrated."""
    from glance.model.card import FLIPS_KEY, OUTLINE_KEY, THRESHOLD_KEYS, card_text, recommended_thresholds

    calibrated = recommended_thresholds(thresholds)
    values = dict(zip(THRESHOLD_KEYS, operating_thresholds(thresholds)))
    text = ", ".join(f"{key} {values[key]:g} ({'calibrated' if key in calibrated else 'engine default'})"
                     for key in THRESHOLD_KEYS)
    if calibrated.get(OUTLINE_KEY):  # rule 9; a card without it keeps the rule off, as before
        text += f", outline fraction {calibrated[OUTLINE_KEY]:g} (calibrated)"
    how = thresholds.get("calibration")
    if how not in (None, "", {}, []):
        text += f"; calibration: {card_text(how)}"
    elif calibrated:
        text += "; calibration: not recorded"
    flips = thresholds.get(FLIPS_KEY)
    if isinstance(flips, dict):
        text += f"; with flip averaging: {thresholds_text(flips)}"
    return text
