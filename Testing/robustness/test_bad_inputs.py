"""`glance segment` on every broken or hostile input of make_inputs.CASES: each ends as stated.

A refusal: exit 2, exactly one stderr line ``glance segment: error: <file>: ...``
naming the file and the problem, and no output folder. A recovery: exit 0,
the stated warning, a complete result folder, and the exact HU the case
predicts. Never a traceback, never a hang, nothing written outside --out.
"""

from __future__ import annotations

import os
import resource
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest

from glance.io import read_volume

from .conftest import (
    ERROR_LINE,
    RECORD,
    CliResult,
    check_complete_result,
    leftovers,
    run_in_process,
    run_subprocess,
    segment_args,
)
from .make_inputs import CASES, DATA, NEEDS_SHARED_DATA, Case

HANG_LIMIT_S = 20  # a FIFO reader still blocked after this is unblocked, and the case fails
FAST_CASES_S = {"10,000 non-DICOM files": 20.0, "FIFO given as input": 5.0,
                "unreadable entries (broken link, folder x.dcm, FIFO)": 15.0,
                "gzip bomb NRRD (inflates past RAM)": 5.0, "gzip bomb NIfTI (.nii.gz)": 5.0,
                "Rows/Columns 65535 x 65535": 5.0}
RSS_CASES = {"gzip bomb NRRD (inflates past RAM)", "gzip bomb NIfTI (.nii.gz)", "Rows/Columns 65535 x 65535"}


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


@contextmanager
def unblock_fifos(folder: Path):
    """If a reader is still blocked on a FIFO under ``folder`` after HANG_LIMIT_S, open it for writing
    so the read returns (EOF) and the test fails on time instead of hanging CI."""
    done = threading.Event()

    def watch():
        if done.wait(HANG_LIMIT_S):
            return
        while not done.is_set():
            for fifo in [p for p in folder.rglob("*") if p.is_fifo()]:
                try:
                    os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
                except OSError:
                    pass  # no reader on this one
            time.sleep(0.1)

    thread = threading.Thread(target=watch, daemon=True)
    thread.start()
    try:
        yield
    finally:
        done.set()
        thread.join()


def _refusal_problems(case: Case, built, result, out: Path) -> list[str]:
    problems = []
    if result.rc != 2:
        problems.append(f"exit {result.rc}, expected 2")
    if len(result.stderr_lines) != 1 or not ERROR_LINE.match(result.stderr_lines[0]):
        problems.append(f"stderr is not one error line: {result.stderr_lines}")
    line = result.stderr_lines[-1] if result.stderr_lines else ""
    if str(built.named) not in line:
        problems.append(f"the error does not name {built.named}")
    if case.detail.lower() not in line.lower():
        problems.append(f"the error does not say {case.detail!r}")
    if leftovers(out):
        problems.append(f"left behind: {leftovers(out)}")
    return problems


