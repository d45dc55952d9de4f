"""Tests of the output folder and the file writers.

The segmentation file is read back by slicerio and by Slicer's own storage node (from the
slicer-core package), the images by SimpleITK, so the tests check the files as their real
readers see them.
"""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from livertumorai.constants import LABEL_LIVER, LABEL_TUMOR, SEGMENT_LIVER, SEGMENT_TUMOR
from livertumorai.errors import ConfigurationError, OutputExistsError
from livertumorai.geometry import ImageGeometry
from livertumorai.outputs import (
    OutputFolder,
    write_json,
    write_labelmap,
    write_probability_map,
    write_segmentation_nrrd,
    write_slices_csv,
)

slicerio = pytest.importorskip("slicerio")
slicerio_segmentation = pytest.importorskip("slicerio.segmentation")
nrrd = pytest.importorskip("nrrd")

EMPTY_EXTENT = [0, -1, 0, -1, 0, -1]


def _rotation_geometry() -> ImageGeometry:
    """A 7 x 6 x 5 grid rotated 30 degrees about z, with the slice axis reversed."""
    cos, sin = math.cos(math.radians(30)), math.sin(math.radians(30))
    return ImageGeometry(
        size_xyz=(7, 6, 5),
        spacing_mm_xyz=(0.75, 0.8, 2.5),
        origin_lps=(-120.5, 33.25, 410.0),
        direction_lps=(cos, -sin, 0.0, sin, cos, 0.0, 0.0, 0.0, -1.0),
    )


def _liver_with_tumor() -> np.ndarray:
    """Labels (z, y, x): a 3 x 3 x 4 liver block, one tumor voxel on its edge and one outside it."""
    labels = np.zeros((5, 6, 7), dtype=np.uint8)
    labels[1:4, 2:5, 1:5] = LABEL_LIVER
    labels[2, 3, 4] = LABEL_TUMOR
    labels[2, 3, 5] = LABEL_TUMOR  # outside the liver box, so it widens the layer's extent
    return labels


def _ijk_to_lps(geometry: ImageGeometry) -> np.ndarray:
    matrix = np.eye(4)
    matrix[:3, :3] = geometry.direction_matrix @ np.diag(geometry.spacing_mm_xyz)
    matrix[:3, 3] = geometry.origin_lps
    return matrix


def _segment_by_name(segmentation: dict, name: str) -> dict:
    matches = [segment for segment in segmentation["segments"] if segment["name"] == name]
    assert len(matches) == 1, f"expected one segment named {name!r}"
    return matches[0]


# --- .seg.nrrd read by slicerio ---------------------------------------------------------


def test_segmentation_slicerio_segments(tmp_path):
    path = write_segmentation_nrrd(_liver_with_tumor(), _rotation_geometry(), tmp_path / "a.seg.nrrd")
    segmentation = slicerio.read_segmentation(str(path))

    assert [s["name"] for s in segmentation["segments"]] == ["Liver", "Liver tumor"]
    for definition in (SEGMENT_LIVER, SEGMENT_TUMOR):
        segment = _segment_by_name(segmentation, definition.name)
        assert segment["id"] == definition.segment_id
        assert segment["labelValue"] == definition.label_value
        assert segment["layer"] == 0
        np.testing.assert_allclose(segment["color"], definition.color_rgb, atol=1e-6)
        assert segment["status"] == "inprogress"
        assert slicerio_segmentation.terminology_entry_to_string(segment["terminology"]) == (
            definition.terminology_entry()
        )


def test_segmentation_slicerio_terminology_codes(tmp_path):
    path = write_segmentation_nrrd(_liver_with_tumor(), _rotation_geometry(), tmp_path / "a.seg.nrrd")
    segmentation = slicerio.read_segmentation(str(path))

    liver = _segment_by_name(segmentation, "Liver")["terminology"]
    assert liver["category"] == ["SCT", "123037004", "Anatomical Structure"]
    assert liver["type"] == ["SCT", "10200004", "Liver"]
    tumor = _segment_by_name(segmentation, "Liver tumor")["terminology"]
    assert tumor["category"] == ["SCT", "49755003", "Morphologically Altered Structure"]
    assert tumor["type"] == ["SCT", "108369006", "Neoplasm"]
    assert tumor["anatomicRegion"] == ["SCT", "10200004", "Liver"]


