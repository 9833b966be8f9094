"""Shared fixtures of the robustness suite: inputs, a model, a CLI runner, and the outcome table.

Each test records its cases' expected and observed outcomes in ``RECORD``;
when the whole suite ran (every case of every file, no -k/-m selection),
the session writes ``README.md`` from them, so the table is always the one
the last complete run produced.
"""

from __future__ import annotations

import io
import json
import logging
import os
import re
import sys
import time
import warnings
from contextlib import redirect_stderr, redirect_stdout
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from glance.io import atomic_write_text

from .make_inputs import CASES, NEEDS_SHARED_DATA, DATA, base_sources

HERE = Path(__file__).resolve().parent
README = HERE / "README.md"
TEST_FILES = {"test_bad_inputs.py", "test_models_hostile.py", "test_fuzz_dicom.py", "test_crash_safety.py"}
ERROR_LINE = re.compile(r"^glance segment: error: .+")
TMP_PREFIX = re.compile(r"/\S*?/pytest-\d+/[^/\s]+/")
EXPECTED_FILES = {".glance-output", "maps", "nodules.csv", "nodules.mrk.json", "nodules.seg.nrrd", "report.json",
                  "nodules.tbl.tsv", "nodules_seg.dcm", "snapshots"}


# ------------------------------------------------------------ outcome record


@dataclass
class Record:
    rows: list[tuple[str, str, str, str, bool]] = field(default_factory=list)  # group, case, expected, observed, ok
    measurements: dict[str, str] = field(default_factory=dict)
    required: set[str] = field(default_factory=set)  # case names the full suite must record

    def add(self, group: str, case: str, expected: str, observed: str, ok: bool) -> None:
        observed = TMP_PREFIX.sub("<tmp>/", observed)  # the table does not change with pytest's temp folders
        self.rows.append((group, case, expected, observed.replace("|", "\\|").replace("\n", " "), ok))

    def complete(self) -> bool:
        return self.required <= {row[1] for row in self.rows}

    def markdown(self) -> str:
        ends = {"exit 0": 0, "exit 2": 0, "other": 0}
        for row in self.rows:
            ends[row[3][:6] if row[3][:6] in ends else "other"] += 1
        lines = [
            "# Robustness suite: hostile and broken input, crash safety, resource limits",
            "",
            "Written by the test run itself (`pytest Testing/robustness`, the whole folder, no `-k`/`-m`);",
            "do not edit by hand. Every bad input is built at test time by `make_inputs.py` from the",
            "phantom and ../shared/data. A refusal is exit 2 with exactly one stderr line",
            "`glance segment: error: <file>: <problem>` and no output folder; a recovery is exit 0",
            "with the stated warning and a complete result folder. Never a traceback.",
            "",
            f"{len(self.rows)} cases: {ends['exit 0']} end in exit 0 (recovery), "
            f"{ends['exit 2']} in exit 2 (refusal), {ends['other']} are crash-safety or fuzzing checks "
            "of many runs each; "
            f"{sum(not r[4] for r in self.rows)} differ from the expectation.",
            "",
            "| group | case | expected | observed | as expected |",
            "|---|---|---|---|---|",
        ]
        lines += [f"| {g} | {c} | {e} | {o} | {'yes' if ok else '**NO**'} |" for g, c, e, o, ok in self.rows]
        lines += ["", "## Measurements", ""]
        lines += [f"- {k}: {TMP_PREFIX.sub('<tmp>/', v)}" for k, v in sorted(self.measurements.items())]
        return "\n".join(lines) + "\n"


RECORD = Record()


def _whole_suite(session: pytest.Session) -> bool:
    opt = session.config.option
    if getattr(opt, "keyword", "") or getattr(opt, "markexpr", "") or getattr(opt, "deselect", None):
        return False
    if getattr(opt, "lf", False) or getattr(opt, "numprocesses", None):
        return False  # each xdist worker would only see its share
    ran = {Path(str(item.path)).name for item in session.items if Path(str(item.path)).parent == HERE}
    return ran == TEST_FILES


