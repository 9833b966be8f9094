"""GLANCE Training: fine-tune the nodule model on the site's own reviewed cases.

Training and evaluation run as ``glance train`` / ``glance evaluate`` in a
background process; live ``PROGRESS`` and ``METRIC`` lines drive the progress
bar and a loss / validation-Dice plot. A finished model is registered by the
engine and appears in GLANCE Segmentation's model selector. ``glance`` and
``glance_training`` are imported only when a button needs them.
"""

import logging
import re
import sys
import time
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
POLL_MS = 200
METRICS_TABLE_NAME = "GLANCE training metrics"
METRIC_COLUMNS = ("epoch", "loss", "val_dice")


def engine():
    """``glance`` (shipped with GLANCE Segmentation) and ``glance_training`` (this folder), on first use."""
    for folder in (MODULE_DIR, MODULE_DIR.parent / "GLANCESegmentation"):
        if folder.is_dir() and str(folder) not in sys.path:
            sys.path.append(str(folder))
    import glance.registry
    import glance.runner
    import glance.scene

    return glance


class GLANCETraining(ScriptedLoadableModule):
    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = _("GLANCE Training")
        self.parent.categories = [translate("qSlicerAbstractCoreModule", "Segmentation")]
        self.parent.dependencies = ["GLANCESegmentation"]
        self.parent.contributors = ["GLANCE for 3D Slicer contributors"]
        self.parent.helpText = _(
            "Fine-tunes a GLANCE nodule model on reviewed cases of this site, plots loss and "
            "validation Dice while it trains, registers the new version for GLANCE Segmentation "
            "and evaluates models on held-out cases. Research use only."
        )
        self.parent.acknowledgementText = _("GLANCE for 3D Slicer.")


