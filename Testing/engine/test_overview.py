"""Tests of the overview PNG: size, slice choice, edge cases and the real small CT."""

from __future__ import annotations

import struct
import time
from pathlib import Path

import matplotlib
import numpy as np
import pytest
import SimpleITK as sitk
from scipy import ndimage

from livertumorai.constants import LABEL_LIVER, LABEL_TUMOR
from livertumorai.geometry import ImageGeometry, axial_frame
from livertumorai.overview import OVERVIEW_SIZE_PX, choose_axial_slices, write_overview_png

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _png_size(path: Path) -> tuple[int, int]:
    """Return (width, height) from a PNG's IHDR chunk."""
    data = path.read_bytes()[:24]
    assert data[:8] == PNG_SIGNATURE, f"{path} is not a PNG file"
    width, height = struct.unpack(">II", data[16:24])
    return width, height


def _synthetic_case(num_slices: int = 12, size: int = 64):
    """CT of water (0 HU) in air with a liver block (60 HU) and one tumor (10 HU)."""
    ct = np.full((num_slices, size, size), -1000, dtype=np.int16)
    ct[:, 8:56, 8:56] = 0
    labels = np.zeros(ct.shape, dtype=np.uint8)
    labels[2:10, 16:40, 10:34] = LABEL_LIVER
    labels[5:8, 20:28, 14:22] = LABEL_TUMOR
    ct[labels == LABEL_LIVER] = 60
    ct[labels == LABEL_TUMOR] = 10
    probabilities = np.zeros((num_slices, 3))
    probabilities[:, 0] = 1.0
    return ct, labels, probabilities


def test_overview_png_size(tmp_path):
    ct, labels, probabilities = _synthetic_case()
    path = write_overview_png(
        tmp_path / "overview.png", ct, labels, (2.5, 0.8, 0.8), probabilities, [6, 5], "synthetic"
    )
    assert path == tmp_path / "overview.png"
    assert _png_size(path) == OVERVIEW_SIZE_PX
    assert sorted(p.name for p in tmp_path.iterdir()) == ["overview.png"]


def test_overview_one_slice(tmp_path):
    ct, labels, probabilities = _synthetic_case(num_slices=1)
    labels[0, 16:40, 10:34] = LABEL_LIVER
    path = write_overview_png(tmp_path / "o.png", ct, labels, (5.0, 0.8, 0.8), probabilities, [], "one")
    assert _png_size(path) == OVERVIEW_SIZE_PX


def test_overview_without_liver(tmp_path):
    ct, labels, probabilities = _synthetic_case()
    labels[:] = 0
    path = write_overview_png(tmp_path / "o.png", ct, labels, (2.5, 0.8, 0.8), probabilities, [], "empty")
    assert _png_size(path) == OVERVIEW_SIZE_PX


def test_overview_one_slice_without_liver(tmp_path):
    ct, labels, probabilities = _synthetic_case(num_slices=1)
    labels[:] = 0
    path = write_overview_png(tmp_path / "o.png", ct, labels, (5.0, 0.8, 0.8), probabilities, [], "empty")
    assert _png_size(path) == OVERVIEW_SIZE_PX


def test_overview_keeps_backend(tmp_path):
    backend_before = matplotlib.get_backend()
    ct, labels, probabilities = _synthetic_case()
    write_overview_png(tmp_path / "o.png", ct, labels, (2.5, 0.8, 0.8), probabilities, [6], "t")
    assert matplotlib.get_backend() == backend_before


def test_choose_slices_lesions():
    labels = np.zeros((10, 4, 4), dtype=np.uint8)
    slices, reason = choose_axial_slices(labels, [7, 3, 7, 2, 9])
    assert slices == [7, 3, 2]
    assert reason == "lesion"


def test_choose_slices_largest_liver():
    labels = np.zeros((10, 4, 4), dtype=np.uint8)
    labels[2, :2, :2] = LABEL_LIVER  # 4 voxels
    labels[6, :3, :3] = LABEL_LIVER  # 9 voxels
    labels[8, :2, :3] = LABEL_TUMOR  # 6 voxels
    assert choose_axial_slices(labels, []) == ([6], "liver")


def test_choose_slices_no_liver():
    labels = np.zeros((9, 4, 4), dtype=np.uint8)
    assert choose_axial_slices(labels, []) == ([4], "no liver")


def test_choose_slices_rejects_out_of_range():
    labels = np.zeros((5, 4, 4), dtype=np.uint8)
    with pytest.raises(ValueError, match="Lesion slice 5"):
        choose_axial_slices(labels, [5])


@pytest.mark.parametrize(
    "change, message",
    [
        ("labels_shape", "label stack"),
        ("probabilities_shape", "probabilities"),
        ("spacing", "spacing"),
    ],
)
def test_overview_rejects_bad_inputs(tmp_path, change, message):
    ct, labels, probabilities = _synthetic_case()
    spacing_mm = (2.5, 0.8, 0.8)
    if change == "labels_shape":
        labels = labels[:, :-1]
    elif change == "probabilities_shape":
        probabilities = probabilities[:-1]
    else:
        spacing_mm = (2.5, 0.0, 0.8)
    with pytest.raises(ValueError, match=message):
        write_overview_png(tmp_path / "o.png", ct, labels, spacing_mm, probabilities, [], "bad")
    assert list(tmp_path.iterdir()) == []


def test_overview_full_size_speed(tmp_path):
    ct = np.random.default_rng(0).integers(-200, 300, size=(150, 512, 512), dtype=np.int16)
    labels = np.zeros(ct.shape, dtype=np.uint8)
    labels[30:120, 100:400, 50:300] = LABEL_LIVER
    labels[60:80, 200:250, 100:150] = LABEL_TUMOR
    probabilities = np.full((150, 3), 1 / 3)

    start = time.perf_counter()
    write_overview_png(tmp_path / "o.png", ct, labels, (1.5, 0.7, 0.7), probabilities, [70], "big")
    elapsed_s = time.perf_counter() - start

    # Measured at about 0.3 s on the 2-core development machine. The bound leaves room
    # for a loaded CI machine.
    assert elapsed_s < 5.0
    assert _png_size(tmp_path / "o.png") == OVERVIEW_SIZE_PX


def test_overview_real_ct(tmp_path, shared_data_dir):
    fixtures = shared_data_dir / "fixtures"
    ct_image = sitk.ReadImage(str(fixtures / "ircadb1.17_small_feet_first.nrrd"))
    label_image = sitk.ReadImage(str(fixtures / "ircadb1.17_small_feet_first_label.nrrd"))
    frame = axial_frame(ImageGeometry.from_image(ct_image))
    ct_axial = frame.to_axial(sitk.GetArrayViewFromImage(ct_image))
    labels_axial = frame.to_axial(sitk.GetArrayViewFromImage(label_image))

    components, count = ndimage.label(labels_axial == LABEL_TUMOR)
    assert count >= 2
    sizes = ndimage.sum_labels(np.ones(components.shape), components, range(1, count + 1))
    lesion_slices = []
    for component in np.argsort(sizes)[::-1] + 1:
        voxels_per_slice = np.count_nonzero(components == component, axis=(1, 2))
        lesion_slices.append(int(np.argmax(voxels_per_slice)))
    probabilities = np.full((ct_axial.shape[0], 3), 1 / 3)

    path = write_overview_png(
        tmp_path / "overview.png",
        ct_axial,
        labels_axial,
        frame.spacing_mm,
        probabilities,
        lesion_slices,
        "ircadb1.17 (small, feet first)",
    )
    assert _png_size(path) == OVERVIEW_SIZE_PX
