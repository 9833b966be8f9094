"""Training data from ``--data`` specs: which sources, split by patient, sampled as patches.

A spec is ``KIND:ARG[,NAME=VALUE ...][@WEIGHT]``:

    maxslice:DIR     real 2D max-slice crops with reader masks (shared/data/lidc-maxslice-crops);
                     option outline=drawn|interior (default drawn: the masks as the readers drew
                     them, contour pixels included; interior: without them, see
                     ``glance_training.datasets.crops``)
    crops3d:DIR      real 3D nodule crops with consensus masks (shared/data/lidc-nodule-crops)
    local:DIR        reviewed cases exported by the Slicer module (CT + seg.nrrd / DICOM-SEG / label map)
    lidc:DIR         LIDC-IDRI DICOM series + reader XML
    luna:DIR         LUNA16 .mhd scans under DIR; options annotations=CSV, excluded=CSV (default: found
                     in DIR, DIR/CSVFILES, DIR/evaluationScript/annotations, under DIR, then the same
                     places beside DIR, see ``glance_training.datasets.luna``)
    tianchi:DIR      the LUNA16 layout; option annotations=CSV
    lndb:DIR
    phantom:N        N synthetic chest CTs generated on the fly (seeded by the run's seed)

Every kind also takes ``case_weights=CSV``: a file with the columns ``case_id,weight`` (weight > 0)
giving some cases of the source a larger or smaller chance of being drawn, within the source's own
share; unlisted cases weigh 1. With a ``label`` column (``case_id,label,weight``) each row weighs one
nodule instead: a nodule slice of the case picks its nodules by weight (unlisted ones weigh 1), and
the case is drawn in proportion to the mean weight of its listed nodules. That is what volumes with
many nodules need (a phantom's one hard nodule among ten). ``bench/hard_case_weights.py`` writes
either from a ``glance evaluate`` of the training split (hard-example sampling: the cases or nodules
the model outlines worst drawn most).

Grammar, so that any path works (Windows drive letters, '@' and ',' in folder names):

* ``KIND`` is the text before the first ``:``; everything after it is ARG, options and weight.
* ``@WEIGHT`` is the source's share, and only a trailing ``@`` followed by a number is one:
  ``lidc:/data/a@b`` is the folder ``/data/a@b`` with weight 1. A path that itself ends in
  ``@<number>`` needs an explicit weight after it (``lidc:/data/x@2@1``).
* Options follow ARG, each as ``,NAME=VALUE`` where NAME is a word (letters, digits, ``_``):
  ``luna:/data/LUNA16/subset3,annotations=/data/LUNA16/annotations.csv@2``. A ``,`` not followed
  by ``NAME=`` belongs to the path. Unknown, repeated or empty options are an error.

2D crop sources are sampled at ``crop_patch_size`` (they hold no more context than
that); every other source at ``patch_size``. Each group gets its own loader, and a group's
share of the training steps is the sum of its sources' weights over all weights (equal weights:
steps alternate between the groups). So ``maxslice:DIR@3 phantom:128`` spends three steps in
four on the crops.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field, replace
from pathlib import Path

from glance.errors import GlanceError

from glance_training.datasets import (CaseList, SliceDataset, SliceSamplingConfig, SplitConfig, check_disjoint,
                                      lidc_cases, lndb_cases, local_cases, luna_cases, maxslice_crop_cases,
                                      nodule_crop_cases, split_source, tianchi_cases)
from glance_training.datasets.crops import OUTLINES

log = logging.getLogger(__name__)

TWO_D_KINDS = {"maxslice"}


# ``@`` + a number at the very end: the weight (so '@' elsewhere in a path is the path's).
_WEIGHT = re.compile(r"@((?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?)$")
# A ',' that starts an option: ``,NAME=``.
_OPTION_START = re.compile(r",(?=\w+=)")


@dataclass(frozen=True)
class DataSpec:
    """One ``--data`` source: ``KIND:ARG[,NAME=VALUE ...][@WEIGHT]`` (module docstring)."""

    kind: str
    arg: str
    weight: float = 1.0
    options: dict[str, str] = field(default_factory=dict, hash=False)

    @classmethod
    def parse(cls, text: str) -> "DataSpec":
        kinds = ", ".join(sorted(_LOADERS))
        kind, sep, rest = text.partition(":")
        if not sep or not rest:
            raise GlanceError(f"--data {text!r}: expected KIND:PATH (kinds: {kinds})")
        if kind not in _LOADERS:
            raise GlanceError(f"--data {text!r}: unknown kind {kind!r} (kinds: {kinds})")
        weight = _WEIGHT.search(rest)
        if weight:
            rest = rest[: weight.start()]
        arg, *pairs = _OPTION_START.split(rest)
        if not arg:
            raise GlanceError(f"--data {text!r}: expected KIND:PATH")
        share = float(weight.group(1)) if weight else 1.0
        if share <= 0:
            raise GlanceError(f"--data {text!r}: a weight must be positive (leave the source out instead)")
        return cls(kind, arg, share, _parse_options(text, kind, pairs))

    def __str__(self) -> str:
        text = f"{self.kind}:{self.arg}" + "".join(f",{k}={v}" for k, v in self.options.items())
        # A text already ending in @NUMBER needs its weight spelled out to parse back the same.
        return text if self.weight == 1.0 and not _WEIGHT.search(text) else f"{text}@{self.weight:g}"


def _parse_options(text: str, kind: str, pairs: list[str]) -> dict[str, str]:
    allowed = (*_OPTIONS.get(kind, ()), *_COMMON_OPTIONS)
    known = f"{kind} options: {', '.join(allowed)}" if allowed else f"{kind} takes no options"
    options: dict[str, str] = {}
    for pair in pairs:
        name, _, value = pair.partition("=")
        if name not in allowed:
            raise GlanceError(f"--data {text!r}: unknown option {name!r} ({known})")
        if name in options:
            raise GlanceError(f"--data {text!r}: option {name!r} given twice")
        if not value:
            raise GlanceError(f"--data {text!r}: option {name!r} needs a value ({name}=VALUE)")
        if name in _CHOICES and value not in _CHOICES[name]:
            raise GlanceError(f"--data {text!r}: {name}={value}: expected one of {', '.join(_CHOICES[name])}")
        options[name] = value
    return options


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


# Loaders take (ARG, seed, options); the options are keyword arguments of the dataset function.
_LOADERS = {
    "maxslice": lambda arg, seed, opts: maxslice_crop_cases(arg, **opts),
    "crops3d": lambda arg, seed, opts: nodule_crop_cases(arg),
    "local": lambda arg, seed, opts: local_cases(arg),
    "lidc": lambda arg, seed, opts: lidc_cases(arg),
    "luna": lambda arg, seed, opts: luna_cases(arg, **opts),
    "tianchi": lambda arg, seed, opts: tianchi_cases(arg, **opts),
    "lndb": lambda arg, seed, opts: lndb_cases(arg),
    "phantom": lambda arg, seed, opts: _phantoms(arg, seed),
}
_OPTIONS = {"luna": ("annotations", "excluded"), "tianchi": ("annotations",), "maxslice": ("outline",)}
_COMMON_OPTIONS = ("case_weights",)  # options of every kind, applied to the loaded cases
_PATH_OPTIONS = {"annotations", "excluded", "case_weights"}  # options naming a file, checked before loading
_CHOICES = {"outline": OUTLINES}


def load_source(spec: DataSpec, seed: int) -> CaseList:
    if spec.kind != "phantom" and not Path(spec.arg).exists():
        hint = " (a weight is '@NUMBER' at the very end)" if "@" in spec.arg else ""
        raise GlanceError(f"--data {spec}: {spec.arg}: no such file or folder{hint}")
    for name, value in spec.options.items():
        if name in _PATH_OPTIONS and not Path(value).is_file():
            raise GlanceError(f"--data {spec}: {name}={value}: no such file")
    own = {k: v for k, v in spec.options.items() if k not in _COMMON_OPTIONS}
    source = _LOADERS[spec.kind](spec.arg, seed, own)
    if "case_weights" in spec.options:
        source = with_case_weights(source, Path(spec.options["case_weights"]), str(spec))
    return source


def with_case_weights(source: CaseList, path: Path, where: str) -> CaseList:
    """``source`` with the sampling weights of ``path``: columns ``case_id,weight`` weigh cases;
    with a ``label`` column each row weighs one nodule of a case, which is then drawn in proportion
    to the mean weight of its listed nodules and, on a nodule slice, picks them by weight."""
    rows, per_nodule = _weight_rows(path, where)
    unknown = sorted({case_id for case_id, _, _ in rows} - {c.case_id for c in source})
    if unknown:
        raise GlanceError(f"--data {where}: {path}: {len(unknown)} case(s) not in this source, "
                          f"e.g. {unknown[0]!r}")
    if not per_nodule:
        weights = {case_id: weight for case_id, _, weight in rows}
        return CaseList(source.name, [replace(c, sampling_weight=weights.get(c.case_id, c.sampling_weight))
                                      for c in source])
    nodules: dict[str, dict[int, float]] = {}
    for case_id, label, weight in rows:
        nodules.setdefault(case_id, {})[label] = weight
    return CaseList(source.name, [
        replace(c, sampling_weight=c.sampling_weight * sum(nodules[c.case_id].values()) / len(nodules[c.case_id]),
                nodule_weights=nodules[c.case_id]) if c.case_id in nodules else c
        for c in source])


def _weight_rows(path: Path, where: str) -> tuple[list[tuple[str, int | None, float]], bool]:
    """The (case_id, label or None, weight) rows of a weights CSV, and whether it has a label column."""
    import csv
    import math

    try:
        with open(path, newline="", encoding="utf-8") as fh:
            reader = csv.DictReader(fh)
            rows = list(reader)
            per_nodule = "label" in (reader.fieldnames or ())
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise GlanceError(f"--data {where}: case_weights: cannot read {path} ({exc})") from None
    columns = "case_id,label,weight with a nodule label and a number" if per_nodule else \
        "case_id,weight with a number"
    parsed = []
    for n, row in enumerate(rows, start=2):
        try:
            case_id, weight = row["case_id"], float(row["weight"])
            label = int(row["label"]) if per_nodule else None
        except (KeyError, TypeError, ValueError):
            raise GlanceError(f"--data {where}: {path} line {n}: expected columns {columns}") from None
        if not (math.isfinite(weight) and weight > 0):
            raise GlanceError(f"--data {where}: {path} line {n}: weight {row['weight']} must be positive")
        if label is not None and label < 1:
            raise GlanceError(f"--data {where}: {path} line {n}: label {label} must be a nodule's (1 or more)")
        parsed.append((case_id, label, weight))
    return parsed, per_nodule


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

    @property
    def share(self) -> float:
        """The group's weight among the groups: the sum of its sources' weights."""
        return float(sum(self.weights))

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


def step_schedule(shares: list[float], steps: int) -> list[int]:
    """Which group each of ``steps`` training steps draws from, the groups taking turns in proportion
    to ``shares`` and spread evenly through the epoch (smooth weighted round robin: every step the
    group furthest behind its share goes next; ties go to the first group)."""
    if not shares or min(shares) <= 0:
        raise GlanceError(f"every patch group needs a positive weight, got {shares}")
    total = sum(shares)
    credit = [0.0] * len(shares)
    order = []
    for _ in range(steps):
        credit = [c + w for c, w in zip(credit, shares)]
        g = max(range(len(shares)), key=lambda i: (credit[i], -i))
        credit[g] -= total
        order.append(g)
    return order


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
