"""FLOP and parameter accounting of ``glance model-info``."""

from __future__ import annotations

import json

import pytest

from glance.cli import main
from glance.model import build_model, config_for
from glance.model.complexity import measure, model_info


@pytest.mark.parametrize("ablation", ["full", "no_cscf", "unet", "dual_plain"])
def test_components_cover_every_parameter_and_flop(ablation):
    info = measure(build_model(config_for("small", ablation)), (64, 64))
    assert sum(c.params for c in info.components.values()) == info.params
    assert sum(c.gflops for c in info.components.values()) == pytest.approx(info.gflops_per_slice, rel=1e-9)


def test_head_flops_are_known_exactly():
    """Two 1x1 convs from 8 channels to 1 at S x S: 2 * (2 * 8 * S^2) FLOPs (biases not counted)."""
    info = measure(build_model(config_for("small")), (64, 64))
    assert info.components["heads"].gflops * 1e9 == 2 * 2 * 8 * 64 * 64


def test_flops_scale_with_area_for_the_convolutional_parts():
    a = measure(build_model(config_for("small")), (64, 64)).components
    b = measure(build_model(config_for("small")), (128, 128)).components
    for name in ("PRD", "heads", "stem"):
        assert b[name].gflops == pytest.approx(4 * a[name].gflops, rel=1e-9), name
    # The gates' MLPs act on pooled vectors: a small size-independent part.
    for name in ("MRGAM", "CSCF"):
        assert b[name].gflops == pytest.approx(4 * a[name].gflops, rel=1e-2), name


def test_dual_stream_ratio_decomposes():
    r = model_info("small", size=128).dual_stream_ratio
    assert r["ratio"] == pytest.approx(r["f_glance_gflops"] / r["f_single_gflops"])
    # The single-stream network differs by the global stream, the fusion and the gate inputs only.
    assert r["ratio"] - 1 - r["global_stream_term"] - r["fusion_term"] == pytest.approx(0, abs=1e-3)
    assert 1 < r["ratio"] < 2


def test_cli_json(capsys):
    assert main(["model-info", "--size", "64", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert {"params", "gflops_per_slice", "components"} <= set(data)
    assert {"GCT", "MRGAM", "CSCF", "PRD", "heads"} <= set(data["components"])
    assert all({"params", "gflops"} == set(v) for v in data["components"].values())


def test_cli_refuses_bad_size(capsys):
    assert main(["model-info", "--size", "8"]) == 2
    assert capsys.readouterr().err.strip() == "glance model-info: error: --size must be between 32 and 4096, got 8"
