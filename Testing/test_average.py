"""``glance average``: the mean of several runs' weights, refused where averaging would be wrong."""

from __future__ import annotations

import pytest
import torch

from glance.errors import GlanceError
from glance.model import build_model, config_for
from glance.model.weights import ModelCard, load_model, read_card, save_model

torch.set_num_threads(2)

SPLIT = {"seed": 0, "split": [0.8, 0.1, 0.1], "held_out": ["LIDC-IDRI-0001"]}


def _run(folder, fill: float, split=SPLIT, channels=1, thresholds=None):
    """A saved model whose every float tensor is ``fill`` (exact in fp16), trained on ``split``."""
    model = build_model(config_for("small", in_channels=channels))
    with torch.no_grad():
        for t in model.state_dict().values():
            if t.is_floating_point():
                t.fill_(fill)
    card = ModelCard("run", "1.0.0", config={}, training={"config": dict(split), "steps": 100},
                     thresholds=thresholds or {})
    return save_model(model, folder, card)


def test_the_average_is_the_exact_mean_and_starts_uncalibrated(tmp_path):
    from glance_training.average import average_models

    runs = [_run(tmp_path / f"r{i}", fill, thresholds={"segmentation": 0.3, "detection": 0.4})
            for i, fill in enumerate((0.25, 0.5, 1.5))]
    folder = average_models([str(r) for r in runs], tmp_path / "avg", name="soup", version="2.0.0")
    model, card = load_model(folder)
    floats = [t for t in model.state_dict().values() if t.is_floating_point()]
    assert floats and all(torch.all(t == 0.75) for t in floats)  # (0.25 + 0.5 + 1.5) / 3, exact in fp16
    assert (card.name, card.version, card.thresholds, card.metrics) == ("soup", "2.0.0", {}, {})
    assert [s["model"] for s in card.training["averaged_from"]] == [str(r) for r in runs]
    assert card.training["config"]["seed"] == 0 and card.provenance["averaged_models"] == 3


def test_integer_buffers_come_from_the_first_model():
    from glance_training.average import mean_state

    a = {"w": torch.tensor([1.0, 3.0]), "n": torch.tensor(7)}
    b = {"w": torch.tensor([3.0, 5.0]), "n": torch.tensor(9)}
    out = mean_state([a, b])
    assert out["w"].tolist() == [2.0, 4.0] and out["n"].item() == 7 and out["n"].dtype == torch.int64


@pytest.mark.parametrize("other, message", [
    ({"split": {**SPLIT, "seed": 1}}, "another patient split"),
    ({"split": {**SPLIT, "held_out": []}}, "another patient split"),
    ({"channels": 3}, "config or preprocessing differs"),
])
def test_models_that_cannot_be_averaged_honestly_are_refused(tmp_path, other, message):
    from glance_training.average import average_models

    first = _run(tmp_path / "a", 0.5)
    second = _run(tmp_path / "b", 0.5, **other)
    with pytest.raises(GlanceError, match=message):
        average_models([str(first), str(second)], tmp_path / "avg")
    assert not (tmp_path / "avg").exists()


def test_one_model_an_unrecorded_split_or_an_existing_folder_are_refused(tmp_path):
    from glance_training.average import average_models

    a, b = _run(tmp_path / "a", 0.5), _run(tmp_path / "b", 0.5)
    with pytest.raises(GlanceError, match="at least two"):
        average_models([str(a)], tmp_path / "avg")
    with pytest.raises(GlanceError, match="already holds a model"):
        average_models([str(a), str(b)], a)
    bare = [_run(tmp_path / n, 0.5, split={}) for n in ("c", "d")]
    with pytest.raises(GlanceError, match="does not record the training split"):
        average_models([str(m) for m in bare], tmp_path / "avg")


def test_cli_writes_the_average_and_bad_input_is_one_line(tmp_path, capsys):
    from glance.cli import main

    a, b = _run(tmp_path / "a", 0.5), _run(tmp_path / "b", 1.0)
    assert main(["average", str(a), str(b), "--out", str(tmp_path / "avg"), "--version", "3.0.0"]) == 0
    assert read_card(tmp_path / "avg").version == "3.0.0" and "calibrate it" in capsys.readouterr().out
    assert main(["average", str(a), "--out", str(tmp_path / "other")]) != 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "at least two" in err[0]
