"""Training configs: the shipped JSON files load, the LUNA16 fold generator partitions the ten
subsets patient-level, and the ablation bench changes exactly one field per variant."""

from __future__ import annotations

import importlib.util
import json
import sys
from dataclasses import asdict
from pathlib import Path

import pytest

from glance_training.train import TrainConfig

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "GLANCETraining" / "configs"


def _load_script(path: Path):
    """Import a script by path (registered first: its dataclasses look their module up)."""
    name = f"_script_{path.stem}"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def folds_script():
    return _load_script(CONFIGS / "make_luna_folds.py")


@pytest.fixture(scope="module")
def ablation():
    return _load_script(REPO / "bench" / "ablation.py")


# ----------------------------------------------------------------------------- shipped configs


@pytest.mark.parametrize("path", sorted(CONFIGS.rglob("*.json")), ids=lambda p: str(p.relative_to(CONFIGS)))
def test_every_shipped_config_loads(path):
    raw = json.loads(path.read_text(encoding="utf-8"))
    cfg = TrainConfig.from_json(path)
    assert cfg.data and cfg.data == raw["data"]
    for key, value in raw.items():  # every key is taken as written (lists become tuples)
        assert getattr(cfg, key) == (tuple(value) if isinstance(value, list) and key != "data" else value), key


def test_full_gpu_config_has_the_paper_hyper_parameters():
    cfg = TrainConfig.from_json(CONFIGS / "lidc-full-gpu.json")
    assert (cfg.preset, cfg.ablation, cfg.lr, cfg.weight_decay, cfg.batch, cfg.t0_epochs) == (
        "base", "full", 1e-4, 0.05, 8, 20)
    assert cfg.data[0] == "lidc:/data/LIDC-IDRI" and cfg.data[1].startswith("phantom:")


# ----------------------------------------------------------------------------- LUNA16 folds

# Patient P-k has one scan in subset k; P-A has a second scan in subset 7 next to one in subset 2;
# "9.unknown" (subset 9) has no known patient.
SCANS = {k: [f"1.{k}.1"] for k in range(10)}
SCANS[2].append("1.2.A")
SCANS[7].append("1.7.A")
SCANS[9].append("9.unknown")
SERIES_PATIENTS = {**{f"1.{k}.1": f"P-{k}" for k in range(10)}, "1.2.A": "P-A", "1.7.A": "P-A"}


def _fake_luna(root: Path) -> None:
    for k, uids in SCANS.items():
        (root / f"subset{k}").mkdir(parents=True)
        for uid in uids:
            (root / f"subset{k}" / f"{uid}.mhd").write_text("")
    (root / "annotations.csv").write_text("")  # not a subset: ignored


def test_luna_scans_lists_the_ten_subsets(folds_script, tmp_path):
    _fake_luna(tmp_path)
    assert folds_script.luna_scans(tmp_path) == {k: sorted(v) for k, v in SCANS.items()}


def test_luna_scans_refuses_a_missing_subset(folds_script, tmp_path):
    _fake_luna(tmp_path)
    (tmp_path / "subset4" / "1.4.1.mhd").unlink()
    (tmp_path / "subset4").rmdir()
    with pytest.raises(SystemExit, match="subset0 .. subset9"):
        folds_script.luna_scans(tmp_path)


def test_fold_configs_partition_the_subsets_by_patient(folds_script, tmp_path):
    base = json.loads((CONFIGS / "lidc-full-gpu.json").read_text())
    configs = folds_script.fold_configs(base, "/L", "/D", SCANS, SERIES_PATIENTS)
    paths = folds_script.write_configs(configs, tmp_path / "folds")
    assert [p.name for p in paths] == [f"fold{k}.json" for k in range(10)]
    trained_in = {k: set() for k in range(10)}
    for k, path in enumerate(paths):
        cfg = TrainConfig.from_json(path)
        luna = [d for d in cfg.data if d.startswith("luna:")]
        assert luna == [f"luna:/L/subset{n}" for n in range(10) if n != k]
        assert cfg.data[-1] == "lidc:/D@9" and len(cfg.data) == 10
        assert cfg.split == (1.0, 0.0, 0.0) and cfg.name == f"glance-luna16-fold{k}"
        assert (cfg.lr, cfg.batch, cfg.preset) == (1e-4, 8, "base")  # hyper-parameters from the base
        for n in range(10):
            if f"luna:/L/subset{n}" in luna:
                trained_in[n].add(k)
        # The fold's patients, under their LIDC id and every LUNA16 scan uid, plus the reserved ones.
        assert {"LIDC-IDRI-0001", "LIDC-IDRI-0003", f"P-{k}", f"1.{k}.1"} <= set(cfg.held_out)
    # Each subset is trained in the nine other folds and held out exactly once.
    assert trained_in == {n: set(range(10)) - {n} for n in range(10)}
    held = {k: set(TrainConfig.from_json(p).held_out) for k, p in enumerate(paths)}
    # P-A's subset-7 scan is not trained in fold 2 (P-A is a test patient there), and vice versa.
    assert {"P-A", "1.2.A", "1.7.A"} <= held[2] and {"P-A", "1.2.A", "1.7.A"} <= held[7]
    assert "P-A" not in held[3] and "1.7.A" not in held[3]
    assert "9.unknown" in held[9] and "9.unknown" not in held[8]
    assert held[0] == {"LIDC-IDRI-0001", "LIDC-IDRI-0003", "P-0", "1.0.1"}


