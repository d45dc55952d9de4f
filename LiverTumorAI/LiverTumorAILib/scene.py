"""Scene updates: the engine's output folder into MRML nodes, without widgets.

Everything here takes MRML nodes and a `vtkMRMLScene`, never Qt, so it runs in the Slicer
application and in plain Python with the `slicer-core` package (the tests do that).

Per input volume the module keeps one set of result nodes, found again through a node
reference from each result node to the input volume:

- a segmentation node named after the input, with the segments "Liver" and "Liver tumor"
  (Slicer colours, SNOMED CT terminology) and the input as reference geometry;
- a per-slice table (one row per slice of `slices.csv`) and a chart with the three class
  probabilities along the slices;
- a lesion table (one row per lesion of `report.json`);
- with the probability map option, a scalar volume of the tumor probability (0..255).

A re-run updates these nodes in place. In the segmentation it replaces only the voxels of
the two engine segments, which are recognised by a segment tag, never by name, so segments
the user added stay as they are. An engine segment counts as edited when its voxels no
longer match the checksum stored by the run that wrote them. Before replacing an edited
segment, `update_scene` keeps a copy of it unless the caller asks to replace it.

Coordinates are RAS in mm. The engine ran on the volume's own grid (written without its
parent transform), so result nodes get the input's parent transform.
"""

from __future__ import annotations

import csv
import hashlib
import json
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import slicer
import vtk
from vtk.util import numpy_support

from livertumorai.constants import SEGMENT_LIVER, SEGMENT_TUMOR, SegmentDefinition

logger = logging.getLogger(__name__)

__all__ = [
    "ENGINE_SEGMENTS",
    "ENGINE_SEGMENT_TAG",
    "CHECKSUM_TAG",
    "EngineResults",
    "ResultNodes",
    "ResultsError",
    "check_input_volume",
    "write_volume_nrrd",
    "load_engine_results",
    "find_result_nodes",
    "engine_segment_ids",
    "edited_engine_segments",
    "segment_checksum",
    "update_scene",
    "slice_row_position_ras",
    "lesion_row_position_ras",
    "jump_slice_views",
]

ENGINE_SEGMENTS: tuple[SegmentDefinition, ...] = (SEGMENT_LIVER, SEGMENT_TUMOR)

# Segment tags written by this module. ENGINE_SEGMENT_TAG contains the engine's segment ID
# ("liver", "liver_tumor") and marks a segment that a re-run may replace. CHECKSUM_TAG
# contains the checksum of the segment's voxels as the run wrote them.
ENGINE_SEGMENT_TAG = "LiverTumorAI.EngineSegment"
CHECKSUM_TAG = "LiverTumorAI.VoxelChecksum"

# Node attribute naming a result node's role, and the reference role from a result node to
# the input volume it belongs to.
ROLE_ATTRIBUTE = "LiverTumorAI.Role"
INPUT_REFERENCE_ROLE = "LiverTumorAIInputVolume"
SUMMARY_ATTRIBUTE = "LiverTumorAI.Summary"
SLICE_AXIS_ATTRIBUTE = "LiverTumorAI.SliceAxisIJK"
ROLE_SEGMENTATION = "segmentation"
ROLE_SLICES = "slices"
ROLE_LESIONS = "lesions"
ROLE_CHART = "chart"
ROLE_PROBABILITY = "probability"
SERIES_ROLE_PREFIX = "series:"

# Segment status tag that Segment Editor shows; Slicer's own tag name and value.
STATUS_TAG = "Segmentation.Status"
STATUS_IN_PROGRESS = "inprogress"
TERMINOLOGY_TAG = "TerminologyEntry"

