"""Atomic writes: a file or a whole result folder appears complete or not at all.

Files are written to a temporary name in the same folder and renamed over the
target (``os.replace`` is atomic within one file system). A result folder is
built in a sibling temporary folder and swapped in at the end, under an
exclusive lock so two runs never write the same output.

Output folder paths come from the user (command line, Slicer dialog); never
derive them from DICOM header strings, which are attacker-controlled.
"""

from __future__ import annotations

import logging
import os
import secrets
import shutil
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from glance.errors import InputError

log = logging.getLogger(__name__)

# Written into every finished result folder; --force replaces only folders that have it,
# so a mistyped --out never deletes a folder of the user's own files.
MARKER = ".glance-output"


def _temp_sibling(path: Path) -> Path:
    # The target name stays at the end: writers that pick the format from the
    # extension (SimpleITK: .nii.gz, .nrrd) still see the right one.
    return path.with_name(f".tmp-{os.getpid()}-{secrets.token_hex(4)}-{path.name}")


def _file_mode() -> int:
    """rw for whoever the umask allows, as open() would give: some writers (safetensors) create
    their files 0600, which would hide a shipped model or a DICOM-SEG from other users."""
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; renamed over ``path`` on success, removed on error."""
    path = Path(path)
    temp = _temp_sibling(path)
    try:
        yield temp
        if not temp.exists():
            raise FileNotFoundError(f"{temp}: nothing was written for {path}")
        if temp.is_file():
            os.chmod(temp, _file_mode())
        os.replace(temp, path)
    except BaseException:
        _remove(temp)
        raise


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    with atomic_path(path) as temp:
        with open(temp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())


def atomic_write_text(path: str | Path, text: str, encoding: str = "utf-8") -> None:
    atomic_write_bytes(path, text.encode(encoding))


class OutputFolder:
    """Build a result folder atomically.

    ``with OutputFolder(out, force) as work:`` yields a temporary folder
    ``.<name>.tmp-<pid>`` beside ``out``; write everything there. On success it
    replaces ``out`` (a previous result stays complete until then); on any
    error, KeyboardInterrupt included, it is removed and ``out`` is untouched.
    An existing non-empty ``out`` is refused unless ``force`` is set, and even
    then only if it is an earlier GLANCE result (has the ``.glance-output``
    marker). ``<out>.lock`` beside it holds an exclusive lock for the whole
    run; it is left in place afterwards because deleting a lock file races
    with a second run opening it. Temporary folders of killed runs are removed
    by the next run (the lock proves they are stale).
    """

    def __init__(self, path: str | Path, force: bool = False) -> None:
        self.path = Path(path).absolute()
        self.force = force
        self.lock_path = self.path.with_name(self.path.name + ".lock")
        self.temp = self.path.with_name(f".{self.path.name}.tmp-{os.getpid()}")
        self._lock_file = None

    def __enter__(self) -> Path:
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise InputError(f"{self.path}: cannot create the output folder ({err.strerror})") from err
        self._lock()
        try:
            self._check_existing()
            self._remove_stale()
            self.temp.mkdir()
        except BaseException:
            self._unlock()
            raise
        return self.temp

    def __exit__(self, exc_type, exc, tb) -> bool:
        try:
            if exc_type is None:
                self._swap_in()
        finally:
            _remove(self.temp)  # nothing left after a successful swap
            self._unlock()
        return False

    def _check_existing(self) -> None:
        out = self.path
        if not (out.exists() or out.is_symlink()):
            return
        if not out.is_dir():
            raise InputError(f"{out}: exists and is not a folder")
        if not any(out.iterdir()):
            return
        if not self.force:
            raise InputError(f"{out}: output folder exists; use --force to replace it")
        if not (out / MARKER).is_file():
            raise InputError(f"{out}: exists and is not a GLANCE output folder; not replaced, even with --force")

    def _remove_stale(self) -> None:
        prefixes = (f".{self.path.name}.tmp-", f".{self.path.name}.old-")
        for entry in self.path.parent.iterdir():
            if entry.name.startswith(prefixes):
                log.info("%s: removing the temporary folder of an interrupted run", entry)
                _remove(entry)

    def _swap_in(self) -> None:
        (self.temp / MARKER).write_text("GLANCE result folder\n")
        if not (self.path.exists() or self.path.is_symlink()):
            os.replace(self.temp, self.path)
            return
        # Directories cannot be renamed over a non-empty one: move the old result
        # aside, move the new one in, then delete the old one.
        old = self.path.with_name(f".{self.path.name}.old-{os.getpid()}")
        os.replace(self.path, old)
        os.replace(self.temp, self.path)
        _remove(old)

    def _lock(self) -> None:
        try:
            handle = open(self.lock_path, "a+b")
        except OSError as err:
            raise InputError(f"{self.lock_path}: cannot create the lock file ({err.strerror})") from err
        if not _try_lock(handle):
            handle.close()
            raise InputError(f"{self.path}: another GLANCE run is writing this output folder (lock {self.lock_path})")
        self._lock_file = handle

    def _unlock(self) -> None:
        if self._lock_file is not None:
            self._lock_file.close()  # closing releases the lock
            self._lock_file = None


def _try_lock(handle) -> bool:
    """Exclusive, non-blocking lock on an open file (flock; msvcrt on Windows)."""
    try:
        if sys.platform == "win32":
            import msvcrt

            handle.seek(0)
            msvcrt.locking(handle.fileno(), msvcrt.LK_NBLCK, 1)
        else:
            import fcntl

            fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        return False
    return True
