"""GLANCE Segmentation: find and segment lung nodules in a chest CT.

A thin front over the ``glance`` engine shipped in this folder. The network runs
in a background process (``PythonSlicer -m glance.cli segment ...``) so Slicer
stays responsive; results come back as the engine's segmentation, fiducial and
table nodes. The engine and its heavy dependencies are imported only inside the
functions that need them, so loading this module at Slicer start-up is cheap.
"""

import logging
import sys
import tempfile
from pathlib import Path

import qt
import slicer
from slicer.i18n import tr as _
from slicer.i18n import translate
from slicer.ScriptedLoadableModule import (
    ScriptedLoadableModule,
    ScriptedLoadableModuleLogic,
    ScriptedLoadableModuleTest,
    ScriptedLoadableModuleWidget,
)
from slicer.util import VTKObservationMixin

MODULE_DIR = Path(__file__).resolve().parent
POLL_MS = 100
REFILTER_DELAY_MS = 300  # wait for the slider to settle before re-filtering
TABLE_COLUMNS = (  # (header, nodules.csv column, format)
    ("Accept", "accepted", None),
    ("Nodule", "name", "{}"),
    ("Long (mm)", "long_axis_mm", "{:.1f}"),
    ("Short (mm)", "short_axis_mm", "{:.1f}"),
    ("Volume (mm³)", "volume_mm3", "{:.0f}"),
    ("Type", "type", "{}"),
    ("Confidence", "confidence", "{:.0%}"),
)


def engine():
    """The ``glance`` package shipped next to this file, imported on first use."""
    if str(MODULE_DIR) not in sys.path:
        sys.path.insert(0, str(MODULE_DIR))
    import glance
    import glance.errors
    import glance.registry
    import glance.report
    import glance.runner
    import glance.scene

    return glance


class GLANCESegmentation(ScriptedLoadableModule):
    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = _("GLANCE Segmentation")
        self.parent.categories = [translate("qSlicerAbstractCoreModule", "Segmentation")]
        self.parent.dependencies = []
        self.parent.contributors = ["GLANCE for 3D Slicer contributors"]
        self.parent.helpText = _(
            "Finds and segments lung nodules in a chest CT with the GLANCE model, measures them "
            "and exports the accepted ones as DICOM-SEG. Research use only, not for clinical use."
        )
        self.parent.acknowledgementText = _(
            "GLANCE: a global-local dual-stream network for lung nodule segmentation. "
            "Test data: LIDC-IDRI (TCIA, CC BY 3.0)."
        )


