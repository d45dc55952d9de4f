"""Engine output folders into a real MRML scene (slicer-core), without the child process.

One engine run on the small ircadb1.17 CT gives a complete output folder. A copy of it gets
the case's reference labels as its segmentation and their measurements as its lesions. The
voxels and lesion values that the scene must show are then known.
"""

from __future__ import annotations

import csv
import json
import shutil

import numpy as np
import pytest
import SimpleITK as sitk

from livertumorai.constants import SEGMENT_LIVER, SEGMENT_TUMOR
from livertumorai.geometry import ImageGeometry, axial_frame
from livertumorai.measure import measure
from livertumorai.outputs import write_json, write_segmentation_nrrd
from scene_helpers import (
    SMALL_CT,
    SMALL_CT_LABEL,
    load_volume,
    run_engine_cli,
    skip_without_slicer_core,
)

skip_without_slicer_core()

import slicer  # noqa: E402 (slicer-core, after the skip check)
import vtk  # noqa: E402
from vtk.util import numpy_support  # noqa: E402

from LiverTumorAILib import scene as scene_updates  # noqa: E402
from LiverTumorAILib.synthetic import add_synthetic_ct, box_labelmap  # noqa: E402

SEGMENTATIONS_LOGIC = slicer.vtkSlicerSegmentationsModuleLogic


@pytest.fixture(scope="module")
def engine_output(shared_data_dir, tiny_weights, tmp_path_factory):
    """A complete output folder of the engine (tiny random weights) with a probability map."""
    folder = tmp_path_factory.mktemp("engine") / "out"
    run_engine_cli(shared_data_dir / "fixtures" / SMALL_CT, folder, "--weights",
                   str(tiny_weights), "--probability-map", "--no-overview")
    return folder


@pytest.fixture(scope="module")
def reference_output(engine_output, shared_data_dir, tmp_path_factory):
    """The engine folder with the reference labels as segmentation and their lesions."""
    folder = tmp_path_factory.mktemp("reference") / "out"
    shutil.copytree(engine_output, folder)
    label_image = sitk.ReadImage(str(shared_data_dir / "fixtures" / SMALL_CT_LABEL))
    labels_zyx = sitk.GetArrayFromImage(label_image).astype(np.uint8)
    geometry = ImageGeometry.from_image(label_image)
    write_segmentation_nrrd(labels_zyx, geometry, folder / "segmentation.seg.nrrd")
    report = json.loads((folder / "report.json").read_text())
    report["measurements"] = measure(labels_zyx, geometry, axial_frame(geometry)).to_dict()
    write_json(folder / "report.json", report)
    return folder, labels_zyx


@pytest.fixture
def ct_volume(mrml_scene, shared_data_dir):
    return load_volume(mrml_scene, shared_data_dir / "fixtures" / SMALL_CT, "ircadb1.17 small")


def _segment_ids(nodes) -> dict[str, str]:
    return scene_updates.engine_segment_ids(nodes.segmentation)


def _ijk_to_ras(volume) -> np.ndarray:
    matrix = vtk.vtkMatrix4x4()
    volume.GetIJKToRASMatrix(matrix)
    return np.array([[matrix.GetElement(r, c) for c in range(4)] for r in range(4)])


def _labelmap_zyx(scene, segmentation_node, segment_ids, reference_volume):
    """Export segments to a labelmap on the reference grid; return (array, IJK-to-RAS)."""
    labelmap = scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode")
    ids = vtk.vtkStringArray()
    for segment_id in segment_ids:
        ids.InsertNextValue(segment_id)
    assert SEGMENTATIONS_LOGIC.ExportSegmentsToLabelmapNode(segmentation_node, ids, labelmap,
                                                            reference_volume)
    image = labelmap.GetImageData()
    dimensions = image.GetDimensions()
    voxels = numpy_support.vtk_to_numpy(image.GetPointData().GetScalars())
    matrix = _ijk_to_ras(labelmap)
    scene.RemoveNode(labelmap)
    return voxels.reshape(dimensions[2], dimensions[1], dimensions[0]).copy(), matrix


