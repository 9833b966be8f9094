"""Where ``luna:DIR`` finds LUNA16's CSVs, and the ``--data`` spec grammar that names them explicitly
(glance_training.datasets.luna, glance_training.data.DataSpec). Every file is written here."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from glance.errors import GlanceError, InputError
from glance_training.data import DataSpec, load_source
from glance_training.datasets import luna_cases, tianchi_cases
from glance_training.datasets.luna import find_annotation_csv

HEADER = ["seriesuid", "coordX", "coordY", "coordZ", "diameter_mm"]
UID = "1.3.6.1.4.1.14519.5.2.1.6279.6001.100"


def write_csv(path: Path, rows) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(HEADER)
        w.writerows(rows)
    return path


def write_scan(folder: Path, uid: str = UID) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    img = sitk.GetImageFromArray(np.full((4, 8, 8), -800, np.int16))
    sitk.WriteImage(img, str(folder / f"{uid}.mhd"))


def luna_root(tmp_path: Path) -> Path:
    """LUNA16 as distributed: subset0 and subset1 side by side; the test puts the CSVs."""
    write_scan(tmp_path / "LUNA16" / "subset0")
    write_scan(tmp_path / "LUNA16" / "subset1", UID + "1")
    return tmp_path / "LUNA16"


def diameters(source, excluded: bool) -> list[float]:
    """The diameters of the first case's findings: each test writes its own, to tell the files apart."""
    return [a.diameter_mm for a in source[0].nodules if a.excluded == excluded]


# --- lookup ------------------------------------------------------------------------------


@pytest.mark.parametrize("place", [".", "CSVFILES", "evaluationScript/annotations"])
def test_csvs_found_in_the_scan_folder_and_its_csv_folders(tmp_path, place):
    root = luna_root(tmp_path)
    subset = root / "subset0"
    write_csv(subset / place / "annotations.csv", [[UID, 1, 2, 3, 6.0]])
    write_csv(subset / place / "annotations_excluded.csv", [[UID, 4, 5, 6, 2.5]])
    source = luna_cases(subset)
    assert diameters(source, False) == [6.0] and diameters(source, True) == [2.5]
    assert source[0].nodules[0].centre_lps == (1.0, 2.0, 3.0)


@pytest.mark.parametrize("place", [".", "CSVFILES", "evaluationScript/annotations"])
def test_csvs_beside_the_subsets_serve_a_single_subset(tmp_path, place):
    root = luna_root(tmp_path)
    write_csv(root / place / "annotations.csv", [[UID, 1, 2, 3, 7.0], [UID + "1", 0, 0, 0, 9.0]])
    write_csv(root / place / "annotations_excluded.csv", [[UID, 4, 5, 6, -1]])
    source = luna_cases(root / "subset0")
    assert [c.case_id for c in source] == [UID]
    assert diameters(source, False) == [7.0]
    assert diameters(source, True) == [0.0]  # -1: size unknown
    # The whole root also works: both subsets' scans, the same CSVs.
    whole = luna_cases(root)
    assert [c.case_id for c in whole] == [UID, UID + "1"]
    assert [a.diameter_mm for a in whole[1].nodules] == [9.0]


def test_official_layout_annotations_beside_excluded_in_the_evaluation_package(tmp_path):
    root = luna_root(tmp_path)
    write_csv(root / "annotations.csv", [[UID, 1, 2, 3, 7.0]])
    write_csv(root / "evaluationScript" / "annotations" / "annotations_excluded.csv", [[UID, 4, 5, 6, 3.5]])
    source = luna_cases(root / "subset1")
    assert [c.case_id for c in source] == [UID + "1"]
    assert find_annotation_csv(root / "subset1", "annotations.csv") == root / "annotations.csv"
    assert find_annotation_csv(root / "subset1", "annotations_excluded.csv") == (
        root / "evaluationScript" / "annotations" / "annotations_excluded.csv")