class GLANCESegmentationWidget(ScriptedLoadableModuleWidget, VTKObservationMixin):
    def __init__(self, parent=None):
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)
        self.logic = None
        self._job = None
        self._jobKind = None
        self._jobOutDir = None  # where the running job writes; becomes _outDir once its result is loaded
        self._jobVolume = None
        self._outDir = None
        self._nodes = None
        self._rows = []
        self._fillingTable = False
        self._thresholdsModel = None  # the model whose thresholds the sliders were last set to
        self._modelThresholds = None  # the sliders' values then: unchanged sliders leave the choice to the engine

    def setup(self):
        ScriptedLoadableModuleWidget.setup(self)
        uiWidget = slicer.util.loadUI(self.resourcePath("UI/GLANCESegmentation.ui"))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        uiWidget.setMRMLScene(slicer.mrmlScene)
        self.logic = GLANCESegmentationLogic()

        self._pollTimer = qt.QTimer()
        self._pollTimer.setInterval(POLL_MS)
        self._pollTimer.connect("timeout()", self.onPollJob)
        self._refilterTimer = qt.QTimer()
        self._refilterTimer.setSingleShot(True)
        self._refilterTimer.setInterval(REFILTER_DELAY_MS)
        self._refilterTimer.connect("timeout()", self.onRefilter)

        self.ui.inputVolumeSelector.connect("currentNodeChanged(vtkMRMLNode*)", self.updateButtons)
        self.ui.modelSelector.connect("currentIndexChanged(int)", self.onModelChanged)
        self.ui.detectionThresholdSlider.connect("valueChanged(double)", self.onThresholdChanged)
        self.ui.segmentationThresholdSlider.connect("valueChanged(double)", self.onThresholdChanged)
        self.ui.segmentButton.connect("clicked(bool)", self.onSegmentButton)
        self.ui.resultsTable.connect("cellClicked(int,int)", self.onRowClicked)
        self.ui.resultsTable.connect("itemChanged(QTableWidgetItem*)", self.onItemChanged)
        self.ui.showSurfacesCheckBox.connect("toggled(bool)", self.onShowSurfaces)
        self.ui.flipAveragingCheckBox.connect("toggled(bool)", self.onFlipAveragingToggled)
        self.ui.keepOutsideLungsCheckBox.connect("toggled(bool)", self.onThresholdChanged)
        self.ui.exportButton.connect("clicked(bool)", self.onExportButton)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.StartCloseEvent, self.onSceneStartClose)

        self.ui.resultsTable.setColumnCount(len(TABLE_COLUMNS))
        self.ui.resultsTable.setHorizontalHeaderLabels([header for header, _key, _fmt in TABLE_COLUMNS])
        self.ui.progressBar.setValue(0)
        runner = engine().runner
        self.setThresholds(runner.DEFAULT_SEG_THRESHOLD, runner.DEFAULT_DET_THRESHOLD)
        self.populateDevices()
        self.updateButtons()

    def cleanup(self):
        if self._job is not None:
            self._job.cancel()
        self.removeObservers()

    def enter(self):
        # A model trained in GLANCE Training since the last visit shows up here.
        self.populateModels()

    def onSceneStartClose(self, caller, event):
        if self._job is not None:
            self._job.cancel()
            self.finishJob()
        self._outDir = self._nodes = None
        self._rows = []
        self.ui.resultsTable.setRowCount(0)
        self.updateButtons()

    # -- inputs ---------------------------------------------------------------

    def populateModels(self):
        current = self.ui.modelSelector.currentData
        self.ui.modelSelector.blockSignals(True)
        self.ui.modelSelector.clear()
        try:
            for entry in self.logic.models():
                self.ui.modelSelector.addItem(self.logic.modelTitle(entry), entry.ref)
        except Exception as exc:  # an unreadable user model must not break the module
            self.showStatus(_("Could not list models: {error}").format(error=exc))
        index = self.ui.modelSelector.findData(current) if current else -1
        self.ui.modelSelector.setCurrentIndex(max(index, 0))
        self.ui.modelSelector.blockSignals(False)
        self.onModelChanged()

    def populateDevices(self):
        self.ui.deviceSelector.clear()
        choices = self.logic.deviceChoices()
        for title, value in choices:
            self.ui.deviceSelector.addItem(title, value)
        self.ui.flipAveragingCheckBox.checked = self.logic.flipAveragingByDefault(choices)

    def onModelChanged(self, index=None):
        entry = self.logic.modelByRef(self.ui.modelSelector.currentData)
        self.ui.modelCardBrowser.setHtml(self.logic.modelCardHtml(entry) if entry else "")
        if entry is not None and entry.ref != self._thresholdsModel:  # not on every visit: keep the user's choice
            self._thresholdsModel = entry.ref
            self.setThresholds(*self.logic.defaultThresholds(entry.ref, self.ui.flipAveragingCheckBox.checked))
        self.updateButtons()

    def onFlipAveragingToggled(self, checked):
        """The sliders move to the model's operating point for that mode (its card may calibrate both)."""
        entry = self.logic.modelByRef(self.ui.modelSelector.currentData)
        if entry is not None:
            self.setThresholds(*self.logic.defaultThresholds(entry.ref, checked))

    def setThresholds(self, segThreshold, detThreshold):
        """The sliders at a model's thresholds, without re-filtering the result on screen (another model's)."""
        sliders = (self.ui.segmentationThresholdSlider, self.ui.detectionThresholdSlider)
        for slider, value in zip(sliders, (segThreshold, detThreshold)):
            slider.blockSignals(True)
            slider.value = value
            slider.blockSignals(False)
        self._modelThresholds = tuple(slider.value for slider in sliders)  # as the sliders round them

    def chosenThresholds(self):
        """(segmentation, detection) for a run; None where the slider still shows the model's own value,
        so the engine applies the card's exact calibrated threshold (and its report says so)."""
        values = (self.ui.segmentationThresholdSlider.value, self.ui.detectionThresholdSlider.value)
        return tuple(None if value == default else value for value, default in zip(values, self._modelThresholds))

    def updateButtons(self, *args):
        running = self._job is not None and self._jobKind == "segment"
        haveInput = self.ui.inputVolumeSelector.currentNode() is not None and self.ui.modelSelector.count > 0
        self.ui.segmentButton.enabled = running or haveInput
        self.ui.segmentButton.text = _("Cancel") if running else _("Segment nodules")
        self.ui.exportButton.enabled = self._nodes is not None and self._job is None

    def showStatus(self, text):
        self.ui.statusLabel.text = text
        logging.info(text)

    # -- segmentation job -------------------------------------------------------

    def onSegmentButton(self):
        if self._job is not None and self._jobKind == "segment":
            self._job.cancel()
            self.finishJob()
            self.showStatus(_("Cancelled."))
            return
        if not self.logic.ensureDependencies():
            self.showStatus(_("GLANCE needs its Python packages; nothing was run."))
            return
        # The result on screen stays until the new one is loaded: a failed run leaves the scene as it was.
        with slicer.util.tryWithErrorDisplay(_("Could not start segmentation."), waitCursor=True):
            segThreshold, detThreshold = self.chosenThresholds()
            self._jobOutDir = self.logic.newOutputFolder()
            self._jobVolume = self.ui.inputVolumeSelector.currentNode()
            self._job = self.logic.startSegmentation(
                self._jobVolume,
                self.ui.modelSelector.currentData,
                self.ui.deviceSelector.currentData,
                self._jobOutDir,
                segThreshold=segThreshold,
                detThreshold=detThreshold,
                flipAveraging=self.ui.flipAveragingCheckBox.checked,
                keepOutsideLungs=self.ui.keepOutsideLungsCheckBox.checked,
            )
            self.startPolling("segment", _("Segmenting..."))

    def onThresholdChanged(self, value):
        """A threshold or the lungs rule changed: re-filter the saved result (debounced)."""
        if self._outDir is not None and self._nodes is not None:
            self._refilterTimer.start()  # restarts while the slider moves

    def onRefilter(self):
        if self._job is not None:  # a refilter is running; try again when it is done
            self._refilterTimer.start()
            return
        self._job = self.logic.startRefilter(
            self._outDir,
            segThreshold=self.ui.segmentationThresholdSlider.value,
            detThreshold=self.ui.detectionThresholdSlider.value,
            keepOutsideLungs=self.ui.keepOutsideLungsCheckBox.checked,
        )
        self._jobOutDir, self._jobVolume = self._outDir, self._nodes.volume_node
        self.startPolling("refilter", _("Re-filtering..."))

    def startPolling(self, kind, text):
        self._jobKind = kind
        self.ui.progressBar.setValue(0)
        self.showStatus(text)
        self._pollTimer.start()
        self.updateButtons()

    def onPollJob(self):
        status = self._job.poll()
        if status.fraction is not None:
            self.ui.progressBar.setValue(int(round(1000 * status.fraction)))
        if status.stage:
            self.ui.statusLabel.text = status.stage
        if not status.state.finished:
            return
        kind, outDir, volumeNode = self._jobKind, self._jobOutDir, self._jobVolume
        self.finishJob()
        try:
            with slicer.util.WaitCursor():
                nodes, rows = self.logic.finishRun(kind, status, outDir, volumeNode, previous=self._nodes)
        except engine().errors.GlanceError as exc:
            self.showStatus(str(exc))
            slicer.util.errorDisplay(str(exc))
            return
        self.ui.progressBar.setValue(1000)
        self._outDir, self._nodes, self._rows = outDir, nodes, rows
        self.showResult()

    def finishJob(self):
        self._pollTimer.stop()
        self._job = None
        self._jobKind = None
        self._jobOutDir = self._jobVolume = None
        self.updateButtons()

    # -- results ----------------------------------------------------------------

    def showResult(self):
        self.logic.showSurfaces(self._nodes, self.ui.showSurfacesCheckBox.checked)
        self.fillTable()
        self.showStatus(self.logic.resultStatus(self._outDir, len(self._rows)))
        self.updateButtons()

    def fillTable(self):
        self._fillingTable = True
        table = self.ui.resultsTable
        table.setRowCount(len(self._rows))
        for r, row in enumerate(self._rows):
            for c, (_header, key, fmt) in enumerate(TABLE_COLUMNS):
                if fmt is None:
                    item = qt.QTableWidgetItem()
                    item.setFlags(qt.Qt.ItemIsUserCheckable | qt.Qt.ItemIsEnabled | qt.Qt.ItemIsSelectable)
                    item.setCheckState(qt.Qt.Checked if row[key] else qt.Qt.Unchecked)
                else:
                    item = qt.QTableWidgetItem(fmt.format(row[key]))
                table.setItem(r, c, item)
        table.resizeColumnsToContents()
        self._fillingTable = False

    def onItemChanged(self, item):
        if self._fillingTable or item.column() != 0 or self._nodes is None:
            return
        label = self._rows[item.row()]["label"]
        self.logic.setAccepted(self._nodes, label, item.checkState() == qt.Qt.Checked)

    def onRowClicked(self, row, column):
        if self._nodes is not None and column != 0:
            self.logic.jumpToNodule(self._nodes, row)

    def onShowSurfaces(self, show):
        if self._nodes is not None:
            self.logic.showSurfaces(self._nodes, show)

    def onExportButton(self):
        with slicer.util.tryWithErrorDisplay(_("DICOM-SEG export failed."), waitCursor=True):
            message = self.logic.exportDicomSeg(
                self._nodes, self._outDir, self.ui.exportPathLineEdit.currentPath,
                self.ui.addToDatabaseCheckBox.checked,
            )  # fmt: skip
            self.showStatus(message)
            slicer.util.infoDisplay(message)