def test_segments_match_reference_labels(mrml_scene, ct_volume, reference_output):
    folder, labels_zyx = reference_output
    nodes = scene_updates.update_scene(mrml_scene, ct_volume,
                                       scene_updates.load_engine_results(folder))
    ids = _segment_ids(nodes)

    liver, liver_matrix = _labelmap_zyx(mrml_scene, nodes.segmentation, [ids["liver"]],
                                        ct_volume)
    tumor, _ = _labelmap_zyx(mrml_scene, nodes.segmentation, [ids["liver_tumor"]], ct_volume)

    assert liver.shape == labels_zyx.shape
    np.testing.assert_allclose(liver_matrix, _ijk_to_ras(ct_volume), atol=1e-4)
    np.testing.assert_array_equal(liver > 0, labels_zyx == 1)
    np.testing.assert_array_equal(tumor > 0, labels_zyx == 2)
    assert (labels_zyx == 2).sum() > 0


def test_segment_names_colours_terminology(mrml_scene, ct_volume, engine_output):
    nodes = scene_updates.update_scene(mrml_scene, ct_volume,
                                       scene_updates.load_engine_results(engine_output))
    segmentation = nodes.segmentation.GetSegmentation()
    ids = _segment_ids(nodes)

    assert nodes.segmentation.GetName() == "ircadb1.17 small segmentation"
    assert segmentation.GetNumberOfSegments() == 2
    for definition in (SEGMENT_LIVER, SEGMENT_TUMOR):
        segment = segmentation.GetSegment(ids[definition.segment_id])
        assert segment.GetName() == definition.name
        assert segment.GetColor() == pytest.approx(definition.color_rgb, abs=1e-3)
        assert scene_updates._segment_tag(segment, "TerminologyEntry") == \
            definition.terminology_entry()
        assert scene_updates._segment_tag(segment, "Segmentation.Status") == "inprogress"


def test_reference_geometry_is_input(mrml_scene, ct_volume, engine_output):
    nodes = scene_updates.update_scene(mrml_scene, ct_volume,
                                       scene_updates.load_engine_results(engine_output))
    expected = slicer.vtkMRMLSegmentationNode()
    expected.SetReferenceImageGeometryParameterFromVolumeNode(ct_volume)
    parameter = "Reference image geometry"

    role = nodes.segmentation.GetReferenceImageGeometryReferenceRole()
    assert nodes.segmentation.GetNodeReferenceID(role) == ct_volume.GetID()
    assert nodes.segmentation.GetSegmentation().GetConversionParameter(parameter) == \
        expected.GetSegmentation().GetConversionParameter(parameter)


