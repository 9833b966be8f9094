"""Synthetic training cases: phantoms generated on the fly, and nodules inserted into real scans.

Both wrap :mod:`glance.phantom` (the generator and ``insert_nodules`` live there); this
module only makes them lazy cases. A case is generated when loaded, from a seed fixed
when the source is built, so case n is the same every time it is loaded. Nothing is
stored unless ``GLANCE_PHANTOM_CACHE`` names a folder (:mod:`.phantom_store`).

Inserted cases keep the background scan's patient id: a patient's scan used as a
background is still that patient for the split. Real nodule crops of held-out patients
are refused by default (``exclude_patients``): the five 3D crops of ``shared/data`` all
come from the reserved scans LIDC-IDRI-0001 and -0003, so they may not be inserted into
training backgrounds.

Benchmarks that build the same phantom sources several times (one training per variant)
generate each phantom once inside :func:`phantom_cache`.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from glance.errors import InputError
from glance.volume import Volume

from . import phantom_store
from .cases import Annotation, Case, CaseList, CaseSource, LoadedCase
from .split import RESERVED_TEST_PATIENTS

log = logging.getLogger(__name__)


def _derived_seed(seed: int, n: int) -> int:
    return int(np.random.SeedSequence([seed, n]).generate_state(1)[0])


def _annotations(phantom_nodules) -> list[Annotation]:
    return [Annotation(tuple(float(v) for v in n.centre_lps), float(n.diameter_mm), label=int(n.id),
                       kind=f"{n.nodule_type}, {n.attachment}")
            for n in phantom_nodules]


class _Generated:
    """Generates once per load and hands the CT, labels and findings to :class:`Case` in turn."""

    def __init__(self, make, *args):
        self.make = make  # (*args) -> (ct, labels, findings)
        self.args = args
        self._last: tuple | None = None

    def ct(self) -> Volume:
        self._last = self.make(*self.args)
        return self._last[0]

    def labels(self, ct: Volume) -> np.ndarray:
        return self._last[1]

    def findings(self, ct: Volume, labels) -> list[Annotation]:
        found, self._last = self._last[2], None  # the case now owns the arrays: drop ours
        return found


@dataclass
class PhantomCache:
    """The phantoms generated inside one :func:`phantom_cache` context, and what they cost."""

    generated: int = 0  # phantoms generated (each config once)
    seconds: float = 0.0  # time spent generating them
    _phantoms: dict[str, tuple] = field(default_factory=dict, repr=False)


_cache: PhantomCache | None = None


@contextmanager
def phantom_cache() -> Iterator[PhantomCache]:
    """While open, every phantom case loaded (from any :func:`phantom_cases` source) is generated once.

    A phantom is a pure function of its config (seed included), so a case loads exactly the
    same data with or without the cache; only the generation time is saved, at the cost of
    keeping every phantom in memory until the context closes. Cases loaded from equal configs
    share the arrays: consumers must treat them as read-only (training and evaluation do).
    Yields the :class:`PhantomCache` (counts and seconds); a nested context shares the outer one.
    The cache belongs to this process: DataLoader worker processes do not share it.
    """
    global _cache
    if _cache is not None:
        yield _cache
        return
    _cache = PhantomCache()
    try:
        yield _cache
    finally:
        _cache = None


def _make_phantom(config) -> tuple[Volume, np.ndarray, list[Annotation]]:
    cache = _cache
    if cache is None:
        return _stored_or_generated(config)
    key = repr(config)  # PhantomConfig is an unhashable dataclass of plain values; its repr is every field
    if key not in cache._phantoms:
        start = time.perf_counter()
        cache._phantoms[key] = _stored_or_generated(config)
        cache.generated += 1
        cache.seconds += time.perf_counter() - start
    return cache._phantoms[key]


def _stored_or_generated(config) -> tuple[Volume, np.ndarray, list[Annotation]]:
    stored = phantom_store.load(config)
    if stored is not None:
        return stored
    phantom = _generate_phantom(config)
    phantom_store.save(config, phantom)
    return phantom


def _generate_phantom(config) -> tuple[Volume, np.ndarray, list[Annotation]]:
    from glance.phantom import make_phantom

    p = make_phantom(config=config)
    return p.ct, p.labels, _annotations(p.nodules)


def phantom_cases(n_cases: int, seed: int = 0, config=None, name: str = "phantom") -> CaseList:
    """``n_cases`` synthetic chest CTs (:func:`glance.phantom.make_phantom`), each its own patient."""
    from glance.phantom import PhantomConfig

    base = config or PhantomConfig()
    cases = []
    for n in range(n_cases):
        s = _derived_seed(seed, n)
        gen = _Generated(_make_phantom, replace(base, seed=s))
        cases.append(Case(f"phantom-{s}", f"phantom-{s}", name, gen.ct, gen.labels, gen.findings,
                          metadata={"seed": s}))
    return CaseList(name, cases)


def _insert_into(background: Case, config, crops) -> tuple[Volume, np.ndarray, list[Annotation]]:
    from glance.phantom.insert import insert_nodules

    loaded: LoadedCase = background.load()
    # The background's own nodules keep their labels 1..M; inserted ones are numbered after them.
    p = insert_nodules(loaded.ct, config, crops, existing=None, existing_labels=loaded.labels)
    return p.ct, p.labels, loaded.nodules + _annotations(p.nodules)


def inserted_cases(
    backgrounds: CaseSource,
    config=None,
    crops_path: str | Path | None = None,
    seed: int = 0,
    exclude_patients: tuple[str, ...] = RESERVED_TEST_PATIENTS,
    name: str = "inserted",
) -> CaseList:
    """Each background case with nodules inserted (:func:`glance.phantom.insert.insert_nodules`).

    ``config`` is an ``InsertConfig`` (its seed is replaced per case); ``crops_path`` the
    ``lidc_nodule_crops_64.npz`` of real nodules for ``source="real"``/``"mixed"``.
    """
    from glance.phantom.insert import InsertConfig, load_crops

    base = config or InsertConfig()
    crops = None
    if crops_path is not None:
        all_crops = load_crops(crops_path)
        crops = [c for c in all_crops if c.name.split(":")[0] not in exclude_patients]
        if len(crops) < len(all_crops):
            log.info("%d of %d real nodule crops come from held-out patients and are not inserted",
                     len(all_crops) - len(crops), len(all_crops))
    if base.source in ("real", "mixed") and not crops:
        raise InputError(f"{crops_path}: no real nodule crops usable for insertion (none given, or all "
                         f"from held-out patients {', '.join(exclude_patients)})")
    cases = []
    for n, bg in enumerate(backgrounds):
        s = _derived_seed(seed, n)
        gen = _Generated(_insert_into, bg, replace(base, seed=s), crops)
        cases.append(Case(f"{bg.case_id}+inserted-{s}", bg.patient_id, name, gen.ct, gen.labels, gen.findings,
                          metadata={"seed": s, "background": bg.case_id}))
    return CaseList(name, cases)
