"""Engine runs in a real child process into a real MRML scene (slicer-core).

These tests take the same path as the Slicer module. The volume node is written to a
temporary NRRD and the engine runs with `--progress json`. The results are then loaded into
the scene, or the scene stays unchanged when the run is cancelled or fails. Tiny random weights keep each
run to seconds; they make the plumbing testable, not the segmentation accurate.
"""

from __future__ import annotations

import os
import signal
import sys
import time

import pytest

from scene_helpers import (
    LARGE_CT,
    SMALL_CT,
    load_volume,
    scene_snapshot,
    skip_without_slicer_core,
)

skip_without_slicer_core()

import slicer  # noqa: E402 (slicer-core, after the skip check)

from LiverTumorAILib import scene as scene_updates  # noqa: E402
from LiverTumorAILib.run import (  # noqa: E402
    EngineRunError,
    RunOptions,
    RunState,
    SegmentationRun,
)
from LiverTumorAILib.synthetic import box_labelmap  # noqa: E402
from livertumorai.cli import EXIT_CANCELLED  # noqa: E402

RUN_TIMEOUT_S = 180.0


def _run(scene, volume, weights, tmp_path, **options) -> SegmentationRun:
    """Start a run on CPU with `weights`; return it once finished."""
    events = []
    run = SegmentationRun(scene, volume,
                          RunOptions(device="cpu", weights=str(weights), **options),
                          python_executable=sys.executable, temp_root=tmp_path,
                          progress_callback=lambda event, fraction: events.append(
                              (event, fraction)))
    run.start()
    run.wait(RUN_TIMEOUT_S)
    run.progress_events = events
    return run


def _process_exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


@pytest.fixture(scope="module")
def finished_run(slicer_core, shared_data_dir, tiny_weights, tmp_path_factory):
    """A scene with the small CT and one finished run on it, shared by this module's tests.

    Tests that change the scene come last in this file and keep the results in place.
    """
    scene = slicer_core.vtkMRMLScene()
    segmentations_logic = slicer_core.vtkSlicerSegmentationsModuleLogic()
    segmentations_logic.SetMRMLScene(scene)
    volume = load_volume(scene, shared_data_dir / "fixtures" / SMALL_CT, "ircadb1.17 small")
    run = _run(scene, volume, tiny_weights, tmp_path_factory.mktemp("first_run"))
    yield run
    scene.Clear(True)
    del segmentations_logic


def test_run_puts_results_in_scene(finished_run):
    run = finished_run
    volume = run.input_volume

    assert run.state is RunState.SUCCEEDED, getattr(run.error, "details", "")
    nodes = run.result_nodes
    segmentation = nodes.segmentation.GetSegmentation()
    ids = scene_updates.engine_segment_ids(nodes.segmentation)
    assert nodes.segmentation.GetName() == "ircadb1.17 small segmentation"
    assert segmentation.GetSegment(ids["liver"]).GetName() == "Liver"
    assert segmentation.GetSegment(ids["liver_tumor"]).GetName() == "Liver tumor"
    role = nodes.segmentation.GetReferenceImageGeometryReferenceRole()
    assert nodes.segmentation.GetNodeReferenceID(role) == volume.GetID()
    assert nodes.slices_table.GetNumberOfRows() == volume.GetImageData().GetDimensions()[2]
    assert nodes.chart.GetNumberOfPlotSeriesNodes() == 3
    assert nodes.lesions_table.GetNumberOfRows() == run.summary["lesion_count"]
    assert segmentation.ContainsRepresentation("Closed surface")
    assert not run.work_dir.exists()


def test_progress_reaches_every_stage(finished_run):
    fractions = [fraction for _, fraction in finished_run.progress_events]
    stages = [event.stage for event, _ in finished_run.progress_events]

    assert list(dict.fromkeys(stages)) == ["read", "preprocess", "classify", "segment",
                                           "postprocess", "write"]
    assert fractions == sorted(fractions)
    assert fractions[-1] == pytest.approx(1.0)


