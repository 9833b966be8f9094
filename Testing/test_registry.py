"""Model registry and model cards without torch: listing, resolving, default thresholds, card text."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from glance import registry, runner
from glance.errors import ModelError
from glance.model.card import CARD_FILE, ModelCard, card_text, read_card

REPO = Path(__file__).resolve().parents[1]

CALIBRATION = {  # what glance_training.calibrate writes, abridged
    "data": ["lidc:/data/val", "phantom:8"],
    "split": "val",
    "rule": "segmentation: best mean per-nodule Dice; detection: highest threshold with sensitivity >= 0.9",
    "dice_at_segmentation": {"lidc:/data/val": 0.71234},
    "n_nodules": {"lidc:/data/val": 12, "phantom:8": 20},
}


def _register(home: Path, name: str, version: str, thresholds: dict | None = None) -> Path:
    """A site model folder holding only its card: listing and thresholds never need the weights."""
    folder = home / "models" / f"{name}-{version}"
    folder.mkdir(parents=True)
    (folder / CARD_FILE).write_text(ModelCard(name, version, config={}, thresholds=thresholds or {}).to_json())
    return folder


@pytest.fixture
def home(tmp_path, monkeypatch):
    monkeypatch.setenv("GLANCE_HOME", str(tmp_path))
    _register(tmp_path, "site-calibrated", "1.0.0", {"segmentation": 0.35, "detection": 0.15,
                                                     "calibration": CALIBRATION})
    _register(tmp_path, "site-plain", "2.0.0")
    _register(tmp_path, "site-half", "1.0.0", {"segmentation": 0.4})
    _register(tmp_path, "site-flips", "1.0.0", {"segmentation": 0.05, "detection": 0.4,
                                                "with_flips": {"segmentation": 0.15, "detection": 0.35}})
    return tmp_path


def test_default_thresholds_are_the_cards_calibrated_values_else_the_engines(home):
    assert registry.default_thresholds("site-calibrated@1.0.0") == (0.35, 0.15)
    assert registry.default_thresholds("site-calibrated") == (0.35, 0.15)
    assert registry.default_thresholds(str(home / "models" / "site-calibrated-1.0.0")) == (0.35, 0.15)
    assert registry.default_thresholds("site-plain@2.0.0") == (runner.DEFAULT_SEG_THRESHOLD,
                                                                runner.DEFAULT_DET_THRESHOLD)
    assert registry.default_thresholds("site-half") == (0.4, runner.DEFAULT_DET_THRESHOLD)
    assert registry.default_thresholds("site-flips", flips=True) == (0.15, 0.35)
    assert registry.default_thresholds("site-flips") == (0.05, 0.4)
    assert registry.default_thresholds("site-calibrated", flips=True) == (0.35, 0.15)  # none for flips: the plain ones
    with pytest.raises(ModelError, match="no model 'site-gone'"):
        registry.default_thresholds("site-gone")


def test_the_fallback_is_what_the_pipeline_uses_for_an_uncalibrated_model():
    from glance.pipeline import SegmentOptions, with_model_thresholds

    card = ModelCard("m", "1", config={})
    options = with_model_thresholds(SegmentOptions(), card)
    expected = registry.operating_thresholds(card.thresholds)
    assert (options.postprocess.seg_threshold, options.postprocess.det_threshold) == expected
    calibrated = ModelCard("m", "1", config={}, thresholds={"segmentation": 0.35, "detection": 0.15})
    options = with_model_thresholds(SegmentOptions(), calibrated)
    assert (options.postprocess.seg_threshold, options.postprocess.det_threshold) == (0.35, 0.15)


def test_a_card_with_bad_thresholds_is_skipped_and_named(home, caplog):
    _register(home, "site-bad", "1.0.0", {"segmentation": 1.5})
    with pytest.raises(ModelError, match=r"invalid model card \(thresholds.segmentation must be a number"):
        read_card(home / "models" / "site-bad-1.0.0")
    assert "site-bad" not in {e.name for e in registry.list_models()}
    assert "site-bad-1.0.0" in caplog.text


def test_thresholds_text_says_which_are_calibrated_and_how():
    assert registry.thresholds_text({}) == "segmentation 0.5 (engine default), detection 0.3 (engine default)"
    assert registry.thresholds_text({"segmentation": 0.35, "detection": 0.15, "calibration": CALIBRATION}) == (
        "segmentation 0.35 (calibrated), detection 0.15 (calibrated); calibration: "
        "data: (lidc:/data/val, phantom:8); split: val; "
        "rule: segmentation: best mean per-nodule Dice; detection: highest threshold with sensitivity >= 0.9; "
        "dice_at_segmentation: (lidc:/data/val: 0.7123); n_nodules: (lidc:/data/val: 12; phantom:8: 20)"
    )
    assert registry.thresholds_text({"segmentation": 0.05, "detection": 0.4, "outline_fraction": 0.1}) == (
        "segmentation 0.05 (calibrated), detection 0.4 (calibrated), outline fraction 0.1 (calibrated); "
        "calibration: not recorded")
    assert registry.thresholds_text({"detection": 0.2}) == (
        "segmentation 0.5 (engine default), detection 0.2 (calibrated); calibration: not recorded")
    assert registry.thresholds_text({"segmentation": 0.05, "detection": 0.4, "calibration": "on val",
                                     "with_flips": {"segmentation": 0.15, "detection": 0.4}}) == (
        "segmentation 0.05 (calibrated), detection 0.4 (calibrated); calibration: on val; with flip averaging: "
        "segmentation 0.15 (calibrated), detection 0.4 (calibrated); calibration: not recorded")
    # Free-form "calibration": whatever a person or another tool wrote stays one line.
    assert registry.thresholds_text({"segmentation": 0.4, "calibration": "by eye\non 3 scans"}) == (
        "segmentation 0.4 (calibrated), detection 0.3 (engine default); calibration: by eye on 3 scans")
    assert registry.thresholds_text({"segmentation": 0.4, "calibration": [1, None, True, {"k": []}]}).endswith(
        "; calibration: 1, none, yes, (k: )")


def test_card_text_is_one_line_for_any_json():
    assert card_text({"a": {"b": [1.0, 2.5]}, "c": "x\ty\nz", "d": {}, "e": 0.123456}) == (
        "a: (b: (1, 2.5)); c: x y z; d: ; e: 0.1235")
    assert card_text([]) == "" and card_text(7) == "7" and card_text(False) == "no"


def test_card_summary_puts_intended_use_and_thresholds_first(home):
    entry = next(e for e in registry.list_models() if e.name == "site-calibrated")
    rows = registry.card_summary(entry.card)
    assert [field for field, _text in rows][:4] == ["intended use", "thresholds", "metrics", "training"]
    assert "not for clinical use" in rows[0][1]
    assert rows[1][1].startswith("segmentation 0.35 (calibrated), detection 0.15 (calibrated); calibration: data:")
    fields = [field for field, _text in rows]
    assert "name" not in fields and "card_version" not in fields and fields.count("thresholds") == 1
    assert all("\n" not in text for _field, text in rows)


def test_listing_resolving_and_describing_models_never_import_torch(home):
    # A fresh interpreter: the GUI lists models and shows cards at start-up; torch costs seconds there.
    code = textwrap.dedent(
        """
        import json, sys
        import glance.registry as registry
        entries = registry.list_models()
        out = {"refs": [e.ref for e in entries], "shipped": [e.ref for e in entries if e.shipped],
               "thresholds": registry.default_thresholds("site-calibrated"),
               "resolved": str(registry.resolve_model("site-plain")),
               "summary_rows": sum(len(registry.card_summary(e.card)) for e in entries),
               "heavy": sorted(m for m in sys.modules if m.split(".")[0] in ("torch", "scipy", "SimpleITK"))}
        print(json.dumps(out))
        """
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                          env=runner.child_environment(), cwd=home)  # fmt: skip
    assert done.returncode == 0, done.stderr
    out = json.loads(done.stdout)
    assert {"site-calibrated@1.0.0", "site-plain@2.0.0", "site-half@1.0.0"} <= set(out["refs"])
    cards = [p / CARD_FILE for p in (REPO / "Resources" / "models").iterdir() if (p / CARD_FILE).is_file()]
    shipped = sorted(f"{c['name']}@{c['version']}" for c in (json.loads(p.read_text()) for p in cards))
    assert shipped and sorted(out["shipped"]) == shipped  # the shipped models are listed
    assert out["summary_rows"] > 2 * len(out["refs"])
    assert out["thresholds"] == [0.35, 0.15]
    assert out["resolved"] == str(home / "models" / "site-plain-2.0.0")
    assert out["heavy"] == []


def test_old_import_path_of_the_card_names_still_works():
    from glance.model import card, weights

    for name in ("ModelCard", "Preprocessing", "read_card", "recommended_thresholds", "CARD_FILE",
                 "CARD_FORMAT", "CARD_VERSION", "WEIGHTS_FILE", "NOT_FOR_CLINICAL_USE"):
        assert getattr(weights, name) is getattr(card, name), name