class GLANCETrainingWidget(ScriptedLoadableModuleWidget, VTKObservationMixin):
    def __init__(self, parent=None):
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)
        self.logic = None
        self._job = None
        self._jobKind = None
        self._jobFolder = None  # training run folder, or evaluation report folder
        self._plotShown = False

    def setup(self):
        ScriptedLoadableModuleWidget.setup(self)
        uiWidget = slicer.util.loadUI(self.resourcePath("UI/GLANCETraining.ui"))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        uiWidget.setMRMLScene(slicer.mrmlScene)
        self.logic = GLANCETrainingLogic()

        self._pollTimer = qt.QTimer()
        self._pollTimer.setInterval(POLL_MS)
        self._pollTimer.connect("timeout()", self.onPollJob)

        self.ui.addFolderButton.connect("clicked(bool)", self.onAddFolder)
        self.ui.addSceneResultButton.connect("clicked(bool)", self.onAddSceneResult)
        self.ui.removeCasesButton.connect("clicked(bool)", self.onRemoveCases)
        self.ui.trainButton.connect("clicked(bool)", self.onTrainButton)
        self.ui.evaluateButton.connect("clicked(bool)", self.onEvaluateButton)
        self.ui.casesFolderPathLineEdit.connect("currentPathChanged(QString)", self.updateButtons)
        self.ui.heldOutPathLineEdit.connect("currentPathChanged(QString)", self.updateButtons)
        self.ui.newModelNameLineEdit.connect("textChanged(QString)", self.updateButtons)
        self.populateDevices()
        self.updateButtons()

    def cleanup(self):
        if self._job is not None:
            self._job.cancel()
        self.removeObservers()

    def enter(self):
        self.populateModels()

    def populateModels(self):
        names = [m.ref for m in self.logic.models()]  # name@version, as --model takes it
        for combo in (self.ui.baseModelSelector, self.ui.evaluationModelSelector):
            current = combo.currentText
            combo.clear()
            combo.addItems(names)
            if current in names:
                combo.setCurrentIndex(names.index(current))
        self.updateButtons()

    def populateDevices(self):
        import GLANCESegmentation

        self.ui.deviceSelector.clear()
        for title, value in GLANCESegmentation.GLANCESegmentationLogic().deviceChoices():
            self.ui.deviceSelector.addItem(title, value)

    def updateButtons(self, *args):
        training = self._job is not None and self._jobKind == "train"
        evaluating = self._job is not None and self._jobKind == "evaluate"
        self.ui.trainButton.enabled = training or (
            self._job is None and self.ui.casesList.count > 0 and self.ui.baseModelSelector.count > 0
        )
        self.ui.trainButton.text = _("Stop") if training else _("Train")
        self.ui.evaluateButton.enabled = evaluating or (
            self._job is None and bool(self.ui.heldOutPathLineEdit.currentPath)
        )
        self.ui.evaluateButton.text = _("Stop") if evaluating else _("Evaluate")
        self.ui.addFolderButton.enabled = bool(self.ui.casesFolderPathLineEdit.currentPath)
        self.ui.addSceneResultButton.enabled = bool(self.ui.casesFolderPathLineEdit.currentPath)

    def showStatus(self, text):
        self.ui.statusLabel.text = text
        logging.info(text)

    # -- cases -------------------------------------------------------------------

    def addCaseFolder(self, folder):
        existing = [self.ui.casesList.item(i).text() for i in range(self.ui.casesList.count)]
        if folder not in existing:
            self.ui.casesList.addItem(folder)
        self.updateButtons()

    def onAddFolder(self):
        with slicer.util.tryWithErrorDisplay(_("Not a folder of cases."), waitCursor=True):
            folder = self.ui.casesFolderPathLineEdit.currentPath
            count = self.logic.countCases(folder)
            self.addCaseFolder(folder)
            self.showStatus(_("{count} case(s) in {folder}.").format(count=count, folder=folder))

    def onAddSceneResult(self):
        import GLANCESegmentation

        nodes = GLANCESegmentation.GLANCESegmentationLogic.currentResult
        if nodes is None:
            slicer.util.errorDisplay(
                _("There is no GLANCE result in the scene: run GLANCE Segmentation and review it first."))
            return
        with slicer.util.tryWithErrorDisplay(_("Could not save the reviewed result."), waitCursor=True):
            folder = self.logic.saveReviewedCase(nodes, self.ui.casesFolderPathLineEdit.currentPath)
            self.addCaseFolder(str(folder))
            self.showStatus(_("Saved the reviewed result as case {folder}.").format(folder=folder))

    def onRemoveCases(self):
        for item in self.ui.casesList.selectedItems():
            self.ui.casesList.takeItem(self.ui.casesList.row(item))
        self.updateButtons()

    # -- jobs ----------------------------------------------------------------------

    def onTrainButton(self):
        if self._job is not None:
            self.stopJob()
            return
        if not self.logic.ensureDependencies():
            return
        cases = [self.ui.casesList.item(i).text() for i in range(self.ui.casesList.count)]
        name = self.ui.newModelNameLineEdit.text or self.ui.newModelNameLineEdit.placeholderText
        with slicer.util.tryWithErrorDisplay(_("Could not start training."), waitCursor=True):
            self._jobFolder = self.logic.newRunFolder(name)
            self._job = self.logic.startTraining(
                cases, self.ui.baseModelSelector.currentText, self.ui.epochsSpinBox.value,
                self.ui.deviceSelector.currentData, name, self._jobFolder,
            )  # fmt: skip
            self._plotShown = False
            self.startPolling("train", _("Training {name}...").format(name=name))

    def onEvaluateButton(self):
        if self._job is not None:
            self.stopJob()
            return
        if not self.logic.ensureDependencies():
            return
        with slicer.util.tryWithErrorDisplay(_("Could not start the evaluation."), waitCursor=True):
            self._jobFolder = self.logic.newEvaluationFolder()
            self._job = self.logic.startEvaluation(
                self.ui.heldOutPathLineEdit.currentPath, self.ui.evaluationModelSelector.currentText,
                self.ui.deviceSelector.currentData, self._jobFolder,
            )  # fmt: skip
            self.ui.evaluationReportBrowser.setPlainText("")
            self.startPolling("evaluate", _("Evaluating..."))

    def startPolling(self, kind, text):
        self._jobKind = kind
        self.ui.progressBar.setValue(0)
        self.showStatus(text)
        self._pollTimer.start()
        self.updateButtons()

    def stopJob(self):
        self._job.cancel()
        self.finishJob()
        self.showStatus(_("Stopped."))

    def finishJob(self):
        self._pollTimer.stop()
        self._job = None
        self._jobKind = None
        self.updateButtons()

    def onPollJob(self):
        job, kind = self._job, self._jobKind
        status = job.poll()
        if status.fraction is not None:
            self.ui.progressBar.setValue(int(round(1000 * status.fraction)))
        if kind == "train" and status.metrics:
            chart = self.logic.updateMetricsPlot(status.metrics)
            if not self._plotShown:
                slicer.modules.plots.logic().ShowChartInLayout(chart)
                self._plotShown = True
        if not status.state.finished:
            return
        self.finishJob()
        if status.state.value == "failed":
            title = _("GLANCE training") if kind == "train" else _("GLANCE evaluation")
            message = engine().runner.failure_message(title, status.error)  # one line, as in Segmentation
            self.showStatus(message)
            slicer.util.errorDisplay(message)
        elif status.state.value == "succeeded" and kind == "train":
            self.populateModels()  # the new version is registered now
            self.showStatus(_("Training finished; the new model is available in GLANCE Segmentation. "
                              "Loss curves: {path}").format(path=Path(self._jobFolder) / "curves.png"))
        elif status.state.value == "succeeded":
            self.ui.evaluationReportBrowser.setPlainText("\n".join(job.stdout_tail))
            self.showStatus(_("Evaluation finished; report and FROC curve in {folder}.").format(folder=self._jobFolder))


