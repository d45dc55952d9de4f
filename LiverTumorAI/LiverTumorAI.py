"""3D Slicer module LiverTumorAI: liver and liver-tumor segmentation of a loaded CT volume.

A thin shell around `LiverTumorAILib`: the module description, the panel (widget), a logic
class for scripts, and the self-test. The engine (`livertumorai`, next to this file) runs in
a child process started with Slicer's Python launcher, so the application stays responsive
and torch is never imported here. Results go into a segmentation node ("Liver",
"Liver tumor"), a per-slice table with a chart, and a lesion table, one set per input volume.
"""

from __future__ import annotations

import json
import logging
import time
from typing import Annotated

import qt
import slicer
import vtk
from slicer import vtkMRMLScalarVolumeNode
from slicer.i18n import tr as _
from slicer.i18n import translate
from slicer.parameterNodeWrapper import Choice, WithinRange, parameterNodeWrapper
from slicer.ScriptedLoadableModule import (
    ScriptedLoadableModule,
    ScriptedLoadableModuleLogic,
    ScriptedLoadableModuleTest,
    ScriptedLoadableModuleWidget,
)
from slicer.util import VTKObservationMixin

from livertumorai.constants import DEFAULT_MIN_LESION_VOLUME_MM3, DEFAULT_TUMOR_THRESHOLD
from LiverTumorAILib import dependencies
from LiverTumorAILib import scene as sceneUpdates
from LiverTumorAILib import synthetic
from LiverTumorAILib.process import (
    ChildProcess,
    default_python_executable,
    device_probe_command,
    parse_device_probe,
)
from LiverTumorAILib.run import EngineRunError, RunOptions, RunState, SegmentationRun

logger = logging.getLogger(__name__)

# Poll intervals of the Qt timers, in milliseconds.
RUN_POLL_INTERVAL_MS = 200
DEVICE_PROBE_POLL_INTERVAL_MS = 500
# The device probe imports torch in a child process; give up after this long.
DEVICE_PROBE_TIMEOUT_S = 120.0
# Device choices: parameter value and label shown in the combo box.
DEVICE_CHOICES = (
    ("auto", _("Automatic")),
    ("cpu", _("CPU")),
    ("gpu", _("GPU (CUDA)")),
)
STAGE_LABELS = {
    "read": _("Reading"),
    "preprocess": _("Preparing slices"),
    "classify": _("Classifying slices"),
    "segment": _("Segmenting"),
    "postprocess": _("Measuring"),
    "write": _("Writing results"),
}


#
# LiverTumorAI
#


class LiverTumorAI(ScriptedLoadableModule):
    """Module description shown in Slicer's module list and help panel."""

    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = _("LiverTumorAI")
        self.parent.categories = [translate("qSlicerAbstractCoreModule", "Segmentation")]
        # The PyTorch extension is needed only to install torch; the module loads without it.
        self.parent.dependencies = []
        self.parent.contributors = ["LiverTumorAI contributors"]
        self.parent.helpText = _(
            "Segments the liver and liver tumors in an abdominal CT volume. Every axial slice "
            "is classified (no liver, liver with tumor, liver without tumor) and liver and "
            "tumor are segmented into an editable segmentation, with per-slice and per-lesion "
            "tables. For research use only; not for diagnosis."
        )
        self.parent.acknowledgementText = _(
            "The networks were trained on public CT collections (3D-IRCADb-01, CHAOS); see "
            "the model card in Resources/Weights for their licences."
        )


#
# Parameter node
#


@parameterNodeWrapper
class LiverTumorAIParameterNode:
    """The panel's settings, saved with the scene.

    inputVolume: CT volume to segment.
    device: 'auto', 'cpu' or 'gpu'.
    tumorThreshold: tumor probability (0..1) from which a voxel is tumor.
    minLesionVolumeMm3: smaller lesions become liver, in mm^3.
    classifierGating: segment only slices in which the classifier finds liver.
    keepProbabilityMap: also load the tumor probability map as a volume.
    """

    inputVolume: vtkMRMLScalarVolumeNode
    device: Annotated[str, Choice(["auto", "cpu", "gpu"])] = "auto"
    tumorThreshold: Annotated[float, WithinRange(0.01, 0.99)] = DEFAULT_TUMOR_THRESHOLD
    minLesionVolumeMm3: Annotated[float, WithinRange(0.0, 100000.0)] = DEFAULT_MIN_LESION_VOLUME_MM3
    classifierGating: bool = True
    keepProbabilityMap: bool = False


