"""glance.runner: the background process behind the Slicer buttons.

Real child processes (small ``python -c`` scripts) stand in for the engine, so
progress parsing, error capture, exit codes and tree kill are exercised exactly
as Slicer's timer will exercise them.
"""

from __future__ import annotations

from dataclasses import replace

import os
import stat
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from glance import runner
from glance.runner import BackgroundJob, JobState, Metric, Progress, Stage, parse_line

PY = sys.executable


def _script(code: str) -> list[str]:
    return [PY, "-c", textwrap.dedent(code)]


def _alive(pid: int) -> bool:
    """True while ``pid`` runs; a zombie (exited, not yet reaped) counts as gone."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    stat_file = Path(f"/proc/{pid}/stat")
    try:
        # Field 3 is the state; the command name in field 2 may contain spaces.
        return stat_file.read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (FileNotFoundError, IndexError):
        return not stat_file.parent.exists() and sys.platform != "linux"


def _wait_gone(pid: int, timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not _alive(pid):
            return True
        time.sleep(0.05)
    return False


# -- command lines --------------------------------------------------------


def test_segment_command_has_the_exact_engine_arguments():
    cmd = runner.segment_command(
        "/data/ct.nrrd", "/tmp/out", "glance-small", device="cuda",
        seg_threshold=0.30000000000000004, det_threshold=0.7, python="/opt/PythonSlicer",
    )  # fmt: skip
    assert cmd == [
        "/opt/PythonSlicer", "-m", "glance.cli", "segment", "/data/ct.nrrd",
        "--out", "/tmp/out", "--model", "glance-small", "--device", "cuda",
        "--seg-threshold", "0.3", "--det-threshold", "0.7", "--progress-lines", "--force",
    ]  # fmt: skip
    with_flips = runner.segment_command("/ct.nrrd", "/o", "m", python="py", tta=True)
    assert with_flips[-3:] == ["--tta", "--progress-lines", "--force"]


def test_thresholds_left_out_are_the_engines_choice():
    # None: no flag, so the engine applies the model card's calibrated value (else its default).
    assert runner.segment_command("/ct.nrrd", "/o", "m", python="py") == [
        "py", "-m", "glance.cli", "segment", "/ct.nrrd", "--out", "/o", "--model", "m", "--device", "auto",
        "--progress-lines", "--force",
    ]  # fmt: skip
    assert runner.segment_command("/ct.nrrd", "/o", "m", det_threshold=0.2, python="py")[11:] == [
        "--det-threshold", "0.2", "--progress-lines", "--force"]
    assert runner.refilter_command("/o", seg_threshold=0.45, python="py") == [
        "py", "-m", "glance.cli", "refilter", "/o", "--seg-threshold", "0.45"]
    assert runner.refilter_command("/o", python="py") == ["py", "-m", "glance.cli", "refilter", "/o"]


def test_refilter_command():
    cmd = runner.refilter_command(Path("/tmp/out"), seg_threshold=0.6, det_threshold=0.25, python="py")
    assert cmd == ["py", "-m", "glance.cli", "refilter", "/tmp/out",
                   "--seg-threshold", "0.6", "--det-threshold", "0.25"]  # fmt: skip


def test_training_evaluation_and_phantom_commands():
    assert runner.train_command(["/c/a", Path("/c/b")], "glance-small", 12.0, "cuda", "site-v1",
                                run_dir="/runs/r1", python="py") == [
        "py", "-m", "glance.cli", "train", "--cases", "/c/a", "--cases", "/c/b", "--base-model", "glance-small",
        "--epochs", "12", "--device", "cuda", "--name", "site-v1", "--progress-lines", "--run-dir", "/runs/r1",
    ]  # fmt: skip
    assert runner.evaluate_command("site-v1@1.0.0", "/rep", cases=["/held"], device="cpu", python="py") == [
        "py", "-m", "glance.cli", "evaluate", "--model", "site-v1@1.0.0", "--cases", "/held", "--split", "all",
        "--out", "/rep", "--device", "cpu", "--progress-lines",
    ]  # fmt: skip
    assert runner.phantom_command("/p", python="py") == ["py", "-m", "glance.cli", "phantom", "--out", "/p",
                                                         "--format", "dicom"]  # fmt: skip
    assert runner.phantom_command("/p", "nrrd", seed=3, nodules=2, shape=(64, 48, 20), spacing=(1.25, 1.25, 2.5),
                                  python="py")[4:] == [
        "--out", "/p", "--format", "nrrd", "--seed", "3", "--nodules", "2", "--shape", "64x48x20",
        "--spacing", "1.25x1.25x2.5",
    ]  # fmt: skip


def _parsed(command: list[str]):
    """The engine's own argparse result for a built command line (the part after ``python -m glance.cli``)."""
    from glance.cli import build_parser

    assert command[1:3] == ["-m", "glance.cli"]
    return build_parser(command[3]).parse_args(command[3:])