# Columns of slices.csv: (name, type, unit, description). Columns the engine adds later
# are kept as text.
SLICE_COLUMNS = (
    ("slice_index", int, "", "Slice index along the input's inferior-superior axis"),
    ("position_ras_z_mm", float, "mm", "S coordinate (RAS) of the slice centre"),
    ("p_background", float, "", "Classifier probability of no liver in the slice"),
    ("p_tumor", float, "", "Classifier probability of liver with tumor"),
    ("p_no_tumor", float, "", "Classifier probability of liver without tumor"),
    ("predicted_class", int, "", "0 background, 1 tumor, 2 no tumor (largest probability)"),
    ("predicted_name", str, "", "Name of the predicted class"),
    ("liver_area_mm2", float, "mm2", "Area of liver (tumor included) in the slice"),
    ("tumor_area_mm2", float, "mm2", "Area of tumor in the slice"),
    ("segmentation_class", int, "", "Class the segmentation implies (0, 1 or 2, as above)"),
    ("segmented", bool, "", "1 when the U-Net segmented this slice, 0 when gated off"),
)
LESION_COLUMNS = (
    ("lesion_id", int, "", "Lesion number, largest first"),
    ("volume_ml", float, "mL", "Lesion volume"),
    ("longest_axial_diameter_mm", float, "mm", "Longest in-plane diameter over axial slices"),
    ("centroid_r_mm", float, "mm", "Centroid R coordinate (RAS)"),
    ("centroid_a_mm", float, "mm", "Centroid A coordinate (RAS)"),
    ("centroid_s_mm", float, "mm", "Centroid S coordinate (RAS)"),
    ("first_slice", int, "", "First slice index the lesion touches"),
    ("last_slice", int, "", "Last slice index the lesion touches"),
    ("voxel_count", int, "", "Number of voxels"),
)
# Chart series: slices.csv column, legend, colour (RGB 0..1).
PROBABILITY_SERIES = (
    ("p_background", "Background (no liver)", (0.55, 0.55, 0.55)),
    ("p_tumor", "Liver with tumor", SEGMENT_TUMOR.color_rgb),
    ("p_no_tumor", "Liver without tumor", SEGMENT_LIVER.color_rgb),
)

_SEGMENTATION_FILE = "segmentation.seg.nrrd"
_SLICES_FILE = "slices.csv"
_REPORT_FILE = "report.json"
_PROBABILITY_FILE = "tumor_probability.nii.gz"
_PROBABILITY_SCALE = 255  # the engine stores tumor probability times 255 as uint8


class ResultsError(Exception):
    """The engine's output folder is missing a file or a file cannot be read."""


@dataclass
class EngineResults:
    """One output folder of the engine, read into memory before the scene is touched.

    Attributes:
        output_dir: the folder.
        segmentation_node: the `.seg.nrrd` read into a node of a private scratch scene.
        slice_rows: rows of `slices.csv` as dicts of strings, in file order.
        report: `report.json`.
        probability_node: the tumor probability map read into the scratch scene, or None.
    """

    output_dir: Path
    segmentation_node: object
    slice_rows: list[dict[str, str]]
    report: dict
    probability_node: object | None = None
    _scratch_scene: object = field(default=None, repr=False)

    @property
    def summary(self) -> dict:
        return self.report.get("summary", {})

    @property
    def lesions(self) -> list[dict]:
        return self.report.get("measurements", {}).get("lesions", [])

    @property
    def slice_axis_ijk(self) -> int:
        """IJK axis of the input that runs inferior-superior (the slices of slices.csv)."""
        return 2 - int(self.report.get("input", {}).get("axial_slice_axis_zyx", 0))


@dataclass
class ResultNodes:
    """The result nodes of one input volume; a field is None when the node does not exist."""

    segmentation: object | None = None
    slices_table: object | None = None
    lesions_table: object | None = None
    chart: object | None = None
    probability_volume: object | None = None
    series: dict[str, object] = field(default_factory=dict)

    def all_nodes(self) -> list:
        nodes = [self.segmentation, self.slices_table, self.lesions_table, self.chart,
                 self.probability_volume, *self.series.values()]
        return [node for node in nodes if node is not None]