def _recovery_problems(case: Case, built, result, out: Path) -> list[str]:
    if result.rc != 0:
        return [f"exit {result.rc}, expected 0: {result.stderr_lines[-3:]}"]
    problems = []
    if case.detail and not any(case.detail in line for line in result.stderr_lines):
        problems.append(f"no warning saying {case.detail!r}: {result.stderr_lines}")
    report = check_complete_result(out)
    if built.expected_hu is not None:
        if report["input"]["shape_kji"] != list(built.expected_hu.shape):
            problems.append(f"result grid {report['input']['shape_kji']}, expected {built.expected_hu.shape}")
        hu = read_volume(built.path).array
        if hu.shape != built.expected_hu.shape or not np.array_equal(hu, built.expected_hu):
            problems.append("HU read differ from the expected values")
    stray = [p.name for p in out.parent.iterdir() if p.name not in (out.name, out.name + ".lock", "input")]
    if stray:
        problems.append(f"written outside --out: {stray}")
    return problems


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_bad_input(case: Case, sources, model_dir, tmp_path):
    if case.name in NEEDS_SHARED_DATA and not DATA.is_dir():
        pytest.skip("../shared/data (LIDC-IDRI) not present")
    built = case.build(tmp_path / "input", sources)
    out = tmp_path / "result"
    rss_before = _peak_rss_mb()
    with unblock_fifos(tmp_path / "input"):
        try:
            result = run_in_process(segment_args(built.path, out, model_dir, *built.extra_args))
        except BaseException as exc:  # anything escaping main() is a traceback for the user
            RECORD.add(case.group, case.name, case.summary, f"TRACEBACK {type(exc).__name__}: {exc}", False)
            raise
    rss_growth = _peak_rss_mb() - rss_before
    check = _refusal_problems if case.expect == "refuse" else _recovery_problems
    problems = check(case, built, result, out)
    limit = FAST_CASES_S.get(case.name)
    if limit and result.seconds > limit:
        problems.append(f"took {result.seconds:.1f} s, limit {limit} s")
    if case.name in RSS_CASES:
        RECORD.measurements[f"peak RSS growth, {case.name}"] = f"{rss_growth:.0f} MB (in-process run)"
        if rss_growth > 300:
            problems.append(f"peak RSS grew by {rss_growth:.0f} MB")
    if limit:
        RECORD.measurements[f"time, {case.name}"] = f"{result.seconds:.2f} s"
    observed = result.describe() + (f" [{result.seconds:.1f} s]" if limit else "")
    said = [line for line in result.stderr_lines if case.detail and case.detail in line]
    if case.expect == "recover" and said:
        observed += f" (warning: {said[0][-140:]})"
    RECORD.add(case.group, case.name, case.summary, observed + "".join(f"; PROBLEM: {p}" for p in problems),
               not problems)
    assert not problems, problems


def test_hostile_names_never_reach_a_file_name(sources, model_dir, tmp_path):
    """Beyond the table case: no output path holds any fragment of the hostile header strings."""
    from .make_inputs import hostile_names

    built = hostile_names(tmp_path / "input", sources)
    out = tmp_path / "result"
    result = run_in_process(segment_args(built.path, out, model_dir))
    assert result.rc == 0, result.stderr_lines
    names = [p.name for p in out.rglob("*")]
    for fragment in ("passwd", "..", "患者", "root", "evil", "\x1b"):
        assert not any(fragment in n for n in names), (fragment, names)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["input", "result", "result.lock"]


@pytest.mark.parametrize("name", ["truncated file (header)", "control characters in an error message"])
def test_real_process_prints_one_line(name, sources, model_dir, tmp_path):
    """The in-process runner's stderr emulation agrees with a real `python -m glance.cli` process."""
    case = next(c for c in CASES if c.name == name)
    built = case.build(tmp_path / "input", sources)
    proc = run_subprocess(segment_args(built.path, tmp_path / "result", model_dir, *built.extra_args), timeout=60)
    lines = proc.stderr.splitlines()
    assert proc.returncode == 2 and len(lines) == 1 and ERROR_LINE.match(lines[0]), proc.stderr
    assert str(built.named) in lines[0] and case.detail in lines[0]
    assert "\x1b" not in proc.stderr


def test_the_recorded_line_does_not_depend_on_the_temp_folder():
    # The table in README.md is rewritten by every complete run: a longer pytest temp folder used to move
    # where the 160-character cut fell, so the same outcome gave a different table on another machine.
    line = "glance segment: error: {}/input/series/IM00006.dcm: pixel data holds 7192 bytes, " + "x" * 120
    short, long = ("/tmp/pytest-of-a/pytest-1/test_x0", "/tmp/pytest-of-someone-else/pytest-123/test_bad_input_x0")
    described = [CliResult(2, "", [line.format(folder)], 0.0).describe() for folder in (short, long)]
    assert described[0] == described[1]
    assert described[0].startswith("exit 2: glance segment: error: <tmp>/input/series/IM00006.dcm: pixel data")