def test_segmentation_slicerio_voxels_and_geometry(tmp_path):
    labels = _liver_with_tumor()
    geometry = _rotation_geometry()
    path = write_segmentation_nrrd(labels, geometry, tmp_path / "a.seg.nrrd")
    segmentation = slicerio.read_segmentation(str(path))

    # pynrrd returns (x, y, z) arrays.
    voxels = segmentation["voxels"]
    assert voxels.dtype == np.uint8
    np.testing.assert_array_equal(voxels, labels.transpose(2, 1, 0))
    np.testing.assert_allclose(segmentation["ijkToLPS"], _ijk_to_lps(geometry), atol=1e-9)
    assert segmentation["masterRepresentation"] == "Binary labelmap"
    assert segmentation["containedRepresentationNames"] == ["Binary labelmap"]
    assert segmentation["referenceImageExtentOffset"] == [0, 0, 0]


def test_segmentation_extents(tmp_path):
    path = write_segmentation_nrrd(_liver_with_tumor(), _rotation_geometry(), tmp_path / "a.seg.nrrd")
    segmentation = slicerio.read_segmentation(str(path), skip_voxels=True)

    # Non-zero voxels: x 1..5, y 2..4, z 1..3. Both segments carry the layer's extent,
    # as Slicer writes it for segments that share a layer.
    layer_extent = [1, 5, 2, 4, 1, 3]
    assert _segment_by_name(segmentation, "Liver")["extent"] == layer_extent
    assert _segment_by_name(segmentation, "Liver tumor")["extent"] == layer_extent


def test_segmentation_header_fields(tmp_path):
    geometry = _rotation_geometry()
    path = write_segmentation_nrrd(_liver_with_tumor(), geometry, tmp_path / "a.seg.nrrd")
    header = nrrd.read_header(str(path))

    assert header["type"] == "unsigned char"
    assert header["encoding"] == "gzip"
    assert header["space"] == "left-posterior-superior"
    assert list(header["kinds"]) == ["domain", "domain", "domain"]
    assert list(header["sizes"]) == [7, 6, 5]
    assert header["Segment0_Tags"] == (
        f"Segmentation.Status:inprogress|TerminologyEntry:{SEGMENT_LIVER.terminology_entry()}|"
    )
    assert header["Segmentation_ContainedRepresentationNames"] == "Binary labelmap|"
    assert header["Segmentation_ConversionParameters"].startswith("Reference image geometry|")
    assert header["Segmentation_ConversionParameters"].endswith("&")


def test_segmentation_geometry_simpleitk(tmp_path):
    geometry = _rotation_geometry()
    path = write_segmentation_nrrd(_liver_with_tumor(), geometry, tmp_path / "a.seg.nrrd")
    image = sitk.ReadImage(str(path))

    assert image.GetSize() == geometry.size_xyz
    np.testing.assert_allclose(image.GetSpacing(), geometry.spacing_mm_xyz, rtol=0, atol=1e-12)
    np.testing.assert_allclose(image.GetOrigin(), geometry.origin_lps, rtol=0, atol=1e-9)
    np.testing.assert_allclose(image.GetDirection(), geometry.direction_lps, rtol=0, atol=1e-12)


def test_segmentation_without_tumor(tmp_path):
    labels = _liver_with_tumor()
    labels[labels == LABEL_TUMOR] = LABEL_LIVER
    path = write_segmentation_nrrd(labels, _rotation_geometry(), tmp_path / "a.seg.nrrd")
    segmentation = slicerio.read_segmentation(str(path))

    assert [s["name"] for s in segmentation["segments"]] == ["Liver", "Liver tumor"]
    assert _segment_by_name(segmentation, "Liver")["extent"] == [1, 5, 2, 4, 1, 3]
    assert _segment_by_name(segmentation, "Liver tumor")["extent"] == EMPTY_EXTENT
    assert not np.any(segmentation["voxels"] == LABEL_TUMOR)


def test_segmentation_empty_first_segment_extent(tmp_path):
    labels = np.zeros((5, 6, 7), dtype=np.uint8)
    labels[1:3, 2:4, 3:6] = LABEL_TUMOR
    path = write_segmentation_nrrd(labels, _rotation_geometry(), tmp_path / "a.seg.nrrd")
    segmentation = slicerio.read_segmentation(str(path), skip_voxels=True)

    # The empty liver segment comes first in the layer, so it carries the layer's extent.
    assert _segment_by_name(segmentation, "Liver")["extent"] == [3, 5, 2, 3, 1, 2]
    assert _segment_by_name(segmentation, "Liver tumor")["extent"] == [3, 5, 2, 3, 1, 2]


