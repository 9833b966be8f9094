"""Run a ``glance`` command in a background process for a GUI.

The Slicer modules never run the network inside Slicer's own process: a crash
or a CUDA out-of-memory there would take the application down, and a long
computation would freeze it. Instead they start ``PythonSlicer -m glance.cli
...`` (plain ``python`` outside Slicer) and poll it from a Qt timer. This module
owns that: the command lines, the machine-readable progress protocol, tree kill
on cancel, the one-line error message, and the first-use dependency check.

Nothing here imports Slicer, Qt or torch, so it is testable in plain Python.

Progress protocol (stdout, one record per line, written by ``--progress-lines``)::

    PROGRESS k/N [free text]      -> fraction k/N
    STAGE name                    -> current stage shown to the user
    METRIC key=value key=value... -> one row of training metrics (floats)

Any other stdout line is kept as log text; stderr carries logging and, last,
the error the CLI prints before it exits non-zero.
"""

from __future__ import annotations

import enum
import importlib.metadata
import importlib.util
import logging
import os
import queue
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections import deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

log = logging.getLogger(__name__)

# The folder that holds the ``glance`` package; the child must find the same
# engine as the GUI even when it is not pip-installed (inside a Slicer extension).
ENGINE_ROOT = Path(__file__).resolve().parent.parent
# Where ``glance_training`` lives: beside ``glance`` in an installed extension
# (one qt-scripted-modules folder), in the sibling module folder in a source tree.
TRAINING_ROOTS = (ENGINE_ROOT, ENGINE_ROOT.parent / "GLANCETraining")

_PROGRESS = re.compile(r"^PROGRESS\s+(\d+)\s*/\s*(\d+)\b\s*(.*)$")
_STAGE = re.compile(r"^STAGE\s+(.+?)\s*$")
_METRIC = re.compile(r"^METRIC\s+(.+?)\s*$")
# The CLI prefixes user errors with "glance <command>: error: "; the GUI shows
# only what follows.
_CLI_ERROR_PREFIX = re.compile(r"^glance(?: [\w-]+)?: error:\s*")


# ---------------------------------------------------------------------------
# Command lines
# ---------------------------------------------------------------------------


def python_executable() -> str:
    """The interpreter for the child: Slicer's launcher when inside Slicer.

    Inside Slicer ``sys.executable`` is the bare ``python-real``, which lacks
    the environment the ``PythonSlicer`` launcher sets up (library paths,
    site-packages of installed extensions such as PyTorch).
    """
    return shutil.which("PythonSlicer") or sys.executable


def _glance(python: str | None, *args: str) -> list[str]:
    return [python or python_executable(), "-m", "glance.cli", *args]


# The engine's default thresholds (glance.postprocess.PostprocessConfig), kept here
# so the GUI can show them without importing scipy; a test keeps the two equal.
DEFAULT_SEG_THRESHOLD = 0.5
DEFAULT_DET_THRESHOLD = 0.3


def segment_command(
    input_path: str | os.PathLike,
    out_dir: str | os.PathLike,
    model: str,
    device: str = "auto",
    seg_threshold: float | None = None,
    det_threshold: float | None = None,
    python: str | None = None,
    tta: bool = False,
    keep_outside_lungs: bool = False,
) -> list[str]:
    """``glance segment`` with machine-readable progress; overwrites ``out_dir``.

    A threshold left None is the engine's choice: the model card's calibrated value, else its default.
    ``tta`` averages the network over the in-plane flips; ``keep_outside_lungs`` also reports findings
    that do not touch the lungs (post-processing rule 8 off).
    """
    return _glance(
        python, "segment", str(input_path),
        "--out", str(out_dir),
        "--model", model,
        "--device", device,
        *_thresholds(seg_threshold, det_threshold),
        *(["--tta"] if tta else []),
        *_lung_flag(keep_outside_lungs or None),
        "--progress-lines",
        "--force",
    )  # fmt: skip


def refilter_command(
    out_dir: str | os.PathLike,
    seg_threshold: float | None = None,
    det_threshold: float | None = None,
    python: str | None = None,
    keep_outside_lungs: bool | None = None,
) -> list[str]:
    """``glance refilter``: re-threshold a finished result from its saved maps; a threshold or
    ``keep_outside_lungs`` left None stays as the run had it."""
    return _glance(python, "refilter", str(out_dir), *_thresholds(seg_threshold, det_threshold),
                   *_lung_flag(keep_outside_lungs))