def check_input_volume(volume_node) -> str | None:
    """Return why `volume_node` cannot be segmented, or None when it can.

    The text is meant for the Run button's tooltip.
    """
    if volume_node is None:
        return "Select an input CT volume."
    if volume_node.IsA("vtkMRMLLabelMapVolumeNode"):
        return f"'{volume_node.GetName()}' is a label map. Select a CT volume."
    if not volume_node.IsA("vtkMRMLScalarVolumeNode"):
        return f"'{volume_node.GetName()}' is not a scalar volume. Select a CT volume."
    image = volume_node.GetImageData()
    if image is None or image.GetPointData() is None or image.GetPointData().GetScalars() is None:
        return f"'{volume_node.GetName()}' has no image data. Load the CT again."
    if image.GetNumberOfScalarComponents() != 1:
        return (f"'{volume_node.GetName()}' has {image.GetNumberOfScalarComponents()} "
                "components per voxel (colour image). Select a grey-scale CT volume.")
    dimensions = image.GetDimensions()
    if min(dimensions) < 2:
        return (f"'{volume_node.GetName()}' has size {dimensions} voxels. Select a CT volume "
                "with at least 2 voxels along each axis.")
    return None


def write_volume_nrrd(volume_node, path: str | os.PathLike) -> None:
    """Write a volume's voxels and geometry (without parent transform) to an uncompressed NRRD.

    The scene is not modified: the storage node used for writing is not added to it.

    Raises:
        ResultsError: the file could not be written.
    """
    storage = slicer.vtkMRMLVolumeArchetypeStorageNode()
    storage.SetFileName(str(path))
    storage.SetUseCompression(False)
    if not storage.WriteData(volume_node):
        raise ResultsError(f"writing '{volume_node.GetName()}' to {path} failed; check that "
                           "the temporary folder is writable and has free space")


def load_engine_results(output_dir: str | os.PathLike) -> EngineResults:
    """Read an engine output folder into memory (segmentation into a scratch scene).

    Raises:
        ResultsError: a required file is missing or unreadable.
    """
    output_dir = Path(output_dir)
    for name in (_SEGMENTATION_FILE, _SLICES_FILE, _REPORT_FILE):
        if not (output_dir / name).is_file():
            raise ResultsError(f"{name} is missing from the engine output folder {output_dir}")
    scratch = slicer.vtkMRMLScene()
    segmentation = scratch.AddNewNodeByClass("vtkMRMLSegmentationNode", "engine result")
    storage = slicer.vtkMRMLSegmentationStorageNode()
    storage.SetFileName(str(output_dir / _SEGMENTATION_FILE))
    if not storage.ReadData(segmentation):
        raise ResultsError(f"reading {output_dir / _SEGMENTATION_FILE} failed")
    for definition in ENGINE_SEGMENTS:
        if segmentation.GetSegmentation().GetSegment(definition.segment_id) is None:
            raise ResultsError(f"segment '{definition.segment_id}' is missing from "
                               f"{output_dir / _SEGMENTATION_FILE}")
    with open(output_dir / _SLICES_FILE, newline="", encoding="utf-8") as stream:
        slice_rows = list(csv.DictReader(stream))
    report = json.loads((output_dir / _REPORT_FILE).read_text(encoding="utf-8"))
    probability = None
    if (output_dir / _PROBABILITY_FILE).is_file():
        probability = scratch.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "probability")
        volume_storage = slicer.vtkMRMLVolumeArchetypeStorageNode()
        volume_storage.SetFileName(str(output_dir / _PROBABILITY_FILE))
        if not volume_storage.ReadData(probability):
            raise ResultsError(f"reading {output_dir / _PROBABILITY_FILE} failed")
    return EngineResults(output_dir, segmentation, slice_rows, report, probability, scratch)


