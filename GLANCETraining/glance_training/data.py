"""Training data from ``--data`` specs: which sources, split by patient, sampled as patches.

A spec is ``KIND:ARG`` (``KIND:ARG@WEIGHT`` sets the source's share):

    maxslice:DIR     real 2D max-slice crops with reader masks (shared/data/lidc-maxslice-crops)
    crops3d:DIR      real 3D nodule crops with consensus masks (shared/data/lidc-nodule-crops)
    local:DIR        reviewed cases exported by the Slicer module (CT + seg.nrrd / DICOM-SEG / label map)
    lidc:DIR         LIDC-IDRI DICOM series + reader XML
    luna:DIR, tianchi:DIR, lndb:DIR
    phantom:N        N synthetic chest CTs generated on the fly (seeded by the run's seed)

2D crop sources are sampled at ``crop_patch_size`` (they hold no more context than
that); every other source at ``patch_size``. Each group gets its own loader and
training steps alternate between groups.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace
from pathlib import Path

from glance.errors import GlanceError

from glance_training.datasets import (CaseList, SliceDataset, SliceSamplingConfig, SplitConfig, check_disjoint,
                                      lidc_cases, lndb_cases, local_cases, luna_cases, maxslice_crop_cases,
                                      nodule_crop_cases, split_source, tianchi_cases)

log = logging.getLogger(__name__)

TWO_D_KINDS = {"maxslice"}


@dataclass(frozen=True)
class DataSpec:
    kind: str
    arg: str
    weight: float = 1.0

    @classmethod
    def parse(cls, text: str) -> "DataSpec":
        kind, sep, rest = text.partition(":")
        if not sep or not rest:
            raise GlanceError(f"--data {text!r}: expected KIND:PATH (kinds: {', '.join(sorted(_LOADERS))})")
        arg, _, weight = rest.rpartition("@") if "@" in rest else (rest, "", "")
        if kind not in _LOADERS:
            raise GlanceError(f"--data {text!r}: unknown kind {kind!r} (kinds: {', '.join(sorted(_LOADERS))})")
        try:
            return cls(kind, arg, float(weight) if weight else 1.0)
        except ValueError:
            raise GlanceError(f"--data {text!r}: weight {weight!r} is not a number") from None


def _phantoms(arg: str, seed: int) -> CaseList:
    from glance.phantom.generate import PhantomConfig
    from glance_training.datasets.synthetic import phantom_cases

    try:
        n = int(arg)
    except ValueError:
        raise GlanceError(f"--data phantom:{arg}: expected a number of phantoms") from None
    # A chest-sized field of view at clinical spacing with many nodules per scan: ~5 s each to
    # generate instead of ~20 s for the 512 x 512 x 240 default, and more positives per scan.
    return phantom_cases(n, seed=seed, config=PhantomConfig((352, 352, 96), (0.9, 0.9, 1.5), n_nodules=10))


_LOADERS = {
    "maxslice": lambda arg, seed: maxslice_crop_cases(arg),
    "crops3d": lambda arg, seed: nodule_crop_cases(arg),
    "local": lambda arg, seed: local_cases(arg),
    "lidc": lambda arg, seed: lidc_cases(arg),
    "luna": lambda arg, seed: luna_cases(arg),
    "tianchi": lambda arg, seed: tianchi_cases(arg),
    "lndb": lambda arg, seed: lndb_cases(arg),
    "phantom": _phantoms,
}


def load_source(spec: DataSpec, seed: int) -> CaseList:
    if spec.kind != "phantom" and not Path(spec.arg).exists():
        raise GlanceError(f"--data {spec.kind}:{spec.arg}: no such file or folder")
    return _LOADERS[spec.kind](spec.arg, seed)


@dataclass
class PatchGroup:
    """Sources sampled at one patch size, for one split."""

    name: str
    sources: list[CaseList]
    weights: list[float]
    patch_size: int

    @property
    def n_cases(self) -> int:
        return sum(len(s) for s in self.sources)

    def dataset(self, sampling: SliceSamplingConfig, samples: int, seed: int, augment: bool) -> SliceDataset:
        cfg = replace(sampling, patch_size=self.patch_size, samples_per_epoch=samples, seed=seed, augment=augment)
        return SliceDataset(self.sources, cfg, self.weights)


def build_groups(specs: list[str], seed: int, split: SplitConfig, patch_size: int,
                 crop_patch_size: int) -> dict[str, list[PatchGroup]]:
    """{"train": [...], "val": [...], "test": [...]} patch groups, patient-disjoint across splits."""
    out: dict[str, dict[str, PatchGroup]] = {"train": {}, "val": {}, "test": {}}
    patients: dict[str, list[str]] = {"train": [], "val": [], "test": []}
    for text in specs:
        spec = DataSpec.parse(text)
        source = load_source(spec, seed)
        group = "crops2d" if spec.kind in TWO_D_KINDS else "volumes"
        size = crop_patch_size if group == "crops2d" else patch_size
        for name, cases in split_source(source, split).items():
            patients[name] += [c.patient_id for c in cases]
            if len(cases):
                g = out[name].setdefault(group, PatchGroup(group, [], [], size))
                g.sources.append(cases)
                g.weights.append(spec.weight)
    check_disjoint(patients)
    if not out["train"]:
        raise GlanceError("no training cases: every --data source was empty or held out")
    for name, groups in out.items():
        for g in groups.values():
            log.info("%s %s: %d cases at %d px", name, g.name, g.n_cases, g.patch_size)
    return {name: list(groups.values()) for name, groups in out.items()}


def describe(groups: dict[str, list[PatchGroup]]) -> dict:
    """What the model card says about the data: sources and case/patient counts per split."""
    out = {}
    for split_name, gs in groups.items():
        cases = [c for g in gs for s in g.sources for c in s]
        out[split_name] = {
            "cases": len(cases),
            "patients": len({c.patient_id for c in cases}),
            "sources": sorted({s.name for g in gs for s in g.sources}),
        }
    return out
