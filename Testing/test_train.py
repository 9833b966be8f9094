"""Training: a short real run, exact resume, model registration, distributed training."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from glance.errors import GlanceError, ModelError

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
CROPS = DATA / "lidc-maxslice-crops"
pytestmark = pytest.mark.skipif(not CROPS.is_dir(), reason="shared/data/lidc-maxslice-crops is not present")


@pytest.fixture
def cfg():
    from glance_training.train import TrainConfig

    return TrainConfig(name="test-site", data=[f"maxslice:{CROPS}"], epochs=2, steps_per_epoch=2, batch=2,
                       crop_patch_size=32, val_samples=4, calibrate=False)


@pytest.fixture(autouse=True)
def _isolated_registry(tmp_path, monkeypatch):
    monkeypatch.setenv("GLANCE_HOME", str(tmp_path / "glance-home"))
    torch.set_num_threads(2)


def test_resume_continues_exactly(cfg, tmp_path):
    from glance_training.train import Trainer

    straight = Trainer(cfg, tmp_path / "a")
    straight.fit()
    interrupted = Trainer(cfg, tmp_path / "b")
    interrupted.fit(stop_after=1)
    resumed = Trainer(cfg, tmp_path / "b")
    resumed.load_checkpoint()
    assert resumed.epoch == 1
    resumed.fit()
    for key, value in straight.model.state_dict().items():
        assert torch.equal(resumed.model.state_dict()[key], value), key
    assert [r.loss for r in resumed.history] == [r.loss for r in straight.history]
    lines = (tmp_path / "b" / "history.csv").read_text().splitlines()
    assert len(lines) == 3 and lines[0].startswith("epoch,step,lr,loss")
    assert (tmp_path / "b" / "curves.png").read_bytes()[:4] == b"\x89PNG"


def test_a_run_with_a_teacher_trains_the_student_only(cfg, tmp_path):
    from glance.infer import mean_over_flips
    from glance_training.losses import distillation_loss
    from glance_training.train import Trainer, _float

    shipped = dict(base_model="glance-small", context_slices=1, pixel_spacing_mm=0.7)
    taught = replace(cfg, teacher="glance-small", distill_weight=2.0, **shipped)
    # The term at the first step: the student is still the teacher, seen once against its flip average.
    trainer = Trainer(taught, tmp_path / "trainer")
    batch = trainer._to_device(next(trainer._batches(0)))
    out = trainer.net(batch["image"])
    total, parts = trainer.loss_fn(_float(out), batch)
    with_term, parts = trainer._with_distillation(out, batch["image"], total, parts)
    expected = distillation_loss(_float(out), mean_over_flips(trainer.teacher, batch["image"]).detach())
    assert parts["distill"].item() == pytest.approx(expected.item(), rel=1e-6) and expected.item() > 0
    assert with_term.item() == pytest.approx(total.item() + 2.0 * expected.item(), rel=1e-6)
    assert with_term.requires_grad
    teacher_before = {k: v.clone() for k, v in trainer.teacher.state_dict().items()}
    trainer.fit()
    assert all(torch.equal(v, teacher_before[k]) for k, v in trainer.teacher.state_dict().items())
    assert not all(torch.equal(v, teacher_before[k]) for k, v in trainer.model.state_dict().items())
    assert all(r.distill > 0 for r in trainer.history)
    assert "distill" in (tmp_path / "trainer" / "history.csv").read_text().splitlines()[0].split(",")
    # A teacher that reads another input is one clear error, before any step.
    with pytest.raises(GlanceError, match="teacher glance-small@.* expects context_slices=1"):
        Trainer(replace(cfg, teacher="glance-small"), tmp_path / "c")
    with pytest.raises(GlanceError, match="distill_weight must be positive"):
        Trainer(replace(taught, distill_weight=0.0), tmp_path / "d")


def test_resume_refuses_another_config(cfg, tmp_path):
    from glance_training.train import Trainer

    Trainer(cfg, tmp_path / "run").fit(stop_after=1)
    other = Trainer(replace(cfg, lr=1e-3), tmp_path / "run")
    with pytest.raises(GlanceError, match="different training config"):
        other.load_checkpoint()


def test_the_split_keeps_reserved_and_validation_patients_out_of_training(cfg, tmp_path):
    from glance_training.datasets import assign_split
    from glance_training.train import Trainer

    trainer = Trainer(cfg, tmp_path / "run")
    train_patients = {c.patient_id for g in trainer.groups["train"] for s in g.sources for c in s}
    val_patients = {c.patient_id for g in trainer.groups["val"] for s in g.sources for c in s}
    assert train_patients and val_patients and not train_patients & val_patients
    assert "LIDC-IDRI-0001" not in train_patients and "LIDC-IDRI-0003" not in train_patients
    assert all(assign_split(p) == "train" for p in train_patients)


def test_registered_versions_never_overwrite(cfg, tmp_path):
    from glance.model.weights import load_model
    from glance.registry import list_models, resolve_model
    from glance_training.train import Trainer, register

    trainer = Trainer(replace(cfg, epochs=1), tmp_path / "run")
    trainer.fit()
    first = register(trainer)
    second = register(trainer)
    assert first != second
    assert [e.version for e in list_models() if e.name == "test-site"] == ["1.0.0", "2.0.0"]
    assert resolve_model("test-site") == second and resolve_model("test-site@1.0.0") == first
    model, card = load_model(first)
    assert card.dtype == "float16" and card.training["steps"] == 2
    assert set(card.training["data"]) == {"train", "val", "test"}
    assert "not for clinical use" in card.intended_use.lower()
    with pytest.raises(ModelError, match="no model 'nope'"):
        resolve_model("nope")


@pytest.mark.parametrize("failure", [GlanceError("no labelled validation case"), ImportError("mixed engine files")])
def test_a_failed_calibration_leaves_the_registered_model_and_a_note(cfg, tmp_path, caplog, monkeypatch, failure):
    """Before, anything but a GlanceError escaped as a traceback after the weights were saved."""
    import glance_training.calibrate
    from glance.model.weights import read_card
    from glance_training.train import Trainer, register

    def fail(*args, **kwargs):
        raise failure

    monkeypatch.setattr(glance_training.calibrate, "calibrate", fail)
    trainer = Trainer(replace(cfg, epochs=1, calibrate=True), tmp_path / "run")
    trainer.fit()
    with caplog.at_level("WARNING", logger="glance_training.train"):
        folder = register(trainer, tmp_path / "model")
    card = read_card(folder)
    assert str(failure) in card.metrics["calibration"] and "glance calibrate" in card.metrics["calibration"]
    assert not card.thresholds and "thresholds not calibrated" in caplog.text
    assert len([r for r in caplog.records if r.levelname == "WARNING"]) == 1


def test_a_volume_group_larger_than_the_cache_is_flagged(cfg, tmp_path, caplog):
    # Here the crops stand in for volumes (same patch size); with phantoms each reload costs seconds.
    from glance_training.train import Trainer

    trainer = Trainer(replace(cfg, patch_size=32, cache_cases=4, workers=0), tmp_path / "run")
    with caplog.at_level("WARNING", logger="glance_training.train"):
        trainer._train_sets()
    n = trainer.groups["train"][0].n_cases
    assert f"{n} training volumes but cache_cases 4" in caplog.text
    caplog.clear()
    roomy = Trainer(replace(cfg, patch_size=32, cache_cases=n, workers=0), tmp_path / "run2")
    with caplog.at_level("WARNING", logger="glance_training.train"):
        roomy._train_sets()
    assert "cache_cases" not in caplog.text


def test_a_release_fine_tuned_from_its_own_name_is_the_next_minor_version():
    from types import SimpleNamespace

    from glance_training.train import out_version

    base = SimpleNamespace(name="glance-small", version="2.0.0")
    assert out_version("glance-small", base) == "2.1.0"
    assert out_version("glance-small", SimpleNamespace(name="glance-small", version="2.9.3")) == "2.10.0"
    assert out_version("glance-site", base) == "1.0.0"  # a new name starts its own versions
    assert out_version("glance-small", None) == "1.0.0"


def test_cli_train_registers_a_model(tmp_path, capsys):
    from glance.cli import main

    rc = main(["train", "--data", f"maxslice:{CROPS}", "--epochs", "1", "--steps-per-epoch", "1", "--batch", "2",
               "--name", "cli-site", "--run-dir", str(tmp_path / "run"), "--progress-lines"])
    out = capsys.readouterr().out
    assert rc == 0
    assert "PROGRESS 1/1" in out and "METRIC epoch=1" in out
    folder = tmp_path / "glance-home" / "models" / "cli-site-1.0.0"
    assert (folder / "model.safetensors").is_file()
    # The new version's thresholds were chosen on the validation patients and stored in its card.
    thresholds = json.loads((folder / "card.json").read_text())["thresholds"]
    calibration = thresholds["calibration"]
    assert calibration["split"] == "val" and calibration["data"] == [f"maxslice:{CROPS}"]
    assert thresholds["segmentation"] in (0.05, 0.1, 0.15, 0.2, 0.25, 0.3, 0.35, 0.4, 0.45, 0.5)
    assert 0.0 < thresholds["detection"] < 1.0
    assert calibration["n_nodules"][f"maxslice:{CROPS}"] > 100


@pytest.mark.parametrize("argv, message", [
    (["train"], "no training data"),
    (["train", "--data", "bogus:x"], "unknown kind 'bogus'"),
    (["train", "--data", "maxslice:/nonexistent"], "no such file or folder"),
    (["train", "--data", f"maxslice:{CROPS}", "--epochs", "0"], "--epochs must be at least 1"),
    (["train", "--data", f"maxslice:{CROPS}", "--resume"], "--resume needs --run-dir"),
])
def test_cli_train_bad_arguments_are_one_line(argv, message, capsys):
    from glance.cli import main

    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1


@pytest.mark.parametrize("field, value, message", [
    ("heatmap_min_sigma_px", 0, "heatmap_min_sigma_px must be positive"),
    ("positive_prob", 1.5, "positive_prob must be in [0, 1]"),  # a traceback before session 10
])
def test_cli_train_refuses_sampler_fields_out_of_range_in_one_line(tmp_path, capsys, field, value, message):
    import json

    from glance.cli import main

    config = tmp_path / "bad.json"
    config.write_text(json.dumps({"data": [f"maxslice:{CROPS}"], field: value}))
    assert main(["train", str(config)]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1


def test_distributed_training_on_two_cpu_processes(tmp_path):
    """torchrun with two processes on the gloo backend trains and registers one model."""
    env = {**os.environ, "GLANCE_HOME": str(tmp_path / "home"), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           "-m", "glance.cli", "train", "--data", f"maxslice:{CROPS}", "--epochs", "1", "--steps-per-epoch",
           "2", "--batch", "4", "--name", "ddp-site", "--run-dir", str(tmp_path / "run"), "--no-calibrate"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    card = json.loads((tmp_path / "home" / "models" / "ddp-site-1.0.0" / "card.json").read_text())
    assert card["training"]["steps"] == 2
    assert proc.stdout.count("trained ddp-site") == 1  # only rank 0 registers


@pytest.mark.parametrize("shares, steps, order", [
    ([1.0], 3, [0, 0, 0]),
    ([1.0, 1.0], 6, [0, 1, 0, 1, 0, 1]),  # equal weights: the groups alternate, first group first
    ([3.0, 1.0], 8, [0, 0, 1, 0, 0, 0, 1, 0]),  # 3 in 4 steps, spread out rather than in a block
    ([2.0, 1.0, 1.0], 8, [0, 1, 2, 0, 0, 1, 2, 0]),
])
def test_patch_groups_take_steps_in_proportion_to_their_weights(shares, steps, order):
    from glance_training.data import step_schedule

    assert step_schedule(shares, steps) == order


def test_a_groups_share_is_the_sum_of_its_sources_weights():
    from glance_training.data import PatchGroup

    assert PatchGroup("volumes", [[], []], [1.0, 0.5], 96).share == 1.5


def test_a_weighted_crop_group_gets_its_share_of_the_samples(cfg, tmp_path, monkeypatch):
    """Epoch datasets are sized from the schedule: with crops@3 and one other group of weight 1, 10
    steps of batch 2 draw 8 crop batches (16 samples) and 2 of the other group (4 samples)."""
    from glance_training.data import PatchGroup
    from glance_training.train import Trainer

    trainer = Trainer(replace(cfg, steps_per_epoch=10), tmp_path / "run")
    crops = trainer.groups["train"][0]
    crops.weights = [3.0]
    other = PatchGroup("volumes", crops.sources, [1.0], 32)
    trainer.groups["train"] = [crops, other]
    assert [len(ds) for ds in trainer._train_sets()] == [16, 4]
    assert sum(1 for _ in trainer._batches(0)) == 10


def test_evaluation_splits_partition_the_patients_as_training_did():
    """--split train scores exactly the patients a run trains on; train, val and test together are all."""
    from glance_training.datasets import SplitConfig, assign_split
    from glance_training.evaluate import SPLIT_CHOICES, split_cases

    split = SplitConfig()
    parts = {which: split_cases(f"maxslice:{CROPS}", which, 0, split, 0)[1] for which in SPLIT_CHOICES}
    for which in ("train", "val", "test"):
        assert parts[which] and {assign_split(c.patient_id, split) for c in parts[which]} == {which}
    assert sorted(c.case_id for w in ("train", "val", "test") for c in parts[w]) == sorted(
        c.case_id for c in parts["all"])


def test_split_train_scores_the_phantoms_the_run_trained_on():
    """Phantoms are their own patients: --split train scores the training run's own training phantoms
    (as for patients), --split val its validation phantoms (those calibration chose thresholds on);
    test and all score phantoms of an offset seed, never trained or calibrated on."""
    from glance.model.card import ModelCard
    from glance_training.data import DataSpec, load_source
    from glance_training.datasets import SplitConfig, split_source
    from glance_training.evaluate import EVALUATION_SEED_OFFSET, evaluation_seed, split_cases

    card = ModelCard("m", "1.0.0", config={}, training={"config": {"seed": 3}})
    assert evaluation_seed(card, "train") == evaluation_seed(card, "val") == 3
    assert {evaluation_seed(card, w) for w in ("test", "all")} == {3 + EVALUATION_SEED_OFFSET}
    split = SplitConfig(seed=3)
    trained = split_source(load_source(DataSpec.parse("phantom:20"), 3), split)["train"]
    scored = split_cases("phantom:20", "train", 0, split, evaluation_seed(card, "train"))[1]
    assert [c.case_id for c in scored] == [c.case_id for c in trained] and scored
    calibrated = split_source(load_source(DataSpec.parse("phantom:20"), 3), split)["val"]
    validated = split_cases("phantom:20", "val", 0, split, evaluation_seed(card, "val"))[1]
    assert [c.case_id for c in validated] == [c.case_id for c in calibrated] and validated
    unseen = split_cases("phantom:20", "all", 0, split, evaluation_seed(card, "all"))[1]
    assert not {c.case_id for c in unseen} & {c.case_id for c in load_source(DataSpec.parse("phantom:20"), 3)}


def test_scoring_training_patients_warns_once_per_source(tmp_path, monkeypatch, caplog):
    import glance.pipeline
    from glance.model.card import ModelCard
    from glance_training.evaluate import EvaluateConfig, evaluate

    card = ModelCard("oracle", "1.0.0", config={})
    monkeypatch.setattr(glance.pipeline, "load_network", lambda options: (None, card, None))
    monkeypatch.setattr("glance_training.evaluate._crop_prediction", lambda loaded, network, options: loaded.labels > 0)
    with caplog.at_level("WARNING", logger="glance_training.evaluate"):
        report = evaluate(EvaluateConfig(data=[f"maxslice:{CROPS}"], split="train", out=str(tmp_path), max_cases=3))
    assert report["segmentation_per_nodule"]["dice"]["mean"] == 1.0  # the oracle: its own reader masks
    assert [r.getMessage() for r in caplog.records] == [
        f"maxslice:{CROPS}: --split train scores patients the model trained on: not a held-out accuracy"]