def find_result_nodes(scene, input_volume) -> ResultNodes:
    """Return the result nodes that refer to `input_volume` (fields None where absent)."""
    nodes = ResultNodes()
    if input_volume is None:
        return nodes
    by_role = {}
    for node_class in ("vtkMRMLSegmentationNode", "vtkMRMLTableNode", "vtkMRMLPlotChartNode",
                       "vtkMRMLPlotSeriesNode", "vtkMRMLScalarVolumeNode"):
        for index in range(scene.GetNumberOfNodesByClass(node_class)):
            node = scene.GetNthNodeByClass(index, node_class)
            role = node.GetAttribute(ROLE_ATTRIBUTE)
            if role and node.GetNodeReferenceID(INPUT_REFERENCE_ROLE) == input_volume.GetID():
                by_role.setdefault(role, node)
    nodes.segmentation = by_role.get(ROLE_SEGMENTATION)
    nodes.slices_table = by_role.get(ROLE_SLICES)
    nodes.lesions_table = by_role.get(ROLE_LESIONS)
    nodes.chart = by_role.get(ROLE_CHART)
    nodes.probability_volume = by_role.get(ROLE_PROBABILITY)
    nodes.series = {role[len(SERIES_ROLE_PREFIX):]: node for role, node in by_role.items()
                    if role.startswith(SERIES_ROLE_PREFIX)}
    return nodes


def engine_segment_ids(segmentation_node) -> dict[str, str]:
    """Map engine segment ID ('liver', 'liver_tumor') to the segment ID in the node.

    Only segments carrying `ENGINE_SEGMENT_TAG` count, so a segment the user created with
    the same name or ID is never mistaken for an engine segment.
    """
    found = {}
    if segmentation_node is None:
        return found
    segmentation = segmentation_node.GetSegmentation()
    for index in range(segmentation.GetNumberOfSegments()):
        segment_id = segmentation.GetNthSegmentID(index)
        engine_id = _segment_tag(segmentation.GetSegment(segment_id), ENGINE_SEGMENT_TAG)
        if engine_id:
            found.setdefault(engine_id, segment_id)
    return found


def edited_engine_segments(segmentation_node) -> list[str]:
    """Return the IDs of engine segments whose voxels changed since the engine wrote them."""
    edited = []
    for segment_id in engine_segment_ids(segmentation_node).values():
        segment = segmentation_node.GetSegmentation().GetSegment(segment_id)
        stored = _segment_tag(segment, CHECKSUM_TAG)
        if stored != segment_checksum(segmentation_node, segment_id):
            edited.append(segment_id)
    return edited


def segment_checksum(segmentation_node, segment_id: str) -> str:
    """Return a SHA-256 of a segment's voxels: which IJK voxels it covers, nothing else.

    Independent of the segment's layer, label value and the padding of its labelmap.
    """
    mask, origin_ijk = _segment_mask_zyx(segmentation_node, segment_id)
    digest = hashlib.sha256()
    if mask is None or not mask.any():
        digest.update(b"empty")
        return digest.hexdigest()
    occupied = np.nonzero(mask)
    low = [int(axis.min()) for axis in occupied]
    high = [int(axis.max()) + 1 for axis in occupied]
    cropped = mask[low[0]:high[0], low[1]:high[1], low[2]:high[2]]
    corner_kji = [low[0] + origin_ijk[2], low[1] + origin_ijk[1], low[2] + origin_ijk[0]]
    digest.update(np.asarray(corner_kji + list(cropped.shape), dtype=np.int64).tobytes())
    digest.update(np.packbits(cropped).tobytes())
    return digest.hexdigest()