def test_segmentation_all_background(tmp_path):
    labels = np.zeros((5, 6, 7), dtype=np.uint8)
    path = write_segmentation_nrrd(labels, _rotation_geometry(), tmp_path / "a.seg.nrrd")
    segmentation = slicerio.read_segmentation(str(path))

    assert len(segmentation["segments"]) == 2
    for segment in segmentation["segments"]:
        assert segment["extent"] == EMPTY_EXTENT
    assert segmentation["voxels"].shape == (7, 6, 5)


def test_segmentation_on_real_oblique_labels(tmp_path, shared_data_dir):
    label_image = sitk.ReadImage(
        str(shared_data_dir / "fixtures" / "ircadb1.17_small_oblique15_label.nii.gz")
    )
    geometry = ImageGeometry.from_image(label_image)
    labels = sitk.GetArrayFromImage(label_image)
    path = write_segmentation_nrrd(labels, geometry, tmp_path / "real.seg.nrrd")
    segmentation = slicerio.read_segmentation(str(path))

    np.testing.assert_array_equal(segmentation["voxels"], labels.transpose(2, 1, 0))
    np.testing.assert_allclose(segmentation["ijkToLPS"], _ijk_to_lps(geometry), atol=1e-6)
    assert np.count_nonzero(labels == LABEL_TUMOR) > 0


def _labels_with(values) -> np.ndarray:
    """Return a (5, 6, 7) label map of zeros with one voxel of each of `values`."""
    labels = np.zeros((5, 6, 7), dtype=np.uint8)
    labels.flat[1:1 + len(values)] = values
    return labels


@pytest.mark.parametrize(
    "labels, message",
    [
        (np.zeros((5, 6, 6), dtype=np.uint8), "shape"),
        (np.zeros((5, 6, 7), dtype=np.float32), "dtype"),
        (np.full((5, 6, 7), 3, dtype=np.uint8), r"\[3\]"),
        (np.full((5, 6, 7), -1, dtype=np.int16), "0..255"),
        (_labels_with(values=(1, 2, 4, 7)), r"\[4, 7\]"),
    ],
)
def test_segmentation_rejects_bad_labels(tmp_path, labels, message):
    with pytest.raises(ValueError, match=message):
        write_segmentation_nrrd(labels, _rotation_geometry(), tmp_path / "a.seg.nrrd")
    assert list(tmp_path.iterdir()) == []


# --- .seg.nrrd read by Slicer's storage node ----------------------------------------------


def _read_with_slicer(path: Path):
    """Read a .seg.nrrd into a vtkMRMLSegmentationNode with Slicer's storage node."""
    slicer = pytest.importorskip("slicer")
    if not hasattr(slicer, "vtkMRMLSegmentationStorageNode"):
        pytest.skip("the installed 'slicer' package is not slicer-core (no MRML classes)")
    scene = slicer.vtkMRMLScene()
    segmentations_logic = slicer.vtkSlicerSegmentationsModuleLogic()
    segmentations_logic.SetMRMLScene(scene)  # registers the segmentation node classes
    segmentation_node = scene.AddNewNodeByClass("vtkMRMLSegmentationNode")
    storage_node = scene.AddNewNodeByClass("vtkMRMLSegmentationStorageNode")
    storage_node.SetFileName(str(path))
    assert storage_node.ReadData(segmentation_node) == 1
    return slicer, scene, segmentation_node


def _slicer_segment_mask(slicer, segmentation_node, segment_id: str, shape_zyx) -> np.ndarray:
    """Return a segment's binary labelmap from Slicer as a full-size (z, y, x) array."""
    from vtk.util import numpy_support

    image = slicer.vtkOrientedImageData()
    segmentation_node.GetBinaryLabelmapRepresentation(segment_id, image)
    mask = np.zeros(shape_zyx, dtype=bool)
    x0, x1, y0, y1, z0, z1 = image.GetExtent()
    if x0 > x1 or y0 > y1 or z0 > z1:
        return mask
    scalars = numpy_support.vtk_to_numpy(image.GetPointData().GetScalars())
    mask[z0 : z1 + 1, y0 : y1 + 1, x0 : x1 + 1] = scalars.reshape(z1 - z0 + 1, y1 - y0 + 1, x1 - x0 + 1) > 0
    return mask