def test_the_scan_folder_wins_over_a_sub_folder_and_a_sub_folder_over_the_parent(tmp_path):
    root = luna_root(tmp_path)
    subset = root / "subset0"
    write_csv(root / "annotations.csv", [[UID, 0, 0, 0, 1.0]])
    write_csv(subset / "notes" / "annotations.csv", [[UID, 0, 0, 0, 2.0]])
    assert diameters(luna_cases(subset), False) == [2.0]
    write_csv(subset / "CSVFILES" / "annotations.csv", [[UID, 0, 0, 0, 3.0]])
    assert diameters(luna_cases(subset), False) == [3.0]
    write_csv(subset / "annotations.csv", [[UID, 0, 0, 0, 4.0]])
    assert diameters(luna_cases(subset), False) == [4.0]


def test_missing_annotations_is_one_input_error_naming_the_option(tmp_path):
    root = luna_root(tmp_path)
    with pytest.raises(InputError,
                       match=r"annotations\.csv not found \(looked in .*\); give its path with annotations=PATH$"):
        luna_cases(root / "subset0")


def test_missing_excluded_list_is_allowed(tmp_path):
    root = luna_root(tmp_path)
    write_csv(root / "annotations.csv", [[UID, 1, 2, 3, 7.0]])
    source = luna_cases(root / "subset0")
    assert diameters(source, False) == [7.0] and diameters(source, True) == []


def test_tianchi_does_not_pick_up_a_luna_excluded_list(tmp_path):
    root = luna_root(tmp_path)
    write_csv(root / "annotations.csv", [[UID, 1, 2, 3, 7.0]])
    write_csv(root / "annotations_excluded.csv", [[UID, 4, 5, 6, 3.5]])
    source = tianchi_cases(root / "subset0")
    assert diameters(source, False) == [7.0] and diameters(source, True) == []


def test_cases_carry_their_luna_seriesuid(tmp_path):
    root = luna_root(tmp_path)
    write_csv(root / "annotations.csv", [[UID, 1, 2, 3, 7.0]])
    source = luna_cases(root, patient_ids={UID: "LIDC-IDRI-0100"})
    assert source[0].metadata["seriesuid"] == UID and source[0].patient_id == "LIDC-IDRI-0100"


# --- explicit locations through the spec --------------------------------------------------


def test_explicit_annotation_files_from_the_spec(tmp_path):
    root = luna_root(tmp_path)
    write_csv(root / "annotations.csv", [[UID, 0, 0, 0, 1.0]])  # would be found; the option wins
    ann = write_csv(tmp_path / "elsewhere" / "my annotations.csv", [[UID, 1, 2, 3, 8.0]])
    exc = write_csv(tmp_path / "elsewhere" / "excl.csv", [[UID, 4, 5, 6, 2.0]])
    spec = DataSpec.parse(f"luna:{root / 'subset0'},annotations={ann},excluded={exc}@3")
    assert (spec.arg, spec.weight) == (str(root / "subset0"), 3.0)
    assert spec.options == {"annotations": str(ann), "excluded": str(exc)}
    source = load_source(spec, seed=0)
    assert diameters(source, False) == [8.0] and diameters(source, True) == [2.0]


def test_explicit_annotations_for_tianchi(tmp_path):
    root = luna_root(tmp_path)
    ann = write_csv(tmp_path / "csv" / "train" / "annotations.csv", [[UID + "1", 1, 2, 3, 5.5]])
    source = load_source(DataSpec.parse(f"tianchi:{root / 'subset1'},annotations={ann}"), seed=0)
    assert source.name == "tianchi" and diameters(source, False) == [5.5]


