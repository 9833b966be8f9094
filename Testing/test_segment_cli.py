"""``glance segment`` and ``glance refilter`` end to end through the command line."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from glance.cli import main
from glance.volume import Volume

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


@pytest.fixture(scope="module")
def untrained(tmp_path_factory):
    """A real (randomly initialised) network: exercises every stage without asserting accuracy."""
    from glance.model import build_model, config_for
    from glance.model.weights import ModelCard, save_model

    folder = tmp_path_factory.mktemp("model")
    return save_model(build_model(config_for("small")), folder, ModelCard(name="untrained", version="0", config={}))


@pytest.fixture(scope="module")
def example_ct(tmp_path_factory):
    from glance.io import write_image
    from glance.phantom import make_example_phantom

    phantom = make_example_phantom(seed=0)
    path = tmp_path_factory.mktemp("ct") / "example.nrrd"
    write_image(phantom.ct, path)
    return phantom, path


def _run(argv, capsys):
    rc = main(argv)
    out = capsys.readouterr()
    return rc, out.out, out.err


def test_segment_writes_a_complete_result(untrained, example_ct, tmp_path, capsys):
    _, path = example_ct
    rc, out, err = _run(["segment", str(path), "--out", str(tmp_path / "r"), "--model", str(untrained),
                         "--progress-lines", "--det-threshold", "0.9"], capsys)
    assert rc == 0, err
    assert "PROGRESS" in out.splitlines()[0] and out.splitlines()[0].startswith("PROGRESS ")
    report = json.loads((tmp_path / "r" / "report.json").read_text())
    assert report["model"]["name"] == "untrained" and report["thresholds"]["detection"] == 0.9
    assert report["input"]["path"] == str(path) and report["input"]["shape_kji"] == [64, 256, 256]
    assert set(report["seconds"]) >= {"preprocess", "model", "postprocess", "scene", "export", "load_model"}
    for name in ("nodules.csv", "nodules.seg.nrrd", "nodules.mrk.json", "maps/nodule_probability.nrrd",
                 "maps/centre_heatmap.nrrd"):
        assert (tmp_path / "r" / name).is_file(), name
    assert not [p for p in tmp_path.iterdir() if ".tmp-" in p.name]


def _flipped_permuted(ct: Volume) -> Volume:
    """The same physical image stored with swapped rows/columns and reversed slices."""
    array = np.ascontiguousarray(ct.array.transpose(0, 2, 1)[::-1])  # (k, j, i) -> (k', i, j), k reversed
    m = ct.index_to_lps
    # New index (i', j', k') = (j, i, K-1-k): columns of the new matrix are old j, old i, -old k.
    k_last = ct.shape[0] - 1
    new = np.column_stack([m[:3, 1], m[:3, 0], -m[:3, 2]])
    origin = m[:3, 3] + k_last * m[:3, 2]
    spacing = (ct.spacing[1], ct.spacing[0], ct.spacing[2])
    return Volume(array, spacing, origin, new / np.asarray(spacing))


def test_results_do_not_depend_on_how_the_volume_is_stored(untrained, example_ct, tmp_path, capsys):
    """Two storage orders of one physical image: identical nodules at identical LPS positions."""
    from glance.io import write_image

    phantom, path = example_ct
    other = tmp_path / "other.nrrd"
    write_image(_flipped_permuted(phantom.ct), other)
    reports = []
    for src, out in ((path, "a"), (other, "b")):
        rc, _, err = _run(["segment", str(src), "--out", str(tmp_path / out), "--model", str(untrained),
                           "--det-threshold", "0.2", "--seg-threshold", "0.3", "--no-snapshots"], capsys)
        assert rc == 0, err
        reports.append(json.loads((tmp_path / out / "report.json").read_text()))
    a, b = ([n["centre_lps"] for n in r["nodules"]] for r in reports)
    assert len(a) == len(b)
    np.testing.assert_allclose(a, b, atol=1e-6)
    assert [n["volume_mm3"] for n in reports[0]["nodules"]] == [n["volume_mm3"] for n in reports[1]["nodules"]]


def test_refilter_changes_thresholds_without_the_network(untrained, example_ct, tmp_path, capsys):
    _, path = example_ct
    out = tmp_path / "r"
    assert _run(["segment", str(path), "--out", str(out), "--model", str(untrained), "--det-threshold", "0.05",
                 "--seg-threshold", "0.3", "--no-snapshots"], capsys)[0] == 0
    first = json.loads((out / "report.json").read_text())
    assert first["thresholds"]["source"] == {"segmentation": "requested", "detection": "requested",
                                             "outline_fraction": "built-in default"}
    # A threshold refilter does not set keeps the source the report gave it.
    first["thresholds"]["source"]["segmentation"] = "model card (calibrated)"
    (out / "report.json").write_text(json.dumps(first))
    rc, text, err = _run(["refilter", str(out), "--det-threshold", "0.999"], capsys)
    assert rc == 0, err
    strict = json.loads((out / "report.json").read_text())
    assert strict["thresholds"] == {"segmentation": 0.3, "detection": 0.999, "outline_fraction": 0.0, "source": {
        "segmentation": "model card (calibrated)", "detection": "requested",
        "outline_fraction": "built-in default"}} and strict["refiltered"]
    assert strict["n_nodules"] <= first["n_nodules"]
    assert _run(["refilter", str(out), "--det-threshold", "0.05"], capsys)[0] == 0
    again = json.loads((out / "report.json").read_text())
    assert [n["centre_lps"] for n in again["nodules"]] == [n["centre_lps"] for n in first["nodules"]]
    assert _run(["refilter", str(out), "--outline-fraction", "0.6"], capsys)[0] == 0
    outlined = json.loads((out / "report.json").read_text())
    assert outlined["thresholds"]["outline_fraction"] == outlined["postprocess"]["outline_fraction"] == 0.6
    assert outlined["thresholds"]["source"]["outline_fraction"] == "requested"


@pytest.mark.parametrize("argv, message", [
    (["segment", "/nonexistent/ct.nrrd", "--out", "{tmp}/o"], "/nonexistent/ct.nrrd: no such file or folder"),
    (["segment", "--out", "{tmp}/o"], "give an INPUT image or folder, or --example"),
    (["segment", "{ct}", "--out", "{tmp}/o", "--seg-threshold", "1.5"], "--seg-threshold must be between 0 and 1"),
    (["segment", "{ct}", "--out", "{tmp}/o", "--outline-fraction", "1"], "--outline-fraction must be at least 0"),
    (["segment", "{ct}", "--out", "{tmp}/o", "--model", "no-such-model"], "no model 'no-such-model'"),
    (["segment", "{ct}", "--out", "{tmp}/o", "--device", "cuda:0"], None),
    (["refilter", "{tmp}"], "not a GLANCE result folder"),
])
def test_bad_requests_are_one_line(argv, message, example_ct, untrained, tmp_path, capsys):
    import torch

    if "cuda:0" in argv and torch.cuda.is_available():
        pytest.skip("a GPU is present")
    argv = [a.format(tmp=tmp_path, ct=example_ct[1]) for a in argv]
    if "--model" not in argv and argv[0] == "segment":
        argv += ["--model", str(untrained)]
    rc, _, err = _run(argv, capsys)
    assert rc == 2
    assert len(err.strip().splitlines()) == 1 and err.startswith(f"glance {argv[0]}: error: ")
    if message:
        assert message in err
    assert not (tmp_path / "o").exists()


def test_existing_output_needs_force(untrained, example_ct, tmp_path, capsys):
    _, path = example_ct
    args = ["segment", str(path), "--out", str(tmp_path / "r"), "--model", str(untrained), "--no-snapshots",
            "--det-threshold", "0.9"]
    assert _run(args, capsys)[0] == 0
    rc, _, err = _run(args, capsys)
    assert rc == 2 and "--force" in err
    assert _run(args + ["--force"], capsys)[0] == 0


@pytest.mark.skipif(not (DATA / "LIDC-IDRI-0001").is_dir(), reason="shared/data/LIDC-IDRI-0001 is not present")
def test_real_dicom_scan_end_to_end_with_the_shipped_model(tmp_path, capsys):
    """LIDC-IDRI-0001 (original DICOM) through the default model: its 4-reader 33 mm nodule is
    reported at its reference position, and the DICOM-SEG reads back and passes dciodvfy."""
    import shutil
    import subprocess

    from glance.registry import resolve_model

    resolve_model()  # the shipped model must be there
    out = tmp_path / "r"
    rc, text, err = _run(["segment", str(DATA / "LIDC-IDRI-0001"), "--out", str(out), "--no-snapshots"], capsys)
    assert rc == 0, err
    report = json.loads((out / "report.json").read_text())
    assert report["input"]["series_uid"].endswith("179049373636438705059720603192")
    reference = np.array([56.40, 86.34, -115.96])  # consensus centroid, LPS mm (shared/data/README.md)
    distances = [np.linalg.norm(np.asarray(n["centre_lps"]) - reference) for n in report["nodules"]]
    assert min(distances) < 23.40 / 2  # within the radius of its equivalent sphere
    seg = out / report["dicom_seg"]
    from highdicom.seg import segread

    assert segread(seg).number_of_segments == report["n_nodules"]
    if shutil.which("dciodvfy"):
        proc = subprocess.run(["dciodvfy", str(seg)], capture_output=True, text=True)
        assert not [line for line in proc.stderr.splitlines() if line.startswith("Error")]
    # Findings away from the lungs come back only on request, and the rest stay as they were.
    assert report["postprocess"]["require_lung_contact"] is True
    assert report["n_dropped_outside_lungs"] >= 1  # 2.3.0 dropped 15 on this scan, 2.4.0 7: upper abdomen
    assert f"{report['n_dropped_outside_lungs']} finding(s) away from the lungs not reported" in text
    rc, text, err = _run(["refilter", str(out), "--keep-outside-lungs"], capsys)
    assert rc == 0, err
    assert "away from the lungs" not in text
    everything = json.loads((out / "report.json").read_text())
    assert everything["postprocess"]["require_lung_contact"] is False
    kept = {tuple(n["centre_lps"]) for n in report["nodules"]}
    assert kept <= {tuple(n["centre_lps"]) for n in everything["nodules"]}
    assert everything["n_nodules"] >= report["n_nodules"]
    rc, _, err = _run(["refilter", str(out), "--no-keep-outside-lungs"], capsys)  # and back on
    assert rc == 0, err
    again = json.loads((out / "report.json").read_text())
    assert again["postprocess"]["require_lung_contact"] is True
    assert again["n_dropped_outside_lungs"] == report["n_dropped_outside_lungs"]
    assert everything["n_nodules"] == report["n_nodules"] + report["n_dropped_outside_lungs"]
    assert everything["n_dropped_outside_lungs"] is None
    assert [n["centre_lps"] for n in again["nodules"]] == [n["centre_lps"] for n in report["nodules"]]


def test_sigint_interrupts_even_when_inherited_as_ignored(tmp_path):
    """A background job starts with SIGINT ignored; the engine must still stop on Ctrl-C / Cancel."""
    import signal
    import subprocess
    import sys
    import time

    # 'ready' is printed inside the try: printed before it, a SIGINT landing between the print and
    # the try escaped as an uncaught KeyboardInterrupt (exit -2) on a loaded machine.
    script = ("import time, sys\nfrom glance.cli import _interruptible\n_interruptible()\n"
              "try:\n    print('ready', flush=True)\n    time.sleep(30)\n"
              "except KeyboardInterrupt:\n    sys.exit(130)\n")
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN))
    assert proc.stdout.readline().strip() == "ready"
    started = time.perf_counter()
    proc.send_signal(signal.SIGINT)
    assert proc.wait(timeout=10) == 130
    assert time.perf_counter() - started < 5


def test_bench_reports_every_stage_with_and_without_flips(untrained, tmp_path, capsys):
    from glance.io import write_image

    path = tmp_path / "small.nrrd"
    hu = np.full((16, 64, 64), 40, np.int16)  # soft tissue around a 29 ml air-filled "lung"
    hu[5:11, 12:52, 12:52] = -850  # the lung crop (10 mm margin) keeps slices 1..14
    write_image(Volume(hu, (1.0, 1.0, 3.0), (0.0, 0.0, 0.0), np.eye(3)), path)
    runs = []
    for flags in ([], ["--tta"]):
        rc, out, err = _run(["bench", "--input", str(path), "--model", str(untrained), "--no-baseline",
                             "--json", *flags], capsys)
        assert rc == 0, err
        runs.append(json.loads(out.splitlines()[0]))
    assert [r["test_time_flips"] for r in runs] == [False, True]
    for r in runs:
        assert r["volume_kji"] == [16, 64, 64] and r["slices_through_model"] == 14  # the lung crop's slices
        assert set(r["seconds"]) >= {"read", "preprocess", "model", "postprocess"}


@pytest.mark.skipif(not (DATA / "lidc-maxslice-crops").is_dir(),
                    reason="shared/data/lidc-maxslice-crops is not present")
def test_evaluate_prints_misses_and_sizes_that_match_its_csv(tmp_path, capsys):
    """The summary glance evaluate prints (and the Slicer module shows) agrees with its own nodules.csv."""
    import csv

    out = tmp_path / "ev"
    rc, text, err = _run(["evaluate", "--data", f"maxslice:{DATA / 'lidc-maxslice-crops'}", "--max-cases", "4",
                          "--out", str(out)], capsys)
    assert rc == 0, err
    summary = json.loads(text[: text.rindex("}") + 1])
    rows = list(csv.DictReader(open(out / "nodules.csv")))
    assert summary["n_nodules_scored"] == len(rows) == 4
    assert summary["n_nodules_missed"] == sum(r["pred_label"] == "0" for r in rows)
    assert sum(g["n"] for g in summary["by_size"].values()) == 4
    assert all(float(r["diameter_mm"]) > 0 for r in rows)
