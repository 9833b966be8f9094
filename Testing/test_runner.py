"""glance.runner: the background process behind the Slicer buttons.

Real child processes (small ``python -c`` scripts) stand in for the engine, so
progress parsing, error capture, exit codes and tree kill are exercised exactly
as Slicer's timer will exercise them.
"""

from __future__ import annotations

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


def test_refilter_command():
    cmd = runner.refilter_command(Path("/tmp/out"), det_threshold=0.25, seg_threshold=0.6, python="py")
    assert cmd == ["py", "-m", "glance.cli", "refilter", "/tmp/out",
                   "--det-threshold", "0.25", "--seg-threshold", "0.6"]  # fmt: skip


def test_training_evaluation_and_phantom_commands():
    assert runner.train_command(["/c/a", Path("/c/b")], "glance-small", 12.0, "cuda", "site-v1", python="py") == [
        "py", "-m", "glance.cli", "train", "--cases", "/c/a", "/c/b", "--base-model", "glance-small",
        "--epochs", "12", "--device", "cuda", "--name", "site-v1", "--progress-lines",
    ]  # fmt: skip
    assert runner.evaluate_command("/held", "site-v1", "cpu", python="py") == [
        "py", "-m", "glance.cli", "evaluate", "--cases", "/held", "--model", "site-v1", "--device", "cpu",
    ]  # fmt: skip
    assert runner.phantom_command("/p", dicom=True, python="py") == ["py", "-m", "glance.cli", "phantom", "/p", "--dicom"]


def test_python_executable_prefers_the_slicer_launcher(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))
    assert runner.python_executable() == sys.executable
    launcher = tmp_path / "PythonSlicer"
    launcher.write_text("#!/bin/sh\n")
    launcher.chmod(launcher.stat().st_mode | stat.S_IXUSR)
    assert runner.python_executable() == str(launcher)


def test_child_environment_makes_the_engine_importable_and_unbuffered():
    env = runner.child_environment({"PYTHONPATH": "/a" + os.pathsep + "/b"})
    assert env["PYTHONPATH"].split(os.pathsep) == [str(runner.ENGINE_ROOT), "/a", "/b"]
    assert env["PYTHONUNBUFFERED"] == "1"
    assert (runner.ENGINE_ROOT / "glance" / "runner.py").is_file()
    # From a folder outside the repository the child finds this very engine.
    out = subprocess.run(
        [PY, "-c", "import glance.runner as r; print(r.__file__)"],
        env=runner.child_environment({"PATH": os.environ.get("PATH", "")}),
        cwd="/", capture_output=True, text=True, check=True,
    )  # fmt: skip
    assert Path(out.stdout.strip()).resolve() == Path(runner.__file__).resolve()


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
        grandchild = next((int(l.split()[1]) for l in job.stdout_tail if l.startswith("GRANDCHILD")), None)
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
        import pathlib, time
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
