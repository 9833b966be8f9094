"""The Slicer extension without the Slicer application.

Static checks (module files compile, .ui widgets match ``self.ui.<name>`` uses,
module files load without torch/highdicom/the engine, CMake lists every file to
install, the extension index entry is valid, icons are what make_icons.py draws)
and the module logic itself run against real MRML through slicer-core, with
only Qt and Slicer's module base classes stubbed.
"""

from __future__ import annotations

import importlib.util
import json
import py_compile
import re
import subprocess
import sys
import textwrap
import types
import xml.etree.ElementTree as ET
from pathlib import Path
from unittest import mock

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
MODULES = {
    "GLANCESegmentation": "glance",
    "GLANCETraining": "glance_training",
}
# Widgets that only lay out or label others need not be used by the module code.
DECORATIVE_CLASSES = {"QLabel", "ctkCollapsibleButton", "QGroupBox", "QFrame", "QWidget", "qMRMLWidget"}
HEAVY_MODULES = ("torch", "highdicom", "safetensors", "SimpleITK", "glance", "glance_training", "monai")


def module_file(name: str) -> Path:
    return REPO / name / f"{name}.py"


# -- module files ----------------------------------------------------------


@pytest.mark.parametrize("name", sorted(MODULES))
def test_module_file_compiles(name, tmp_path):
    py_compile.compile(str(module_file(name)), cfile=str(tmp_path / "out.pyc"), doraise=True)


def _ui_widgets(name: str) -> dict[str, str]:
    """objectName -> class of every widget in the module's .ui file."""
    root = ET.parse(REPO / name / "Resources" / "UI" / f"{name}.ui").getroot()
    return {w.get("name"): w.get("class") for w in root.iter("widget")}


def _ui_uses(name: str) -> set[str]:
    return set(re.findall(r"self\.ui\.(\w+)", module_file(name).read_text()))


@pytest.mark.parametrize("name", sorted(MODULES))
def test_every_ui_name_used_exists_and_every_control_is_used(name):
    widgets = _ui_widgets(name)
    used = _ui_uses(name)
    assert used, "module does not use its .ui at all"
    assert not used - widgets.keys(), f"self.ui names missing from {name}.ui"
    controls = {n for n, cls in widgets.items() if cls not in DECORATIVE_CLASSES}
    assert not controls - used, f"widgets in {name}.ui that the module never uses"


@pytest.mark.parametrize("name", sorted(MODULES))
def test_ui_file_is_loadable_designer_xml(name):
    root = ET.parse(REPO / name / "Resources" / "UI" / f"{name}.ui").getroot()
    assert root.tag == "ui" and root.findtext("class") == name
    top = root.find("widget")
    assert top.get("class") == "qMRMLWidget" and top.get("name") == name
    names = [w.get("name") for w in root.iter("widget")]
    assert len(names) == len(set(names)), "duplicate widget names"
    custom = {c.findtext("class") for c in root.iter("customwidget")}
    used_classes = {w.get("class") for w in root.iter("widget")}
    assert {c for c in used_classes if c.startswith(("ctk", "qMRML"))} <= custom