#
# LiverTumorAIWidget
#


class LiverTumorAIWidget(ScriptedLoadableModuleWidget, VTKObservationMixin):
    """The module panel: input, options, Run/Cancel with progress, results."""

    def __init__(self, parent=None) -> None:
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)
        self.logic = None
        self._parameterNode = None
        self._parameterNodeGuiTag = None
        self._run = None
        self._deviceProbe = None
        self._deviceProbeStart = 0.0

    def setup(self) -> None:
        ScriptedLoadableModuleWidget.setup(self)
        uiWidget = slicer.util.loadUI(self.resourcePath("UI/LiverTumorAI.ui"))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        uiWidget.setMRMLScene(slicer.mrmlScene)
        self.logic = LiverTumorAILogic()

        for value, label in DEVICE_CHOICES:
            self.ui.deviceComboBox.addItem(label, value)
        self.ui.progressBar.setVisible(False)
        self.ui.cancelButton.setVisible(False)

        self._runTimer = qt.QTimer()
        self._runTimer.setInterval(RUN_POLL_INTERVAL_MS)
        self._runTimer.connect("timeout()", self.onRunTimer)
        self._deviceProbeTimer = qt.QTimer()
        self._deviceProbeTimer.setInterval(DEVICE_PROBE_POLL_INTERVAL_MS)
        self._deviceProbeTimer.connect("timeout()", self.onDeviceProbeTimer)

        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.StartCloseEvent, self.onSceneStartClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndCloseEvent, self.onSceneEndClose)
        self.ui.deviceComboBox.connect("currentIndexChanged(int)", self.onDeviceChanged)
        self.ui.runButton.connect("clicked(bool)", self.onRunButton)
        self.ui.cancelButton.connect("clicked(bool)", self.onCancelButton)
        self.ui.segmentEditorButton.connect("clicked(bool)", self.onSegmentEditorButton)
        self.ui.showChartButton.connect("clicked(bool)", self.onShowChartButton)
        self.ui.installDependenciesButton.connect("clicked(bool)", self.onInstallDependencies)
        self.ui.slicesTableView.connect("clicked(QModelIndex)", self.onSliceRowClicked)
        self.ui.lesionsTableView.connect("clicked(QModelIndex)", self.onLesionRowClicked)

        self.initializeParameterNode()
        self.updateDependencyStatus()
        self.startDeviceProbe()

    def cleanup(self) -> None:
        """Stop a running engine and the device probe when the application closes."""
        if self._run is not None and not self._run.state.finished:
            self._run.cancel()
        if self._deviceProbe is not None:
            self._deviceProbe.kill_tree()
        self._runTimer.stop()
        self._deviceProbeTimer.stop()
        self.removeObservers()

    def enter(self) -> None:
        self.initializeParameterNode()

    def exit(self) -> None:
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self._parameterNodeGuiTag = None
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self.updateGUI)

    def onSceneStartClose(self, caller, event) -> None:
        if self._run is not None and not self._run.state.finished:
            self._run.cancel()
        self.setParameterNode(None)

    def onSceneEndClose(self, caller, event) -> None:
        if self.parent.isEntered:
            self.initializeParameterNode()

    def initializeParameterNode(self) -> None:
        self.setParameterNode(self.logic.getParameterNode())
        if not self._parameterNode.inputVolume:
            firstVolume = slicer.mrmlScene.GetFirstNodeByClass("vtkMRMLScalarVolumeNode")
            if firstVolume and not firstVolume.IsA("vtkMRMLLabelMapVolumeNode"):
                self._parameterNode.inputVolume = firstVolume

    def setParameterNode(self, inputParameterNode) -> None:
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self.updateGUI)
        self._parameterNode = inputParameterNode
        if self._parameterNode:
            # connectGui binds the widgets that have the dynamic property "SlicerParameterName"
            # in the .ui file. The device combo box is bound by hand because its items carry
            # labels that differ from the stored values.
            self._parameterNodeGuiTag = self._parameterNode.connectGui(self.ui)
            self.addObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self.updateGUI)
        self.updateGUI()

    # --- GUI state ------------------------------------------------------------------------

    def updateGUI(self, caller=None, event=None) -> None:
        """Refresh the device choice, the Run button and the results of the current input."""
        if self._parameterNode is None:
            return
        index = self.ui.deviceComboBox.findData(self._parameterNode.device)
        wasBlocked = self.ui.deviceComboBox.blockSignals(True)
        self.ui.deviceComboBox.setCurrentIndex(max(index, 0))
        self.ui.deviceComboBox.blockSignals(wasBlocked)
        self.updateRunButton()
        if self._run is None or self._run.state.finished:
            self.showResultsOf(self._parameterNode.inputVolume)

    def updateRunButton(self) -> None:
        running = self._run is not None and not self._run.state.finished
        reason = sceneUpdates.check_input_volume(
            self._parameterNode.inputVolume if self._parameterNode else None)
        if running:
            reason = _("A segmentation is running. Wait for it or cancel it.")
        self.ui.runButton.enabled = reason is None
        self.ui.runButton.toolTip = reason or _(
            "Segment liver and liver tumors in the selected CT volume.")
        self.ui.inputSelector.enabled = not running
        self.ui.cancelButton.enabled = running and self._run.state is RunState.RUNNING

    def showResultsOf(self, inputVolume) -> None:
        """Show the result nodes of `inputVolume` in the Results section and the status line."""
        nodes = sceneUpdates.find_result_nodes(slicer.mrmlScene, inputVolume)
        hasResults = nodes.segmentation is not None
        self.ui.resultsCollapsibleButton.enabled = hasResults
        self.ui.show3DButton.setSegmentationNode(nodes.segmentation)
        self.ui.slicesTableView.setMRMLTableNode(nodes.slices_table)
        self.ui.lesionsTableView.setMRMLTableNode(nodes.lesions_table)
        if hasResults:
            summary = json.loads(nodes.segmentation.GetAttribute(sceneUpdates.SUMMARY_ATTRIBUTE)
                                 or "{}")
            self.ui.statusLabel.text = summaryText(summary)
        elif self._run is None or self._run.state is RunState.SUCCEEDED:
            self.ui.statusLabel.text = ""

    def onDeviceChanged(self, index: int) -> None:
        if self._parameterNode is not None:
            self._parameterNode.device = self.ui.deviceComboBox.itemData(index)

    # --- run ------------------------------------------------------------------------------

    def onRunButton(self) -> None:
        if not self.ensureDependencies():
            return
        inputVolume = self._parameterNode.inputVolume
        keepEditedCopies = self.askKeepEditedSegments(inputVolume)
        if keepEditedCopies is None:
            return
        self._run = self.logic.createRun(
            inputVolume, self.logic.runOptions(self._parameterNode),
            keepEditedCopies=keepEditedCopies, progressCallback=self.onProgress)
        try:
            self._run.start()
        except EngineRunError as error:
            self._run = None
            self.showEngineError(error)
            return
        self.ui.progressBar.value = 0
        self.ui.progressBar.format = _("Starting...")
        self.ui.progressBar.setVisible(True)
        self.ui.cancelButton.setVisible(True)
        self.ui.statusLabel.text = _("Running on {device}...").format(
            device=self.ui.deviceComboBox.currentText)
        self.updateRunButton()
        self._runTimer.start()

    def askKeepEditedSegments(self, inputVolume):
        """Ask what to do with engine segments edited since the last run.

        Returns:
            True to keep edited segments as copies, False to replace them, None to cancel
            the run.
        """
        nodes = sceneUpdates.find_result_nodes(slicer.mrmlScene, inputVolume)
        edited = sceneUpdates.edited_engine_segments(nodes.segmentation)
        if not edited:
            return True
        segmentation = nodes.segmentation.GetSegmentation()
        names = ", ".join(segmentation.GetSegment(segmentId).GetName() for segmentId in edited)
        box = qt.QMessageBox(slicer.util.mainWindow())
        box.setWindowTitle(_("Edited segments"))
        box.setText(_("{names} changed since the last run. Keep your edited version as a "
                      "separate segment, or replace it with the new result?").format(names=names))
        keepButton = box.addButton(_("Keep a copy"), qt.QMessageBox.AcceptRole)
        replaceButton = box.addButton(_("Replace"), qt.QMessageBox.DestructiveRole)
        box.addButton(qt.QMessageBox.Cancel)
        box.setDefaultButton(keepButton)
        box.exec_()
        if box.clickedButton() == keepButton:
            return True
        if box.clickedButton() == replaceButton:
            return False
        return None

    def onProgress(self, event, fraction: float) -> None:
        stage = STAGE_LABELS.get(event.stage, event.stage)
        self.ui.progressBar.value = int(round(100 * fraction))
        self.ui.progressBar.format = f"{stage}: %p%"
        self.ui.progressBar.toolTip = event.message

    def onRunTimer(self) -> None:
        if self._run is None:
            self._runTimer.stop()
            return
        state = self._run.poll()
        if not state.finished:
            return
        self._runTimer.stop()
        self.ui.progressBar.setVisible(False)
        self.ui.cancelButton.setVisible(False)
        if state is RunState.SUCCEEDED:
            self.showNewResults(self._run)
        elif state is RunState.CANCELLED:
            self.ui.statusLabel.text = _("Cancelled. The scene is unchanged.")
        else:
            message = self._run.error.message
            self.ui.statusLabel.text = _("Failed: {message}").format(message=message)
            self.showEngineError(self._run.error)
        self.updateRunButton()

    def onCancelButton(self) -> None:
        if self._run is not None:
            self._run.cancel()
            self.ui.statusLabel.text = _("Cancelling...")
            self.updateRunButton()

    def showNewResults(self, run) -> None:
        nodes = run.result_nodes
        slicer.util.setSliceViewerLayers(background=run.input_volume, fit=False)
        self.showResultsOf(run.input_volume)
        self.ui.statusLabel.text = _("{summary} (completed in {seconds:.0f} s)").format(
            summary=summaryText(run.summary), seconds=run.elapsed_s)
        if nodes.segmentation.GetDisplayNode() is not None:
            nodes.segmentation.GetDisplayNode().SetVisibility(True)

    def showEngineError(self, error: EngineRunError) -> None:
        text = error.message[:1].upper() + error.message[1:] + "."
        if error.hint:
            text += "\n\n" + error.hint
        extra = {"detailedText": error.details} if error.details else {}
        slicer.util.errorDisplay(text, windowTitle=_("LiverTumorAI"), **extra)

    # --- dependencies ---------------------------------------------------------------------

    def updateDependencyStatus(self) -> None:
        missing = dependencies.missing_requirements()
        if missing:
            self.ui.dependencyStatusLabel.text = _(
                "Missing: {packages}. They are installed when you click Run or the button "
                "below (PyTorch through the PyTorch extension).").format(
                packages=", ".join(r.specifier for r in missing))
            self.ui.dependenciesCollapsibleButton.collapsed = False
        else:
            self.ui.dependencyStatusLabel.text = _("All required Python packages are installed.")
        self.ui.installDependenciesButton.enabled = bool(missing)

    def onInstallDependencies(self) -> None:
        self.ensureDependencies()

    def ensureDependencies(self) -> bool:
        """Install missing packages after asking; return True when the engine can run now."""
        if not dependencies.missing_requirements():
            return True
        try:
            with slicer.util.WaitCursor():
                restartRequired = dependencies.install_dependencies(
                    confirm=lambda question: slicer.util.confirmOkCancelDisplay(question))
        except dependencies.DependencyError as error:
            slicer.util.errorDisplay(str(error), windowTitle=_("LiverTumorAI"))
            restartRequired = error.restart_required
        self.updateDependencyStatus()
        if restartRequired:
            if slicer.util.confirmOkCancelDisplay(
                    _("Slicer must restart to use the new packages. Restart now?")):
                slicer.util.restart()
            return False
        self.startDeviceProbe()
        return not dependencies.missing_requirements()

    def startDeviceProbe(self) -> None:
        """Start a child process that reports torch's device; the timer shows the result."""
        if dependencies.installed_version("torch") is None:
            self.ui.detectedDeviceLabel.text = _("Detected device: PyTorch is not installed yet.")
            return
        if self._deviceProbe is not None:
            return
        self.ui.detectedDeviceLabel.text = _("Detected device: checking...")
        self._deviceProbe = ChildProcess(device_probe_command(default_python_executable()))
        self._deviceProbeStart = time.monotonic()
        self._deviceProbeLines = []
        self._deviceProbeTimer.start()

    def onDeviceProbeTimer(self) -> None:
        probe = self._deviceProbe
        self._deviceProbeLines += [line for stream, line in probe.read_lines()
                                   if stream == "stdout"]
        status = probe.poll()
        if status is None and time.monotonic() - self._deviceProbeStart < DEVICE_PROBE_TIMEOUT_S:
            return
        self._deviceProbeTimer.stop()
        if status is None:
            probe.kill_tree()
        self._deviceProbe = None
        result = parse_device_probe(self._deviceProbeLines)
        self.ui.detectedDeviceLabel.text = deviceText(result)

    # --- results --------------------------------------------------------------------------

    def onSegmentEditorButton(self) -> None:
        inputVolume = self._parameterNode.inputVolume
        nodes = sceneUpdates.find_result_nodes(slicer.mrmlScene, inputVolume)
        if nodes.segmentation is None:
            return
        slicer.util.selectModule("SegmentEditor")
        editor = slicer.modules.segmenteditor.widgetRepresentation().self().editor
        editor.setSegmentationNode(nodes.segmentation)
        editor.setSourceVolumeNode(inputVolume)

    def onShowChartButton(self) -> None:
        nodes = sceneUpdates.find_result_nodes(slicer.mrmlScene, self._parameterNode.inputVolume)
        if nodes.chart is not None:
            slicer.modules.plots.logic().ShowChartInLayout(nodes.chart)

    def onSliceRowClicked(self, index) -> None:
        inputVolume = self._parameterNode.inputVolume
        nodes = sceneUpdates.find_result_nodes(slicer.mrmlScene, inputVolume)
        row = mrmlTableRow(self.ui.slicesTableView, index)
        if nodes.slices_table is not None and row >= 0:
            position = sceneUpdates.slice_row_position_ras(inputVolume, nodes.slices_table, row)
            sceneUpdates.jump_slice_views(slicer.mrmlScene, position)

    def onLesionRowClicked(self, index) -> None:
        inputVolume = self._parameterNode.inputVolume
        nodes = sceneUpdates.find_result_nodes(slicer.mrmlScene, inputVolume)
        row = mrmlTableRow(self.ui.lesionsTableView, index)
        if nodes.lesions_table is not None and row >= 0:
            position = sceneUpdates.lesion_row_position_ras(inputVolume, nodes.lesions_table, row)
            sceneUpdates.jump_slice_views(slicer.mrmlScene, position)