def _slicer_image_to_ras(slicer, segmentation_node, segment_id: str) -> np.ndarray:
    import vtk

    image = slicer.vtkOrientedImageData()
    segmentation_node.GetBinaryLabelmapRepresentation(segment_id, image)
    matrix = vtk.vtkMatrix4x4()
    image.GetImageToWorldMatrix(matrix)
    return np.array([[matrix.GetElement(row, column) for column in range(4)] for row in range(4)])


def test_slicer_reads_segments(tmp_path):
    path = write_segmentation_nrrd(_liver_with_tumor(), _rotation_geometry(), tmp_path / "a.seg.nrrd")
    _, _, node = _read_with_slicer(path)
    segmentation = node.GetSegmentation()

    assert segmentation.GetNumberOfSegments() == 2
    for index, definition in enumerate((SEGMENT_LIVER, SEGMENT_TUMOR)):
        segment = segmentation.GetNthSegment(index)
        assert segmentation.GetNthSegmentID(index) == definition.segment_id
        assert segment.GetName() == definition.name
        assert segment.GetLabelValue() == definition.label_value
        np.testing.assert_allclose(segment.GetColor(), definition.color_rgb, atol=1e-6)
        assert segment.GetTerminology() == definition.terminology_entry()


def test_slicer_reads_voxels_and_geometry(tmp_path):
    labels = _liver_with_tumor()
    geometry = _rotation_geometry()
    path = write_segmentation_nrrd(labels, geometry, tmp_path / "a.seg.nrrd")
    slicer, _, node = _read_with_slicer(path)

    expected_ijk_to_ras = np.diag([-1.0, -1.0, 1.0, 1.0]) @ _ijk_to_lps(geometry)
    for definition in (SEGMENT_LIVER, SEGMENT_TUMOR):
        mask = _slicer_segment_mask(slicer, node, definition.segment_id, labels.shape)
        np.testing.assert_array_equal(mask, labels == definition.label_value)
        image_to_ras = _slicer_image_to_ras(slicer, node, definition.segment_id)
        np.testing.assert_allclose(image_to_ras, expected_ijk_to_ras, atol=1e-6)


def test_slicer_reads_reference_geometry(tmp_path):
    geometry = _rotation_geometry()
    path = write_segmentation_nrrd(_liver_with_tumor(), geometry, tmp_path / "a.seg.nrrd")
    slicer, _, node = _read_with_slicer(path)

    name = slicer.vtkSegmentationConverter.GetReferenceImageGeometryParameterName()
    values = node.GetSegmentation().GetConversionParameter(name).rstrip(";").split(";")
    matrix = np.array([float(v) for v in values[:16]]).reshape(4, 4)
    expected_ijk_to_ras = np.diag([-1.0, -1.0, 1.0, 1.0]) @ _ijk_to_lps(geometry)
    np.testing.assert_allclose(matrix, expected_ijk_to_ras, atol=1e-12)
    assert [int(v) for v in values[16:]] == [0, 6, 0, 5, 0, 4]


def test_slicer_reads_tumor_free(tmp_path):
    labels = _liver_with_tumor()
    labels[labels == LABEL_TUMOR] = LABEL_LIVER
    path = write_segmentation_nrrd(labels, _rotation_geometry(), tmp_path / "a.seg.nrrd")
    slicer, _, node = _read_with_slicer(path)

    assert node.GetSegmentation().GetNumberOfSegments() == 2
    liver = _slicer_segment_mask(slicer, node, SEGMENT_LIVER.segment_id, labels.shape)
    tumor = _slicer_segment_mask(slicer, node, SEGMENT_TUMOR.segment_id, labels.shape)
    assert liver.sum() == 37  # 36-voxel block plus the tumor voxel outside it
    assert tumor.sum() == 0