_STUB_LOADER = textwrap.dedent(
    """
    import importlib.util, json, sys, types, unittest
    from unittest import mock

    def permissive(name):
        m = types.ModuleType(name)
        m.__getattr__ = lambda attr: mock.MagicMock(name=f"{name}.{attr}")
        return m

    class ScriptedLoadableModule:
        def __init__(self, parent):
            self.parent = parent
    class ScriptedLoadableModuleWidget:
        def __init__(self, parent=None):
            self.parent = parent
    class ScriptedLoadableModuleLogic:
        def __init__(self, parent=None):
            pass
    class ScriptedLoadableModuleTest(unittest.TestCase):
        pass
    class VTKObservationMixin:
        def __init__(self):
            pass

    slicer = permissive("slicer")
    slm = types.ModuleType("slicer.ScriptedLoadableModule")
    for cls in (ScriptedLoadableModule, ScriptedLoadableModuleWidget, ScriptedLoadableModuleLogic,
                ScriptedLoadableModuleTest):
        setattr(slm, cls.__name__, cls)
    util = permissive("slicer.util")
    util.VTKObservationMixin = VTKObservationMixin
    i18n = types.ModuleType("slicer.i18n")
    i18n.tr = lambda text: text
    i18n.translate = lambda context, text: text
    slicer.ScriptedLoadableModule, slicer.util, slicer.i18n = slm, util, i18n
    sys.modules.update({"slicer": slicer, "slicer.ScriptedLoadableModule": slm, "slicer.util": util,
                        "slicer.i18n": i18n, "qt": permissive("qt"), "ctk": permissive("ctk"),
                        "vtk": permissive("vtk")})
    before = set(sys.modules)
    path = sys.argv[1]
    name = path.rsplit("/", 1)[-1][:-3]
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    parent = types.SimpleNamespace()
    getattr(module, name)(parent)  # what Slicer does at start-up
    print(json.dumps({"loaded": sorted(set(sys.modules) - before), "title": parent.title,
                      "categories": parent.categories,
                      "classes": [c for c in (name + "Widget", name + "Logic", name + "Test") if hasattr(module, c)]}))
    """
)


@pytest.mark.parametrize("name", sorted(MODULES))
def test_loading_the_module_imports_nothing_heavy(name):
    # A fresh interpreter: other tests' imports must not hide an import done by the module.
    out = subprocess.run(
        [sys.executable, "-c", _STUB_LOADER, str(module_file(name))],
        capture_output=True, text=True, timeout=60, cwd=REPO.parent,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout.strip().splitlines()[-1])
    heavy = [m for m in result["loaded"] if m.split(".")[0] in HEAVY_MODULES]
    assert heavy == []
    assert result["title"].startswith("GLANCE ")
    assert result["categories"] == ["Segmentation"]
    assert result["classes"] == [f"{name}Widget", f"{name}Logic", f"{name}Test"]


# -- CMake -----------------------------------------------------------------


def _cmake_list(text: str, variable: str) -> list[str]:
    m = re.search(rf"set\(\s*{variable}\s+(.*?)\)", text, re.S)
    assert m, f"set({variable} ...) missing"
    return [line.split("#")[0].strip() for line in m.group(1).splitlines() if line.split("#")[0].strip()]


def _tree_files(root: Path, pattern: str) -> set[str]:
    return {
        p.relative_to(root).as_posix()
        for p in root.rglob(pattern)
        if p.is_file() and "__pycache__" not in p.parts and not p.name.startswith(".")
    }


@pytest.mark.parametrize("name", sorted(MODULES))
def test_module_cmake_installs_every_engine_file_and_resource(name):
    folder = REPO / name
    text = (folder / "CMakeLists.txt").read_text()
    assert re.search(rf"set\(MODULE_NAME {name}\)", text)
    scripts = {s.replace("${MODULE_NAME}", name) for s in _cmake_list(text, "MODULE_PYTHON_SCRIPTS")}
    resources = {s.replace("${MODULE_NAME}", name) for s in _cmake_list(text, "MODULE_PYTHON_RESOURCES")}

    expected_scripts = {f"{name}.py"} | _tree_files(folder, f"{MODULES[name]}/**/*.py")
    missing = sorted(expected_scripts - scripts)
    assert not missing, "add to MODULE_PYTHON_SCRIPTS:\n  " + "\n  ".join(missing)
    assert not scripts - expected_scripts, "listed but not in the tree"
    expected_resources = _tree_files(folder / "Resources", "*")
    expected_resources = {f"Resources/{r}" for r in expected_resources}
    assert resources == expected_resources

    assert "slicerMacroBuildScriptedModule(" in text
    for var in ("SCRIPTS ${MODULE_PYTHON_SCRIPTS}", "RESOURCES ${MODULE_PYTHON_RESOURCES}"):
        assert var in text
    assert "slicer_add_python_unittest(SCRIPT ${MODULE_NAME}.py)" in text