def test_every_built_command_is_accepted_by_the_engine_parser():
    seg = _parsed(runner.segment_command("/d/ct.nrrd", "/o", "m@1", "cuda:1", 0.45, 0.2, python="py"))
    assert (seg.command, seg.input, seg.out, seg.model, seg.device) == ("segment", "/d/ct.nrrd", "/o", "m@1", "cuda:1")
    assert (seg.seg_threshold, seg.det_threshold, seg.progress_lines, seg.force) == (0.45, 0.2, True, True)

    ref = _parsed(runner.refilter_command("/o", 0.45, 0.2, python="py"))
    assert (ref.result, ref.seg_threshold, ref.det_threshold, ref.keep_outside_lungs) == ("/o", 0.45, 0.2, None)
    assert not seg.keep_outside_lungs


@pytest.mark.parametrize("keep, segment_value, refilter_value, require_lung_contact", [
    (True, True, True, False), (False, None, False, True), (None, None, None, "as saved")])
def test_keeping_findings_outside_the_lungs_reaches_the_engine(keep, segment_value, refilter_value,
                                                               require_lung_contact):
    """segment: the flag or nothing (rule 8 on by default); refilter: on, off, or as the result had it."""
    from dataclasses import replace

    from glance.cli.segment import postprocess_config
    from glance.postprocess import PostprocessConfig

    if keep is not None:
        seg = _parsed(runner.segment_command("/ct.nrrd", "/o", "m", python="py", keep_outside_lungs=keep))
        assert seg.keep_outside_lungs is segment_value
    ref = _parsed(runner.refilter_command("/o", python="py", keep_outside_lungs=keep))
    assert ref.keep_outside_lungs is refilter_value
    for saved in (True, False):  # what the result was made with
        cfg = postprocess_config(ref, replace(PostprocessConfig(), require_lung_contact=saved))
        assert cfg.require_lung_contact is (saved if require_lung_contact == "as saved" else require_lung_contact)

    train = _parsed(runner.train_command(["/c/a", "/c/b"], "glance-small@1.0.0", 3, "cpu", "site", run_dir="/r",
                                         data=["phantom:4"], config="/cfg.json", python="py"))
    assert (train.config, train.data, train.cases) == ("/cfg.json", ["phantom:4"], ["/c/a", "/c/b"])
    assert (train.base_model, train.epochs, train.device, train.name) == ("glance-small@1.0.0", 3, "cpu", "site")
    assert (train.run_dir, train.progress_lines, train.resume, train.out) == ("/r", True, False, None)
    bare = _parsed(runner.train_command(["/c/a"], "b", 1, "auto", "n", python="py"))
    assert bare.config is None and bare.run_dir is None and bare.cases == ["/c/a"]

    ev = _parsed(runner.evaluate_command("m@2", "/rep", cases=["/h1", "/h2"], data=["lidc:/l"], split="test",
                                         device="cpu", python="py"))
    assert (ev.model, ev.cases, ev.data, ev.split, ev.out, ev.device, ev.progress_lines) == (
        "m@2", ["/h1", "/h2"], ["lidc:/l"], "test", "/rep", "cpu", True)

    ph = _parsed(runner.phantom_command("/p", seed=5, nodules=1, shape=(64, 64, 16), spacing=(1.5, 1.5, 2.5),
                                        python="py"))
    assert (ph.out, ph.format, ph.seed, ph.nodules) == (Path("/p"), "dicom", 5, 1)
    assert (ph.shape, ph.spacing) == ((64, 64, 16), (1.5, 1.5, 2.5))