def mrmlTableRow(tableView, index) -> int:
    """Return the table-node row of a clicked view index (the view may sort its rows).

    `qMRMLTableModel.mrmlTableRowIndex` is a plain C++ method that Python cannot call, so
    its rule is repeated here: without column names as header, model row 0 contains them.
    """
    sourceIndex = tableView.sortFilterProxyModel().mapToSource(index)
    row = sourceIndex.row()
    tableNode = tableView.mrmlTableNode()
    if tableNode is not None and not tableNode.GetUseColumnNameAsColumnHeader():
        row -= 1
    return row


def summaryText(summary: dict) -> str:
    """Return the status line for a report summary: volumes, burden and lesions."""
    if not summary:
        return ""
    if not summary.get("liver_found"):
        return _("No liver found.")
    liver = _("Liver {volume:.1f} mL").format(volume=summary.get("liver_volume_ml", 0.0))
    if not summary.get("tumor_found"):
        return liver + _(", no tumor found.")
    return liver + _(", tumor {volume:.1f} mL ({burden:.1f} % of the liver), "
                     "{count} lesion(s).").format(
        volume=summary.get("tumor_volume_ml", 0.0),
        burden=summary.get("tumor_burden_percent", 0.0),
        count=summary.get("lesion_count", 0))


def deviceText(probe) -> str:
    """Return the 'Detected device' line for the device probe's result (None if it failed)."""
    if probe is None:
        return _("Detected device: unknown (PyTorch could not be started; see the Python console).")
    if probe.get("cuda"):
        return _("Detected device: GPU {name} (CUDA), PyTorch {version}.").format(
            name=probe.get("name", ""), version=probe.get("torch", ""))
    return _("Detected device: CPU only (PyTorch {version} sees no CUDA GPU).").format(
        version=probe.get("torch", ""))


