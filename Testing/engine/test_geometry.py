"""Axial-stack orientation: every storage order and flip maps to the same anatomy."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import SimpleITK as sitk

from livertumorai.geometry import (
    ImageGeometry,
    axial_frame,
    lps_to_ras,
    xyz_to_zyx,
)

FIXTURE_NAMES = ("axial_lps", "axial_flipped_xy", "feet_first", "coronal_stack", "oblique15")
FIXTURE_EXTENSIONS = (".nii.gz", ".nrrd", ".mha")


def _find_fixture(shared_data_dir, stem):
    for extension in FIXTURE_EXTENSIONS:
        path = shared_data_dir / "fixtures" / f"{stem}{extension}"
        if path.exists():
            return path
    pytest.fail(f"fixture {stem} not found in {shared_data_dir / 'fixtures'}")


def _reoriented(image: sitk.Image, axes_order, flips) -> sitk.Image:
    """Store the same physical image with permuted and flipped axes (no resampling)."""
    permuted = sitk.PermuteAxes(image, list(axes_order))
    return sitk.Flip(permuted, list(flips))


def test_xyz_to_zyx_reverses():
    assert xyz_to_zyx((1.0, 2.0, 3.0)) == (3.0, 2.0, 1.0)


def test_lps_to_ras_negates_x_and_y():
    assert lps_to_ras((10.0, -20.0, 30.0)) == (-10.0, 20.0, 30.0)


def test_index_to_lps_matches_simpleitk():
    image = sitk.Image(5, 6, 7, sitk.sitkUInt8)
    image.SetSpacing((0.7, 0.8, 2.5))
    image.SetOrigin((10.0, -4.0, 100.0))
    image.SetDirection((0, 0, 1, -1, 0, 0, 0, -1, 0))
    geometry = ImageGeometry.from_image(image)
    for index in [(0, 0, 0), (4, 5, 6), (2, 3, 1)]:
        expected = image.TransformIndexToPhysicalPoint(index)
        np.testing.assert_allclose(geometry.index_to_lps(index), expected, atol=1e-9)


@pytest.mark.parametrize("name", FIXTURE_NAMES)
def test_fixture_round_trip(shared_data_dir, name):
    labels = sitk.ReadImage(str(_find_fixture(shared_data_dir, f"ircadb1.17_small_{name}_label")))
    frame = axial_frame(ImageGeometry.from_image(labels))
    array = sitk.GetArrayFromImage(labels)

    stack = frame.to_axial(array)

    np.testing.assert_array_equal(frame.from_axial(stack), array)
    assert stack.shape[0] == array.shape[frame.input_slice_axis_zyx]


@pytest.mark.parametrize("name", ("axial_lps", "axial_flipped_xy", "feet_first", "coronal_stack"))
def test_fixture_same_axial_stack(shared_data_dir, name):
    """Same anatomy in four storage orders gives the same axial stack, voxel for voxel."""
    reference = sitk.ReadImage(
        str(_find_fixture(shared_data_dir, "ircadb1.17_small_axial_lps_label")))
    reference_stack = axial_frame(ImageGeometry.from_image(reference)).to_axial(
        sitk.GetArrayFromImage(reference))
    labels = sitk.ReadImage(str(_find_fixture(shared_data_dir, f"ircadb1.17_small_{name}_label")))
    frame = axial_frame(ImageGeometry.from_image(labels))

    stack = frame.to_axial(sitk.GetArrayFromImage(labels))

    assert stack.shape == reference_stack.shape
    assert np.mean(stack != reference_stack) < 1e-3


def test_oblique_fixture_warns(shared_data_dir, caplog):
    labels = sitk.ReadImage(str(_find_fixture(shared_data_dir, "ircadb1.17_small_oblique15_label")))
    geometry = ImageGeometry.from_image(labels)

    frame = axial_frame(geometry)

    assert frame.obliquity_deg == pytest.approx(15.0, abs=0.1)
    tilted = sitk.Image(4, 4, 4, sitk.sitkUInt8)
    angle = np.radians(30.0)
    rotation = (1, 0, 0, 0, np.cos(angle), -np.sin(angle), 0, np.sin(angle), np.cos(angle))
    tilted.SetDirection(rotation)
    with caplog.at_level("WARNING"):
        axial_frame(ImageGeometry.from_image(tilted))
    assert "oblique" in caplog.text


@pytest.mark.parametrize(
    "axes_order, flips",
    [(order, flips) for order in itertools.permutations(range(3))
     for flips in [(False, False, False), (True, False, True), (False, True, True)]],
)
def test_every_axis_order_and_flip(shared_data_dir, axes_order, flips):
    """Rewrite the axial CT in 18 storage orders: the axial stack never changes."""
    labels = sitk.ReadImage(
        str(_find_fixture(shared_data_dir, "ircadb1.17_small_axial_lps_label")))
    reference = axial_frame(ImageGeometry.from_image(labels)).to_axial(
        sitk.GetArrayFromImage(labels))
    stored = _reoriented(labels, axes_order, flips)
    frame = axial_frame(ImageGeometry.from_image(stored))
    array = sitk.GetArrayFromImage(stored)

    stack = frame.to_axial(array)

    np.testing.assert_array_equal(stack, reference)
    np.testing.assert_array_equal(frame.from_axial(stack), array)
    assert frame.spacing_mm == pytest.approx((3.2, 2.972, 2.972), abs=1e-3)


def test_liver_on_patient_right_in_stack(shared_data_dir):
    """Columns run from the patient's right to left, so the liver sits in the left half."""
    labels = sitk.ReadImage(
        str(_find_fixture(shared_data_dir, "ircadb1.17_small_axial_flipped_xy_label")))
    stack = axial_frame(ImageGeometry.from_image(labels)).to_axial(sitk.GetArrayFromImage(labels))

    liver_columns = np.nonzero(stack > 0)[2]

    assert liver_columns.mean() < stack.shape[2] / 2


@pytest.mark.parametrize(
    "axes_order, flips",
    [((0, 1, 2), (False, False, False)), ((2, 0, 1), (True, False, True)),
     ((1, 2, 0), (False, True, True))],
)
def test_stack_point_maps_to_input_index(axes_order, flips):
    image = sitk.Image(6, 7, 8, sitk.sitkUInt8)
    image.SetDirection((-1, 0, 0, 0, -1, 0, 0, 0, 1))
    stored = _reoriented(image, axes_order, flips)
    array = np.zeros(sitk.GetArrayViewFromImage(stored).shape, dtype=np.uint8)
    frame = axial_frame(ImageGeometry.from_image(stored))
    stack = frame.to_axial(array)
    marked = np.zeros_like(stack)
    marked[2, 3, 4] = 1

    index_zyx = frame.stack_to_input_index_zyx((2, 3, 4), stack.shape)

    assert frame.from_axial(marked)[tuple(int(v) for v in index_zyx)] == 1