def test_default_thresholds_are_the_engines():
    from glance.cli.segment import postprocess_config
    from glance.postprocess import PostprocessConfig

    engine = PostprocessConfig()
    assert (runner.DEFAULT_SEG_THRESHOLD, runner.DEFAULT_DET_THRESHOLD) == (engine.seg_threshold, engine.det_threshold)
    # A GUI run with untouched sliders is the same as "glance segment" without threshold options.
    gui = postprocess_config(_parsed(runner.segment_command("ct.nrrd", "o", "m", python="py")))
    cli = postprocess_config(_parsed(["py", "-m", "glance.cli", "segment", "ct.nrrd", "--out", "o"]))
    assert gui == cli == engine


def test_new_run_dir_is_beside_the_site_models(tmp_path, monkeypatch):
    import time

    monkeypatch.setenv("GLANCE_HOME", str(tmp_path))
    now = time.mktime((2025, 3, 4, 5, 6, 7, 0, 0, -1))
    assert runner.new_run_dir("site-v1", now) == tmp_path / "runs" / "site-v1-20250304-050607"


def test_python_executable_prefers_the_slicer_launcher(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))
    assert runner.python_executable() == sys.executable
    launcher = tmp_path / "PythonSlicer"
    launcher.write_text("#!/bin/sh\n")
    launcher.chmod(launcher.stat().st_mode | stat.S_IXUSR)
    assert runner.python_executable() == str(launcher)


def test_child_environment_makes_the_engine_importable_and_unbuffered():
    training_root = runner.ENGINE_ROOT.parent / "GLANCETraining"  # the source tree's layout
    env = runner.child_environment({"PYTHONPATH": "/a" + os.pathsep + "/b"})
    assert env["PYTHONPATH"].split(os.pathsep) == [str(runner.ENGINE_ROOT), str(training_root), "/a", "/b"]
    assert env["PYTHONUNBUFFERED"] == "1"
    assert (runner.ENGINE_ROOT / "glance" / "runner.py").is_file()
    # From a folder outside the repository, with no inherited PYTHONPATH, the child finds this very
    # engine and the training package ("glance train" from the Training module).
    out = subprocess.run(
        [PY, "-S", "-c", "import glance.runner as r, glance_training as t; print(r.__file__); print(t.__file__)"],
        env=runner.child_environment({"PATH": os.environ.get("PATH", "")}),
        cwd="/", capture_output=True, text=True, check=True,
    )  # fmt: skip
    engine_file, training_file = out.stdout.split()
    assert Path(engine_file).resolve() == Path(runner.__file__).resolve()
    assert Path(training_file).resolve().parent == training_root / "glance_training"


# -- protocol parsing -----------------------------------------------------


def test_parse_line_protocol_records():
    assert parse_line("PROGRESS 3/12") == Progress(3, 12, "")
    assert parse_line("PROGRESS 5 / 10 infer batch") == Progress(5, 10, "infer batch")
    assert parse_line("PROGRESS 3/12").fraction == 0.25
    assert Progress(7, 0).fraction == 0.0 and Progress(9, 4).fraction == 1.0
    assert parse_line("STAGE postprocess") == Stage("postprocess")
    assert parse_line("METRIC epoch=2 loss=0.5 val_dice=0.75") == Metric(
        {"epoch": 2.0, "loss": 0.5, "val_dice": 0.75}
    )
    assert parse_line("METRIC epoch=2 loss=nan-ish") is None
    assert parse_line("found 3 nodules") is None
    assert parse_line("PROGRESS x/12") is None


