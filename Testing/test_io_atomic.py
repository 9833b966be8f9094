"""glance.io.atomic: atomic files and result folders with a lock."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

from glance.errors import InputError
from glance.io import OutputFolder, atomic_path, atomic_write_bytes, atomic_write_text
from glance.io.atomic import MARKER


def hidden(folder):
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


def test_atomic_write_replaces_and_leaves_no_temp(tmp_path):
    target = tmp_path / "report.json"
    atomic_write_text(target, "first")
    atomic_write_bytes(target, b"second")
    assert target.read_bytes() == b"second"
    assert [p.name for p in tmp_path.iterdir()] == ["report.json"]


def test_atomic_path_keeps_extension_and_previous_content_on_error(tmp_path):
    target = tmp_path / "seg.nii.gz"
    target.write_bytes(b"old")
    with pytest.raises(RuntimeError, match="boom"):
        with atomic_path(target) as temp:
            assert temp.parent == tmp_path and temp.name.endswith("-seg.nii.gz") and temp.name.startswith(".")
            temp.write_bytes(b"half")
            raise RuntimeError("boom")
    assert target.read_bytes() == b"old" and hidden(tmp_path) == []


def test_atomic_path_requires_something_written(tmp_path):
    with pytest.raises(FileNotFoundError, match="nothing was written"):
        with atomic_path(tmp_path / "x.txt"):
            pass
    assert list(tmp_path.iterdir()) == []


def run_once(out, content: str, force: bool = False):
    with OutputFolder(out, force=force) as work:
        assert work.parent == out.parent and work.name.startswith(f".{out.name}.tmp-")
        (work / "result.txt").write_text(content)
    return out


def test_success_swaps_in_and_force_replaces(tmp_path):
    out = tmp_path / "results" / "case1"
    run_once(out, "one")
    assert sorted(p.name for p in out.iterdir()) == [MARKER, "result.txt"]
    assert (out / "result.txt").read_text() == "one"
    with pytest.raises(InputError, match=f"{out}: output folder exists; use --force"):
        run_once(out, "two")
    run_once(out, "two", force=True)
    assert (out / "result.txt").read_text() == "two"
    assert hidden(out.parent) == [] and sorted(p.name for p in out.parent.iterdir()) == ["case1", "case1.lock"]


@pytest.mark.parametrize("error", [RuntimeError, KeyboardInterrupt])
def test_error_keeps_previous_result_and_removes_temp(tmp_path, error):
    out = tmp_path / "case"
    run_once(out, "good")
    with pytest.raises(error):
        with OutputFolder(out, force=True) as work:
            (work / "result.txt").write_text("partial")
            raise error()
    assert (out / "result.txt").read_text() == "good"
    assert hidden(tmp_path) == []


def test_concurrent_run_is_refused_in_process_and_from_another_process(tmp_path):
    out = tmp_path / "case"
    script = textwrap.dedent(f"""
        from glance.errors import InputError
        from glance.io import OutputFolder
        try:
            with OutputFolder({str(out)!r}):
                pass
        except InputError as err:
            print(err)
    """)
    with OutputFolder(out):
        with pytest.raises(InputError, match=f"{out}: another GLANCE run is writing this output folder"):
            with OutputFolder(out):
                pass
        other = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
        assert "another GLANCE run is writing this output folder" in other.stdout
    run_once(out, "after", force=True)  # the lock is free again
    assert (out / "result.txt").read_text() == "after"


def test_stale_temp_folders_of_killed_runs_are_removed(tmp_path):
    out = tmp_path / "case"
    for stale in (".case.tmp-99999", ".case.old-99998"):
        (tmp_path / stale).mkdir()
        (tmp_path / stale / "junk").write_text("x")
    (tmp_path / ".other.tmp-1").mkdir()  # someone else's: untouched
    run_once(out, "new")
    assert hidden(tmp_path) == [".other.tmp-1"]


def test_force_never_deletes_a_foreign_folder_or_file(tmp_path):
    mine = tmp_path / "my-documents"
    mine.mkdir()
    (mine / "thesis.docx").write_text("precious")
    with pytest.raises(InputError, match=f"{mine}: exists and is not a GLANCE output folder"):
        run_once(mine, "x", force=True)
    assert (mine / "thesis.docx").read_text() == "precious" and hidden(tmp_path) == []
    (tmp_path / "file").write_text("f")
    with pytest.raises(InputError, match="exists and is not a folder"):
        run_once(tmp_path / "file", "x", force=True)


def test_empty_existing_folder_is_used_without_force(tmp_path):
    out = tmp_path / "empty"
    out.mkdir()
    run_once(out, "ok")
    assert (out / "result.txt").read_text() == "ok"


def test_atomic_files_get_ordinary_permissions(tmp_path):
    """A writer that creates its file 0600 (safetensors does) still yields a file others may read."""
    import os
    import stat

    from glance.io.atomic import atomic_path

    target = tmp_path / "weights.bin"
    with atomic_path(target) as temp:
        fd = os.open(temp, os.O_WRONLY | os.O_CREAT, 0o600)
        os.write(fd, b"x")
        os.close(fd)
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(target.stat().st_mode) == 0o666 & ~umask