def test_slicer_keeps_tumor_without_liver(tmp_path):
    # Some Slicer versions read a shared layer cropped to its first segment's extent, so
    # an empty liver segment must not crop the tumor away.
    labels = np.zeros((5, 6, 7), dtype=np.uint8)
    labels[1:3, 2:4, 3:6] = LABEL_TUMOR
    path = write_segmentation_nrrd(labels, _rotation_geometry(), tmp_path / "a.seg.nrrd")
    slicer, _, node = _read_with_slicer(path)

    tumor = _slicer_segment_mask(slicer, node, SEGMENT_TUMOR.segment_id, labels.shape)
    liver = _slicer_segment_mask(slicer, node, SEGMENT_LIVER.segment_id, labels.shape)
    np.testing.assert_array_equal(tumor, labels == LABEL_TUMOR)
    assert liver.sum() == 0


# --- label map and probability map --------------------------------------------------------


def test_labelmap_round_trip(tmp_path):
    labels = _liver_with_tumor()
    geometry = _rotation_geometry()
    path = write_labelmap(labels.astype(np.int64), geometry, tmp_path / "labels.nii.gz")
    image = sitk.ReadImage(str(path))

    assert image.GetPixelID() == sitk.sitkUInt8
    np.testing.assert_array_equal(sitk.GetArrayFromImage(image), labels)
    assert ImageGeometry.from_image(image).size_xyz == geometry.size_xyz
    np.testing.assert_allclose(image.GetOrigin(), geometry.origin_lps, atol=1e-4)
    np.testing.assert_allclose(image.GetDirection(), geometry.direction_lps, atol=1e-6)


def test_probability_map_uint8(tmp_path):
    geometry = _rotation_geometry()
    probabilities = np.arange(5 * 6 * 7, dtype=np.uint8).reshape(5, 6, 7)
    path = write_probability_map(probabilities, geometry, tmp_path / "tumor_probability.nrrd")
    image = sitk.ReadImage(str(path))

    assert image.GetPixelID() == sitk.sitkUInt8
    np.testing.assert_array_equal(sitk.GetArrayFromImage(image), probabilities)
    np.testing.assert_allclose(image.GetDirection(), geometry.direction_lps, atol=1e-12)


def test_probability_map_float(tmp_path):
    probabilities = np.linspace(0.0, 1.0, 5 * 6 * 7).reshape(5, 6, 7)
    path = write_probability_map(probabilities, _rotation_geometry(), tmp_path / "p.nrrd")
    image = sitk.ReadImage(str(path))

    assert image.GetPixelID() == sitk.sitkFloat32
    np.testing.assert_allclose(sitk.GetArrayFromImage(image), probabilities, atol=1e-7)


def test_probability_map_rejects_nan(tmp_path):
    probabilities = np.zeros((5, 6, 7), dtype=np.float32)
    probabilities[0, 0, 0] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        write_probability_map(probabilities, _rotation_geometry(), tmp_path / "p.nrrd")
    assert list(tmp_path.iterdir()) == []


# --- CSV and JSON -------------------------------------------------------------------------


def test_slices_csv_round_trip(tmp_path):
    rows = [
        {"slice": 0, "class": "background", "p_tumor": 0.125},
        {"slice": 1, "class": "tumor", "p_tumor": 0.75},
    ]
    path = write_slices_csv(tmp_path / "slices.csv", rows)
    with open(path, newline="", encoding="utf-8") as file:
        read_rows = list(csv.DictReader(file))

    assert read_rows == [
        {"slice": "0", "class": "background", "p_tumor": "0.125"},
        {"slice": "1", "class": "tumor", "p_tumor": "0.75"},
    ]


def test_slices_csv_rejects_mismatched_rows(tmp_path):
    rows = [{"slice": 0, "class": "tumor"}, {"slice": 1}]
    with pytest.raises(ValueError, match="Row 1"):
        write_slices_csv(tmp_path / "slices.csv", rows)
    assert list(tmp_path.iterdir()) == []


def test_slices_csv_header_only(tmp_path):
    path = write_slices_csv(tmp_path / "slices.csv", [], fieldnames=["slice", "class"])
    assert path.read_text(encoding="utf-8").splitlines() == ["slice,class"]


def test_json_round_trip_with_numpy(tmp_path):
    data = {
        "volume_ml": np.float32(12.5),
        "count": np.int64(3),
        "spacing_mm": np.array([0.5, 0.5, 2.0]),
        "input": Path("/data/ct.nii.gz"),
        "name": "Leber",
    }
    path = write_json(tmp_path / "report.json", data)
    text = path.read_text(encoding="utf-8")

    assert json.loads(text) == {
        "volume_ml": 12.5,
        "count": 3,
        "spacing_mm": [0.5, 0.5, 2.0],
        "input": "/data/ct.nii.gz",
        "name": "Leber",
    }
    assert text.startswith('{\n  "volume_ml"')
    assert text.endswith("\n")


