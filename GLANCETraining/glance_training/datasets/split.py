"""Patient-level train / validation / test splits.

A patient's split is a pure function of (seed, patient id): a SHA-256 hash mapped to
[0, 1) and cut at the cumulative fractions. So every data set, crop set and run sees
the same assignment for the same patient, whichever order or subset it lists them in,
and the readers' repeated crops of one nodule never straddle two splits.

Patients whose full scans are reserved for testing (LIDC-IDRI-0001 and -0003, the
scans of ``shared/data``) and any others named are forced into ``test``: the crop
sets hold crops of those patients too, and they must never be trained on.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from .cases import CaseList, CaseSource

log = logging.getLogger(__name__)

SPLITS = ("train", "val", "test")
RESERVED_TEST_PATIENTS = ("LIDC-IDRI-0001", "LIDC-IDRI-0003")


@dataclass(frozen=True)
class SplitConfig:
    fractions: tuple[float, float, float] = (0.8, 0.1, 0.1)  # train, val, test
    seed: int = 0
    held_out: tuple[str, ...] = RESERVED_TEST_PATIENTS  # always "test"

    def __post_init__(self) -> None:
        if len(self.fractions) != 3 or min(self.fractions) < 0 or abs(sum(self.fractions) - 1) > 1e-6:
            raise ValueError(f"split fractions must be three non-negative numbers summing to 1: {self.fractions}")


def hash_fraction(patient_id: str, seed: int = 0) -> float:
    """A stable number in [0, 1) for (seed, patient): independent of Python's hash seed."""
    digest = hashlib.sha256(f"{seed}:{patient_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2.0**64


def assign_split(patient_id: str, config: SplitConfig = SplitConfig()) -> str:
    """"train", "val" or "test" for one patient."""
    if patient_id in config.held_out:
        return "test"
    u = hash_fraction(patient_id, config.seed)
    train, val, _ = config.fractions
    if u < train:
        return "train"
    return "val" if u < train + val else "test"


def split_patients(patient_ids: Iterable[str], config: SplitConfig = SplitConfig()) -> dict[str, list[str]]:
    """{split: sorted unique patient ids}."""
    out: dict[str, list[str]] = {s: [] for s in SPLITS}
    for pid in sorted(set(patient_ids)):
        out[assign_split(pid, config)].append(pid)
    return out


def split_source(source: CaseSource, config: SplitConfig = SplitConfig()) -> dict[str, CaseList]:
    """The cases of ``source`` grouped by their patient's split (lazy cases, nothing loaded)."""
    groups: dict[str, list] = {s: [] for s in SPLITS}
    for case in source:
        groups[assign_split(case.patient_id, config)].append(case)
    for s in SPLITS:
        log.info("%s %s: %d cases", source.name, s, len(groups[s]))
    return {s: CaseList(f"{source.name}:{s}", groups[s]) for s in SPLITS}


def check_disjoint(splits: dict[str, Sequence]) -> None:
    """Raise ValueError if a patient appears in two splits (cases or patient-id lists)."""
    owner: dict[str, str] = {}
    for name, items in splits.items():
        for item in items:
            pid = item if isinstance(item, str) else item.patient_id
            if owner.setdefault(pid, name) != name:
                raise ValueError(f"patient {pid} is in both {owner[pid]} and {name}")