def test_segmentation_cmake_installs_every_shipped_model_file():
    text = (REPO / "GLANCESegmentation" / "CMakeLists.txt").read_text()
    listed = set(_cmake_list(text, "GLANCE_MODEL_FILES"))
    models = REPO / "Resources" / "models"
    expected = _tree_files(models, "*") if models.is_dir() else set()
    missing = sorted(expected - listed)
    assert not missing, "add to GLANCE_MODEL_FILES:\n  " + "\n  ".join(missing)
    assert listed == expected


def _cmake_set(text: str, variable: str) -> str:
    m = re.search(rf'set\({variable}\s+("([^"]*)"|[^)\s]+)\s*\)', text)
    assert m, f"{variable} is not set"
    return m.group(2) if m.group(2) is not None else m.group(1)


def test_extension_cmake_has_the_index_metadata_and_every_module():
    text = (REPO / "CMakeLists.txt").read_text()
    assert re.search(r"^project\(GLANCE\)", text, re.M)
    for var in ("EXTENSION_HOMEPAGE", "EXTENSION_ICONURL"):
        assert _cmake_set(text, var).startswith("https://")
    # The index's own checks: both URL variables are quoted http(s) URLs.
    assert re.search(r'set\s*\(EXTENSION_ICONURL\s*"(http[^"]+\.png)"\s*\)', text)
    shots = _cmake_set(text, "EXTENSION_SCREENSHOTURLS").split()
    assert shots and all(s.startswith("https://") for s in shots)
    assert _cmake_set(text, "EXTENSION_CATEGORY") == "Segmentation"
    assert _cmake_set(text, "EXTENSION_CONTRIBUTORS")
    assert len(_cmake_set(text, "EXTENSION_DESCRIPTION")) > 40
    assert _cmake_set(text, "EXTENSION_DEPENDS") == "PyTorch"
    assert "find_package(Slicer REQUIRED)" in text and "include(${Slicer_USE_FILE})" in text
    subdirs = re.findall(r"add_subdirectory\((\w+)\)", text)
    assert subdirs == sorted(MODULES)
    assert text.index("${Slicer_EXTENSION_GENERATE_CONFIG}") < text.index("${Slicer_EXTENSION_CPACK}")


# -- extension index entry ---------------------------------------------------

# Slicer/Slicer Schemas/slicer-extension-catalog-entry-schema-v1.0.2.json (draft-07):
# required keys, property types, additionalProperties false.
SCHEMA_REQUIRED = ("$schema", "category", "scm_url")
SCHEMA_TYPES = {
    "$schema": str, "category": str, "scm_url": str, "scm_revision": str, "scm_type": str,
    "build_dependencies": list, "dicom_support_rule": str, "build_subdirectory": str,
    "enabled": bool, "tier": int,
}  # fmt: skip
# A few of ExtensionsIndex scripts/check_description_files.py ACCEPTED_EXTENSION_CATEGORIES.
INDEX_CATEGORIES = {"Segmentation", "Quantification", "Informatics", "Utilities", "Analysis"}


def test_extension_index_entry_is_valid():
    entry = json.loads((REPO / "GLANCE.json").read_text())
    for key in SCHEMA_REQUIRED:
        assert key in entry
    assert set(entry) <= set(SCHEMA_TYPES), "the schema allows no other keys"
    for key, value in entry.items():
        assert type(value) is SCHEMA_TYPES[key], key
    assert re.fullmatch(
        r"https://raw\.githubusercontent\.com/Slicer/Slicer/main/Schemas/"
        r"slicer-extension-catalog-entry-schema-v\d+\.\d+\.\d+\.json#?",
        entry["$schema"],
    )
    assert entry.get("scm_type", "git") in ("git", "local")
    assert 1 <= entry.get("tier", 1) <= 5
    assert all(isinstance(d, str) for d in entry.get("build_dependencies", []))
    # Index rules: https or git URL, repository named Slicer..., known category.
    assert entry["scm_url"].startswith("https://")
    repo_name = entry["scm_url"].rstrip("/").rsplit("/", 1)[-1].removesuffix(".git")
    assert "slicer" in repo_name.lower()
    assert entry["category"] in INDEX_CATEGORIES
    cmake = (REPO / "CMakeLists.txt").read_text()
    assert entry["category"] == _cmake_set(cmake, "EXTENSION_CATEGORY")
    assert entry["build_dependencies"] == _cmake_set(cmake, "EXTENSION_DEPENDS").split()


