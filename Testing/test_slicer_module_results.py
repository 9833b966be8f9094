"""GLANCE Segmentation after a run, without the Slicer application (issues 4 and 8).

- Any engine failure reaches the user as one readable line, and the scene is exactly as it was
  before the click (no partial nodes), whether the engine failed or loading its result failed half-way.
- The threshold sliders start at the selected model's calibrated thresholds, and the card says so.

The module logic runs against real MRML (slicer-core) and real engine processes; only Qt and the
module base classes are stubbed (the ``modules`` fixture of test_slicer_modules).
"""

from __future__ import annotations

import contextlib
import types
from pathlib import Path
from unittest import mock

import numpy as np
import pytest

from glance import runner
from glance.errors import GlanceError
from glance.model.card import CARD_FILE, ModelCard
from test_slicer_modules import _result_folder, _scene_with_ct_in_a_study, headless_save_node, modules  # noqa: F401

SUCCEEDED = runner.JobStatus(state=runner.JobState.SUCCEEDED, returncode=0)


def _snapshot(scene):
    """Every node (ID, class, name) and every subject hierarchy item (name, parent) of ``scene``."""
    import vtk

    nodes = [scene.GetNthNode(i) for i in range(scene.GetNumberOfNodes())]
    sh = scene.GetSubjectHierarchyNode()
    ids = vtk.vtkIdList()
    sh.GetItemChildren(sh.GetSceneItemID(), ids, True)
    items = [(sh.GetItemName(ids.GetId(i)), sh.GetItemParent(ids.GetId(i))) for i in range(ids.GetNumberOfIds())]
    return [(n.GetID(), n.GetClassName(), n.GetName()) for n in nodes], items


@pytest.fixture
def reviewing(modules, tmp_path):
    """A CT in a study with a previous GLANCE result on screen, as the user sees it before clicking again."""
    ct, _ = _result_folder(tmp_path / "previous")
    scene, volume, study = _scene_with_ct_in_a_study(modules.slicer, ct)
    logic = modules.GLANCESegmentation.GLANCESegmentationLogic()
    previous = logic.loadResult(tmp_path / "previous", volume, scene=scene)
    return types.SimpleNamespace(ct=ct, scene=scene, volume=volume, logic=logic, previous=previous)


def _previous_still_there(reviewing):
    nodes = reviewing.previous
    for node in (nodes.segmentation_node, nodes.markups_node, nodes.table_node):
        assert reviewing.scene.IsNodePresent(node)
    assert type(reviewing.logic).currentResult is nodes


# -- engine failures -------------------------------------------------------------------------


def test_failed_engine_runs_are_one_line_and_leave_the_scene_as_it_was(modules, reviewing, tmp_path, monkeypatch):
    from glance import registry, scene as S
    from glance.volume import Volume

    monkeypatch.setenv("GLANCE_HOME", str(tmp_path / "home"))  # the child inherits it: no site models
    headless_save_node(modules.slicer, monkeypatch)
    logic = reviewing.logic
    # A volume that is not a CT in HU: all zeros (what an unsigned image without its rescale looks like).
    flat = S.add_volume_node(reviewing.scene, Volume(np.zeros((6, 16, 16), np.int16), spacing=(1.0, 1.0, 2.0)),
                             name="not a CT")
    before = _snapshot(reviewing.scene)

    # Both real engine runs at once, exactly as the module starts them.
    no_model = logic.startSegmentation(reviewing.volume, "no-such-model@9", "cpu", tmp_path / "run1")
    not_ct = logic.startSegmentation(flat, "glance-small", "cpu", tmp_path / "run2")
    messages = []
    for job, run, volume in ((no_model, tmp_path / "run1", reviewing.volume), (not_ct, tmp_path / "run2", flat)):
        status = job.wait(timeout=180)
        assert status.state is runner.JobState.FAILED, status
        with pytest.raises(GlanceError) as failure:
            logic.finishRun("segment", status, run, volume, previous=reviewing.previous, scene=reviewing.scene)
        messages.append(str(failure.value))

    known = ", ".join(sorted({e.ref for e in registry.list_models()}))
    assert messages[0] == (f"GLANCE segmentation failed: no model 'no-such-model@9' (known: {known}); "
                           "train one with 'glance train'")
    assert messages[1].startswith(f"GLANCE segmentation failed: {tmp_path / 'run2' / 'input.nrrd'}: "
                                  "does not look like CT in HU (1st-99th percentile [0, 0]")
    assert all("\n" not in m for m in messages)
    assert _snapshot(reviewing.scene) == before
    _previous_still_there(reviewing)


