"""The whole repository passes `ruff check` with the settings in pyproject.toml."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_ruff_check_passes():
    # Fail rather than skip: CI installs the test extras, so a missing ruff means a broken set-up,
    # and a skip would let unchecked code through unnoticed.
    assert importlib.util.find_spec("ruff") is not None, (
        'ruff is not installed in this environment: pip install -e ".[test]"'
    )
    out = subprocess.run(
        [sys.executable, "-m", "ruff", "check", "--output-format", "concise", str(ROOT)],
        capture_output=True, text=True, timeout=120, cwd=ROOT,
    )
    assert out.returncode == 0, f"ruff check found problems:\n{out.stdout}{out.stderr}"