def test_engine_error_keeps_scene(finished_run, tmp_path):
    scene = finished_run.scene
    before = scene_snapshot(scene)

    run = _run(scene, finished_run.input_volume, tmp_path / "no_weights_here", tmp_path)

    assert run.state is RunState.FAILED
    assert run.error.code == "weights"
    assert "no_weights_here" in run.error.message
    assert run.error.hint
    assert "exit status: 4" in run.error.details
    assert scene_snapshot(scene) == before


def test_label_map_rejected_before_start(mrml_scene, tmp_path):
    labelmap = mrml_scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode", "labels")
    before = scene_snapshot(mrml_scene)
    run = SegmentationRun(mrml_scene, labelmap, python_executable=sys.executable,
                          temp_root=tmp_path)

    with pytest.raises(EngineRunError, match="label map"):
        run.start()

    assert run.child_pid is None
    assert list(tmp_path.iterdir()) == []
    assert scene_snapshot(mrml_scene) == before


def test_cancel_leaves_scene_unchanged(finished_run, shared_data_dir, tiny_weights, tmp_path):
    scene = finished_run.scene
    large_ct = load_volume(scene, shared_data_dir / LARGE_CT, "ircadb1.7")
    before = scene_snapshot(scene)
    run = SegmentationRun(
        scene, large_ct,
        RunOptions(device="cpu", weights=str(tiny_weights), batch_size=1,
                   classifier_gating=False),
        python_executable=sys.executable, temp_root=tmp_path)
    run.start()
    deadline = time.monotonic() + RUN_TIMEOUT_S
    while (run.poll() is RunState.RUNNING and time.monotonic() < deadline
           and not (run.last_progress and run.last_progress.stage == "classify"
                    and run.last_progress.done > 0)):
        time.sleep(0.02)
    assert run.state is RunState.RUNNING, "the run ended before it could be cancelled"

    run.cancel()
    state = run.wait(60.0)

    assert state is RunState.CANCELLED
    # The engine stopped on SIGTERM, or was killed after the grace time; it did not finish.
    assert run.exit_status in (EXIT_CANCELLED, -signal.SIGKILL)
    assert scene_snapshot(scene) == before
    assert scene_updates.find_result_nodes(scene, large_ct).all_nodes() == []
    assert not _process_exists(run.child_pid)
    assert not run.work_dir.exists()


def test_rerun_updates_in_place(finished_run, tiny_weights, tmp_path):
    scene, volume = finished_run.scene, finished_run.input_volume
    segmentation_node = finished_run.result_nodes.segmentation
    user_id = segmentation_node.GetSegmentation().AddEmptySegment("", "Biopsy site",
                                                                  [0.0, 0.0, 1.0])
    logic = slicer.vtkSlicerSegmentationsModuleLogic
    logic.SetBinaryLabelmapToSegment(
        box_labelmap(volume, (slice(25, 30), slice(60, 70), slice(30, 40))),
        segmentation_node, user_id, logic.MODE_REPLACE)
    user_checksum = scene_updates.segment_checksum(segmentation_node, user_id)
    node_ids = [node.GetID() for node in finished_run.result_nodes.all_nodes()]
    node_count = scene.GetNumberOfNodes()

    rerun = _run(scene, volume, tiny_weights, tmp_path, tumor_threshold=0.27)

    assert rerun.state is RunState.SUCCEEDED, getattr(rerun.error, "details", "")
    assert [node.GetID() for node in rerun.result_nodes.all_nodes()] == node_ids
    assert scene.GetNumberOfNodes() == node_count
    assert segmentation_node.GetSegmentation().GetSegment(user_id).GetName() == "Biopsy site"
    assert scene_updates.segment_checksum(segmentation_node, user_id) == user_checksum
    assert rerun.result_nodes.lesions_table.GetNumberOfRows() == rerun.summary["lesion_count"]
    assert rerun.summary != finished_run.summary