#
# LiverTumorAILogic
#


class LiverTumorAILogic(ScriptedLoadableModuleLogic):
    """Logic for scripts, for example `LiverTumorAILogic().process(volumeNode)`.

    `LiverTumorAILib` does the work. This class binds it to `slicer.mrmlScene` and to the
    parameter node.
    """

    def __init__(self) -> None:
        ScriptedLoadableModuleLogic.__init__(self)

    def getParameterNode(self):
        return LiverTumorAIParameterNode(super().getParameterNode())

    @staticmethod
    def runOptions(parameterNode) -> RunOptions:
        """Return the engine settings stored in a parameter node."""
        return RunOptions(
            device=parameterNode.device,
            tumor_threshold=parameterNode.tumorThreshold,
            min_lesion_volume_mm3=parameterNode.minLesionVolumeMm3,
            classifier_gating=parameterNode.classifierGating,
            keep_probability_map=parameterNode.keepProbabilityMap,
        )

    def createRun(self, inputVolume, options: RunOptions | None = None, keepEditedCopies=True,
                  progressCallback=None) -> SegmentationRun:
        """Return a run of the engine on `inputVolume`, not started yet."""
        return SegmentationRun(slicer.mrmlScene, inputVolume, options,
                               temp_root=slicer.app.temporaryPath,
                               keep_edited_copies=keepEditedCopies,
                               progress_callback=progressCallback)

    def process(self, inputVolume, options: RunOptions | None = None, timeoutS: float = 3600.0,
                keepEditedCopies: bool = True) -> sceneUpdates.ResultNodes:
        """Segment `inputVolume` and wait for the result (keeps the application drawing).

        Raises:
            EngineRunError: the run failed, or did not finish within `timeoutS` seconds.
        """
        run = self.createRun(inputVolume, options, keepEditedCopies)
        run.start()
        state = run.wait(timeoutS, idle_callback=slicer.app.processEvents)
        if state is RunState.SUCCEEDED:
            return run.result_nodes
        if not state.finished:
            run.cancel()
            run.wait(30.0)
            raise EngineRunError(f"the run did not finish within {timeoutS:.0f} s",
                                 "Use a GPU or a smaller volume.", code="timeout")
        raise run.error or EngineRunError("the run was cancelled", code="cancelled")

    def resultNodes(self, inputVolume) -> sceneUpdates.ResultNodes:
        """Return the result nodes of `inputVolume` (fields None where absent)."""
        return sceneUpdates.find_result_nodes(slicer.mrmlScene, inputVolume)