def _lung_flag(keep_outside_lungs: bool | None) -> list[str]:
    if keep_outside_lungs is None:
        return []
    return ["--keep-outside-lungs" if keep_outside_lungs else "--no-keep-outside-lungs"]


def _thresholds(seg_threshold: float | None, det_threshold: float | None) -> list[str]:
    pairs = (("--seg-threshold", seg_threshold), ("--det-threshold", det_threshold))
    return [item for flag, value in pairs if value is not None for item in (flag, _number(value))]


def _repeated(flag: str, values: Sequence[str | os.PathLike]) -> list[str]:
    # The engine's list options are argparse "append": one flag per value.
    return [item for value in values for item in (flag, str(value))]


def train_command(
    cases: Sequence[str | os.PathLike],
    base_model: str,
    epochs: int,
    device: str,
    name: str,
    run_dir: str | os.PathLike | None = None,
    data: Sequence[str] = (),
    config: str | os.PathLike | None = None,
    python: str | None = None,
) -> list[str]:
    """``glance train``: fine-tune ``base_model`` on case folders, register it as ``name``.

    The run folder (checkpoints, ``history.csv``, ``curves.png``) is ``run_dir``,
    or a new folder the engine picks. ``data`` adds ``KIND:PATH`` sources.
    """
    return _glance(
        python, "train",
        *([str(config)] if config else []),
        *_repeated("--data", data),
        *_repeated("--cases", cases),
        "--base-model", base_model,
        "--epochs", str(int(epochs)),
        "--device", device,
        "--name", name,
        "--progress-lines",
        *(["--run-dir", str(run_dir)] if run_dir else []),
    )  # fmt: skip


def evaluate_command(
    model: str,
    out_dir: str | os.PathLike,
    cases: Sequence[str | os.PathLike] = (),
    data: Sequence[str] = (),
    split: str = "all",
    device: str = "auto",
    python: str | None = None,
) -> list[str]:
    """``glance evaluate``: score ``model``; ``out_dir`` receives evaluation.json and froc.png.

    ``split="all"`` scores every case: right for a folder held out from training.
    ``test``/``val`` score only the patients the model's training split set aside.
    """
    return _glance(
        python, "evaluate",
        "--model", model,
        *_repeated("--data", data),
        *_repeated("--cases", cases),
        "--split", split,
        "--out", str(out_dir),
        "--device", device,
        "--progress-lines",
    )  # fmt: skip


def phantom_command(
    out_dir: str | os.PathLike,
    fmt: str = "dicom",
    seed: int | None = None,
    nodules: int | None = None,
    shape: Sequence[int] | None = None,
    spacing: Sequence[float] | None = None,
    python: str | None = None,
) -> list[str]:
    """``glance phantom``: a synthetic chest CT with known nodules (module self-test).

    Writes ``out_dir/ct/`` (DICOM series; ``ct.nrrd`` for ``fmt="nrrd"``),
    ``labels.nrrd`` and ``nodules.json``. ``shape`` is columns x rows x slices,
    ``spacing`` mm in the same order.
    """
    return _glance(
        python, "phantom",
        "--out", str(out_dir),
        "--format", fmt,
        *(["--seed", str(int(seed))] if seed is not None else []),
        *(["--nodules", str(int(nodules))] if nodules is not None else []),
        *(["--shape", "x".join(str(int(v)) for v in shape)] if shape else []),
        *(["--spacing", "x".join(_number(v) for v in spacing)] if spacing else []),
    )  # fmt: skip


def new_run_dir(name: str, now: float | None = None) -> Path:
    """A new training run folder beside the site's models (what ``glance train`` picks without --run-dir)."""
    from glance.registry import user_models_dir

    stamp = time.strftime("%Y%m%d-%H%M%S", time.localtime(now))
    return user_models_dir().parent / "runs" / f"{name}-{stamp}"


def _number(value: float) -> str:
    # repr-exact and locale-independent (a Qt slider gives 0.30000000000000004).
    return f"{float(value):.6g}"


