"""Hostile and broken model folders: each a one-line error naming the file; nothing unpickled or run."""

from __future__ import annotations

import pickle

import pytest

from .conftest import ERROR_LINE, RECORD, leftovers, run_in_process, segment_args
from .make_inputs import MODEL_CASES, ModelCase, _Payload

NAMED_FILE = {"card": "card.json", "weights": "model.safetensors", "evil": "evil.safetensors"}


def test_payload_would_leave_a_marker(tmp_path):
    """The payload is live: unpickling it really creates the marker (so its absence below means something)."""
    marker = tmp_path / "ran"
    pickle.loads(pickle.dumps(_Payload(marker)))  # noqa: S301 - that is the point of this test
    assert marker.exists()


@pytest.mark.parametrize("case", MODEL_CASES, ids=[c.name for c in MODEL_CASES])
def test_hostile_model(case: ModelCase, sources, model_dir, tmp_path):
    folder, marker, out = tmp_path / "model", tmp_path / "code-ran", tmp_path / "result"
    case.build(model_dir, folder, marker)
    named = folder / NAMED_FILE[case.names]
    result = run_in_process(segment_args(sources.nrrd, out, folder))
    line = result.stderr_lines[-1] if result.stderr_lines else ""
    problems = []
    if result.rc != 2:
        problems.append(f"exit {result.rc}, expected 2")
    if len(result.stderr_lines) != 1 or not ERROR_LINE.match(line):
        problems.append(f"stderr is not one error line: {result.stderr_lines}")
    if str(named) not in line or case.detail not in line:
        problems.append(f"the error does not name {named.name} and say {case.detail!r}")
    if marker.exists():
        problems.append("CODE RAN: the payload was unpickled")
    if leftovers(out):
        problems.append(f"left behind: {leftovers(out)}")
    RECORD.add("model", case.name, f"exit 2, names {named.name}: {case.detail}; nothing unpickled",
               result.describe() + "".join(f"; PROBLEM: {p}" for p in problems), not problems)
    assert not problems, problems