def test_readable_error_takes_the_last_stderr_line_without_cli_prefix():
    lines = ["INFO loading model", "glance segment: error: ct.nrrd: not a CT (modality MR)", ""]
    assert runner.readable_error(lines, 2) == "ct.nrrd: not a CT (modality MR)"
    assert runner.readable_error(["Traceback ...", "ValueError: bad"], 1) == "ValueError: bad"
    assert runner.readable_error([], 3) == "the engine stopped with exit code 3"
    assert runner.readable_error([], -9) == "the engine was stopped by signal 9"


# -- background job -------------------------------------------------------


def test_job_reports_progress_stage_metrics_and_success():
    job = BackgroundJob(_script("""
        import sys, time
        print("STAGE infer")
        for k in range(1, 5):
            print(f"PROGRESS {k}/4")
            time.sleep(0.05)
        print("METRIC epoch=1 loss=0.9 val_dice=0.4")
        print("done: 2 nodules")
        print("INFO all fine", file=sys.stderr)
    """))
    assert job.status.state is JobState.NOT_STARTED
    job.start()
    fractions = []
    deadline = time.monotonic() + 20
    while not job.poll().state.finished and time.monotonic() < deadline:
        if job.status.fraction is not None:
            fractions.append(job.status.fraction)
        time.sleep(0.01)
    status = job.status
    assert status.state is JobState.SUCCEEDED and status.returncode == 0 and status.error is None
    assert status.progress == Progress(4, 4) and status.fraction == 1.0
    assert fractions == sorted(fractions) and fractions[0] < 1.0  # live, monotone updates
    assert status.stage == "infer"
    assert status.metrics == [{"epoch": 1.0, "loss": 0.9, "val_dice": 0.4}]
    assert list(job.stdout_tail) == ["done: 2 nodules"]
    assert list(job.stderr_tail) == ["INFO all fine"]


def test_poll_does_not_block_while_the_child_runs():
    job = BackgroundJob(_script("import time; print('PROGRESS 1/2', flush=True); time.sleep(30)")).start()
    try:
        t0 = time.monotonic()
        for _ in range(20):
            job.poll()
        assert time.monotonic() - t0 < 0.5
        assert job.status.state is JobState.RUNNING
    finally:
        job.cancel(grace=0.5)


def test_failure_gives_one_readable_message_and_the_exit_code():
    job = BackgroundJob(_script("""
        import sys
        print("PROGRESS 1/3")
        print("INFO reading", file=sys.stderr)
        print("glance segment: error: scan.nrrd: slice spacing is inconsistent", file=sys.stderr)
        sys.exit(2)
    """)).start()
    status = job.wait(timeout=20)
    assert status.state is JobState.FAILED
    assert status.returncode == 2
    assert status.error == "scan.nrrd: slice spacing is inconsistent"
    assert status.progress == Progress(1, 3)


def test_failure_message_is_one_line_naming_what_failed_and_why():
    assert runner.failure_message("GLANCE segmentation", "scan.nrrd: not CT") == (
        "GLANCE segmentation failed: scan.nrrd: not CT")
    assert runner.failure_message("Loading", ValueError("a\n  b\tc")) == "Loading failed: a b c"
    assert runner.failure_message("Loading", None) == runner.failure_message("Loading", " ") == (
        "Loading failed: unknown error")


def test_segment_on_a_file_that_is_not_an_image_fails_with_one_line(tmp_path):
    # The real engine in the background, as the Slicer module starts it.
    bad = tmp_path / "ct.nrrd"
    bad.write_text("not an image\n")
    status = BackgroundJob(runner.segment_command(bad, tmp_path / "out", "glance-small", "cpu", python=PY)).start()
    status = status.wait(timeout=120)
    assert status.state is JobState.FAILED and status.returncode == 2
    assert status.error.startswith(f"{bad}: cannot read the image header (")
    message = runner.failure_message("GLANCE segmentation", status.error)
    assert "\n" not in message and message.startswith(f"GLANCE segmentation failed: {bad}: cannot read")
    assert not (tmp_path / "out").exists()  # nothing half-written