def update_scene(scene, input_volume, results: EngineResults, *,
                 keep_edited_copies: bool = True, show_3d: bool = True) -> ResultNodes:
    """Put one engine result into the scene, updating the input's result nodes in place.

    Args:
        scene: the MRML scene holding `input_volume`.
        input_volume: the CT volume node the engine ran on.
        results: the output folder read by `load_engine_results`.
        keep_edited_copies: copy an engine segment that was edited since the run that
            wrote it into a new segment named "<name> (edited)" before replacing it. With
            False the edited voxels are replaced without a copy.
        show_3d: also build the closed-surface (3D) representation.

    Returns:
        The result nodes, existing ones reused and missing ones created.
    """
    nodes = find_result_nodes(scene, input_volume)
    name = input_volume.GetName()
    nodes.segmentation = _result_node(scene, nodes.segmentation, "vtkMRMLSegmentationNode",
                                      f"{name} segmentation", ROLE_SEGMENTATION, input_volume)
    _update_segmentation(nodes.segmentation, input_volume, results, keep_edited_copies,
                         show_3d)
    nodes.slices_table = _result_node(scene, nodes.slices_table, "vtkMRMLTableNode",
                                      f"{name} slices", ROLE_SLICES, input_volume)
    _fill_table(nodes.slices_table, SLICE_COLUMNS, results.slice_rows)
    nodes.slices_table.SetAttribute(SLICE_AXIS_ATTRIBUTE, str(results.slice_axis_ijk))
    nodes.lesions_table = _result_node(scene, nodes.lesions_table, "vtkMRMLTableNode",
                                       f"{name} lesions", ROLE_LESIONS, input_volume)
    _fill_table(nodes.lesions_table, LESION_COLUMNS, [_lesion_row(l) for l in results.lesions])
    nodes.chart = _result_node(scene, nodes.chart, "vtkMRMLPlotChartNode",
                               f"{name} slice classes", ROLE_CHART, input_volume)
    _update_chart(scene, nodes, name, input_volume)
    if results.probability_node is not None:
        nodes.probability_volume = _result_node(
            scene, nodes.probability_volume, "vtkMRMLScalarVolumeNode",
            f"{name} tumor probability", ROLE_PROBABILITY, input_volume)
        _update_probability_volume(nodes.probability_volume, results.probability_node,
                                   input_volume)
    nodes.segmentation.SetAttribute(SUMMARY_ATTRIBUTE, json.dumps(results.summary))
    return nodes


def slice_row_position_ras(input_volume, slices_table, row: int) -> tuple[float, float, float]:
    """Return the world RAS position (mm) of the centre of the slice in a slice-table row."""
    slice_index = int(float(_cell(slices_table, row, "slice_index")))
    axis_ijk = int(slices_table.GetAttribute(SLICE_AXIS_ATTRIBUTE) or 2)
    dimensions = input_volume.GetImageData().GetDimensions()
    point_ijk = [(size - 1) / 2.0 for size in dimensions]
    point_ijk[axis_ijk] = float(slice_index)
    ijk_to_ras = vtk.vtkMatrix4x4()
    input_volume.GetIJKToRASMatrix(ijk_to_ras)
    local_ras = ijk_to_ras.MultiplyPoint([*point_ijk, 1.0])[:3]
    return _to_world(input_volume, local_ras)


def lesion_row_position_ras(input_volume, lesions_table, row: int) -> tuple[float, float, float]:
    """Return the world RAS position (mm) of the centroid of the lesion in a lesion-table row."""
    local_ras = [float(_cell(lesions_table, row, column))
                 for column in ("centroid_r_mm", "centroid_a_mm", "centroid_s_mm")]
    return _to_world(input_volume, local_ras)


def jump_slice_views(scene, position_ras: Sequence[float]) -> None:
    """Centre every slice view of the scene on a world RAS position (mm)."""
    slicer.vtkMRMLSliceNode.JumpAllSlices(scene, *[float(v) for v in position_ras],
                                          slicer.vtkMRMLSliceNode.CenteredJumpSlice)


# --- segmentation -------------------------------------------------------------------------

