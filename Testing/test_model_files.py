"""Model files: safetensors + card round trip, mismatch errors, export, FLOP accounting."""

from __future__ import annotations

import json
import pickle

import pytest
import torch

from glance.errors import ModelError
from glance.model import build_model, config_for
from glance.model.weights import ModelCard, load_model, read_card, save_model

torch.set_num_threads(2)


def _card(name="test"):
    return ModelCard(name=name, version="0.0.1", config={})


def _trained_like(cfg_name="small"):
    """A model whose BatchNorm statistics are not the defaults, so the round trip covers buffers."""
    model = build_model(config_for(cfg_name)).train()
    with torch.no_grad():
        model(torch.rand(2, 1, 64, 64))
    return model.eval()


def test_float32_round_trip_is_bit_exact(tmp_path):
    model = _trained_like()
    save_model(model, tmp_path / "m", _card(), dtype=torch.float32)
    loaded, card = load_model(tmp_path / "m")
    for key, value in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key
    x = torch.rand(1, 1, 64, 64)
    with torch.inference_mode():
        assert torch.equal(model(x).seg, loaded(x).seg)
    assert card.glance_config == model.cfg
    assert "not for clinical use" in card.intended_use.lower()


def test_float16_round_trip_is_bit_exact_after_rounding(tmp_path):
    model = _trained_like()
    save_model(model, tmp_path / "m", _card())
    loaded, card = load_model(tmp_path / "m")
    assert card.dtype == "float16"
    for key, value in model.state_dict().items():
        expected = value.half().float() if value.is_floating_point() else value
        assert torch.equal(loaded.state_dict()[key], expected), key


def _swap_config(folder, cfg):
    card = json.loads((folder / "card.json").read_text())
    card["config"] = cfg.to_dict()
    (folder / "card.json").write_text(json.dumps(card))


def test_weights_with_other_shapes_are_refused(tmp_path):
    save_model(build_model(config_for("small", in_channels=3)), tmp_path / "m", _card())
    _swap_config(tmp_path / "m", config_for("small"))
    with pytest.raises(ModelError, match=r"stem.stride1.0.weight has shape \(8, 3, 3, 3\)"):
        load_model(tmp_path / "m")


def test_weights_of_another_architecture_are_refused(tmp_path):
    save_model(build_model(config_for("base")), tmp_path / "m", _card())
    _swap_config(tmp_path / "m", config_for("small"))
    with pytest.raises(ModelError, match="unexpected tensors"):
        load_model(tmp_path / "m")


def test_weights_changed_after_the_card_are_refused(tmp_path):
    save_model(_trained_like(), tmp_path / "m", _card())
    other = tmp_path / "other"
    save_model(build_model(config_for("small")), other, _card())
    (tmp_path / "m" / "model.safetensors").write_bytes((other / "model.safetensors").read_bytes())
    with pytest.raises(ModelError, match="SHA-256"):
        load_model(tmp_path / "m")


class _Exploit:
    def __reduce__(self):
        import pathlib

        return (pathlib.Path.touch, (pathlib.Path(self.marker),))


def test_a_pickle_renamed_safetensors_is_refused_and_never_run(tmp_path):
    save_model(_trained_like(), tmp_path / "m", _card())
    marker = tmp_path / "pwned"
    exploit = _Exploit()
    exploit.marker = str(marker)
    weights = tmp_path / "m" / "model.safetensors"
    weights.write_bytes(pickle.dumps(exploit))
    card = json.loads((tmp_path / "m" / "card.json").read_text())
    card["weights_sha256"] = ""  # even without the hash check, nothing is unpickled
    (tmp_path / "m" / "card.json").write_text(json.dumps(card))
    with pytest.raises(ModelError, match="not a valid safetensors"):
        load_model(tmp_path / "m")
    assert not marker.exists()


@pytest.mark.parametrize("edit, message", [
    ({"card_version": 99}, "card version 99"),
    ({"format": "something-else"}, "not a GLANCE model card"),
    ({"config": {"dims": [1, 2]}}, "invalid model card"),
    ({"surprise": 1}, "invalid model card"),
])
def test_bad_cards_are_clear_errors(tmp_path, edit, message):
    save_model(_trained_like(), tmp_path / "m", _card())
    card = json.loads((tmp_path / "m" / "card.json").read_text())
    card.update(edit)
    (tmp_path / "m" / "card.json").write_text(json.dumps(card))
    with pytest.raises(ModelError, match=message):
        read_card(tmp_path / "m")


def test_missing_files_are_clear_errors(tmp_path):
    with pytest.raises(ModelError, match="no model card"):
        load_model(tmp_path)
    save_model(_trained_like(), tmp_path / "m", _card())
    (tmp_path / "m" / "model.safetensors").unlink()
    with pytest.raises(ModelError, match="weights file missing"):
        load_model(tmp_path / "m")


def test_torch_export_matches_eager():
    """torch.export of the small model gives the eager outputs (tolerance 1e-5 absolute)."""
    model = _trained_like()
    x = torch.rand(1, 1, 96, 128)
    exported = torch.export.export(model, (x,))
    with torch.inference_mode():
        eager = model(x)
        ported = exported.module()(x)
    torch.testing.assert_close(ported.seg, eager.seg, atol=1e-5, rtol=0)
    torch.testing.assert_close(ported.heatmap, eager.heatmap, atol=1e-5, rtol=0)


def test_onnx_export_matches_eager(tmp_path):
    """ONNX (dynamo exporter) run by onnxruntime agrees with eager within 1e-4 absolute."""
    ort = pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    model = _trained_like()
    x = torch.rand(1, 1, 64, 96)
    path = tmp_path / "glance.onnx"
    torch.onnx.export(model, (x,), str(path), dynamo=True, output_names=["seg", "heatmap"])
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    seg, heatmap = session.run(None, {session.get_inputs()[0].name: x.numpy()})[:2]
    with torch.inference_mode():
        eager = model(x)
    torch.testing.assert_close(torch.from_numpy(seg), eager.seg, atol=1e-4, rtol=0)
    torch.testing.assert_close(torch.from_numpy(heatmap), eager.heatmap, atol=1e-4, rtol=0)