class GLANCETrainingLogic(ScriptedLoadableModuleLogic):
    """Training-side steps; each is an engine call (glance.runner, glance_training) or plain MRML."""

    def __init__(self):
        ScriptedLoadableModuleLogic.__init__(self)

    def models(self):
        return engine().registry.list_models()

    def ensureDependencies(self):
        import GLANCESegmentation

        return GLANCESegmentation.GLANCESegmentationLogic().ensureDependencies()

    @staticmethod
    def countCases(folder):
        engine()
        import glance_training.datasets.cases as cases

        return len(cases.local_cases(folder))

    @staticmethod
    def saveReviewedCase(nodes, casesFolder, scene=None):
        """A case folder (``ct.nrrd`` + ``nodules-label.nrrd`` of the accepted nodules) in ``casesFolder``."""
        glance = engine()
        scene = scene or nodes.scene
        ct = nodes.volume_node
        stem = re.sub(r"[^A-Za-z0-9_.-]+", "_", ct.GetName()).strip("_") or "case"
        folder = Path(casesFolder) / f"{stem}-{time.strftime('%Y%m%d-%H%M%S')}"
        folder.mkdir(parents=True, exist_ok=False)
        ids = _stringArray(glance.scene.segment_id(label) for label in glance.scene.accepted_labels(nodes))
        labelmap = scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode", "GLANCE reviewed labels")
        try:
            ok = slicer.vtkSlicerSegmentationsModuleLogic.ExportSegmentsToLabelmapNode(
                nodes.segmentation_node, ids, labelmap, ct
            )
            if not ok:
                raise RuntimeError(_("Could not convert the accepted nodules to a label map."))
            _writeNode(ct, folder / "ct.nrrd")
            _writeNode(labelmap, folder / "nodules-label.nrrd")
        finally:
            scene.RemoveNode(labelmap)
        return folder

    @staticmethod
    def newRunFolder(name):
        """Where ``glance train`` keeps checkpoints, history.csv and curves.png for this run."""
        return engine().runner.new_run_dir(name)

    @staticmethod
    def newEvaluationFolder():
        import tempfile

        return Path(tempfile.mkdtemp(prefix="glance-evaluation-", dir=slicer.app.temporaryPath))

    def startTraining(self, cases, baseModel, epochs, device, name, runFolder):
        """``glance train --cases ... --base-model ... --run-dir runFolder``; registers ``name`` when done."""
        runner = engine().runner
        command = runner.train_command(cases, baseModel, epochs, device, name, run_dir=runFolder)
        return runner.BackgroundJob(command).start()

    def startEvaluation(self, cases, model, device, outFolder):
        """``glance evaluate`` on every case of a held-out folder; the report goes to ``outFolder``."""
        runner = engine().runner
        command = runner.evaluate_command(model, outFolder, cases=[cases], split="all", device=device)
        return runner.BackgroundJob(command).start()

    @staticmethod
    def updateMetricsPlot(metrics, scene=None):
        """Loss and validation Dice per epoch in a table node and a plot chart; returns the chart."""
        scene = scene or slicer.mrmlScene
        import vtk

        table = scene.GetFirstNodeByName(METRICS_TABLE_NAME)
        if table is None:
            table = scene.AddNewNodeByClass("vtkMRMLTableNode", METRICS_TABLE_NAME)
            for column in METRIC_COLUMNS:
                array = vtk.vtkDoubleArray()  # the default column type is text, which cannot be plotted
                array.SetName(column)
                table.AddColumn(array)
        for column in METRIC_COLUMNS:
            array = table.GetTable().GetColumnByName(column)
            array.SetNumberOfTuples(len(metrics))
            for row, values in enumerate(metrics):
                array.SetValue(row, float(values.get(column, float("nan"))))
            array.Modified()
        table.GetTable().Modified()
        table.Modified()
        return _metricsChart(scene, table)


