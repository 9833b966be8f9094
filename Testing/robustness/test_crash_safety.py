"""Crash safety of `glance segment` as a real process: SIGKILL, SIGINT, two runs into one folder.

- SIGKILL at 10 random moments of a run over a previous result: the folder then
  holds a complete result (the previous one, or the new one if the kill came
  after the swap), and the next run removes every temporary folder.
- SIGINT: exit 130 within 2 s with a one-line message, nothing left behind.
- Two concurrent runs into one folder: the second refuses (lock), the first completes.
"""

from __future__ import annotations

import random
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

from .conftest import ERROR_LINE, RECORD, check_complete_result, leftovers, run_in_process, segment_args

N_KILLS = 10
SIGINT_LIMIT_S = 2.0


def _popen(argv: list[str]) -> subprocess.Popen:
    import os

    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-m", "glance.cli", *argv], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env)


def _wait_for_progress(proc: subprocess.Popen, timeout: float = 120) -> None:
    """Block until the run prints its first PROGRESS line (inference has started, the lock is held)."""
    timer = threading.Timer(timeout, proc.kill)  # a run that never progresses fails instead of hanging
    timer.start()
    try:
        for line in proc.stdout:
            if line.startswith("PROGRESS"):
                return
        raise AssertionError(f"the run ended before inference: {proc.wait()} {proc.stderr.read()}")
    finally:
        timer.cancel()


def _temporaries(out: Path) -> list[str]:
    inside = [p.name for p in out.rglob("*") if p.name.startswith(".tmp-")] if out.exists() else []
    return sorted(set(leftovers(out)) - {out.name}) + inside


def _record(case: str, expected: str, observed: str, problems: list[str]) -> None:
    """One row of the robustness table; the test fails on any problem, after the row is written."""
    RECORD.add("crash", case, expected, observed + "".join(f"; PROBLEM: {p}" for p in problems), not problems)
    assert not problems, problems


def test_sigkill_at_random_moments(sources, model_dir, tmp_path):
    out = tmp_path / "result"
    argv = segment_args(sources.nrrd, out, model_dir, "--force")
    for _ in range(2):  # the second, warm run (file caches filled) times a typical run
        start = time.perf_counter()
        first = subprocess.run([sys.executable, "-m", "glance.cli", *argv], capture_output=True, text=True,
                               timeout=300)
        duration = time.perf_counter() - start
        assert first.returncode == 0, first.stderr
    previous = (out / "report.json").read_bytes()
    check_complete_result(out)

    rng = random.Random(20240601)
    moments = sorted(rng.uniform(0.2, duration) for _ in range(N_KILLS))
    ends, problems = [], []
    for moment in moments:
        proc = _popen(argv)
        time.sleep(moment)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
        if proc.returncode != -signal.SIGKILL:  # finished before the kill: a complete new result
            ends.append(f"{moment:.1f}s: finished first (exit {proc.returncode})")
        try:
            report = check_complete_result(out)
        except AssertionError as err:
            problems.append(f"kill at {moment:.1f} s left an incomplete folder: {err}")
            continue
        state = "previous result" if (out / "report.json").read_bytes() == previous else "new complete result"
        previous = (out / "report.json").read_bytes()
        ends.append(f"{moment:.1f}s: {state}, {len(_temporaries(out))} temporaries")
        assert report["n_nodules"] == len(report["nodules"])

    final = subprocess.run([sys.executable, "-m", "glance.cli", *argv], capture_output=True, text=True, timeout=300)
    if final.returncode != 0:
        problems.append(f"the run after the kills failed: {final.stderr[-300:]}")
    survivors = _temporaries(out)
    if survivors:
        problems.append(f"temporaries survive the next run: {survivors}")
    RECORD.measurements["SIGKILL moments (s into a run of %.1f s)" % duration] = ", ".join(ends)
    _record(f"SIGKILL at {N_KILLS} random moments",
            "folder holds the previous or a new complete result; the next run removes all temporaries",
            f"{sum('previous' in e for e in ends)} x previous, {sum('new complete' in e for e in ends)} x new "
            f"complete result; {len(survivors)} temporaries after the next run", problems)


def test_sigint_exits_within_2s_and_cleans_up(sources, model_dir, tmp_path):
    out = tmp_path / "result"
    proc = _popen(segment_args(sources.nrrd, out, model_dir, "--progress-lines", "--batch", "1"))
    _wait_for_progress(proc)
    sent = time.perf_counter()
    proc.send_signal(signal.SIGINT)
    try:
        proc.wait(timeout=30)
    finally:
        proc.kill()
    seconds = time.perf_counter() - sent
    stderr = proc.stderr.read()
    lines = stderr.splitlines()
    problems = []
    if proc.returncode != 130:
        problems.append(f"exit {proc.returncode}, expected 130")
    if seconds > SIGINT_LIMIT_S:
        problems.append(f"took {seconds:.2f} s")
    if not lines or lines[-1] != "glance segment: interrupted" or "Traceback" in stderr:
        problems.append(f"stderr ends {lines[-3:]}")
    if leftovers(out):
        problems.append(f"left behind: {leftovers(out)}")
    RECORD.measurements["time from SIGINT to exit"] = f"{seconds:.2f} s"
    _record("SIGINT during inference", "exit 130 within 2 s, 'glance segment: interrupted', nothing left",
            f"exit {proc.returncode} after {seconds:.2f} s: {lines[-1] if lines else ''}", problems)


def test_second_concurrent_run_refuses_and_first_completes(sources, model_dir, tmp_path):
    out = tmp_path / "result"
    first = _popen(segment_args(sources.nrrd, out, model_dir, "--progress-lines", "--batch", "1"))
    _wait_for_progress(first)
    second = run_in_process(segment_args(sources.nrrd, out, model_dir, "--force"))
    first_rc = first.wait(timeout=300)
    first_err = first.stderr.read()
    problems = []
    if second.rc != 2 or len(second.stderr_lines) != 1 or not ERROR_LINE.match(second.stderr_lines[0]) \
            or "another GLANCE run is writing" not in second.stderr_lines[0]:
        problems.append(f"second run: exit {second.rc}, {second.stderr_lines}")
    if first_rc != 0:
        problems.append(f"first run: exit {first_rc}: {first_err[-300:]}")
    else:
        check_complete_result(out)
    if _temporaries(out):
        problems.append(f"temporaries: {_temporaries(out)}")
    _record("two concurrent runs into one folder", "second: exit 2 (lock); first: exit 0, complete",
            f"second {second.describe()}; first exit {first_rc}", problems)