def test_a_cancelled_or_failed_status_never_touches_the_scene(reviewing, tmp_path):
    before = _snapshot(reviewing.scene)
    cancelled = runner.JobStatus(state=runner.JobState.CANCELLED, returncode=-9)
    crashed = runner.JobStatus(state=runner.JobState.FAILED, returncode=7,
                               error=runner.readable_error([], 7))
    for kind, status, message in (
        ("segment", cancelled, "GLANCE segmentation failed: cancelled"),
        ("refilter", crashed, "GLANCE re-filtering failed: the engine stopped with exit code 7"),
    ):
        with pytest.raises(GlanceError, match=f"^{message}$"):
            # The folder holds a good result: a failed job's output is never loaded.
            reviewing.logic.finishRun(kind, status, tmp_path / "previous", reviewing.volume,
                                      previous=reviewing.previous, scene=reviewing.scene)
    assert _snapshot(reviewing.scene) == before
    _previous_still_there(reviewing)


# -- loading the result fails half-way ------------------------------------------------------------


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[:300])  # header cut mid-way, no data


def _drop_last_csv_row(path: Path) -> None:
    lines = path.read_text().splitlines(keepends=True)
    path.write_text("".join(lines[:-1]))


def _reject_first_nodule(path: Path) -> None:
    header, first, *rest = path.read_text().splitlines(keepends=True)
    column = header.rstrip("\n").split(",").index("accepted")
    cells = first.rstrip("\n").split(",")
    cells[column] = "0"
    path.write_text("".join([header, ",".join(cells) + "\n", *rest]))


# (what breaks, how, what the message names). The later the failure, the more nodes the load had added.
BREAKAGES = {
    "segmentation missing": ("nodules.seg.nrrd", Path.unlink, "nodules.seg.nrrd: missing from the result folder"),
    # Slicer's own reader would abort the process on this one (an uncaught ITK exception).
    "segmentation header cut": ("nodules.seg.nrrd", _truncate, "nodules.seg.nrrd: not a readable NRRD segmentation"),
    "segmentation data cut": ("nodules.seg.nrrd", lambda p: p.write_bytes(p.read_bytes()[:-10]),
                              "nodules.seg.nrrd: cannot read the segmentation data"),
    "markups corrupt": ("nodules.mrk.json", lambda p: p.write_text("{not json"),
                        "nodules.mrk.json: Slicer could not read it"),
    "csv disagrees": ("nodules.csv", _drop_last_csv_row, "segments, control points and CSV rows disagree (2, 2, 1)"),
}


@pytest.mark.parametrize("breakage", sorted(BREAKAGES))
def test_loading_a_broken_result_is_all_or_nothing(reviewing, tmp_path, breakage):
    name, corrupt, problem = BREAKAGES[breakage]
    _result_folder(tmp_path / "new")  # a complete result of the same CT; then one file goes bad
    corrupt(tmp_path / "new" / "result" / name)
    before = _snapshot(reviewing.scene)

    with pytest.raises(GlanceError) as failure:
        reviewing.logic.finishRun("segment", SUCCEEDED, tmp_path / "new", reviewing.volume,
                                  previous=reviewing.previous, scene=reviewing.scene)

    message = str(failure.value)
    assert message.startswith("Loading the result failed: ") and problem in message and "\n" not in message
    assert _snapshot(reviewing.scene) == before
    _previous_still_there(reviewing)


def test_a_failure_after_every_node_was_added_removes_them_all(reviewing, tmp_path, monkeypatch):
    # The last step of loading (re-applying a rejected nodule) fails: segmentation, markups, table and
    # their display nodes are all in the scene by then, and must all go.
    from glance import scene as S

    _result_folder(tmp_path / "new")
    _reject_first_nodule(tmp_path / "new" / "result" / "nodules.csv")
    added = []
    original = S.set_nodule_accepted

    def fail(nodes, label, accepted):
        added.extend(n.GetID() for n in (nodes.segmentation_node, nodes.markups_node, nodes.table_node))
        raise RuntimeError("the table node\nrefused the change")

    monkeypatch.setattr(S, "set_nodule_accepted", fail)
    before = _snapshot(reviewing.scene)
    with pytest.raises(GlanceError, match="^Loading the result failed: the table node refused the change$"):
        reviewing.logic.finishRun("segment", SUCCEEDED, tmp_path / "new", reviewing.volume,
                                  previous=reviewing.previous, scene=reviewing.scene)
    assert len(added) == 3  # the failure really came after all three nodes were in the scene
    assert _snapshot(reviewing.scene) == before
    _previous_still_there(reviewing)

    monkeypatch.setattr(S, "set_nodule_accepted", original)  # the same folder loads once nothing fails
    nodes, rows = reviewing.logic.finishRun("segment", SUCCEEDED, tmp_path / "new", reviewing.volume,
                                            previous=reviewing.previous, scene=reviewing.scene)
    assert [r["accepted"] for r in rows] == [0, 1] and S.accepted_labels(nodes) == [2]