def test_held_out_patients_really_leave_training(folds_script):
    """What held_out does in the split: fold 2 trains neither P-A's scans nor its LIDC series."""
    from glance_training.datasets import SplitConfig, assign_split

    base = json.loads((CONFIGS / "lidc-full-gpu.json").read_text())
    cfg = folds_script.fold_configs(base, "/L", "/D", SCANS, SERIES_PATIENTS)[2]
    split = SplitConfig(tuple(cfg["split"]), cfg["seed"], tuple(cfg["held_out"]))
    assert [assign_split(p, split) for p in ("1.7.A", "P-A", "P-2", "1.3.1", "P-3")] == [
        "test", "test", "test", "train", "train"]


LIDC_0001 = REPO.parent / "shared" / "data" / "LIDC-IDRI-0001"
UID_0001 = "1.3.6.1.4.1.14519.5.2.1.6279.6001.179049373636438705059720603192"


@pytest.mark.skipif(not LIDC_0001.is_dir(), reason="shared/data/LIDC-IDRI-0001 is not present")
def test_main_maps_series_to_patients_from_real_dicom(folds_script, tmp_path, monkeypatch, capsys):
    """The real LIDC-IDRI-0001 series, as a LUNA16 scan in subset 3, is held out in fold 3 only."""
    assert folds_script.series_patients_from_dicom(LIDC_0001) == {UID_0001: "LIDC-IDRI-0001"}
    _fake_luna(tmp_path / "luna")
    (tmp_path / "luna" / "subset3" / f"{UID_0001}.mhd").write_text("")
    monkeypatch.chdir(tmp_path)
    assert folds_script.main(["--luna", "luna", "--lidc", str(LIDC_0001), "--out", "folds"]) == 0
    assert capsys.readouterr().out.split() == [f"folds/fold{k}.json" for k in range(10)]
    folds = [json.loads((tmp_path / "folds" / f"fold{k}.json").read_text()) for k in range(10)]
    assert folds[3]["data"][0] == f"luna:{tmp_path / 'luna'}/subset0"  # absolute paths
    assert folds[3]["data"][-1] == f"lidc:{LIDC_0001}@9"
    # 0001 is a reserved test patient (the base's held_out): its LIDC id and scan uid leave every fold.
    assert all("LIDC-IDRI-0001" in f["held_out"] and UID_0001 in f["held_out"] for f in folds)


# ----------------------------------------------------------------------------- ablation bench


def test_ablation_variants_differ_from_the_base_in_exactly_their_field(ablation):
    base = ablation.base_config(epochs=2, steps_per_epoch=5)
    assert (base.ablation, base.context_slices, base.epochs, base.steps_per_epoch) == ("full", 0, 2, 5)
    # T0 scales with the budget: the shipped config's cosine cycle stays the same share of the run.
    shipped = TrainConfig.from_json(ablation.BASE_CONFIG)
    assert base.t0_epochs == max(1, round(shipped.t0_epochs * 2 / shipped.epochs))
    assert ablation.base_config(epochs=shipped.epochs).t0_epochs == shipped.t0_epochs
    # Relative data paths of the shipped config now point at the repository's data.
    assert base.data[0] == f"maxslice:{(REPO.parent / 'shared' / 'data' / 'lidc-maxslice-crops').resolve()}"
    assert base.data[1] == "phantom:32"
    expected = {"full": {}, "no_gct": {"ablation": "no_gct"}, "no_mrgam": {"ablation": "no_mrgam"},
                "no_cscf": {"ablation": "no_cscf"}, "unet": {"ablation": "unet"}, "2.5d": {"context_slices": 1}}
    assert list(ablation.VARIANTS) == list(expected)
    b = asdict(base)
    for name, changed in expected.items():
        v = asdict(ablation.variant_config(base, ablation.VARIANTS[name]))
        assert {k: v[k] for k in b if v[k] != b[k]} == changed, name


def test_ablation_variants_name_real_model_ablations(ablation):
    from glance.model.config import ABLATIONS, config_for

    for v in ablation.VARIANTS.values():
        if v.field == "ablation":
            assert v.value in ABLATIONS
    # Each ablation changes the network the way Table 4 says.
    assert config_for("small", "no_gct").global_stream == "identity"
    assert config_for("small", "no_mrgam").local_stream == "identity"
    assert config_for("small", "no_cscf").fusion == "none"
    assert config_for("small", "unet").encoder == "unet"


def test_ablation_markdown_table(ablation):
    crops = {"n_nodules": 199, "dice": 0.8123, "iou": 0.7}
    results = {"command": "python bench/ablation.py --variants full 2.5d", "budget": "B", "variants": {
        "full": {"label": "Full", "field": "ablation", "value": "full", "train_seconds": 100.4,
                 "final_loss": 0.51234, "crops": crops, "phantoms": {"dice": 0.5, "cpm": 0.25}},
        "2.5d": {"label": "2.5D", "field": "context_slices", "value": 1, "train_seconds": 120,
                 "final_loss": 0.6, "crops": {"n_nodules": 0}, "phantoms": {"dice": float("nan"), "cpm": None}},
    }}
    lines = ablation.markdown(results).splitlines()
    assert lines[0] == "Command: `python bench/ablation.py --variants full 2.5d`"
    assert "| Full | – | 100 | 0.512 | 81.2 (199) | 70.0 | 50.0 | 25.0 |" in lines
    assert "| 2.5D | context_slices=1 | 120 | 0.600 | – (0) | – | – | – |" in lines
    assert any("only meaningful on volumetric data" in line for line in lines)


def test_ablation_flags(ablation):
    args = ablation.parse_args(["--epochs", "1", "--steps-per-epoch", "2", "--variants", "full", "unet"])
    assert (args.epochs, args.steps_per_epoch, args.variants) == (1, 2, ["full", "unet"])
    assert args.out == REPO / "bench" / "results"
    with pytest.raises(SystemExit):
        ablation.parse_args(["--variants", "no_such"])
    with pytest.raises(SystemExit):
        ablation.parse_args(["--steps-per-epoch", "0"])