def test_crash_without_message_still_explains_itself():
    status = BackgroundJob(_script("import os; os._exit(7)")).start().wait(timeout=20)
    assert status.state is JobState.FAILED
    assert status.error == "the engine stopped with exit code 7"


def test_cancel_kills_child_and_grandchild():
    # The grandchild ignores SIGINT, so only the group kill can end it.
    job = BackgroundJob(_script(f"""
        import subprocess, sys, time
        subprocess.Popen([{PY!r}, "-c",
            "import os, signal, time; signal.signal(signal.SIGINT, signal.SIG_IGN); "
            "print('GRANDCHILD', os.getpid(), flush=True); time.sleep(60)"])
        for k in range(1000):
            print(f"PROGRESS {{k}}/1000", flush=True)
            time.sleep(0.05)
    """)).start()
    child = job.pid
    grandchild = None
    deadline = time.monotonic() + 20
    while grandchild is None and time.monotonic() < deadline:
        job.poll()
        grandchild = next((int(line.split()[1]) for line in job.stdout_tail if line.startswith("GRANDCHILD")), None)
        time.sleep(0.02)
    assert grandchild is not None, "fake engine did not start its grandchild"
    while job.status.progress is None and time.monotonic() < deadline:
        job.poll()
        time.sleep(0.02)
    assert _alive(child) and _alive(grandchild)

    status = job.cancel(grace=0.5)

    assert status.state is JobState.CANCELLED
    assert status.error is None  # a cancel is not an error to report
    assert not _alive(child)
    assert _wait_gone(grandchild), "grandchild survived cancel"
    assert job.cancel() is status  # a second cancel is harmless


def test_cancel_lets_the_engine_clean_up_first(tmp_path):
    # The engine turns the interrupt into Cancelled and removes partial output.
    partial = tmp_path / "partial.tmp"
    job = BackgroundJob(_script(f"""
        import pathlib, signal, time
        signal.signal(signal.SIGINT, signal.default_int_handler)  # as glance.cli.main does
        p = pathlib.Path({str(partial)!r})
        p.write_text("half")
        try:
            print("PROGRESS 0/1", flush=True)
            time.sleep(60)
        except KeyboardInterrupt:
            p.unlink()
            raise SystemExit(130)
    """)).start()
    deadline = time.monotonic() + 20
    while job.poll().progress is None and time.monotonic() < deadline:
        time.sleep(0.02)
    status = job.cancel(grace=5)
    assert status.state is JobState.CANCELLED and status.returncode == 130
    assert not partial.exists()


def test_start_twice_is_refused():
    job = BackgroundJob(_script("pass")).start()
    with pytest.raises(RuntimeError):
        job.start()
    assert job.wait(timeout=20).state is JobState.SUCCEEDED


# -- environment checks ---------------------------------------------------


def test_dependency_status_reports_without_importing(monkeypatch):
    for name in ("torch", "highdicom", "safetensors"):
        monkeypatch.delitem(sys.modules, name, raising=False)
    status = {d.module: d for d in runner.dependency_status()}
    assert {"torch", "highdicom", "safetensors", "pydicom", "SimpleITK"} <= status.keys()
    assert all(d.present for d in status.values())  # this venv has them all
    assert status["torch"].version.startswith("2.")
    assert status["torch"].source is runner.Source.PYTORCH_EXTENSION
    assert "torch" not in sys.modules and "highdicom" not in sys.modules


def test_missing_requirements_never_ask_pip_for_torch_or_slicer_packages():
    d = runner.Dependency
    status = [
        d("torch", "torch", runner.Source.PYTORCH_EXTENSION, "torch>=2.8", False, None),
        d("highdicom", "highdicom", runner.Source.PIP, "highdicom>=0.27", False, None),
        d("safetensors", "safetensors", runner.Source.PIP, "safetensors>=0.4", True, "0.5"),
        d("SimpleITK", "SimpleITK", runner.Source.SLICER, "SimpleITK", False, None),
    ]
    assert runner.missing_pip_requirements(status) == ["highdicom>=0.27"]