# -- icons -------------------------------------------------------------------


def test_icons_are_128px_pngs_drawn_by_make_icons():
    spec = importlib.util.spec_from_file_location("make_icons", REPO / "Resources" / "Icons" / "make_icons.py")
    make_icons = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(make_icons)
    from PIL import Image

    drawn = {
        REPO / "Resources/Icons/GLANCE.png": make_icons.extension_icon(),
        REPO / "GLANCESegmentation/Resources/Icons/GLANCESegmentation.png": make_icons.segmentation_icon(),
        REPO / "GLANCETraining/Resources/Icons/GLANCETraining.png": make_icons.training_icon(),
    }
    for path, big in drawn.items():
        with Image.open(path) as committed:
            assert committed.format == "PNG" and committed.size == (128, 128)
            expected = np.asarray(big.resize((128, 128), Image.Resampling.LANCZOS), dtype=np.int16)
            assert np.abs(np.asarray(committed.convert("RGBA"), dtype=np.int16) - expected).max() <= 1


# -- module logic on real MRML (slicer-core) -----------------------------------


@pytest.fixture
def modules(monkeypatch):
    """The two module files imported against slicer-core, with Qt and the module base classes stubbed."""
    slicer = pytest.importorskip("slicer")
    if hasattr(slicer, "app"):
        pytest.skip("inside the Slicer application: the module's own test covers this")

    def permissive(name):
        m = types.ModuleType(name)
        m.__getattr__ = lambda attr: mock.MagicMock(name=f"{name}.{attr}")
        return m

    slm = types.ModuleType("slicer.ScriptedLoadableModule")
    for cls_name in ("ScriptedLoadableModule", "ScriptedLoadableModuleWidget", "ScriptedLoadableModuleLogic"):
        setattr(slm, cls_name, type(cls_name, (), {"__init__": lambda self, *a: None}))
    slm.ScriptedLoadableModuleTest = type("ScriptedLoadableModuleTest", (), {})
    i18n = types.ModuleType("slicer.i18n")
    i18n.tr = lambda text: text
    i18n.translate = lambda context, text: text
    for name, module in {"slicer.ScriptedLoadableModule": slm, "slicer.i18n": i18n,
                         "qt": permissive("qt"), "ctk": permissive("ctk")}.items():  # fmt: skip
        monkeypatch.setitem(sys.modules, name, module)
        if name.startswith("slicer."):
            monkeypatch.setattr(slicer, name.split(".")[1], module, raising=False)
    loaded = {}
    for name in MODULES:
        spec = importlib.util.spec_from_file_location(name, module_file(name))
        loaded[name] = importlib.util.module_from_spec(spec)
        monkeypatch.setitem(sys.modules, name, loaded[name])  # GLANCETraining imports GLANCESegmentation
        spec.loader.exec_module(loaded[name])
    return types.SimpleNamespace(slicer=slicer, **loaded)