class GLANCESegmentationLogic(ScriptedLoadableModuleLogic):
    """Collects inputs, starts the engine and brings results into the scene.

    Every step is an engine function (glance.runner, glance.scene, glance.registry,
    glance.export); this class only adds what needs the Slicer application.
    """

    # The result on screen, for GLANCE Training's "Add current reviewed result".
    currentResult = None

    def __init__(self):
        ScriptedLoadableModuleLogic.__init__(self)

    # -- models and devices -------------------------------------------------------

    def models(self):
        return engine().registry.list_models()

    def modelByRef(self, ref):
        """The registry entry for ``name@version``, the value the engine's ``--model`` takes."""
        return next((m for m in self.models() if m.ref == ref), None) if ref else None

    @staticmethod
    def modelTitle(entry):
        origin = _("shipped") if entry.shipped else _("trained here")
        return f"{entry.name} {entry.version} ({origin})"

    @staticmethod
    def modelCardHtml(entry):
        import html

        rows = "".join(
            f"<tr><td><b>{html.escape(field)}</b></td><td>{html.escape(text)}</td></tr>"
            for field, text in engine().registry.card_summary(entry.card)
        )
        return f"<h4>{html.escape(entry.name)} {html.escape(str(entry.version))}</h4><table>{rows}</table>"

    @staticmethod
    def defaultThresholds(ref, flipAveraging=False):
        """(segmentation, detection): the model card's calibrated values (for runs with flip averaging when
        asked and calibrated), else the engine's defaults."""
        return engine().registry.default_thresholds(ref, flipAveraging)

    def deviceChoices(self):
        choices = [(_("Automatic"), "auto"), (_("CPU"), "cpu")]
        gpus = engine().runner.gpu_names()
        for i, name in enumerate(gpus):
            choices.append((_("GPU: {name}").format(name=name), "cuda" if len(gpus) == 1 else f"cuda:{i}"))
        return choices

    @staticmethod
    def flipAveragingByDefault(choices):
        """Flip averaging starts on where a GPU makes its 4x network time cheap: on the held-out scans it
        more than halved the false positives at the default thresholds (docs/training.md)."""
        return any(value.startswith("cuda") for _title, value in choices)

    # -- first use ----------------------------------------------------------------

    def ensureDependencies(self):
        """Install what the engine needs, asking first; False if the user declined."""
        runner = engine().runner
        status = runner.dependency_status()
        if any(d.module == "torch" and not d.present for d in status):
            try:
                import PyTorchUtils
            except ModuleNotFoundError:
                slicer.util.errorDisplay(
                    _("GLANCE needs the PyTorch extension. Install it from the Extensions Manager."))
                return False
            if PyTorchUtils.PyTorchUtilsLogic().installTorch(askConfirmation=True) is None:
                return False
        missing = runner.missing_pip_requirements(status)
        if missing:
            question = _("GLANCE needs these Python packages: {packages}. Install them now?").format(
                packages=", ".join(missing)
            )
            if not slicer.util.confirmOkCancelDisplay(question):
                return False
            # Only packages Slicer does not ship; pinning the ones it ships makes pip fail rather
            # than replace them.
            slicer.util.pip_install(runner.pip_install_arguments(status))
        return True

    # -- running the engine -----------------------------------------------------------

    @staticmethod
    def newOutputFolder():
        return Path(tempfile.mkdtemp(prefix="glance-", dir=slicer.app.temporaryPath))

    @staticmethod
    def resultFolder(outDir):
        """Where the engine writes its result inside a run folder (the CT it read sits beside it)."""
        return Path(outDir) / "result"

    def startSegmentation(self, volumeNode, model, device, outDir, segThreshold=None, detThreshold=None,
                          flipAveraging=False, keepOutsideLungs=False):
        """``glance segment`` on the CT as Slicer holds it; a threshold left None is the engine's choice
        (the model card's calibrated value, else the engine's default). ``keepOutsideLungs`` also
        reports findings that do not touch the lungs (post-processing rule 8 off)."""
        runner = engine().runner
        # The engine reads the CT exactly as Slicer holds it (LPS NRRD), whatever it was loaded from.
        inputPath = Path(outDir) / "input.nrrd"
        if not slicer.util.saveNode(volumeNode, str(inputPath)):
            raise RuntimeError(_("Could not write the CT to {path}").format(path=inputPath))
        command = runner.segment_command(inputPath, self.resultFolder(outDir), model, device,
                                         seg_threshold=segThreshold, det_threshold=detThreshold,
                                         tta=flipAveraging, keep_outside_lungs=keepOutsideLungs)
        return runner.BackgroundJob(command).start()

    def startRefilter(self, outDir, segThreshold, detThreshold, keepOutsideLungs=None):
        """``glance refilter``: new thresholds, or the lungs rule turned on or off (None: as the run
        had it), on the saved maps; no network."""
        runner = engine().runner
        command = runner.refilter_command(self.resultFolder(outDir), seg_threshold=segThreshold,
                                          det_threshold=detThreshold, keep_outside_lungs=keepOutsideLungs)
        return runner.BackgroundJob(command).start()

    # -- results ----------------------------------------------------------------------

    def finishRun(self, kind, status, outDir, volumeNode, previous=None, scene=None):
        """A finished job's result in the scene in place of ``previous``: (nodes, table rows).

        All or nothing: when the engine failed or its result cannot be loaded, GlanceError carries the
        one line the user sees, and the scene (``previous`` included) is exactly as it was before.
        """
        glance = engine()
        title = _("GLANCE segmentation") if kind == "segment" else _("GLANCE re-filtering")
        if status.state is not glance.runner.JobState.SUCCEEDED:
            raise glance.errors.GlanceError(glance.runner.failure_message(title, status.error or status.state.value))
        try:
            rows = self.resultRows(outDir)
            nodes = self.loadResult(outDir, volumeNode, scene=scene)
        except Exception as exc:  # whatever the cause, the user gets one line; the details go to the log
            logging.debug("loading %s failed", outDir, exc_info=True)
            raise glance.errors.GlanceError(glance.runner.failure_message(_("Loading the result"), exc)) from exc
        if previous is not None:
            self.removeResult(previous)
        return nodes, rows

    def loadResult(self, outDir, volumeNode, scene=None):
        """The engine's nodes for a finished run, placed under the CT's study; all or nothing (glance.scene)."""
        nodes = engine().scene.load_result(self.resultFolder(outDir), scene=scene or slicer.mrmlScene,
                                           reference_volume_node=volumeNode)
        GLANCESegmentationLogic.currentResult = nodes
        return nodes

    @classmethod
    def resultStatus(cls, outDir, count):
        """The line under the table: the nodules found, and the findings held back as away from the
        lungs, so that a reader whose CT cuts the lungs knows to look."""
        text = _("{count} nodule(s) found.").format(count=count)
        dropped = engine().report.dropped_outside_lungs(cls.resultFolder(outDir))
        if dropped:
            text += " " + _("{dropped} finding(s) away from the lungs not shown "
                            "(Keep findings outside the lungs shows them).").format(dropped=dropped)
        return text

    @classmethod
    def resultRows(cls, outDir):
        glance = engine()
        return glance.report.read_csv(cls.resultFolder(outDir) / glance.scene.CSV_FILE)

    @staticmethod
    def removeResult(nodes):
        engine().scene.remove_result(nodes)
        if GLANCESegmentationLogic.currentResult is nodes:
            GLANCESegmentationLogic.currentResult = None

    @staticmethod
    def showSurfaces(nodes, show):
        if show:
            nodes.segmentation_node.CreateClosedSurfaceRepresentation()
        nodes.segmentation_node.GetDisplayNode().SetVisibility3D(bool(show))

    @staticmethod
    def setAccepted(nodes, label, accepted):
        engine().scene.set_nodule_accepted(nodes, label, accepted)

    @staticmethod
    def jumpToNodule(nodes, row):
        # Control points are in table-row order (glance.scene).
        slicer.modules.markups.logic().JumpSlicesToNthPointInMarkup(nodes.markups_node.GetID(), row, True)

    # -- export -------------------------------------------------------------------------

    @staticmethod
    def dicomSourceFiles(volumeNode):
        """The DICOM files the CT was loaded from; empty when it is not from the DICOM database."""
        uids = (volumeNode.GetAttribute("DICOM.instanceUIDs") or "").split()
        database = getattr(slicer, "dicomDatabase", None)
        if not uids or database is None:
            return []
        files = [database.fileForInstance(uid) for uid in uids]
        return [f for f in files if f]

    def exportDicomSeg(self, nodes, outDir, outPath, addToDatabase):
        """Write the accepted nodules as DICOM-SEG (glance.export); returns the message for the user.

        The review (accepted flags) is saved into the result's nodules.csv as well.
        """
        glance = engine()
        if nodes is None:
            return _("Nothing to export: run Segment nodules first.")
        accepted = glance.scene.accepted_labels(nodes)
        if not accepted:
            return _("Nothing to export: no nodule is accepted.")
        sources = self.dicomSourceFiles(nodes.volume_node)
        if not sources:
            return _(
                "The CT was not loaded from DICOM, so there is no study to attach a DICOM-SEG to. "
                "Load the CT through the DICOM module, or save the segmentation as .seg.nrrd instead."
            )
        if not outPath:
            outPath = str(Path(outDir) / "export" / "nodules-seg.dcm")
        import glance.export

        path = glance.export.export_dicom_seg(self.resultFolder(outDir), sources, Path(outPath), accepted)
        if path is None:
            return _("Nothing to export: the accepted nodules have no voxels.")
        if addToDatabase:
            from DICOMLib import DICOMUtils

            # Indexes the file's folder: the default export folder holds only this SEG.
            DICOMUtils.importDicom(str(Path(path).parent))
        return _("Exported {count} nodule(s) to {path}.").format(count=len(accepted), path=path)