def test_slicer_packages_are_pinned_and_highdicom_needs_pydicom_3():
    d = runner.Dependency
    status = [
        d("highdicom", "highdicom", runner.Source.PIP, "highdicom>=0.27", False, None),
        d("tqdm", "tqdm", runner.Source.PIP, "tqdm>=4.66", False, None),
        d("pydicom", "pydicom", runner.Source.SLICER, "pydicom", True, "2.4.4"),
        d("numpy", "numpy", runner.Source.SLICER, "numpy", True, "2.3.4"),
        d("SimpleITK", "SimpleITK", runner.Source.SLICER, "SimpleITK", True, None),  # no metadata: no pin
    ]
    # Slicer 5.10: pydicom 2.4 -> no highdicom (it would pull pydicom 3 over Slicer's copy).
    assert runner.pip_install_arguments(status) == ["tqdm>=4.66", "pydicom==2.4.4", "numpy==2.3.4"]
    later = [replace(s, version="3.0.1") if s.module == "pydicom" else s for s in status]
    assert runner.pip_install_arguments(later) == ["highdicom>=0.27", "tqdm>=4.66", "pydicom==3.0.1",
                                                   "numpy==2.3.4"]
    assert runner.pip_install_arguments([s for s in status if s.source is runner.Source.SLICER]) == []


def _fake_nvidia_smi(folder: Path, body: str) -> None:
    exe = folder / "nvidia-smi"
    exe.write_text("#!/bin/sh\n" + body)
    exe.chmod(0o755)


@pytest.mark.skipif(sys.platform == "win32", reason="shell-script stand-in for nvidia-smi")
def test_gpu_names_from_nvidia_smi(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))
    assert runner.gpu_names() == []
    _fake_nvidia_smi(tmp_path, 'echo "NVIDIA H200"\necho "NVIDIA A100-SXM4-80GB"\n')
    assert runner.gpu_names() == ["NVIDIA H200", "NVIDIA A100-SXM4-80GB"]
    _fake_nvidia_smi(tmp_path, "echo 'NVIDIA-SMI has failed' >&2\nexit 9\n")
    assert runner.gpu_names() == []


def test_the_background_command_line_runs_the_engine_cli():
    # What Slicer's button starts: "<python> -m glance.cli ...", needs glance/cli/__main__.py.
    prefix = runner.segment_command("x", "y", "m", python=PY)[:3]
    out = subprocess.run([*prefix, "--version"], env=runner.child_environment(), cwd="/",
                         capture_output=True, text=True, timeout=60)  # fmt: skip
    assert out.returncode == 0, out.stderr.strip()
    assert out.stdout.strip().startswith("glance ")


def test_phantom_command_runs_and_writes_what_the_module_self_test_reads(tmp_path):
    # GLANCESegmentationTest reads OUT/ct/ (DICOM), OUT/nodules.json nodules[].centre_lps / diameter_mm.
    import json

    from glance.io import read_volume

    # Seed 3 on this small grid has room for both nodules (seed 1 places only one).
    cmd = runner.phantom_command(tmp_path / "p", "dicom", seed=3, nodules=2, shape=(96, 96, 32),
                                 spacing=(2.0, 2.0, 3.0), python=PY)
    status = BackgroundJob(cmd).start().wait(timeout=120)
    assert status.state is JobState.SUCCEEDED, status.error
    ct = read_volume(tmp_path / "p" / "ct")
    assert ct.shape == (32, 96, 96) and ct.spacing == (2.0, 2.0, 3.0)
    nodules = json.loads((tmp_path / "p" / "nodules.json").read_text())["nodules"]
    assert len(nodules) == 2
    for n in nodules:
        assert len(n["centre_lps"]) == 3 and n["diameter_mm"] > 0
        i, j, k = ct.lps_to_ijk(n["centre_lps"])
        assert 0 <= i < 96 and 0 <= j < 96 and 0 <= k < 32
    assert (tmp_path / "p" / "labels.nrrd").is_file()