def _metricsChart(scene, table):
    chart = scene.GetFirstNodeByName("GLANCE training")
    if chart is not None:
        return chart
    chart = scene.AddNewNodeByClass("vtkMRMLPlotChartNode", "GLANCE training")
    chart.SetXAxisTitle("epoch")
    chart.SetYAxisTitle("loss / Dice")
    for column, title in (("loss", "training loss"), ("val_dice", "validation Dice")):
        series = scene.AddNewNodeByClass("vtkMRMLPlotSeriesNode", title)
        series.SetAndObserveTableNodeID(table.GetID())
        series.SetXColumnName("epoch")
        series.SetYColumnName(column)
        series.SetPlotType(series.PlotTypeScatter)
        chart.AddAndObservePlotSeriesNodeID(series.GetID())
    return chart


def _stringArray(values):
    import vtk

    array = vtk.vtkStringArray()
    for value in values:
        array.InsertNextValue(value)
    return array


def _writeNode(node, path):
    # Storage nodes rather than slicer.util.saveNode: the same call works headless (CI).
    storage = node.CreateDefaultStorageNode()
    storage.SetFileName(str(path))
    storage.SetUseCompression(True)
    if not storage.WriteData(node):
        raise OSError(f"{path}: could not write {node.GetName()}")


class GLANCETrainingTest(ScriptedLoadableModuleTest):
    """Inside Slicer: the metrics plot and the model list (training itself is covered by the engine tests)."""

    def setUp(self):
        slicer.mrmlScene.Clear()

    def runTest(self):
        self.setUp()
        self.test_metrics_plot()

    def test_metrics_plot(self):
        logic = GLANCETrainingLogic()
        chart = logic.updateMetricsPlot([{"epoch": 1, "loss": 0.9, "val_dice": 0.3},
                                         {"epoch": 2, "loss": 0.6, "val_dice": 0.5}])
        table = slicer.mrmlScene.GetFirstNodeByName(METRICS_TABLE_NAME)
        self.assertEqual(table.GetNumberOfRows(), 2)
        self.assertEqual(chart.GetNumberOfPlotSeriesNodes(), 2)
        self.assertTrue(logic.models(), "no model registered")
        self.delayDisplay("Test passed")