def _result_folder(folder: Path):
    """A finished engine run on a small CT: the files ``glance segment`` leaves in its result folder."""
    from glance import scene as S
    from glance.nodule import Nodule
    from glance.report import AlgorithmInfo, write_csv
    from glance.volume import Volume

    # Columns alternate soft tissue and air, enough of both for the engine's "is this CT in HU" check.
    hu = np.broadcast_to(np.where(np.arange(24) % 3 == 0, 40, -1000), (8, 20, 24)).astype(np.int16)
    ct = Volume(hu.copy(), spacing=(0.75, 0.75, 2.0), origin=(-9.0, -7.5, 40.0))
    labels = np.zeros(ct.shape, np.uint16)
    labels[2:4, 3:7, 4:8] = 1  # centre (k, j, i) = (2.5, 4.5, 5.5)
    labels[5:7, 12:16, 15:21] = 2  # centre (5.5, 13.5, 17.5)
    nodules = []
    for label, confidence in ((1, 0.9), (2, 0.6)):
        ijk = tuple(np.argwhere(labels == label).mean(axis=0)[::-1].tolist())
        nodules.append(Nodule(label, tuple(ct.ijk_to_lps(ijk).tolist()), ijk, 4.0, 3.0, 100.0,
                              -50.0, -40.0, "solid", confidence))  # fmt: skip
    nodes = S.build_scene(ct, labels, nodules, AlgorithmInfo("glance-small", "1.0"), create_volume_node=True)
    result = folder / "result"
    S.save_scene_files(nodes, result)
    write_csv(nodules, result / S.CSV_FILE)
    return ct, nodules


def _scene_with_ct_in_a_study(slicer, ct):
    from glance import scene as S

    scene = S.mrml_scene(slicer.vtkMRMLScene())
    volume = S.add_volume_node(scene, ct, name="chest CT")
    sh = scene.GetSubjectHierarchyNode()
    study = sh.CreateStudyItem(sh.CreateSubjectItem(sh.GetSceneItemID(), "patient"), "study")
    # Headless there is no plugin logic giving every node an item, as the application does.
    sh.CreateItem(study, volume)
    return scene, volume, study


def test_segmentation_logic_loads_reviews_and_navigates_a_result(modules, tmp_path):
    slicer = modules.slicer
    from glance import scene as S

    ct, nodules = _result_folder(tmp_path)
    scene, volume, study = _scene_with_ct_in_a_study(slicer, ct)
    logic = modules.GLANCESegmentation.GLANCESegmentationLogic()

    nodes = logic.loadResult(tmp_path, volume, scene=scene)

    sh = scene.GetSubjectHierarchyNode()
    for node in (nodes.segmentation_node, nodes.markups_node, nodes.table_node):
        assert sh.GetItemParent(sh.GetItemByDataNode(node)) == study  # under the CT's study
    assert nodes.volume_node is volume
    assert modules.GLANCESegmentation.GLANCESegmentationLogic.currentResult is nodes
    rows = logic.resultRows(tmp_path)
    assert [r["label"] for r in rows] == [1, 2] and [r["confidence"] for r in rows] == [0.9, 0.6]

    logic.showSurfaces(nodes, True)
    seg = nodes.segmentation_node
    assert seg.GetSegmentation().ContainsRepresentation("Closed surface")
    assert seg.GetDisplayNode().GetVisibility3D()
    logic.showSurfaces(nodes, False)
    assert not seg.GetDisplayNode().GetVisibility3D()

    logic.setAccepted(nodes, 1, False)
    assert S.accepted_labels(nodes) == [2]
    assert not seg.GetDisplayNode().GetSegmentVisibility(S.segment_id(1))

    # Clicking row 2 centres the slice views on nodule 2's centre.
    markups_logic = slicer.vtkSlicerMarkupsLogic()
    markups_logic.SetMRMLScene(scene)
    red = scene.AddNewNodeByClass("vtkMRMLSliceNode", "Red")
    red.SetLayoutName("Red")
    red.SetOrientationToAxial()
    with mock.patch.object(
        slicer, "modules", types.SimpleNamespace(markups=types.SimpleNamespace(logic=lambda: markups_logic)),
        create=True,
    ):
        logic.jumpToNodule(nodes, 1)
    centre = [red.GetSliceToRAS().GetElement(r, 3) for r in range(3)]
    np.testing.assert_allclose(centre, S.lps_to_ras(nodules[1].centre_lps), atol=1e-6)

    logic.removeResult(nodes)
    assert scene.GetNodeByID(seg.GetID()) is None
    assert modules.GLANCESegmentation.GLANCESegmentationLogic.currentResult is None