def child_environment(base: Mapping[str, str] | None = None) -> dict[str, str]:
    """Environment for the child: unbuffered output, the engine importable."""
    env = dict(os.environ if base is None else base)
    # Without this a Python child buffers stdout in 8 kB blocks and the
    # progress bar jumps from 0 to 100 %.
    env["PYTHONUNBUFFERED"] = "1"
    env["PYTHONIOENCODING"] = "utf-8"
    training = [str(r) for r in TRAINING_ROOTS if r != ENGINE_ROOT and (r / "glance_training").is_dir()]
    paths = [str(ENGINE_ROOT), *training] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
    env["PYTHONPATH"] = os.pathsep.join(dict.fromkeys(paths))
    return env


# ---------------------------------------------------------------------------
# Progress protocol
# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Progress:
    done: int
    total: int
    text: str = ""

    @property
    def fraction(self) -> float:
        if self.total <= 0:
            return 0.0
        return min(1.0, max(0.0, self.done / self.total))


@dataclass(frozen=True)
class Stage:
    name: str


@dataclass(frozen=True)
class Metric:
    values: dict[str, float]


def parse_line(line: str) -> Progress | Stage | Metric | None:
    """One stdout line of the protocol, or None for ordinary text."""
    line = line.strip()
    if m := _PROGRESS.match(line):
        return Progress(int(m.group(1)), int(m.group(2)), m.group(3).strip())
    if m := _STAGE.match(line):
        return Stage(m.group(1))
    if m := _METRIC.match(line):
        values: dict[str, float] = {}
        for token in m.group(1).split():
            key, sep, raw = token.partition("=")
            if not sep:
                return None
            try:
                values[key] = float(raw)
            except ValueError:
                return None
        return Metric(values)
    return None


def failure_message(what: str, reason: object) -> str:
    """``"<what> failed: <reason>"`` on one line: the one message a GUI shows for any failure."""
    text = " ".join(str(reason).split()) if reason is not None else ""
    return f"{what} failed: {text or 'unknown error'}"


def readable_error(stderr_lines: Sequence[str], returncode: int | None) -> str:
    """The one message a user sees when the child failed."""
    for line in reversed(stderr_lines):
        line = line.strip()
        if line:
            return _CLI_ERROR_PREFIX.sub("", line)
    if returncode is not None and returncode < 0:
        return f"the engine was stopped by signal {-returncode}"
    return f"the engine stopped with exit code {returncode}"


# ---------------------------------------------------------------------------
# Background job
# ---------------------------------------------------------------------------


class JobState(enum.Enum):
    NOT_STARTED = "not started"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"

    @property
    def finished(self) -> bool:
        return self in (JobState.SUCCEEDED, JobState.FAILED, JobState.CANCELLED)


@dataclass
class JobStatus:
    """What a GUI shows; updated by :meth:`BackgroundJob.poll`."""

    state: JobState = JobState.NOT_STARTED
    progress: Progress | None = None
    stage: str | None = None
    metrics: list[dict[str, float]] = field(default_factory=list)
    returncode: int | None = None
    error: str | None = None

    @property
    def fraction(self) -> float | None:
        return None if self.progress is None else self.progress.fraction


# After the child exits, output still in the pipes is read for at most this long;
# a grandchild that inherited the pipes must not keep the job "running".
_DRAIN_SECONDS = 2.0