def test_json_rejects_nan(tmp_path):
    with pytest.raises(ValueError, match="NaN"):
        write_json(tmp_path / "report.json", {"burden": float("nan")})
    assert list(tmp_path.iterdir()) == []


# --- OutputFolder -------------------------------------------------------------------------


def test_output_folder_success_renames(tmp_path):
    target = tmp_path / "out"
    with OutputFolder(target) as folder:
        assert folder.parent == tmp_path
        assert folder.name.startswith(".out.partial-")
        assert not target.exists()
        (folder / "report.json").write_text("{}")

    assert (target / "report.json").read_text() == "{}"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_output_folder_creates_parents(tmp_path):
    target = tmp_path / "a" / "b" / "out"
    with OutputFolder(target) as folder:
        (folder / "x.txt").write_text("x")
    assert (target / "x.txt").is_file()


def test_output_folder_exception_leaves_nothing(tmp_path):
    target = tmp_path / "out"
    with pytest.raises(RuntimeError, match="failed"):
        with OutputFolder(target) as folder:
            (folder / "half.json").write_text("{")
            raise RuntimeError("failed")

    assert list(tmp_path.iterdir()) == []


def test_output_folder_exception_keeps_old(tmp_path):
    target = tmp_path / "out"
    target.mkdir()
    (target / "old.json").write_text("old")
    with pytest.raises(RuntimeError):
        with OutputFolder(target, overwrite=True) as folder:
            (folder / "new.json").write_text("new")
            raise RuntimeError("failed")

    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    assert sorted(p.name for p in target.iterdir()) == ["old.json"]
    assert (target / "old.json").read_text() == "old"


def test_output_folder_exists_without_overwrite(tmp_path):
    target = tmp_path / "out"
    target.mkdir()
    (target / "old.json").write_text("old")

    with pytest.raises(OutputExistsError, match="--overwrite") as raised:
        OutputFolder(target)
    assert str(target) in str(raised.value)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_output_folder_file_without_overwrite(tmp_path):
    target = tmp_path / "out"
    target.write_text("not a folder")
    with pytest.raises(OutputExistsError):
        OutputFolder(target)


def test_output_folder_file_with_overwrite(tmp_path):
    target = tmp_path / "out"
    target.write_text("not a folder")
    with pytest.raises(ConfigurationError, match="is a file"):
        OutputFolder(target, overwrite=True)
    assert target.read_text() == "not a folder"


def test_output_folder_empty_folder_accepted(tmp_path):
    target = tmp_path / "out"
    target.mkdir()
    with OutputFolder(target) as folder:
        (folder / "report.json").write_text("{}")
    assert sorted(p.name for p in target.iterdir()) == ["report.json"]


def test_output_folder_overwrite_replaces(tmp_path):
    target = tmp_path / "out"
    target.mkdir()
    (target / "old.json").write_text("old")
    with OutputFolder(target, overwrite=True) as folder:
        (folder / "new.json").write_text("new")

    assert sorted(p.name for p in target.iterdir()) == ["new.json"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_output_folder_parent_is_file(tmp_path):
    blocker = tmp_path / "file.txt"
    blocker.write_text("x")
    with pytest.raises(ConfigurationError, match="is a file"):
        OutputFolder(blocker / "out")


def test_output_folder_filled_during_run(tmp_path):
    target = tmp_path / "out"
    with pytest.raises(OutputExistsError):
        with OutputFolder(target) as folder:
            (folder / "new.json").write_text("new")
            target.mkdir()
            (target / "other.json").write_text("other")

    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    assert sorted(p.name for p in target.iterdir()) == ["other.json"]


def test_writers_inside_output_folder(tmp_path):
    target = tmp_path / "out"
    with OutputFolder(target) as folder:
        write_segmentation_nrrd(_liver_with_tumor(), _rotation_geometry(), folder / "segmentation.seg.nrrd")
        write_json(folder / "report.json", {"ok": True})

    assert sorted(p.name for p in target.iterdir()) == ["report.json", "segmentation.seg.nrrd"]