def test_export_explains_when_there_is_nothing_to_export(modules, tmp_path):
    slicer = modules.slicer
    ct, _ = _result_folder(tmp_path)
    scene, volume, _ = _scene_with_ct_in_a_study(slicer, ct)
    logic = modules.GLANCESegmentation.GLANCESegmentationLogic()
    nodes = logic.loadResult(tmp_path, volume, scene=scene)
    out = tmp_path / "seg.dcm"

    assert "not loaded from DICOM" in logic.exportDicomSeg(nodes, tmp_path, str(out), False)
    for label in (1, 2):
        logic.setAccepted(nodes, label, False)
    assert logic.exportDicomSeg(nodes, tmp_path, str(out), False) == "Nothing to export: no nodule is accepted."
    assert logic.exportDicomSeg(None, tmp_path, str(out), False).startswith("Nothing to export")
    assert not out.exists()


def _engine_args(command):
    """The engine's own argparse result for a command the module started."""
    from glance.cli import build_parser

    assert command[1:3] == ["-m", "glance.cli"]
    return build_parser(command[3]).parse_args(command[3:])


def headless_save_node(slicer, monkeypatch):
    """slicer.util.saveNode needs the application; headless the same storage node writes the file."""

    def save_node(node, filename):
        storage = node.CreateDefaultStorageNode()
        storage.SetFileName(str(filename))
        return bool(storage.WriteData(node))

    monkeypatch.setattr(slicer.util, "saveNode", save_node)


def _capture_starts(monkeypatch):
    from glance import runner

    started = []
    monkeypatch.setattr(runner.BackgroundJob, "start", lambda self: started.append(self.command) or self)
    return started


def test_segmentation_logic_starts_the_engine_with_its_real_arguments(modules, tmp_path, monkeypatch):
    slicer = modules.slicer
    from glance.io import read_volume

    ct, _ = _result_folder(tmp_path / "made")
    scene, volume, _ = _scene_with_ct_in_a_study(slicer, ct)
    headless_save_node(slicer, monkeypatch)
    started = _capture_starts(monkeypatch)
    logic = modules.GLANCESegmentation.GLANCESegmentationLogic()

    logic.startSegmentation(volume, "glance-small@1.0.0", "cpu", tmp_path / "run")
    args = _engine_args(started[-1])
    assert (args.command, args.out, args.model, args.device) == ("segment", str(tmp_path / "run" / "result"),
                                                                "glance-small@1.0.0", "cpu")
    # No thresholds given: the engine applies the model card's calibrated ones (else its defaults).
    assert (args.seg_threshold, args.det_threshold) == (None, None)
    from glance.cli.segment import threshold_arguments

    assert threshold_arguments(args) == {"seg_threshold": None, "det_threshold": None, "outline_fraction": None}
    assert args.progress_lines and args.force and not args.tta
    written = read_volume(args.input)  # the CT the engine will read is the one in the scene, in LPS
    np.testing.assert_array_equal(written.array, ct.array)
    np.testing.assert_allclose(written.origin, ct.origin, atol=1e-4)

    logic.startSegmentation(volume, "m", "auto", tmp_path / "run", segThreshold=0.65, detThreshold=0.4,
                            flipAveraging=True)
    args = _engine_args(started[-1])
    assert (args.seg_threshold, args.det_threshold, args.tta) == (0.65, 0.4, True)
    assert not args.keep_outside_lungs
    logic.startSegmentation(volume, "m", "auto", tmp_path / "run", keepOutsideLungs=True)
    assert _engine_args(started[-1]).keep_outside_lungs is True
    logic.startRefilter(tmp_path / "run", segThreshold=0.65, detThreshold=0.4)
    args = _engine_args(started[-1])
    assert (args.command, args.result, args.seg_threshold, args.det_threshold, args.keep_outside_lungs) == (
        "refilter", str(tmp_path / "run" / "result"), 0.65, 0.4, None)
    for keep in (True, False):  # the checkbox turns rule 8 off and back on for the saved result
        logic.startRefilter(tmp_path / "run", segThreshold=0.65, detThreshold=0.4, keepOutsideLungs=keep)
        assert _engine_args(started[-1]).keep_outside_lungs is keep