def test_a_loaded_result_replaces_the_previous_one(reviewing, tmp_path):
    from glance import scene as S

    _result_folder(tmp_path / "new")
    before_ids, before_items = _snapshot(reviewing.scene)
    old_ids = {n.GetID() for n in (reviewing.previous.segmentation_node, reviewing.previous.markups_node,
                                   reviewing.previous.table_node)}

    nodes, rows = reviewing.logic.finishRun("segment", SUCCEEDED, tmp_path / "new", reviewing.volume,
                                            previous=reviewing.previous, scene=reviewing.scene)

    after_ids, after_items = _snapshot(reviewing.scene)
    assert not old_ids & {i for i, _c, _n in after_ids}
    # The same kinds of nodes as before, display nodes included: one result replaced by one, nothing left over.
    assert sorted(c for _i, c, _n in after_ids) == sorted(c for _i, c, _n in before_ids)
    data = lambda ids: sorted((c, n) for _i, c, n in ids if "Display" not in c)  # noqa: E731
    assert data(after_ids) == data(before_ids)
    assert sorted(after_items) == sorted(before_items)
    assert type(reviewing.logic).currentResult is nodes and nodes.volume_node is reviewing.volume
    assert [r["label"] for r in rows] == [1, 2]
    assert S.accepted_labels(nodes) == [1, 2]


# -- the widget: one message, thresholds from the model card ------------------------------------


class _Slider:
    """A ctkSliderWidget as the widget uses it; records valueChanged signals it would emit."""

    def __init__(self, value):
        self._value, self.blocked, self.emitted = value, False, []

    @property
    def value(self):
        return self._value

    @value.setter
    def value(self, value):
        self._value = round(min(max(value, 0.01), 0.99), 2)  # the .ui's range and decimals
        if not self.blocked:
            self.emitted.append(self._value)

    def blockSignals(self, blocked):
        self.blocked = blocked


def _widget(modules, ref=None):
    widget = modules.GLANCESegmentation.GLANCESegmentationWidget()
    widget.logic = modules.GLANCESegmentation.GLANCESegmentationLogic()
    widget.ui = mock.MagicMock()
    widget.ui.segmentationThresholdSlider = _Slider(0.5)
    widget.ui.detectionThresholdSlider = _Slider(0.3)
    widget.ui.modelSelector.currentData = ref
    widget.ui.modelSelector.count = 1
    widget.setThresholds(runner.DEFAULT_SEG_THRESHOLD, runner.DEFAULT_DET_THRESHOLD)  # what setup() does
    return widget


def _register(home: Path, name: str, thresholds: dict) -> str:
    folder = home / "models" / f"{name}-1.0.0"
    folder.mkdir(parents=True)
    (folder / CARD_FILE).write_text(ModelCard(name, "1.0.0", config={}, thresholds=thresholds).to_json())
    return f"{name}@1.0.0"


