"""Slice preparation for the networks and the way back to the stack grid."""

from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from livertumorai.geometry import ImageGeometry, axial_frame
from livertumorai.preprocess import SlicePreprocessor, body_center_rc, window_to_unit
from livertumorai.weights import Preprocessing


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    return 2.0 * np.logical_and(a, b).sum() / (a.sum() + b.sum())


@pytest.fixture(scope="module")
def case_17(shared_data_dir):
    """Full-resolution ircadb1.17 as axial stacks (HU and labels)."""
    folder = shared_data_dir / "train" / "ircadb1.17"
    ct = sitk.ReadImage(str(folder / "ct.nii.gz"), sitk.sitkFloat32)
    labels = sitk.ReadImage(str(folder / "label.nii.gz"))
    frame = axial_frame(ImageGeometry.from_image(ct))
    return (frame.to_axial(sitk.GetArrayFromImage(ct)),
            frame.to_axial(sitk.GetArrayFromImage(labels)), frame)


def test_window_maps_to_unit_interval():
    hu = torch.tensor([-1000.0, -160.0, 40.0, 240.0, 3000.0])

    unit = window_to_unit(hu, center_hu=40.0, width_hu=400.0)

    torch.testing.assert_close(unit, torch.tensor([0.0, 0.0, 0.5, 1.0, 1.0]))


def test_body_center_finds_offset_body():
    stack = np.full((8, 100, 120), -1000.0, dtype=np.float32)
    stack[:, 20:40, 70:110] = 40.0

    row, col = body_center_rc(stack)

    assert row == pytest.approx(29.5, abs=2.5)
    assert col == pytest.approx(89.5, abs=2.5)


def test_body_center_of_air_is_image_center():
    stack = np.full((4, 50, 60), -1000.0, dtype=np.float32)

    assert body_center_rc(stack) == (24.5, 29.5)


def test_context_indices_clamp_at_ends():
    prep = Preprocessing(40, 400, 1.0, (32, 32), 2, 3.0)
    preprocessor = SlicePreprocessor(prep, (5, 32, 32), (1.5, 1.0, 1.0), (16, 16))

    indices = preprocessor.context_indices([0, 4])

    np.testing.assert_array_equal(indices, [[0, 0, 0, 2, 4], [0, 2, 4, 4, 4]])


def test_single_slice_volume_prepares():
    prep = Preprocessing(40, 400, 2.0, (32, 32), 2, 3.0)
    stack = np.zeros((1, 40, 40), dtype=np.float32)
    preprocessor = SlicePreprocessor(prep, stack.shape, (5.0, 1.0, 1.0), (20, 20))

    images = preprocessor.images(stack, [0])

    assert images.shape == (1, 5, 32, 32)


def test_labels_survive_resample_and_restore(case_17):
    stack_hu, labels, frame = case_17
    prep = Preprocessing(40, 400, 2.0, (192, 192), 2, 3.0)
    preprocessor = SlicePreprocessor(prep, stack_hu.shape, frame.spacing_mm,
                                     body_center_rc(stack_hu))
    slices = [40, 60, 80]

    small = preprocessor.labels(labels, slices)
    one_hot = torch.nn.functional.one_hot(small, 3).permute(0, 3, 1, 2).float()
    restored = preprocessor.restore(one_hot, fill=(1.0, 0.0, 0.0)).argmax(1).numpy()

    assert _dice(restored > 0, labels[slices] > 0) > 0.97
    assert restored.shape == (3, 512, 512)


def test_crop_keeps_whole_liver(case_17):
    """The crop around the body must not cut the liver at the bundled FOV (192 px of 2 mm)."""
    stack_hu, labels, frame = case_17
    prep = Preprocessing(40, 400, 2.0, (192, 192), 2, 3.0)
    preprocessor = SlicePreprocessor(prep, stack_hu.shape, frame.spacing_mm,
                                     body_center_rc(stack_hu))
    liver_slices = np.flatnonzero((labels > 0).any(axis=(1, 2)))

    small = preprocessor.labels(labels, liver_slices)
    area_ratio = (small > 0).sum().item() * 4.0 / (
        (labels[liver_slices] > 0).sum() * frame.spacing_mm[1] * frame.spacing_mm[2])

    assert area_ratio == pytest.approx(1.0, abs=0.03)


def test_images_are_windowed(case_17):
    stack_hu, _, frame = case_17
    prep = Preprocessing(40, 400, 3.0, (128, 128), 1, 3.0)
    preprocessor = SlicePreprocessor(prep, stack_hu.shape, frame.spacing_mm,
                                     body_center_rc(stack_hu))

    images = preprocessor.images(stack_hu, [50, 51])

    assert images.shape == (2, 3, 128, 128)
    assert images.dtype == torch.float32
    assert images.min() >= 0.0
    assert images.max() <= 1.0
    assert images.mean() > 0.05


def test_overlapping_batches_reuse_slices():
    rng = np.random.default_rng(3)
    stack = rng.normal(0, 300, (20, 48, 40)).astype(np.float32)
    prep = Preprocessing(40, 400, 1.5, (32, 32), 2, 2.0)
    reused = SlicePreprocessor(prep, stack.shape, (1.0, 1.0, 1.0), (24, 20))

    batches = [reused.images(stack, range(start, start + 4)) for start in range(0, 20, 4)]

    for start, batch in zip(range(0, 20, 4), batches):
        fresh = SlicePreprocessor(prep, stack.shape, (1.0, 1.0, 1.0), (24, 20))
        torch.testing.assert_close(batch, fresh.images(stack, range(start, start + 4)),
                                   rtol=0, atol=0)


def test_second_stack_gets_its_own_slices():
    stack = np.full((6, 32, 32), -1000.0, dtype=np.float32)
    other = np.full((6, 32, 32), 100.0, dtype=np.float32)
    prep = Preprocessing(40, 400, 1.0, (32, 32), 1, 1.0)
    preprocessor = SlicePreprocessor(prep, stack.shape, (1.0, 1.0, 1.0), (16, 16))

    first = preprocessor.images(stack, [2, 3])
    second = preprocessor.images(other, [2, 3])

    assert float(first.max()) == 0.0
    assert float(second.min()) > 0.5