def test_device_choices(modules):
    choices = modules.GLANCESegmentation.GLANCESegmentationLogic().deviceChoices()
    assert choices[:2] == [("Automatic", "auto"), ("CPU", "cpu")]
    assert all(value.startswith("cuda") for _title, value in choices[2:])


def test_sliders_follow_the_operating_point_of_the_chosen_mode(modules, tmp_path, monkeypatch):
    from glance.model.weights import CARD_FILE, ModelCard

    monkeypatch.setenv("GLANCE_HOME", str(tmp_path))
    folder = tmp_path / "models" / "site-1.0.0"
    folder.mkdir(parents=True)
    thresholds = {"segmentation": 0.05, "detection": 0.4, "with_flips": {"segmentation": 0.15, "detection": 0.35}}
    (folder / CARD_FILE).write_text(ModelCard("site", "1.0.0", config={}, thresholds=thresholds).to_json())
    logic = modules.GLANCESegmentation.GLANCESegmentationLogic
    assert logic.defaultThresholds("site") == (0.05, 0.4)
    assert logic.defaultThresholds("site", flipAveraging=True) == (0.15, 0.35)


def test_flip_averaging_starts_on_only_with_a_gpu(modules):
    logic = modules.GLANCESegmentation.GLANCESegmentationLogic
    cpu_only = [("Automatic", "auto"), ("CPU", "cpu")]
    assert not logic.flipAveragingByDefault(cpu_only)
    assert logic.flipAveragingByDefault(cpu_only + [("GPU: H200", "cuda")])


# The export test's DICOM phantom and engine-made result folder (module-scoped fixture).
from test_export import MODEL, reviewed  # noqa: E402,F401


def test_export_writes_the_accepted_nodules_of_a_dicom_ct(modules, reviewed, tmp_path, monkeypatch):
    import pydicom

    from glance import scene as S
    from glance.dicomseg import read_dicom_seg
    from glance.export import read_source_ct

    slicer = modules.slicer
    files, result, labels, found, _ = reviewed
    ct, _ = read_source_ct(files)
    scene, volume, _ = _scene_with_ct_in_a_study(slicer, ct)
    # What Slicer's DICOM plugin leaves on a volume it loaded, and its database's file lookup.
    uids = {str(pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID): str(f) for f in files}
    volume.SetAttribute("DICOM.instanceUIDs", " ".join(uids))
    monkeypatch.setattr(slicer, "dicomDatabase", types.SimpleNamespace(fileForInstance=uids.get), raising=False)
    logic = modules.GLANCESegmentation.GLANCESegmentationLogic()
    run = result.parent  # the run folder: the engine's result is run/result
    nodes = logic.loadResult(run, volume, scene=scene)
    assert sorted(logic.dicomSourceFiles(volume)) == sorted(str(f) for f in files)

    logic.setAccepted(nodes, found[0], False)
    out = tmp_path / "seg.dcm"
    message = logic.exportDicomSeg(nodes, run, str(out), False)

    assert message == f"Exported 2 nodule(s) to {out}."
    expected = np.zeros_like(labels)
    for number, label in enumerate(found[1:], start=1):
        expected[labels == label] = number
    np.testing.assert_array_equal(read_dicom_seg(out, ct), expected)
    assert [r["accepted"] for r in logic.resultRows(run)] == [0, 1, 1]
    assert S.accepted_labels(logic.loadResult(run, volume, scene=scene)) == found[1:]  # review survives a reload