def _update_segmentation(node, input_volume, results: EngineResults, keep_edited_copies: bool,
                         show_3d: bool) -> None:
    node.CreateDefaultDisplayNodes()
    node.SetReferenceImageGeometryParameterFromVolumeNode(input_volume)
    node.SetAndObserveTransformNodeID(input_volume.GetTransformNodeID())
    existing = engine_segment_ids(node)
    edited = set(edited_engine_segments(node)) if keep_edited_copies else set()
    source = results.segmentation_node
    was_modifying = node.StartModify()
    try:
        for definition in ENGINE_SEGMENTS:
            target_id = existing.get(definition.segment_id)
            if target_id is not None and target_id in edited:
                _copy_edited_segment(node, target_id)
            if target_id is None:
                target_id = _add_engine_segment(node, source, definition)
            else:
                _replace_segment_voxels(node, target_id, source, definition.segment_id)
            segment = node.GetSegmentation().GetSegment(target_id)
            segment.SetTag(STATUS_TAG, STATUS_IN_PROGRESS)
            segment.SetTag(CHECKSUM_TAG, segment_checksum(node, target_id))
    finally:
        node.EndModify(was_modifying)
    if show_3d:
        node.CreateClosedSurfaceRepresentation()
    display = node.GetDisplayNode()
    if display is not None:
        display.SetVisibility(True)


def _add_engine_segment(node, source, definition: SegmentDefinition) -> str:
    """Add one engine segment (name, colour, terminology, voxels); return its ID in `node`."""
    segmentation = node.GetSegmentation()
    target_id = definition.segment_id
    if segmentation.GetSegment(target_id) is not None:
        # The user owns a segment with this ID; give the engine segment another one.
        target_id = segmentation.GenerateUniqueSegmentID(definition.segment_id)
    source_segment = source.GetSegmentation().GetSegment(definition.segment_id)
    target_id = segmentation.AddEmptySegment(target_id, source_segment.GetName(),
                                             source_segment.GetColor())
    segment = segmentation.GetSegment(target_id)
    terminology = _segment_tag(source_segment, TERMINOLOGY_TAG)
    if terminology:
        segment.SetTag(TERMINOLOGY_TAG, terminology)
    segment.SetTag(ENGINE_SEGMENT_TAG, definition.segment_id)
    _replace_segment_voxels(node, target_id, source, definition.segment_id)
    return target_id


def _replace_segment_voxels(node, target_id: str, source, source_id: str) -> None:
    labelmap = _binary_labelmap(source, source_id)
    logic = slicer.vtkSlicerSegmentationsModuleLogic
    logic.ClearSegment(node, target_id)
    if labelmap is not None:
        logic.SetBinaryLabelmapToSegment(labelmap, node, target_id, logic.MODE_REPLACE)


def _copy_edited_segment(node, segment_id: str) -> str:
    """Copy an edited engine segment into a plain user segment; return the copy's ID."""
    segmentation = node.GetSegmentation()
    original = segmentation.GetSegment(segment_id)
    copy_name = f"{original.GetName()} (edited)"
    copy_id = segmentation.AddEmptySegment("", copy_name, original.GetColor())
    copy = segmentation.GetSegment(copy_id)
    terminology = _segment_tag(original, TERMINOLOGY_TAG)
    if terminology:
        copy.SetTag(TERMINOLOGY_TAG, terminology)
    labelmap = _binary_labelmap(node, segment_id)
    if labelmap is not None:
        logic = slicer.vtkSlicerSegmentationsModuleLogic
        logic.SetBinaryLabelmapToSegment(labelmap, node, copy_id, logic.MODE_REPLACE)
    logger.info("kept the edited segment '%s' as '%s'", original.GetName(), copy_name)
    return copy_id


