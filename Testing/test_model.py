"""The GLANCE network: shapes, gates, gradients, ablations, determinism."""

from __future__ import annotations

import pytest
import torch

from glance.model import ABLATIONS, GlanceConfig, build_model, config_for
from glance.model.cscf import CSCF
from glance.model.gct import GCTStage, PositionEmbedding
from glance.model.mrgam import MRGAM

torch.set_num_threads(2)


@pytest.fixture(scope="module")
def small():
    return build_model(config_for("small")).eval()


@pytest.mark.parametrize("size", [(512, 512), (77, 93), (33, 200), (32, 32)])
def test_output_shapes_any_size(small, size):
    with torch.inference_mode():
        out = small(torch.rand(1, 1, *size))
    assert out.seg.shape == (1, 1, *size)
    assert out.heatmap.shape == (1, 1, *size)
    assert out.aux == ()  # deep supervision only in training


def test_aux_heads_cover_the_image_at_their_stride():
    model = build_model(config_for("small")).train()
    out = model(torch.rand(2, 1, 77, 93))
    assert [tuple(a.shape[-2:]) for a in out.aux] == [(5, 6), (10, 12), (20, 24), (39, 47)]


def test_25d_input_channels():
    model = build_model(config_for("small", in_channels=5)).eval()
    with torch.inference_mode():
        out = model(torch.rand(2, 5, 64, 48))
    assert out.seg.shape == (2, 1, 64, 48)
    with pytest.raises(ValueError, match="in_channels"):
        config_for("small", in_channels=4)


@pytest.mark.parametrize("gate", ["global_local", "uniform", "local_se", "static", "attention"])
def test_branch_weights_sum_to_one(gate):
    mrgam = MRGAM(32, (1, 3, 5), 4, gate, 4)
    x, context = torch.randn(3, 32, 16, 16), torch.randn(3, 32, 16, 16)
    alpha = mrgam.branch_weights(x, context)
    assert alpha.shape == (3, 3)
    torch.testing.assert_close(alpha.sum(dim=1), torch.ones(3))
    assert (alpha >= 0).all()


def test_uniform_gate_is_exactly_one_over_n():
    alpha = MRGAM(16, (1, 3, 5, 7), 4, "uniform", 4).branch_weights(torch.randn(2, 16, 8, 8))
    assert torch.equal(alpha, torch.full((2, 4), 0.25))


def test_global_context_steers_the_gate():
    """Eq. 6: with the same local input, a different global map changes alpha."""
    torch.manual_seed(0)
    mrgam = MRGAM(16, (1, 3, 5), 4, "global_local", 4)
    x = torch.randn(1, 16, 8, 8)
    a1 = mrgam.branch_weights(x, torch.randn(1, 16, 8, 8))
    a2 = mrgam.branch_weights(x, torch.randn(1, 16, 8, 8) + 3)
    assert not torch.allclose(a1, a2)


def test_mrgam_is_a_residual_blend():
    """F_l = X + sum alpha_i U_i, recomputed by hand from the branches."""
    torch.manual_seed(1)
    mrgam = MRGAM(8, (1, 3), 2, "static", 4).eval()
    x = torch.randn(1, 8, 10, 10)
    alpha = torch.softmax(mrgam.gate.logits, 0)
    expected = x + sum(a * b(x) for a, b in zip(alpha, mrgam.branches))
    torch.testing.assert_close(mrgam(x), expected)


def test_cscf_matches_equation_7():
    torch.manual_seed(2)
    cscf = CSCF(16, 16).eval()
    f_g, f_l = torch.randn(2, 16, 6, 6), torch.randn(2, 16, 6, 6)
    z = cscf.norm(torch.cat([f_g, f_l], 1))
    expected = cscf.se(z) * cscf.proj(z) + f_g + f_l
    torch.testing.assert_close(cscf(f_g, f_l), expected)