#
# LiverTumorAITest
#


class LiverTumorAITest(ScriptedLoadableModuleTest):
    """Self-test: real engine runs on CPU with the bundled weights, checked on the nodes."""

    # Upper limit of one run. A CPU run on a full-size CT is expected to take minutes.
    RUN_TIMEOUT_S = 30 * 60

    def setUp(self):
        slicer.mrmlScene.Clear()

    def runTest(self):
        self.setUp()
        self.test_SyntheticVolume()
        self.setUp()
        self.test_CancelLeavesSceneUnchanged()
        self.setUp()
        self.test_CTLiverSample()

    def test_SyntheticVolume(self):
        """Results on a built CT volume; a re-run updates in place and keeps user segments."""
        logic = LiverTumorAILogic()
        volume = synthetic.add_synthetic_ct(slicer.mrmlScene, "LiverTumorAITest synthetic CT")
        options = RunOptions(device="cpu")

        nodes = logic.process(volume, options, self.RUN_TIMEOUT_S)

        self.assertNodesMatchInput(nodes, volume)
        segmentation = nodes.segmentation.GetSegmentation()
        userSegmentId = segmentation.AddEmptySegment("", "My annotation", [0.2, 0.4, 1.0])
        userLabelmap = synthetic.box_labelmap(volume, (slice(10, 14), slice(40, 50), slice(30, 40)))
        slicer.vtkSlicerSegmentationsModuleLogic.SetBinaryLabelmapToSegment(
            userLabelmap, nodes.segmentation, userSegmentId,
            slicer.vtkSlicerSegmentationsModuleLogic.MODE_REPLACE)
        userChecksum = sceneUpdates.segment_checksum(nodes.segmentation, userSegmentId)
        nodeIds = [node.GetID() for node in nodes.all_nodes()]
        nodeCount = slicer.mrmlScene.GetNumberOfNodes()

        rerun = logic.process(volume, options, self.RUN_TIMEOUT_S)

        self.assertEqual([node.GetID() for node in rerun.all_nodes()], nodeIds)
        self.assertEqual(slicer.mrmlScene.GetNumberOfNodes(), nodeCount)
        self.assertIsNotNone(segmentation.GetSegment(userSegmentId))
        self.assertEqual(sceneUpdates.segment_checksum(rerun.segmentation, userSegmentId),
                         userChecksum)

    def test_CancelLeavesSceneUnchanged(self):
        volume = synthetic.add_synthetic_ct(slicer.mrmlScene, "LiverTumorAITest cancel")
        nodeIds = sceneNodeIds()
        run = LiverTumorAILogic().createRun(volume, RunOptions(device="cpu", batch_size=1,
                                                               classifier_gating=False))
        run.start()
        while run.poll() is RunState.RUNNING and run.last_progress is None:
            slicer.app.processEvents()
            time.sleep(0.05)
        run.cancel()

        state = run.wait(60.0, idle_callback=slicer.app.processEvents)

        self.assertEqual(state, RunState.CANCELLED)
        self.assertEqual(sceneNodeIds(), nodeIds)

    def test_CTLiverSample(self):
        """The bundled weights find the liver in Slicer's CTLiver sample."""
        import SampleData

        volume = SampleData.SampleDataLogic().downloadSample("CTLiver")
        self.assertIsNotNone(volume, "the CTLiver sample could not be downloaded")

        nodes = LiverTumorAILogic().process(volume, RunOptions(device="cpu"), self.RUN_TIMEOUT_S)

        self.assertNodesMatchInput(nodes, volume)
        summary = json.loads(nodes.segmentation.GetAttribute(sceneUpdates.SUMMARY_ATTRIBUTE))
        self.assertTrue(summary["liver_found"])
        # Loose bounds: any plausible adult liver volume lies well inside 0.5 to 5 L.
        self.assertGreater(summary["liver_volume_ml"], 500.0)
        self.assertLess(summary["liver_volume_ml"], 5000.0)

    def assertNodesMatchInput(self, nodes, volume):
        segmentIds = sceneUpdates.engine_segment_ids(nodes.segmentation)
        segmentation = nodes.segmentation.GetSegmentation()
        self.assertEqual(segmentation.GetSegment(segmentIds["liver"]).GetName(), "Liver")
        self.assertEqual(segmentation.GetSegment(segmentIds["liver_tumor"]).GetName(),
                         "Liver tumor")
        self.assertEqual(nodes.segmentation.GetNodeReferenceID(
            nodes.segmentation.GetReferenceImageGeometryReferenceRole()), volume.GetID())
        slices = volume.GetImageData().GetDimensions()[2]
        self.assertEqual(nodes.slices_table.GetNumberOfRows(), slices)
        self.assertEqual(nodes.chart.GetNumberOfPlotSeriesNodes(), 3)
        self.assertIsNotNone(nodes.lesions_table.GetTable().GetColumnByName("volume_ml"))


def sceneNodeIds() -> list:
    return [slicer.mrmlScene.GetNthNode(i).GetID()
            for i in range(slicer.mrmlScene.GetNumberOfNodes())]