def test_training_logic_saves_the_reviewed_result_as_a_case(modules, tmp_path):
    slicer = modules.slicer
    from glance_training.datasets.cases import local_cases

    ct, nodules = _result_folder(tmp_path)
    scene, volume, _ = _scene_with_ct_in_a_study(slicer, ct)
    nodes = modules.GLANCESegmentation.GLANCESegmentationLogic().loadResult(tmp_path, volume, scene=scene)
    modules.GLANCESegmentation.GLANCESegmentationLogic().setAccepted(nodes, 2, False)  # reviewed: 2 rejected
    training = modules.GLANCETraining.GLANCETrainingLogic()

    folder = training.saveReviewedCase(nodes, tmp_path / "cases")

    assert sorted(p.name for p in folder.iterdir()) == ["ct.nrrd", "nodules-label.nrrd"]
    assert folder.name.startswith("chest_CT-")
    assert scene.GetNodesByClass("vtkMRMLLabelMapVolumeNode").GetNumberOfItems() == 0  # temporary node removed
    assert training.countCases(tmp_path / "cases") == 1
    case = local_cases(tmp_path / "cases")[0].load()
    np.testing.assert_array_equal(case.ct.array, ct.array)
    np.testing.assert_allclose(case.ct.origin, ct.origin, atol=1e-4)
    # Only the accepted nodule, exactly its voxels.
    assert case.labels.shape == ct.shape
    np.testing.assert_array_equal(np.argwhere(case.labels > 0), np.argwhere(_labels_of(ct, nodules[0])))
    assert len(case.nodules) == 1


def _labels_of(ct, nodule):
    mask = np.zeros(ct.shape, bool)
    mask[2:4, 3:7, 4:8] = True
    assert nodule.label == 1
    return mask


def test_training_logic_plots_loss_and_dice_per_epoch(modules):
    slicer = modules.slicer
    from glance import scene as S

    scene = S.mrml_scene(slicer.vtkMRMLScene())
    logic = modules.GLANCETraining.GLANCETrainingLogic()
    metrics = [{"epoch": 1.0, "loss": 0.9, "val_dice": 0.31}]
    chart = logic.updateMetricsPlot(metrics, scene=scene)
    metrics.append({"epoch": 2.0, "loss": 0.7, "val_dice": 0.45})
    assert logic.updateMetricsPlot(metrics, scene=scene) is chart  # one chart, updated in place

    table = scene.GetFirstNodeByName(modules.GLANCETraining.METRICS_TABLE_NAME).GetTable()
    assert table.GetNumberOfRows() == 2
    assert [table.GetColumnByName("val_dice").GetValue(r) for r in range(2)] == [0.31, 0.45]
    assert chart.GetNumberOfPlotSeriesNodes() == 2
    series = [chart.GetNthPlotSeriesNode(i) for i in range(2)]
    assert sorted(s.GetYColumnName() for s in series) == ["loss", "val_dice"]
    assert all(s.GetXColumnName() == "epoch" for s in series)


def test_training_logic_starts_train_and_evaluate_with_their_real_arguments(modules, tmp_path, monkeypatch):
    monkeypatch.setenv("GLANCE_HOME", str(tmp_path / "home"))
    started = _capture_starts(monkeypatch)
    logic = modules.GLANCETraining.GLANCETrainingLogic()

    run = logic.newRunFolder("site-v1")
    assert run.parent == tmp_path / "home" / "runs" and run.name.startswith("site-v1-")
    logic.startTraining([str(tmp_path / "a"), str(tmp_path / "b")], "glance-small@1.0.0", 3, "cpu", "site-v1", run)
    args = _engine_args(started[-1])
    assert (args.command, args.cases, args.base_model, args.epochs) == (
        "train", [str(tmp_path / "a"), str(tmp_path / "b")], "glance-small@1.0.0", 3)
    assert (args.device, args.name, args.run_dir, args.progress_lines, args.config) == (
        "cpu", "site-v1", str(run), True, None)

    logic.startEvaluation(str(tmp_path / "held"), "site-v1@1.0.0", "cpu", tmp_path / "report")
    args = _engine_args(started[-1])
    assert (args.command, args.model, args.cases, args.data) == (
        "evaluate", "site-v1@1.0.0", [str(tmp_path / "held")], [])
    # A held-out folder is scored whole, and the report lands where the module shows it.
    assert (args.split, args.out, args.device, args.progress_lines) == ("all", str(tmp_path / "report"), "cpu", True)