def test_explicit_file_that_does_not_exist(tmp_path):
    root = luna_root(tmp_path)
    spec = DataSpec.parse(f"luna:{root},annotations={tmp_path / 'nope.csv'}")
    with pytest.raises(GlanceError, match=r"annotations=.*nope\.csv: no such file$"):
        load_source(spec, seed=0)
    write_csv(root / "annotations.csv", [[UID, 1, 2, 3, 7.0]])
    with pytest.raises(InputError, match=r"nope\.csv: no such excluded-annotations file$"):
        luna_cases(root, excluded=tmp_path / "nope.csv")


# --- grammar --------------------------------------------------------------------------------


@pytest.mark.parametrize("text, kind, arg, weight, options", [
    ("lidc:/data/LIDC-IDRI", "lidc", "/data/LIDC-IDRI", 1.0, {}),
    ("phantom:64@0.2", "phantom", "64", 0.2, {}),
    ("lidc:/D@9", "lidc", "/D", 9.0, {}),
    ("lidc:/data/user@host/LIDC", "lidc", "/data/user@host/LIDC", 1.0, {}),  # '@' in a path
    ("lidc:/data/scans@2@1", "lidc", "/data/scans@2", 1.0, {}),  # a path ending in @2, explicit weight
    ("lidc:/data/a,b/LIDC@2", "lidc", "/data/a,b/LIDC", 2.0, {}),  # ',' without NAME=
    (r"luna:C:\LUNA16\subset3", "luna", r"C:\LUNA16\subset3", 1.0, {}),  # Windows drive letter
    (r"luna:C:\LUNA16\subset3,annotations=D:\csv\a@v2.csv,excluded=D:\csv\e.csv@1.5e0", "luna",
     r"C:\LUNA16\subset3", 1.5, {"annotations": r"D:\csv\a@v2.csv", "excluded": r"D:\csv\e.csv"}),
    ("tianchi:/t,annotations=/t/a.csv", "tianchi", "/t", 1.0, {"annotations": "/t/a.csv"}),
    ("maxslice:/C,outline=interior@3", "maxslice", "/C", 3.0, {"outline": "interior"}),
])
def test_spec_grammar(text, kind, arg, weight, options):
    spec = DataSpec.parse(text)
    assert (spec.kind, spec.arg, spec.weight, spec.options) == (kind, arg, weight, options)
    assert DataSpec.parse(str(spec)) == spec


@pytest.mark.parametrize("text, message", [
    ("luna:/L,annotation=/a.csv", r"unknown option 'annotation' \(luna options: annotations, excluded, case_weights\)"),
    ("tianchi:/T,excluded=/e.csv", r"unknown option 'excluded' \(tianchi options: annotations, case_weights\)"),
    ("lidc:/D,annotations=/a.csv", r"unknown option 'annotations' \(lidc options: case_weights\)"),
    ("luna:/L,annotations=/a.csv,annotations=/b.csv", r"option 'annotations' given twice"),
    ("luna:/L,annotations=", r"option 'annotations' needs a value"),
    ("luna:,annotations=/a.csv", r"expected KIND:PATH"),
    ("lunar:/L", r"unknown kind 'lunar'"),
    ("phantom:8@0", r"a weight must be positive"),
    ("maxslice:/C@0.0", r"a weight must be positive"),
    ("maxslice:/C,outline=inner", r"outline=inner: expected one of drawn, interior"),
    ("crops3d:/C,outline=interior", r"unknown option 'outline' \(crops3d options: case_weights\)"),
    ("/data/LUNA16", r"expected KIND:PATH"),
])
def test_bad_specs_are_one_line_errors(text, message):
    with pytest.raises(GlanceError, match=message) as info:
        DataSpec.parse(text)
    assert "\n" not in str(info.value)


def test_a_non_numeric_suffix_is_part_of_the_path(tmp_path):
    spec = DataSpec.parse(f"lidc:{tmp_path}@abc")
    assert spec.arg == f"{tmp_path}@abc" and spec.weight == 1.0
    with pytest.raises(GlanceError, match=r"no such file or folder \(a weight is '@NUMBER' at the very end\)"):
        load_source(spec, seed=0)
