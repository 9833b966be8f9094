"""Generated phantoms kept on disk between runs (``GLANCE_PHANTOM_CACHE=DIR``), so a training,
calibration or evaluation that uses the same phantoms as an earlier run loads them instead of
generating them again (a 352 x 352 x 96 phantom: 5-10 s to generate, 0.4 s to load, 12 MB).

A phantom is a pure function of its config and of the generator, so the file name is a hash of
both: the config's every field, the code of ``glance.phantom`` and the numpy and scipy versions
it draws with. The code counts as parsed (its syntax tree): rewrapping a line or editing a comment
keeps the stored phantoms. Any other change to one of them names a different file, so a stale
phantom is never loaded; old files are simply no longer read (delete the folder to reclaim the space).
Files are written atomically; one that cannot be read is logged, generated again and replaced.
Unset, nothing is stored.
"""

from __future__ import annotations

import ast
import functools
import hashlib
import json
import logging
import os
import zipfile
from pathlib import Path

import numpy as np

from glance.volume import Volume

from .cases import Annotation

log = logging.getLogger(__name__)

ENV = "GLANCE_PHANTOM_CACHE"
Phantom = tuple[Volume, np.ndarray, list[Annotation]]


def store_dir() -> Path | None:
    """The cache folder named by ``GLANCE_PHANTOM_CACHE``, or None when phantoms are not stored."""
    value = os.environ.get(ENV, "").strip()
    return Path(value) if value else None


@functools.cache
def generator_fingerprint() -> str:
    """A hash of everything besides the config that decides a phantom's voxels."""
    import scipy

    import glance.phantom

    digest = hashlib.sha256(f"numpy {np.__version__} scipy {scipy.__version__}".encode())
    for source in sorted(Path(glance.phantom.__file__).parent.glob("*.py")):
        digest.update(source.name.encode() + b"\0" + code_fingerprint(source.read_text(encoding="utf-8")))
    return digest.hexdigest()


def code_fingerprint(source: str) -> bytes:
    """The parsed form of a module's source: blind to layout and comments, not to code. Its form
    follows the Python version, so a new Python only regenerates phantoms, never loads stale ones."""
    return ast.dump(ast.parse(source)).encode()


def phantom_path(folder: Path, config) -> Path:
    key = hashlib.sha256(f"{generator_fingerprint()}\n{config!r}".encode()).hexdigest()[:32]
    return folder / f"phantom-{config.seed}-{key}.npz"


def load(config) -> Phantom | None:
    """The stored phantom of ``config``, or None (no store, not stored yet, or unreadable)."""
    folder = store_dir()
    if folder is None:
        return None
    path = phantom_path(folder, config)
    if not path.is_file():
        return None
    try:
        with np.load(path, allow_pickle=False) as data:
            ct = Volume(data["hu"], tuple(data["spacing"]), tuple(data["origin"]), data["direction"],
                        json.loads(str(data["metadata"])))
            findings = [Annotation(tuple(f["centre_lps"]), f["diameter_mm"], f["excluded"], f["label"], f["kind"])
                        for f in json.loads(str(data["findings"]))]
            labels = data["labels"]
        log.info("phantom seed %s loaded from %s", config.seed, path)
        return ct, labels, findings
    except (OSError, ValueError, KeyError, TypeError, EOFError, zipfile.BadZipFile) as exc:
        log.warning("%s: cannot read the stored phantom (%s); generating it again", path, exc)
        return None


def save(config, phantom: Phantom) -> None:
    """Store ``phantom`` for ``config`` when a store is set; a failure to write is logged, not raised."""
    folder = store_dir()
    if folder is None:
        return
    from glance.io.atomic import atomic_path

    ct, labels, findings = phantom
    rows = [{"centre_lps": list(f.centre_lps), "diameter_mm": f.diameter_mm, "excluded": f.excluded,
             "label": f.label, "kind": f.kind} for f in findings]
    try:
        metadata = json.dumps(ct.metadata)
    except TypeError:  # a generator that starts attaching objects: not storable, so always generated
        log.warning("phantom seed %s: metadata %r is not JSON; not stored", config.seed, ct.metadata)
        return
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with atomic_path(phantom_path(folder, config)) as temp, open(temp, "wb") as fh:
            np.savez_compressed(fh, hu=ct.array, labels=labels, spacing=np.asarray(ct.spacing),
                                origin=np.asarray(ct.origin), direction=ct.direction, metadata=metadata,
                                findings=json.dumps(rows))
    except OSError as exc:
        log.warning("%s: cannot store the phantom (%s); it will be generated again next time", folder, exc)