def _binary_labelmap(segmentation_node, segment_id: str):
    """Return a new 0/1 `vtkOrientedImageData` of one segment, or None when it has no voxels."""
    mask, _ = _segment_mask_zyx(segmentation_node, segment_id)
    if mask is None or not mask.any():
        return None
    layer = slicer.vtkOrientedImageData()
    slicer.vtkSlicerSegmentationsModuleLogic.GetSegmentBinaryLabelmapRepresentation(
        segmentation_node, segment_id, layer)
    image_to_world = vtk.vtkMatrix4x4()
    layer.GetImageToWorldMatrix(image_to_world)
    image = slicer.vtkOrientedImageData()
    image.SetImageToWorldMatrix(image_to_world)
    image.SetExtent(layer.GetExtent())
    scalars = numpy_support.numpy_to_vtk(mask.astype(np.uint8).ravel(), deep=True,
                                         array_type=vtk.VTK_UNSIGNED_CHAR)
    image.GetPointData().SetScalars(scalars)
    return image


def _segment_mask_zyx(segmentation_node, segment_id: str):
    """Return (mask in (k, j, i) order, extent start (i, j, k)) of one segment's voxels.

    A shared labelmap layer contains several segments with different label values, so only
    voxels equal to this segment's label value belong to it.
    """
    image = slicer.vtkOrientedImageData()
    found = slicer.vtkSlicerSegmentationsModuleLogic.GetSegmentBinaryLabelmapRepresentation(
        segmentation_node, segment_id, image)
    scalars = image.GetPointData().GetScalars() if found else None
    if scalars is None:
        return None, (0, 0, 0)
    extent = image.GetExtent()
    shape_kji = (extent[5] - extent[4] + 1, extent[3] - extent[2] + 1, extent[1] - extent[0] + 1)
    if min(shape_kji) <= 0:
        return None, (0, 0, 0)
    values = numpy_support.vtk_to_numpy(scalars).reshape(shape_kji)
    label_value = segmentation_node.GetSegmentation().GetSegment(segment_id).GetLabelValue()
    return values == label_value, (extent[0], extent[2], extent[4])


def _segment_tag(segment, tag: str) -> str:
    value = vtk.reference("")
    if segment is None or not segment.GetTag(tag, value):
        return ""
    return str(value)


# --- tables and chart ---------------------------------------------------------------------

def _fill_table(table_node, columns, rows: Sequence[dict]) -> None:
    """Replace a table node's columns with typed columns filled from `rows`."""
    was_modifying = table_node.StartModify()
    try:
        table_node.RemoveAllColumns()
        known = [name for name, *_ in columns]
        extra = [name for name in (rows[0].keys() if rows else []) if name not in known]
        for name, kind, unit, description in [*columns, *[(n, str, "", "") for n in extra]]:
            table_node.AddColumn(_vtk_column(name, kind, [row.get(name, "") for row in rows]))
            if unit:
                table_node.SetColumnUnitLabel(name, unit)
            if description:
                table_node.SetColumnDescription(name, description)
        table_node.SetLocked(True)
        table_node.Modified()
    finally:
        table_node.EndModify(was_modifying)


def _vtk_column(name: str, kind, values: Sequence) -> vtk.vtkAbstractArray:
    if kind is int or kind is bool:
        column = vtk.vtkIntArray()
        convert = _to_flag if kind is bool else (lambda v: int(float(v)))
    elif kind is float:
        column = vtk.vtkDoubleArray()
        convert = float
    else:
        column = vtk.vtkStringArray()
        convert = str
    column.SetName(name)
    for value in values:
        column.InsertNextValue(convert(value))
    return column


def _to_flag(value) -> int:
    return 1 if str(value).strip().lower() in ("1", "true", "yes") else 0


def _lesion_row(lesion: dict) -> dict:
    centroid = lesion.get("centroid_ras") or [0.0, 0.0, 0.0]
    first, last = (lesion.get("slice_range") or [0, 0])[:2]
    return {
        "lesion_id": lesion.get("lesion_id", 0),
        "volume_ml": lesion.get("volume_ml", 0.0),
        "longest_axial_diameter_mm": lesion.get("longest_axial_diameter_mm", 0.0),
        "centroid_r_mm": centroid[0],
        "centroid_a_mm": centroid[1],
        "centroid_s_mm": centroid[2],
        "first_slice": first,
        "last_slice": last,
        "voxel_count": lesion.get("voxel_count", 0),
    }