def test_slice_table_one_row_per_slice(mrml_scene, ct_volume, engine_output):
    nodes = scene_updates.update_scene(mrml_scene, ct_volume,
                                       scene_updates.load_engine_results(engine_output))
    with open(engine_output / "slices.csv", newline="") as stream:
        rows = list(csv.DictReader(stream))
    table = nodes.slices_table.GetTable()

    assert nodes.slices_table.GetNumberOfRows() == ct_volume.GetImageData().GetDimensions()[2]
    assert nodes.slices_table.GetNumberOfRows() == len(rows)
    assert table.GetColumnByName("slice_index").GetClassName() == "vtkIntArray"
    assert table.GetColumnByName("p_tumor").GetClassName() == "vtkDoubleArray"
    assert table.GetColumnByName("predicted_name").GetClassName() == "vtkStringArray"
    assert nodes.slices_table.GetColumnUnitLabel("position_ras_z_mm") == "mm"
    for row_index in (0, len(rows) // 2, len(rows) - 1):
        row = rows[row_index]
        assert table.GetColumnByName("slice_index").GetValue(row_index) == int(row["slice_index"])
        assert table.GetColumnByName("p_no_tumor").GetValue(row_index) == \
            pytest.approx(float(row["p_no_tumor"]))
        assert table.GetColumnByName("segmented").GetValue(row_index) == \
            (1 if row["segmented"] == "True" else 0)


def test_chart_plots_three_probabilities(mrml_scene, ct_volume, engine_output):
    nodes = scene_updates.update_scene(mrml_scene, ct_volume,
                                       scene_updates.load_engine_results(engine_output))
    chart = nodes.chart
    series = [chart.GetNthPlotSeriesNode(i) for i in range(chart.GetNumberOfPlotSeriesNodes())]

    assert len(series) == 3
    assert {s.GetYColumnName() for s in series} == {"p_background", "p_tumor", "p_no_tumor"}
    assert {s.GetXColumnName() for s in series} == {"slice_index"}
    assert {s.GetTableNodeID() for s in series} == {nodes.slices_table.GetID()}


def test_lesion_table_matches_report(mrml_scene, ct_volume, reference_output):
    folder, _ = reference_output
    lesions = json.loads((folder / "report.json").read_text())["measurements"]["lesions"]
    nodes = scene_updates.update_scene(mrml_scene, ct_volume,
                                       scene_updates.load_engine_results(folder))
    table = nodes.lesions_table.GetTable()

    assert len(lesions) >= 1
    assert nodes.lesions_table.GetNumberOfRows() == len(lesions)
    for row, lesion in enumerate(lesions):
        assert table.GetColumnByName("lesion_id").GetValue(row) == lesion["lesion_id"]
        assert table.GetColumnByName("volume_ml").GetValue(row) == \
            pytest.approx(lesion["volume_ml"])
        assert table.GetColumnByName("longest_axial_diameter_mm").GetValue(row) == \
            pytest.approx(lesion["longest_axial_diameter_mm"])
        assert table.GetColumnByName("first_slice").GetValue(row) == lesion["slice_range"][0]
        assert scene_updates.lesion_row_position_ras(ct_volume, nodes.lesions_table, row) == \
            pytest.approx(lesion["centroid_ras"])


def test_lesion_position_follows_parent_transform(mrml_scene, ct_volume, reference_output):
    folder, _ = reference_output
    centroid = json.loads((folder / "report.json").read_text())["measurements"]["lesions"][0][
        "centroid_ras"]
    transform = mrml_scene.AddNewNodeByClass("vtkMRMLLinearTransformNode")
    shift = vtk.vtkMatrix4x4()
    shift.SetElement(0, 3, 10.0)
    transform.SetMatrixTransformToParent(shift)
    ct_volume.SetAndObserveTransformNodeID(transform.GetID())

    nodes = scene_updates.update_scene(mrml_scene, ct_volume,
                                       scene_updates.load_engine_results(folder))

    assert nodes.segmentation.GetTransformNodeID() == transform.GetID()
    position = scene_updates.lesion_row_position_ras(ct_volume, nodes.lesions_table, 0)
    assert position == pytest.approx([centroid[0] + 10.0, centroid[1], centroid[2]])


def test_slice_row_position_is_slice_centre(mrml_scene, ct_volume, engine_output):
    nodes = scene_updates.update_scene(mrml_scene, ct_volume,
                                       scene_updates.load_engine_results(engine_output))
    table = nodes.slices_table.GetTable()
    dimensions = ct_volume.GetImageData().GetDimensions()
    ijk_to_ras = _ijk_to_ras(ct_volume)

    for row in (0, 30, nodes.slices_table.GetNumberOfRows() - 1):
        slice_index = table.GetColumnByName("slice_index").GetValue(row)
        centre_ijk = [(dimensions[0] - 1) / 2, (dimensions[1] - 1) / 2, slice_index, 1.0]
        position = scene_updates.slice_row_position_ras(ct_volume, nodes.slices_table, row)
        assert position == pytest.approx((ijk_to_ras @ centre_ijk)[:3])
        assert position[2] == pytest.approx(
            table.GetColumnByName("position_ras_z_mm").GetValue(row), abs=1e-3)


def test_update_in_place_keeps_ids_and_user_segment(mrml_scene, ct_volume, engine_output,
                                                    reference_output):
    first = scene_updates.update_scene(mrml_scene, ct_volume,
                                       scene_updates.load_engine_results(engine_output))
    segmentation = first.segmentation.GetSegmentation()
    user_id = segmentation.AddEmptySegment("", "Vessel", [0.0, 0.0, 1.0])
    logic = SEGMENTATIONS_LOGIC
    logic.SetBinaryLabelmapToSegment(
        box_labelmap(ct_volume, (slice(20, 30), slice(50, 70), slice(50, 70))),
        first.segmentation, user_id, logic.MODE_REPLACE)
    user_checksum = scene_updates.segment_checksum(first.segmentation, user_id)
    node_ids = [node.GetID() for node in first.all_nodes()]
    node_count = mrml_scene.GetNumberOfNodes()

    second = scene_updates.update_scene(mrml_scene, ct_volume,
                                        scene_updates.load_engine_results(reference_output[0]))

    assert [node.GetID() for node in second.all_nodes()] == node_ids
    assert mrml_scene.GetNumberOfNodes() == node_count
    assert segmentation.GetNumberOfSegments() == 3
    assert segmentation.GetSegment(user_id).GetName() == "Vessel"
    assert scene_updates.segment_checksum(second.segmentation, user_id) == user_checksum
    assert scene_updates.edited_engine_segments(second.segmentation) == []
    liver, _ = _labelmap_zyx(mrml_scene, second.segmentation, [_segment_ids(second)["liver"]],
                             ct_volume)
    np.testing.assert_array_equal(liver > 0, reference_output[1] == 1)


def test_rerun_empties_segment_without_voxels(mrml_scene, ct_volume, engine_output,
                                              reference_output):
    summary = json.loads((engine_output / "report.json").read_text())["summary"]
    assert not summary["tumor_found"]  # the tiny random weights find no tumor at 0.5
    scene_updates.update_scene(mrml_scene, ct_volume,
                               scene_updates.load_engine_results(reference_output[0]))

    nodes = scene_updates.update_scene(mrml_scene, ct_volume,
                                       scene_updates.load_engine_results(engine_output))

    tumor, _ = _labelmap_zyx(mrml_scene, nodes.segmentation, [_segment_ids(nodes)["liver_tumor"]],
                             ct_volume)
    assert not tumor.any()


def test_edited_segment_kept_as_copy(mrml_scene, ct_volume, engine_output):
    nodes = scene_updates.update_scene(mrml_scene, ct_volume,
                                       scene_updates.load_engine_results(engine_output))
    liver_id = _segment_ids(nodes)["liver"]
    logic = SEGMENTATIONS_LOGIC
    edit = box_labelmap(ct_volume, (slice(5, 9), slice(10, 20), slice(10, 20)))
    logic.ClearSegment(nodes.segmentation, liver_id)
    logic.SetBinaryLabelmapToSegment(edit, nodes.segmentation, liver_id, logic.MODE_REPLACE)
    edited_checksum = scene_updates.segment_checksum(nodes.segmentation, liver_id)

    assert scene_updates.edited_engine_segments(nodes.segmentation) == [liver_id]

    scene_updates.update_scene(mrml_scene, ct_volume,
                               scene_updates.load_engine_results(engine_output))
    segmentation = nodes.segmentation.GetSegmentation()
    names = {segmentation.GetNthSegment(i).GetName(): segmentation.GetNthSegmentID(i)
             for i in range(segmentation.GetNumberOfSegments())}

    assert set(names) == {"Liver", "Liver tumor", "Liver (edited)"}
    assert scene_updates.segment_checksum(nodes.segmentation, names["Liver (edited)"]) == \
        edited_checksum
    assert scene_updates.edited_engine_segments(nodes.segmentation) == []
    assert scene_updates.engine_segment_ids(nodes.segmentation)["liver"] == liver_id


def test_edited_segment_replaced_when_asked(mrml_scene, ct_volume, engine_output):
    nodes = scene_updates.update_scene(mrml_scene, ct_volume,
                                       scene_updates.load_engine_results(engine_output))
    liver_id = _segment_ids(nodes)["liver"]
    original = scene_updates.segment_checksum(nodes.segmentation, liver_id)
    SEGMENTATIONS_LOGIC.ClearSegment(nodes.segmentation, liver_id)

    scene_updates.update_scene(mrml_scene, ct_volume,
                               scene_updates.load_engine_results(engine_output),
                               keep_edited_copies=False)

    assert nodes.segmentation.GetSegmentation().GetNumberOfSegments() == 2
    assert scene_updates.segment_checksum(nodes.segmentation, liver_id) == original


def test_user_segment_with_engine_id_is_kept(mrml_scene, ct_volume, engine_output):
    nodes = scene_updates.update_scene(mrml_scene, ct_volume,
                                       scene_updates.load_engine_results(engine_output))
    segmentation = nodes.segmentation.GetSegmentation()
    segmentation.RemoveSegment("liver")
    segmentation.AddEmptySegment("liver", "Liver (my own)", [1.0, 0.0, 0.0])

    scene_updates.update_scene(mrml_scene, ct_volume,
                               scene_updates.load_engine_results(engine_output))

    assert segmentation.GetSegment("liver").GetName() == "Liver (my own)"
    engine_liver = scene_updates.engine_segment_ids(nodes.segmentation)["liver"]
    assert engine_liver != "liver"
    assert segmentation.GetSegment(engine_liver).GetName() == "Liver"


def test_probability_volume_on_input_grid(mrml_scene, ct_volume, engine_output):
    nodes = scene_updates.update_scene(mrml_scene, ct_volume,
                                       scene_updates.load_engine_results(engine_output))
    probability = nodes.probability_volume
    voxels = numpy_support.vtk_to_numpy(probability.GetImageData().GetPointData().GetScalars())

    assert probability.GetName() == "ircadb1.17 small tumor probability"
    assert probability.GetImageData().GetDimensions() == ct_volume.GetImageData().GetDimensions()
    np.testing.assert_allclose(_ijk_to_ras(probability), _ijk_to_ras(ct_volume), atol=1e-4)
    assert 0 <= voxels.min() <= voxels.max() <= 255


def test_results_found_again_per_input(mrml_scene, ct_volume, engine_output, shared_data_dir):
    other = load_volume(mrml_scene, shared_data_dir / "fixtures" / SMALL_CT, "second CT")
    nodes = scene_updates.update_scene(mrml_scene, ct_volume,
                                       scene_updates.load_engine_results(engine_output))

    found = scene_updates.find_result_nodes(mrml_scene, ct_volume)

    assert [n.GetID() for n in found.all_nodes()] == [n.GetID() for n in nodes.all_nodes()]
    assert scene_updates.find_result_nodes(mrml_scene, other).all_nodes() == []


def test_check_input_volume_reasons(mrml_scene, ct_volume):
    labelmap = mrml_scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode", "labels")
    empty = mrml_scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "empty")

    assert "Select an input CT volume" in scene_updates.check_input_volume(None)
    assert "label map" in scene_updates.check_input_volume(labelmap)
    assert "no image data" in scene_updates.check_input_volume(empty)
    assert scene_updates.check_input_volume(ct_volume) is None
    assert scene_updates.check_input_volume(add_synthetic_ct(mrml_scene)) is None


def test_missing_output_file_raises(tmp_path):
    with pytest.raises(scene_updates.ResultsError, match="segmentation.seg.nrrd"):
        scene_updates.load_engine_results(tmp_path)