class BackgroundJob:
    """A child process whose output is read on threads and consumed by poll().

    ``poll()`` never blocks, so a Qt timer can call it every 100 ms; plain
    Python can call ``wait()``. The child starts in its own process group
    (POSIX session / Windows process group) so ``cancel()`` can end it and
    everything it started, e.g. data-loader workers or a launcher's child.
    """

    def __init__(
        self,
        command: Sequence[str],
        env: Mapping[str, str] | None = None,
        cwd: str | os.PathLike | None = None,
        log_lines: int = 500,
    ) -> None:
        self.command = [str(c) for c in command]
        self.env = child_environment() if env is None else dict(env)
        self.cwd = cwd
        self.status = JobStatus()
        self.stdout_tail: deque[str] = deque(maxlen=log_lines)
        self.stderr_tail: deque[str] = deque(maxlen=log_lines)
        self._process: subprocess.Popen | None = None
        self._lines: queue.Queue[tuple[str, str | None]] = queue.Queue()
        self._open_streams = 0
        self._exited_at: float | None = None
        self._cancelled = False

    # -- lifecycle ---------------------------------------------------------

    def start(self) -> BackgroundJob:
        if self._process is not None:
            raise RuntimeError("job already started")
        log.debug("starting %s", " ".join(self.command))
        self._process = subprocess.Popen(
            self.command,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=self.env,
            cwd=self.cwd,
            text=True,
            encoding="utf-8",
            errors="replace",
            bufsize=1,
            **_new_process_group_kwargs(),
        )
        self.status.state = JobState.RUNNING
        for name, stream in (("stdout", self._process.stdout), ("stderr", self._process.stderr)):
            self._open_streams += 1
            threading.Thread(target=self._read, args=(name, stream), daemon=True).start()
        return self

    @property
    def pid(self) -> int | None:
        return None if self._process is None else self._process.pid

    def poll(self) -> JobStatus:
        """Consume the output read so far and update :attr:`status`; never blocks."""
        self._drain()
        if self.status.state is not JobState.RUNNING:
            return self.status
        code = self._process.poll()
        if code is None:
            return self.status
        if self._exited_at is None:
            self._exited_at = time.monotonic()
        if self._open_streams and time.monotonic() - self._exited_at < _DRAIN_SECONDS:
            return self.status  # output still arriving; finish on a later poll
        self._finish(code)
        return self.status

    def wait(self, timeout: float | None = None, interval: float = 0.05) -> JobStatus:
        """Poll until the job has finished (or ``timeout`` seconds passed)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while not self.poll().state.finished:
            if deadline is not None and time.monotonic() > deadline:
                break
            time.sleep(interval)
        return self.status

    def cancel(self, grace: float = 3.0) -> JobStatus:
        """Stop the child and all its descendants; returns the final status.

        The group first gets an interrupt (the engine turns it into
        ``Cancelled`` and removes half-written files), then, after ``grace``
        seconds, a kill that nothing survives.
        """
        if self._process is None or self.status.state.finished:
            return self.status
        self._cancelled = True
        _interrupt_tree(self._process)
        try:
            self._process.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            pass
        _kill_tree(self._process)  # also reaches grandchildren that outlived the child
        code = self._process.wait()
        self._exited_at = time.monotonic()
        self._drain()
        self._finish(code)
        return self.status

    # -- internals -----------------------------------------------------------

    def _read(self, name: str, stream) -> None:
        try:
            for line in stream:
                self._lines.put((name, line.rstrip("\r\n")))
        except (OSError, ValueError):  # pipe closed under us by cancel
            pass
        finally:
            self._lines.put((name, None))

    def _drain(self) -> None:
        while True:
            try:
                name, line = self._lines.get_nowait()
            except queue.Empty:
                return
            if line is None:
                self._open_streams -= 1
            elif name == "stderr":
                self.stderr_tail.append(line)
            else:
                self._handle_stdout(line)

    def _handle_stdout(self, line: str) -> None:
        event = parse_line(line)
        if isinstance(event, Progress):
            self.status.progress = event
        elif isinstance(event, Stage):
            self.status.stage = event.name
        elif isinstance(event, Metric):
            self.status.metrics.append(event.values)
        else:
            self.stdout_tail.append(line)

    def _finish(self, code: int) -> None:
        self.status.returncode = code
        if self._cancelled:
            self.status.state = JobState.CANCELLED
        elif code == 0:
            self.status.state = JobState.SUCCEEDED
        else:
            self.status.state = JobState.FAILED
            self.status.error = readable_error(list(self.stderr_tail), code)
        for stream in (self._process.stdout, self._process.stderr):
            if stream is not None and self._open_streams == 0:
                stream.close()
        log.debug("job %s: %s (exit %s)", self.command[3:4], self.status.state.value, code)


def _new_process_group_kwargs() -> dict:
    if sys.platform == "win32":
        flags = subprocess.CREATE_NEW_PROCESS_GROUP | subprocess.CREATE_NO_WINDOW
        return {"creationflags": flags}
    return {"start_new_session": True}


def _interrupt_tree(process: subprocess.Popen) -> None:
    if sys.platform == "win32":
        try:
            process.send_signal(signal.CTRL_BREAK_EVENT)
        except OSError:
            pass
        return
    try:
        os.killpg(process.pid, signal.SIGINT)
    except (ProcessLookupError, PermissionError):
        pass


def _kill_tree(process: subprocess.Popen) -> None:
    if sys.platform == "win32":
        # taskkill /T walks the parent-child tree, which Windows has no group kill for.
        subprocess.run(
            ["taskkill", "/F", "/T", "/PID", str(process.pid)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            check=False,
            creationflags=subprocess.CREATE_NO_WINDOW,
        )
        return
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


# ---------------------------------------------------------------------------
# Environment checks for the GUI
# ---------------------------------------------------------------------------


class Source(enum.Enum):
    """Where a missing package must come from; the GUI must respect this."""

    PYTORCH_EXTENSION = "PyTorch extension"  # never a bare pip install of torch
    PIP = "pip"
    SLICER = "Slicer"  # shipped with Slicer: never installed or replaced by us


@dataclass(frozen=True)
class Dependency:
    module: str
    distribution: str
    source: Source
    requirement: str
    present: bool
    version: str | None


# (import name, distribution name, source, pip requirement)
_REQUIRED: tuple[tuple[str, str, Source, str], ...] = (
    ("torch", "torch", Source.PYTORCH_EXTENSION, "torch>=2.8"),
    # Only for DICOM-SEG export. Every highdicom that works on numpy 2 needs pydicom 3, which
    # Slicer 5.10 does not ship (docs/compatibility.md): there it is not requested at all.
    ("highdicom", "highdicom", Source.PIP, "highdicom>=0.27"),
    ("safetensors", "safetensors", Source.PIP, "safetensors>=0.4"),
    ("nrrd", "pynrrd", Source.PIP, "pynrrd>=1.0"),
    ("tqdm", "tqdm", Source.PIP, "tqdm>=4.66"),
    # Decoders for compressed DICOM (JPEG lossless/extended, JPEG-LS, JPEG 2000) that Slicer's
    # pydicom cannot decode alone; they need only numpy.
    ("pylibjpeg", "pylibjpeg", Source.PIP, "pylibjpeg>=2.0"),
    ("libjpeg", "pylibjpeg-libjpeg", Source.PIP, "pylibjpeg-libjpeg>=2.1"),
    ("openjpeg", "pylibjpeg-openjpeg", Source.PIP, "pylibjpeg-openjpeg>=2.3"),
    ("jpeg_ls", "pyjpegls", Source.PIP, "pyjpegls>=1.2"),
    ("pydicom", "pydicom", Source.SLICER, "pydicom"),
    ("SimpleITK", "SimpleITK", Source.SLICER, "SimpleITK"),
    ("numpy", "numpy", Source.SLICER, "numpy"),
)


def dependency_status() -> list[Dependency]:
    """Which engine dependencies are importable, without importing them.

    ``find_spec`` on a top-level name only locates the package, so checking
    for torch costs milliseconds instead of the seconds an import takes.
    """
    result = []
    for module, dist, source, requirement in _REQUIRED:
        present = importlib.util.find_spec(module) is not None
        try:
            version = importlib.metadata.version(dist) if present else None
        except importlib.metadata.PackageNotFoundError:
            version = None
        result.append(Dependency(module, dist, source, requirement, present, version))
    return result


def missing_pip_requirements(status: Sequence[Dependency]) -> list[str]:
    """Requirements the GUI may ``pip_install`` after asking the user (highdicom only where the
    pydicom Slicer ships is 3 or later: installing it would otherwise replace Slicer's pydicom)."""
    pydicom = next((d for d in status if d.module == "pydicom"), None)
    seg_possible = pydicom is None or _major(pydicom.version) >= 3
    return [d.requirement for d in status if not d.present and d.source is Source.PIP
            and (d.module != "highdicom" or seg_possible)]


def pip_install_arguments(status: Sequence[Dependency]) -> list[str]:
    """The missing requirements plus pins of the packages Slicer ships, so that pip fails rather
    than replace one of them to satisfy a dependency."""
    missing = missing_pip_requirements(status)
    if not missing:
        return []
    pins = [f"{d.distribution}=={d.version}" for d in status if d.source is Source.SLICER and d.version]
    return missing + pins


def _major(version: str | None) -> int:
    try:
        return int((version or "0").split(".")[0])
    except ValueError:
        return 0


def gpu_names(timeout: float = 5.0) -> list[str]:
    """Names of the NVIDIA GPUs, from ``nvidia-smi`` so that torch stays unloaded.

    An empty list when there is no driver, no GPU or the query fails.
    """
    exe = shutil.which("nvidia-smi")
    if exe is None:
        return []
    try:
        out = subprocess.run(
            [exe, "--query-gpu=name", "--format=csv,noheader"],
            capture_output=True, text=True, timeout=timeout, check=True,
        )  # fmt: skip
    except (OSError, subprocess.SubprocessError):
        return []
    return [line.strip() for line in out.stdout.splitlines() if line.strip()]