def _update_chart(scene, nodes: ResultNodes, name: str, input_volume) -> None:
    chart = nodes.chart
    chart.SetTitle(f"{name}: slice class probabilities")
    chart.SetXAxisTitle("Slice index")
    chart.SetYAxisTitle("Probability")
    chart.SetLegendVisibility(True)
    for column, legend, color in PROBABILITY_SERIES:
        series = _result_node(scene, nodes.series.get(column), "vtkMRMLPlotSeriesNode",
                              f"{name} {legend}", SERIES_ROLE_PREFIX + column, input_volume)
        series.SetAndObserveTableNodeID(nodes.slices_table.GetID())
        series.SetXColumnName("slice_index")
        series.SetYColumnName(column)
        series.SetPlotType(slicer.vtkMRMLPlotSeriesNode.PlotTypeScatter)
        series.SetMarkerStyle(slicer.vtkMRMLPlotSeriesNode.MarkerStyleNone)
        series.SetLineStyle(slicer.vtkMRMLPlotSeriesNode.LineStyleSolid)
        series.SetColor(*color)
        nodes.series[column] = series
        if not _chart_has_series(chart, series):
            chart.AddAndObservePlotSeriesNodeID(series.GetID())


def _chart_has_series(chart, series) -> bool:
    return any(chart.GetNthPlotSeriesNodeID(i) == series.GetID()
               for i in range(chart.GetNumberOfPlotSeriesNodes()))


# --- probability map ----------------------------------------------------------------------

def _update_probability_volume(target, source, input_volume) -> None:
    image = vtk.vtkImageData()
    image.DeepCopy(source.GetImageData())
    ijk_to_ras = vtk.vtkMatrix4x4()
    source.GetIJKToRASMatrix(ijk_to_ras)
    target.SetIJKToRASMatrix(ijk_to_ras)
    target.SetAndObserveImageData(image)
    target.SetAndObserveTransformNodeID(input_volume.GetTransformNodeID())
    target.CreateDefaultDisplayNodes()
    display = target.GetDisplayNode()
    if display is not None:
        display.AutoWindowLevelOff()
        display.SetWindowLevelMinMax(0, _PROBABILITY_SCALE)


# --- helpers ------------------------------------------------------------------------------

def _result_node(scene, node, node_class: str, name: str, role: str, input_volume):
    """Return `node`, or a new node of `node_class` tagged with `role` for `input_volume`."""
    if node is None:
        node = scene.AddNewNodeByClass(node_class, name)
        node.SetAttribute(ROLE_ATTRIBUTE, role)
        node.SetNodeReferenceID(INPUT_REFERENCE_ROLE, input_volume.GetID())
    return node


def _cell(table_node, row: int, column_name: str) -> str:
    table = table_node.GetTable()
    column = table.GetColumnByName(column_name)
    if column is None:
        raise KeyError(f"column '{column_name}' is missing from table '{table_node.GetName()}'")
    if not 0 <= row < table.GetNumberOfRows():
        raise IndexError(f"row {row} is outside table '{table_node.GetName()}' "
                         f"({table.GetNumberOfRows()} rows)")
    return str(column.GetVariantValue(row).ToString())


def _to_world(node, local_ras: Sequence[float]) -> tuple[float, float, float]:
    parent = node.GetParentTransformNode()
    if parent is None:
        return tuple(float(v) for v in local_ras)
    transform = vtk.vtkGeneralTransform()
    slicer.vtkMRMLTransformNode.GetTransformBetweenNodes(parent, None, transform)
    return tuple(float(v) for v in transform.TransformPoint(list(local_ras)))