def _loss(out):
    return out.seg.square().mean() + out.heatmap.square().mean() + sum(a.square().mean() for a in out.aux)


def test_every_parameter_gets_a_gradient():
    model = build_model(config_for("small")).train()
    _loss(model(torch.rand(2, 1, 64, 64))).backward()
    no_grad = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert no_grad == []


def test_both_heads_reach_the_encoder():
    model = build_model(config_for("small")).train()
    out = model(torch.rand(2, 1, 64, 64))
    for head in (out.seg, out.heatmap):
        grads = torch.autograd.grad(head.mean(), list(model.encoder.parameters()), retain_graph=True,
                                    allow_unused=True)
        assert all(g is not None and g.abs().sum() > 0 for g in grads)


@pytest.mark.parametrize("ablation", sorted(ABLATIONS))
def test_every_ablation_builds_runs_and_trains(ablation):
    model = build_model(config_for("small", ablation)).train()
    out = model(torch.rand(2, 1, 64, 64))
    _loss(out).backward()
    assert out.seg.shape == (2, 1, 64, 64) and len(out.aux) == 4
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


def _count(model, kind):
    return sum(isinstance(m, kind) for m in model.modules())


@pytest.mark.parametrize("ablation, gct, mrgam, cscf", [
    ("full", 4, 4, 4),
    ("no_cscf", 4, 4, 0),
    ("no_mrgam", 4, 0, 4),
    ("no_gct", 0, 4, 4),
    ("two_local_streams", 0, 8, 4),
    ("conv_transformer", 4, 0, 4),
    ("mrgam_only", 0, 4, 0),
    ("gct_only", 4, 0, 0),
    ("dual_plain", 0, 0, 4),
    ("unet", 0, 0, 0),
])
def test_ablations_have_the_components_of_table_4(ablation, gct, mrgam, cscf):
    model = build_model(config_for("small", ablation))
    assert (_count(model, GCTStage), _count(model, MRGAM), _count(model, CSCF)) == (gct, mrgam, cscf)


def test_position_embedding_only_at_stage_one():
    model = build_model(config_for("small"))
    pes = [n for n, m in model.named_modules() if isinstance(m, PositionEmbedding)]
    assert pes == ["encoder.stages.0.global_stream.pos"]


def test_attention_kinds_by_stage():
    model = build_model(config_for("small"))
    kinds = [s.global_stream.blocks[0].attn.kind for s in model.encoder.stages]
    assert kinds == ["sr", "sr", "full", "full"]
    windowed = build_model(config_for("small", attention="window")).eval()
    assert [s.global_stream.blocks[0].attn.kind for s in windowed.encoder.stages] == [
        "window", "window", "full", "full"]
    with torch.inference_mode():
        assert windowed(torch.rand(1, 1, 100, 70)).seg.shape == (1, 1, 100, 70)


def test_eval_mode_is_deterministic(small):
    x = torch.rand(2, 1, 96, 80)
    with torch.inference_mode():
        a, b = small(x), small(x)
    assert torch.equal(a.seg, b.seg) and torch.equal(a.heatmap, b.heatmap)


def test_batch_items_are_independent_in_eval(small):
    x = torch.rand(3, 1, 64, 64)
    with torch.inference_mode():
        whole = small(x).seg
        single = small(x[1:2]).seg
    torch.testing.assert_close(whole[1:2], single, atol=1e-5, rtol=1e-5)


def test_presets_are_in_the_stated_parameter_ranges():
    small_params = sum(p.numel() for p in build_model(config_for("small")).parameters())
    base_params = sum(p.numel() for p in build_model(config_for("base")).parameters())
    assert 2e6 <= small_params <= 6e6
    assert base_params > 3 * small_params


def test_config_round_trips_through_dict():
    cfg = config_for("base", "no_cscf", in_channels=3)
    assert GlanceConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ValueError, match="unknown config keys"):
        GlanceConfig.from_dict({**cfg.to_dict(), "bogus": 1})