def test_sliders_start_at_the_selected_models_calibrated_thresholds(modules, tmp_path, monkeypatch):
    monkeypatch.setenv("GLANCE_HOME", str(tmp_path))
    calibrated = _register(tmp_path, "site-calibrated", {
        "segmentation": 0.35, "detection": 0.15,
        "calibration": {"data": ["lidc:/val"], "split": "val", "rule": "best mean Dice"}})
    plain = _register(tmp_path, "site-plain", {})
    widget = _widget(modules, calibrated)
    seg, det = widget.ui.segmentationThresholdSlider, widget.ui.detectionThresholdSlider

    widget.onModelChanged()
    assert (seg.value, det.value) == (0.35, 0.15)
    assert seg.emitted == det.emitted == []  # no re-filtering of the result on screen
    assert widget.chosenThresholds() == (None, None)  # untouched: the engine applies the card's exact values
    html = widget.ui.modelCardBrowser.setHtml.call_args.args[0]
    assert ("<td><b>thresholds</b></td><td>segmentation 0.35 (calibrated), detection 0.15 (calibrated); "
            "calibration: data: (lidc:/val); split: val; rule: best mean Dice</td>") in html

    seg.value = 0.6  # the user moves a slider; coming back to the module keeps it
    widget.onModelChanged()
    assert widget.chosenThresholds() == (0.6, None)

    widget.ui.modelSelector.currentData = plain
    widget.onModelChanged()
    assert (seg.value, det.value) == (runner.DEFAULT_SEG_THRESHOLD, runner.DEFAULT_DET_THRESHOLD)
    assert widget.chosenThresholds() == (None, None)
    assert "segmentation 0.5 (engine default), detection 0.3 (engine default)" in (
        widget.ui.modelCardBrowser.setHtml.call_args.args[0])


def test_widget_shows_an_engine_failure_as_one_message_and_keeps_the_result(modules, reviewing, monkeypatch):
    slicer = modules.slicer
    shown = []
    monkeypatch.setattr(slicer.util, "errorDisplay", lambda text, **kw: shown.append(text))
    monkeypatch.setattr(slicer.util, "WaitCursor", contextlib.nullcontext)
    widget = _widget(modules)
    widget._pollTimer = mock.MagicMock()
    widget._nodes, widget._outDir, widget._rows = reviewing.previous, Path("previous-run"), [{"label": 1}]
    error = "/tmp/run/input.nrrd: does not look like CT in HU"
    widget._job = types.SimpleNamespace(poll=lambda: runner.JobStatus(runner.JobState.FAILED, returncode=2,
                                                                      error=error))
    widget._jobKind, widget._jobOutDir, widget._jobVolume = "segment", Path("new-run"), reviewing.volume
    before = _snapshot(reviewing.scene)

    widget.onPollJob()

    assert shown == [f"GLANCE segmentation failed: {error}"]
    assert widget.ui.statusLabel.text == shown[0]
    assert (widget._nodes, widget._outDir, widget._job) == (reviewing.previous, Path("previous-run"), None)
    assert _snapshot(reviewing.scene) == before


def test_training_module_shows_an_engine_failure_as_one_message(modules, monkeypatch):
    slicer = modules.slicer
    shown = []
    monkeypatch.setattr(slicer.util, "errorDisplay", lambda text, **kw: shown.append(text))
    widget = modules.GLANCETraining.GLANCETrainingWidget()
    widget.ui = mock.MagicMock()
    widget.ui.casesList.count = widget.ui.baseModelSelector.count = 0
    widget.ui.heldOutPathLineEdit.currentPath = ""
    widget._pollTimer = mock.MagicMock()
    error = "no training cases in /site/cases"
    widget._job = types.SimpleNamespace(poll=lambda: runner.JobStatus(runner.JobState.FAILED, returncode=2,
                                                                      error=error))
    widget._jobKind = "train"

    widget.onPollJob()

    assert shown == [f"GLANCE training failed: {error}"] and widget.ui.statusLabel.text == shown[0]
    assert widget._job is None


@pytest.mark.parametrize("report, expected", [
    ('{"n_nodules": 1, "n_dropped_outside_lungs": 2}',
     "1 nodule(s) found. 2 finding(s) away from the lungs not shown (Keep findings outside the lungs shows them)."),
    ('{"n_nodules": 1, "n_dropped_outside_lungs": 0}', "1 nodule(s) found."),
    ('{"n_nodules": 1, "n_dropped_outside_lungs": null}', "1 nodule(s) found."),  # the rule was off
    ('{"n_nodules": 1}', "1 nodule(s) found."),  # a result from before the count
    ("{not json", "1 nodule(s) found."),
    (None, "1 nodule(s) found."),
])
def test_the_status_line_says_how_many_findings_away_from_the_lungs_are_not_shown(modules, tmp_path, report,
                                                                                   expected):
    logic = modules.GLANCESegmentation.GLANCESegmentationLogic()
    folder = logic.resultFolder(tmp_path)
    folder.mkdir()
    if report is not None:
        (folder / "report.json").write_text(report)
    assert logic.resultStatus(tmp_path, 1) == expected