class GLANCESegmentationTest(ScriptedLoadableModuleTest):
    """End to end inside Slicer, with the engine's real commands:
    ``glance phantom`` (DICOM) -> DICOM database -> ``glance segment`` (default model and
    thresholds) -> nodes in the scene -> review -> DICOM-SEG, read back voxel for voxel."""

    # A small phantom: the module test must run in minutes on a CPU.
    PHANTOM = {"seed": 0, "nodules": 3, "shape": (256, 256, 64), "spacing": (1.25, 1.25, 2.5)}

    def setUp(self):
        slicer.mrmlScene.Clear()

    def runTest(self):
        self.setUp()
        self.test_phantom_end_to_end()

    def test_phantom_end_to_end(self):
        import json

        import numpy as np

        glance = engine()
        runner = glance.runner
        logic = GLANCESegmentationLogic()
        work = Path(tempfile.mkdtemp(prefix="glance-test-", dir=slicer.app.temporaryPath))
        self.delayDisplay("Writing the phantom (glance phantom --format dicom)")
        phantomDir = work / "phantom"
        phantom = runner.BackgroundJob(runner.phantom_command(phantomDir, "dicom", **self.PHANTOM)).start().wait(600)
        self.assertEqual(phantom.state.value, "succeeded", phantom.error)
        truth = json.loads((phantomDir / "nodules.json").read_text())
        self.assertEqual(len(truth["nodules"]), self.PHANTOM["nodules"])

        from DICOMLib import DICOMUtils

        with DICOMUtils.TemporaryDICOMDatabase() as db:
            DICOMUtils.importDicom(str(phantomDir / "ct"), db)
            nodeIDs = DICOMUtils.loadPatientByUID(db.patients()[0])
            ct = slicer.mrmlScene.GetNodeByID(nodeIDs[0])
            sources = logic.dicomSourceFiles(ct)
            self.assertEqual(len(sources), self.PHANTOM["shape"][2])

            self.delayDisplay("Segmenting with the default model (glance segment)")
            models = logic.models()
            self.assertTrue(models, "no model registered")
            model = ([m for m in models if m.name == glance.registry.DEFAULT_MODEL] or models)[-1]
            run = work / "run"
            run.mkdir()
            job = logic.startSegmentation(ct, model.ref, "auto", run)
            while not job.poll().state.finished:
                slicer.app.processEvents()  # the GUI stays responsive while the engine runs
            self.assertEqual(job.status.state.value, "succeeded", job.status.error)
            self.assertEqual(job.status.fraction, 1.0)

            nodes, _rows = logic.finishRun("segment", job.status, run, ct)  # what the widget does with it
            markups = nodes.markups_node
            found = [markups.GetNthControlPointPosition(i) for i in range(markups.GetNumberOfControlPoints())]
            for nodule in truth["nodules"]:  # every ground-truth nodule is found at its centre
                ras = glance.scene.lps_to_ras(nodule["centre_lps"])
                nearest = min((sum((a - b) ** 2 for a, b in zip(p, ras)) ** 0.5 for p in found), default=1e9)
                self.assertLess(nearest, max(3.0, nodule["diameter_mm"] / 2))

            self.delayDisplay("Rejecting one nodule and exporting DICOM-SEG")
            labels = glance.scene.accepted_labels(nodes)
            logic.setAccepted(nodes, labels[0], False)
            accepted = labels[1:]
            out = work / "seg" / "nodules.dcm"
            message = logic.exportDicomSeg(nodes, run, str(out), False)
            self.assertTrue(out.is_file(), message)

            import glance.dicomseg
            import glance.export

            grid, _files = glance.export.read_source_ct(sources)
            resultLabels = glance.export.labels_on_grid(logic.resultFolder(run) / glance.scene.SEGMENTATION_FILE, grid)
            expected = np.zeros_like(resultLabels)
            for number, label in enumerate(accepted, start=1):
                expected[resultLabels == label] = number
            self.assertTrue(np.array_equal(glance.dicomseg.read_dicom_seg(out, grid), expected))
            rows = logic.resultRows(run)  # the review is kept in the result
            self.assertEqual([r["accepted"] for r in rows], [int(r["label"] in accepted) for r in rows])
        self.delayDisplay("Test passed")
