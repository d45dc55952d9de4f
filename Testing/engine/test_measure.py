"""Tests of livertumorai.measure on phantoms with hand-computed volumes and positions."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import SimpleITK as sitk

from livertumorai.constants import LABEL_LIVER, LABEL_TUMOR
from livertumorai.geometry import ImageGeometry, axial_frame
from livertumorai.measure import label_lesions, measure, slice_areas_mm2

# One physical phantom on two grids with the same voxel centres (LPS, mm):
#   x = 100 - 0.8 i, y = 80 - 0.9 j, z = -50 + 2 k   for i < 60, j < 50, k < 30.
# AXIAL stores it as axial slices with direction diag(-1, -1, 1). CORONAL stores it as
# coronal slices: image axis i runs to the left, j to inferior, k to posterior.
AXIAL = dict(
    size=(60, 50, 30),
    spacing=(0.8, 0.9, 2.0),
    origin=(100.0, 80.0, -50.0),
    direction=(-1, 0, 0, 0, -1, 0, 0, 0, 1),
)
CORONAL = dict(
    size=(60, 30, 50),
    spacing=(0.8, 2.0, 0.9),
    origin=(100.0 - 0.8 * 59, 80.0 - 0.9 * 49, -50.0 + 2.0 * 29),
    direction=(1, 0, 0, 0, 0, 1, 0, -1, 0),
)

# Liver box and tumor sphere in LPS mm. The sphere centre is the voxel centre
# (i, j, k) = (30, 25, 12). With r = 10.05 mm no voxel centre lies exactly on the sphere
# (10.1 mm would put (dy, dz) = (9.9, 2) mm on it and break the symmetry by rounding).
LIVER_BOX_LPS = ((58.0, 95.0), (40.0, 76.0), (-46.0, -4.0))
SPHERE_CENTRE_LPS = (76.0, 57.5, -26.0)
SPHERE_RADIUS_MM = 10.05


def _geometry(grid: dict) -> ImageGeometry:
    image = sitk.Image([int(v) for v in grid["size"]], sitk.sitkUInt8)
    image.SetSpacing(grid["spacing"])
    image.SetOrigin(grid["origin"])
    image.SetDirection([float(v) for v in grid["direction"]])
    return ImageGeometry.from_image(image)


def _voxel_centres_lps(geometry: ImageGeometry) -> np.ndarray:
    """Return the LPS position of every voxel centre, shape (z, y, x, 3)."""
    size_x, size_y, size_z = geometry.size_xyz
    k, j, i = np.meshgrid(
        np.arange(size_z), np.arange(size_y), np.arange(size_x), indexing="ij"
    )
    index_xyz = np.stack([i, j, k], axis=-1).astype(np.float64)
    scaled = index_xyz * np.asarray(geometry.spacing_mm_xyz)
    return scaled @ geometry.direction_matrix.T + np.asarray(geometry.origin_lps)


def _phantom(geometry: ImageGeometry, spheres=((SPHERE_CENTRE_LPS, SPHERE_RADIUS_MM),)):
    """Return a liver box with tumor spheres, as a uint8 (z, y, x) label map."""
    centres = _voxel_centres_lps(geometry)
    in_box = np.ones(centres.shape[:3], dtype=bool)
    for axis, (low, high) in enumerate(LIVER_BOX_LPS):
        in_box &= (centres[..., axis] >= low) & (centres[..., axis] <= high)
    labels = np.where(in_box, LABEL_LIVER, 0).astype(np.uint8)
    for centre, radius in spheres:
        squared = np.sum((centres - np.asarray(centre)) ** 2, axis=-1)
        labels[squared <= radius**2] = LABEL_TUMOR
    return labels


@pytest.fixture(scope="module")
def axial_case():
    geometry = _geometry(AXIAL)
    return _phantom(geometry), geometry


@pytest.fixture(scope="module")
def coronal_case():
    geometry = _geometry(CORONAL)
    return _phantom(geometry), geometry


def test_sphere_volume_and_diameter(axial_case):
    labels, geometry = axial_case

    result = measure(labels, geometry, axial_frame(geometry))

    sphere_ml = 4.0 / 3.0 * math.pi * SPHERE_RADIUS_MM**3 / 1000.0
    assert len(result.lesions) == 1
    lesion = result.lesions[0]
    assert lesion.lesion_id == 1
    assert lesion.volume_ml == pytest.approx(sphere_ml, rel=0.03)
    assert result.tumor_volume_ml == pytest.approx(lesion.volume_ml)
    # Centre to centre: at most 2r, and at least 2r minus one pixel.
    assert 2 * SPHERE_RADIUS_MM - 0.9 <= lesion.longest_axial_diameter_mm <= 2 * SPHERE_RADIUS_MM


def test_sphere_centroid_and_slice_range(axial_case):
    labels, geometry = axial_case

    lesion = measure(labels, geometry, axial_frame(geometry)).lesions[0]

    # The voxelised sphere is symmetric about its centre voxel, so its centroid is the
    # centre: RAS = (-x, -y, z) of LPS (76, 57.5, -26).
    assert lesion.centroid_ras == pytest.approx((-76.0, -57.5, -26.0), abs=1e-9)
    # z from -36.05 to -15.95 mm covers k = 7 (z = -36) to k = 17 (z = -16).
    assert lesion.slice_range == (7, 17)
    assert lesion.voxel_count == np.count_nonzero(labels == LABEL_TUMOR)


def test_liver_volume_and_burden(axial_case):
    labels, geometry = axial_case

    result = measure(labels, geometry, axial_frame(geometry))

    # Voxel centres inside the box: x 58..95 -> i 7..52 (46), y 40..76 -> j 5..44 (40),
    # z -46..-4 -> k 2..23 (22); each voxel is 0.8 x 0.9 x 2 = 1.44 mm3.
    box_ml = 46 * 40 * 22 * 1.44 / 1000.0
    assert result.liver_volume_ml == pytest.approx(box_ml)
    expected_burden = 100.0 * result.tumor_volume_ml / box_ml
    assert result.tumor_burden_percent == pytest.approx(expected_burden)
    # Mean index (29.5, 24.5, 12.5) is LPS (76.4, 57.95, -25), so RAS (-76.4, -57.95, -25).
    assert result.liver_centroid_ras == pytest.approx((-76.4, -57.95, -25.0), abs=1e-9)


def test_coronal_storage_gives_same_results(axial_case, coronal_case):
    axial_labels, axial_geometry = axial_case
    coronal_labels, coronal_geometry = coronal_case

    axial = measure(axial_labels, axial_geometry, axial_frame(axial_geometry))
    coronal = measure(coronal_labels, coronal_geometry, axial_frame(coronal_geometry))

    assert coronal.liver_volume_ml == pytest.approx(axial.liver_volume_ml)
    assert coronal.tumor_volume_ml == pytest.approx(axial.tumor_volume_ml)
    assert coronal.liver_centroid_ras == pytest.approx(axial.liver_centroid_ras, abs=1e-6)
    lesion = coronal.lesions[0]
    assert lesion.centroid_ras == pytest.approx((-76.0, -57.5, -26.0), abs=1e-9)
    diameter_mm = axial.lesions[0].longest_axial_diameter_mm
    assert lesion.longest_axial_diameter_mm == pytest.approx(diameter_mm)
    # Along coronal axis j, z = 8 - 2 j: z = -16 is j = 12 and z = -36 is j = 22.
    assert lesion.slice_range == (12, 22)


def test_two_lesions_ordered_by_volume():
    geometry = _geometry(AXIAL)
    # The small sphere sits lower (smaller k), so SciPy finds it first.
    small = ((64.0, 57.5, -40.0), 3.1)
    large = ((80.0, 57.5, -20.0), 6.1)
    labels = _phantom(geometry, spheres=(small, large))

    result = measure(labels, geometry, axial_frame(geometry))
    lesion_ids, count = label_lesions(labels)

    assert count == 2
    assert [lesion.lesion_id for lesion in result.lesions] == [1, 2]
    assert result.lesions[0].volume_ml > result.lesions[1].volume_ml
    assert result.lesions[0].centroid_ras == pytest.approx((-80.0, -57.5, -20.0), abs=1e-9)
    assert result.lesions[1].centroid_ras == pytest.approx((-64.0, -57.5, -40.0), abs=1e-9)
    assert lesion_ids.dtype == np.int32
    assert np.count_nonzero(lesion_ids == 1) == result.lesions[0].voxel_count
    assert np.count_nonzero(lesion_ids == 2) == result.lesions[1].voxel_count
    assert not lesion_ids[labels != LABEL_TUMOR].any()
    total_ml = result.lesions[0].volume_ml + result.lesions[1].volume_ml
    assert result.tumor_volume_ml == pytest.approx(total_ml)


def test_tumor_free_liver(axial_case):
    labels, geometry = axial_case
    liver_only = np.where(labels > 0, LABEL_LIVER, 0).astype(np.uint8)

    result = measure(liver_only, geometry, axial_frame(geometry))

    assert result.tumor_volume_ml == 0.0
    assert result.tumor_burden_percent == 0.0
    assert result.lesions == ()
    assert result.liver_centroid_ras is not None
    assert label_lesions(liver_only)[1] == 0


def test_liver_free_volume():
    geometry = _geometry(AXIAL)
    labels = np.zeros((30, 50, 60), dtype=np.uint8)

    result = measure(labels, geometry, axial_frame(geometry))
    liver_area_mm2, tumor_area_mm2 = slice_areas_mm2(labels, axial_frame(geometry))

    assert result.liver_volume_ml == 0.0
    assert result.tumor_burden_percent == 0.0
    assert result.liver_centroid_ras is None
    assert result.lesions == ()
    assert result.to_dict()["liver_centroid_ras"] is None
    assert not liver_area_mm2.any()
    assert not tumor_area_mm2.any()


def test_liver_on_patient_right_has_positive_ras_x():
    # Identity direction, origin x = -40 mm: low i is low LPS x, the patient's right.
    image = sitk.Image([40, 10, 10], sitk.sitkUInt8)
    image.SetSpacing((2.0, 1.0, 1.0))
    image.SetOrigin((-40.0, 0.0, 0.0))
    geometry = ImageGeometry.from_image(image)
    frame = axial_frame(geometry)
    right = np.zeros((10, 10, 40), dtype=np.uint8)
    right[:, :, 0:5] = LABEL_LIVER  # i = 0..4: LPS x = -40..-32, mean -36
    left = np.zeros_like(right)
    left[:, :, 35:40] = LABEL_LIVER  # i = 35..39: LPS x = 30..38, mean 34

    right_centroid = measure(right, geometry, frame).liver_centroid_ras
    left_centroid = measure(left, geometry, frame).liver_centroid_ras

    assert right_centroid == pytest.approx((36.0, -4.5, 4.5))
    assert left_centroid == pytest.approx((-34.0, -4.5, 4.5))


def test_slice_areas_inferior_to_superior():
    # Feet first: image axis k points to inferior, so stack slice 0 is input slice 3.
    image = sitk.Image([8, 6, 4], sitk.sitkUInt8)
    image.SetSpacing((0.5, 0.25, 3.0))
    image.SetDirection((1, 0, 0, 0, 1, 0, 0, 0, -1))
    geometry = ImageGeometry.from_image(image)
    frame = axial_frame(geometry)
    labels = np.zeros((4, 6, 8), dtype=np.uint8)
    for k in range(4):
        labels[k, : k + 1, :] = LABEL_LIVER  # input slice k has k + 1 liver rows
    labels[1, 0, 0:3] = LABEL_TUMOR

    liver_area_mm2, tumor_area_mm2 = slice_areas_mm2(labels, frame)

    pixel_mm2 = 0.5 * 0.25
    row_mm2 = 8 * pixel_mm2
    np.testing.assert_allclose(liver_area_mm2, [4 * row_mm2, 3 * row_mm2, 2 * row_mm2, row_mm2])
    np.testing.assert_allclose(tumor_area_mm2, [0.0, 0.0, 3 * pixel_mm2, 0.0])
    assert [frame.input_slice_index(s, 4) for s in range(4)] == [3, 2, 1, 0]


@pytest.mark.parametrize(
    "pixels, expected_mm",
    [
        ([(2, 3, 3)], 0.0),  # one voxel
        ([(2, 3, 3), (2, 3, 4)], 0.8),  # two along a row
        ([(2, 1, 3), (2, 2, 3), (2, 3, 3), (2, 4, 3), (2, 5, 3)], 4 * 0.7),  # a column
        ([(2, 3, 3), (2, 4, 4)], math.hypot(0.7, 0.8)),  # diagonal pair
        ([(2, r, c) for r in range(1, 4) for c in range(2, 6)], math.hypot(1.4, 2.4)),
        ([(1, 3, 3), (2, 3, 3), (3, 3, 3)], 0.0),  # along z only: not an axial length
    ],
    ids=["single", "row-pair", "column-line", "diagonal", "rectangle", "vertical"],
)
def test_axial_diameter_small_shapes(pixels, expected_mm):
    # Identity direction; rows along y at 0.7 mm, columns along x at 0.8 mm.
    image = sitk.Image([10, 10, 6], sitk.sitkUInt8)
    image.SetSpacing((0.8, 0.7, 2.0))
    geometry = ImageGeometry.from_image(image)
    labels = np.full((6, 10, 10), LABEL_LIVER, dtype=np.uint8)
    for pixel in pixels:
        labels[pixel] = LABEL_TUMOR

    lesion = measure(labels, geometry, axial_frame(geometry)).lesions[0]

    assert lesion.longest_axial_diameter_mm == pytest.approx(expected_mm)
    assert lesion.voxel_count == len(pixels)


def test_to_dict_is_json_ready(axial_case):
    labels, geometry = axial_case

    summary = measure(labels, geometry, axial_frame(geometry)).to_dict()
    decoded = json.loads(json.dumps(summary))

    assert decoded["lesion_count"] == 1
    assert set(decoded) == {
        "liver_volume_ml",
        "tumor_volume_ml",
        "tumor_burden_percent",
        "liver_centroid_ras",
        "lesion_count",
        "lesions",
    }
    lesion = decoded["lesions"][0]
    assert lesion["lesion_id"] == 1
    assert lesion["slice_range"] == [7, 17]
    assert lesion["centroid_ras"] == [-76.0, -57.5, -26.0]
    assert lesion["volume_ml"] == round(lesion["volume_ml"], 3)


def test_measure_after_file_round_trip(tmp_path, axial_case):
    labels, geometry = axial_case
    path = tmp_path / "labels.nrrd"
    sitk.WriteImage(geometry.image_from_array(labels), str(path), useCompression=True)

    image = sitk.ReadImage(str(path))
    read_geometry = ImageGeometry.from_image(image)
    result = measure(sitk.GetArrayFromImage(image), read_geometry, axial_frame(read_geometry))

    expected = measure(labels, geometry, axial_frame(geometry))
    assert result.to_dict() == expected.to_dict()


def test_invalid_labels_rejected(axial_case):
    labels, geometry = axial_case
    frame = axial_frame(geometry)
    with pytest.raises(ValueError, match="needs"):
        measure(labels[:-1], geometry, frame)
    with pytest.raises(ValueError, match="values from"):
        measure(labels * 2, geometry, frame)
    with pytest.raises(ValueError, match="3-D"):
        label_lesions(labels[0])


@pytest.mark.parametrize(
    "name",
    ["axial_lps", "axial_flipped_xy", "feet_first", "coronal_stack"],
)
def test_real_labels_in_four_storages(shared_data_dir, name):
    # The same real segmentation stored four ways: every measurement agrees, and the
    # liver centroid is the documented LPS (133.5, 133.5, 111.7) mm.
    extension = {"feet_first": "nrrd", "coronal_stack": "mha"}.get(name, "nii.gz")
    path = shared_data_dir / "fixtures" / f"ircadb1.17_small_{name}_label.{extension}"
    image = sitk.ReadImage(str(path))
    geometry = ImageGeometry.from_image(image)
    frame = axial_frame(geometry)
    labels = sitk.GetArrayFromImage(image)

    result = measure(labels, geometry, frame)
    liver_area_mm2, tumor_area_mm2 = slice_areas_mm2(labels, frame)

    assert result.liver_centroid_ras == pytest.approx((-133.5, -133.5, 111.7), abs=0.1)
    assert len(result.lesions) == 2
    voxel_mm3 = geometry.voxel_volume_mm3
    assert result.liver_volume_ml == pytest.approx((60015 + 5833) * voxel_mm3 / 1000.0)
    assert result.tumor_volume_ml == pytest.approx(5833 * voxel_mm3 / 1000.0)
    assert [lesion.voxel_count for lesion in result.lesions] == [3128, 2705]
    # Areas summed over slices times the slice spacing give the volumes back.
    slice_mm = frame.spacing_mm[0]
    assert liver_area_mm2.sum() * slice_mm / 1000.0 == pytest.approx(result.liver_volume_ml)
    assert tumor_area_mm2.sum() * slice_mm / 1000.0 == pytest.approx(result.tumor_volume_ml)
    # The largest lesion's slices, read in the axial stack, are where its area is.
    num_slices = labels.shape[frame.input_slice_axis_zyx]
    for input_slice in result.lesions[0].slice_range:
        stack_slice = frame.input_slice_index(input_slice, num_slices)  # its own inverse
        assert tumor_area_mm2[stack_slice] > 0
