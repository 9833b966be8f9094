"""Training data: every source yields lazy :class:`Case` objects (CT, nodule masks and/or centres).

Sources: reviewed local cases (:func:`local_cases`), LIDC-IDRI (:func:`lidc_cases`), LUNA16
and Tianchi (:func:`luna_cases`, :func:`tianchi_cases`), LNDb (:func:`lndb_cases`), the real
crop sets of ``shared/data`` (:func:`nodule_crop_cases`, :func:`maxslice_crop_cases`) and
synthetic phantoms and nodules inserted into real scans (:func:`phantom_cases`,
:func:`inserted_cases`; :func:`phantom_cache` generates each phantom once while open).
:mod:`.split` splits by patient; :class:`SliceDataset` turns cases into 2D / 2.5D training patches.
"""

from .cases import Annotation, Case, CaseList, CaseSource, LoadedCase, local_cases, nodules_from_labels
from .crops import lidc_series_patients, maxslice_crop_cases, nodule_crop_cases
from .lidc import lidc_cases
from .lndb import lndb_cases
from .luna import luna_cases, tianchi_cases
from .slices import SliceDataset, SliceSamplingConfig
from .split import RESERVED_TEST_PATIENTS, SplitConfig, assign_split, check_disjoint, split_patients, split_source
from .synthetic import PhantomCache, inserted_cases, phantom_cache, phantom_cases

__all__ = [
    "Annotation", "Case", "CaseList", "CaseSource", "LoadedCase", "PhantomCache", "RESERVED_TEST_PATIENTS",
    "SliceDataset", "SliceSamplingConfig", "SplitConfig", "assign_split", "check_disjoint", "inserted_cases",
    "lidc_cases", "lidc_series_patients", "lndb_cases", "local_cases", "luna_cases", "maxslice_crop_cases",
    "nodule_crop_cases", "nodules_from_labels", "phantom_cache", "phantom_cases", "split_patients", "split_source",
    "tianchi_cases",
]