@pytest.fixture(scope="session", autouse=True)
def outcome_table(request):
    RECORD.required |= {c.name for c in CASES if c.name not in NEEDS_SHARED_DATA or DATA.is_dir()}
    yield RECORD
    if _whole_suite(request.session) and RECORD.complete():
        atomic_write_text(README, RECORD.markdown())


# ------------------------------------------------------------- inputs, model


@pytest.fixture(scope="session")
def sources(tmp_path_factory):
    return base_sources(tmp_path_factory.mktemp("sources"))


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory) -> Path:
    """An untrained small model; 5 mm network spacing keeps a 64 x 64 x 12 run to a few seconds."""
    from glance.model import build_model, config_for
    from glance.model.weights import ModelCard, Preprocessing, save_model

    prep = Preprocessing(pixel_spacing_mm=5.0)
    card = ModelCard(name="robustness", version="0", config={},
                     preprocessing={**prep.__dict__, "window_hu": list(prep.window_hu)})
    return save_model(build_model(config_for("small")), tmp_path_factory.mktemp("model") / "robustness", card)


def segment_args(input_path: Path, out: Path, model: Path, *extra: str) -> list[str]:
    return ["segment", str(input_path), "--out", str(out), "--model", str(model), "--device", "cpu",
            "--no-snapshots", *extra]


# ---------------------------------------------------------------- CLI runner


@dataclass
class CliResult:
    rc: int
    stdout: str
    stderr_lines: list[str]
    seconds: float

    def describe(self) -> str:
        last = self.stderr_lines[-1] if self.stderr_lines else ""
        # The temp folder out before the cut, so a longer or shorter one does not move where the line ends.
        return f"exit {self.rc}: {TMP_PREFIX.sub('<tmp>/', last)[:160]}"


def run_in_process(argv: list[str]) -> CliResult:
    """``glance.cli.main(argv)`` in this process, with stderr exactly as the command writes it.

    pytest's log handlers are taken off the root logger for the call, so ``main``'s
    logging.basicConfig installs the command's own stderr handler (here on a buffer),
    as in a fresh process; every Python warning is shown ("always"), a stricter
    setting than a fresh process's once-per-location default.
    """
    from glance.cli import main

    root = logging.getLogger()
    saved_handlers, saved_level = root.handlers[:], root.level
    root.handlers = []
    out, err = io.StringIO(), io.StringIO()
    start = time.perf_counter()
    try:
        with warnings.catch_warnings(), redirect_stdout(out), redirect_stderr(err):
            warnings.simplefilter("always")
            try:
                rc = main(argv)
            except SystemExit as exc:  # argparse
                rc = exc.code if isinstance(exc.code, int) else 2
    finally:
        logging.captureWarnings(False)
        for handler in root.handlers:
            handler.close()
        root.handlers = saved_handlers
        root.setLevel(saved_level)
    seconds = time.perf_counter() - start
    lines = err.getvalue().splitlines()
    return CliResult(int(rc), out.getvalue(), lines, seconds)


def run_subprocess(argv: list[str], timeout: float = 120, **kwargs):
    """``python -m glance.cli ARGV`` as a real process; returns the CompletedProcess."""
    import subprocess

    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "glance.cli", *argv], capture_output=True, text=True,
                          timeout=timeout, env=env, **kwargs)


def leftovers(out: Path) -> list[str]:
    """What a failed run left: the output folder, or temporary siblings of it (the lock file is by design)."""
    found = [out.name] if out.exists() else []
    if out.parent.is_dir():
        found += [p.name for p in out.parent.iterdir() if p.name.startswith((f".{out.name}.tmp-", f".{out.name}.old-"))]
    return found


def check_complete_result(out: Path) -> dict:
    """A complete result folder: the marker, only known names, a parseable report; returns the report."""
    names = {p.name for p in out.iterdir()}
    assert ".glance-output" in names and "report.json" in names, names
    assert names <= EXPECTED_FILES, names - EXPECTED_FILES
    assert not [p for p in out.rglob("*") if p.name.startswith(".tmp-")]
    return json.loads((out / "report.json").read_text())
