"""Tests of livertumorai.postprocess on phantoms whose cleaned result is known voxel by voxel."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import SimpleITK as sitk

from livertumorai.constants import LABEL_BACKGROUND, LABEL_LIVER, LABEL_TUMOR
from livertumorai.geometry import ImageGeometry, axial_frame
from livertumorai.postprocess import (
    PostprocessOptions,
    bounding_box,
    label_components_by_size,
    postprocess_labels,
)

ISOTROPIC_1MM = (1.0, 1.0, 1.0)


def _box_liver(shape=(20, 40, 40), box=(slice(5, 15), slice(10, 30), slice(10, 30))):
    """Return a label map with a liver box and nothing else."""
    labels = np.zeros(shape, dtype=np.uint8)
    labels[box] = LABEL_LIVER
    return labels


def test_clean_liver_with_sphere_unchanged():
    labels = _box_liver(shape=(30, 40, 40), box=(slice(2, 28), slice(5, 35), slice(5, 35)))
    z, y, x = np.ogrid[:30, :40, :40]
    labels[(z - 15) ** 2 + (y - 20) ** 2 + (x - 20) ** 2 <= 36] = LABEL_TUMOR
    before = labels.copy()

    result = postprocess_labels(labels, ISOTROPIC_1MM)

    assert result.dtype == np.uint8
    assert result is not labels
    np.testing.assert_array_equal(result, before)
    np.testing.assert_array_equal(labels, before)  # input untouched


def test_empty_input_returns_zeros():
    labels = np.zeros((6, 7, 8), dtype=np.uint8)

    result = postprocess_labels(labels, (2.5, 0.7, 0.7))

    assert result.shape == (6, 7, 8)
    assert result.dtype == np.uint8
    assert not result.any()


def test_tumor_free_liver_stays_tumor_free():
    labels = _box_liver()
    labels[0:2, 0:2, 0:2] = LABEL_LIVER  # a stray component, removed

    result = postprocess_labels(labels, ISOTROPIC_1MM)

    assert not np.any(result == LABEL_TUMOR)
    assert np.count_nonzero(result == LABEL_LIVER) == 10 * 20 * 20


def test_small_lesion_becomes_liver():
    # Voxels of 2 x 1 x 1 mm = 2 mm3, with a minimum lesion volume of 20 mm3.
    spacing_mm = (2.0, 1.0, 1.0)
    options = PostprocessOptions(min_lesion_volume_mm3=20.0)
    labels = _box_liver()
    labels[6:8, 12:14, 12:14] = LABEL_TUMOR  # 8 voxels = 16 mm3
    labels[6:8, 20:22, 20:23] = LABEL_TUMOR  # 12 voxels = 24 mm3
    labels[11:12, 12:14, 20:25] = LABEL_TUMOR  # 10 voxels = 20 mm3, exactly the minimum

    result = postprocess_labels(labels, spacing_mm, options)

    assert np.all(result[6:8, 12:14, 12:14] == LABEL_LIVER)
    assert np.all(result[6:8, 20:22, 20:23] == LABEL_TUMOR)
    assert np.all(result[11:12, 12:14, 20:25] == LABEL_TUMOR)
    assert np.count_nonzero(result == LABEL_TUMOR) == 22


def test_small_speck_outside_liver_becomes_background():
    # Tumor just outside the liver survives the tolerance rule. When it is small, it must
    # not turn into a liver island. A small lesion inside the liver becomes liver.
    options = PostprocessOptions(min_lesion_volume_mm3=20.0)
    labels = _box_liver()
    labels[8:10, 10:12, 31:33] = LABEL_TUMOR  # 8 voxels, 2 mm beyond the liver's x edge
    labels[8:10, 14:16, 14:16] = LABEL_TUMOR  # 8 voxels inside the liver
    labels[8:11, 20:24, 24:26] = LABEL_TUMOR  # 24 voxels inside the liver, kept

    result = postprocess_labels(labels, ISOTROPIC_1MM, options)

    assert not result[8:10, 10:12, 31:33].any()
    assert np.all(result[8:10, 14:16, 14:16] == LABEL_LIVER)
    assert np.all(result[8:11, 20:24, 24:26] == LABEL_TUMOR)
    assert np.count_nonzero(result == LABEL_TUMOR) == 24


def _reference_fill(mask: np.ndarray, slice_axis_zyx: int) -> np.ndarray:
    """Fill 3-D holes, then the 2-D holes of each slice, with scipy.ndimage."""
    from scipy import ndimage

    filled = ndimage.binary_fill_holes(mask)
    slices_first = np.moveaxis(filled, slice_axis_zyx, 0)
    for index in range(slices_first.shape[0]):
        slices_first[index] = ndimage.binary_fill_holes(slices_first[index])
    return filled


@pytest.mark.parametrize("slice_axis_zyx", [0, 1, 2])
def test_hole_filling_matches_scipy(slice_axis_zyx):
    # Random blobs with cavities, tunnels and holes that touch the box's faces.
    from scipy import ndimage

    rng = np.random.default_rng(slice_axis_zyx)
    noise = ndimage.gaussian_filter(rng.random((24, 30, 36)), sigma=1.5)
    liver = noise > np.quantile(noise, 0.35)
    labels = liver.astype(np.uint8) * LABEL_LIVER
    options = PostprocessOptions(min_lesion_volume_mm3=0.0, keep_largest_liver_component=False)

    result = postprocess_labels(labels, ISOTROPIC_1MM, options, slice_axis_zyx=slice_axis_zyx)

    expected = _reference_fill(liver, slice_axis_zyx)
    assert np.count_nonzero(expected) > np.count_nonzero(liver)  # some holes were filled
    np.testing.assert_array_equal(result > 0, expected)


def test_default_minimum_is_5mm_sphere():
    labels = _box_liver()
    labels[6:10, 12:16, 12:16] = LABEL_TUMOR  # 64 voxels = 64 mm3
    labels[6:11, 20:24, 20:24] = LABEL_TUMOR  # 80 voxels = 80 mm3

    result = postprocess_labels(labels, ISOTROPIC_1MM)

    assert np.all(result[6:10, 12:16, 12:16] == LABEL_LIVER)
    assert np.all(result[6:11, 20:24, 20:24] == LABEL_TUMOR)


def test_small_lesion_kept_with_zero_minimum():
    labels = _box_liver()
    labels[8, 15, 15] = LABEL_TUMOR

    options = PostprocessOptions(min_lesion_volume_mm3=0.0)
    result = postprocess_labels(labels, ISOTROPIC_1MM, options)

    assert result[8, 15, 15] == LABEL_TUMOR


def test_largest_liver_component_kept():
    labels = _box_liver()  # 4000 voxels
    labels[1:3, 1:5, 1:5] = LABEL_LIVER  # 32 voxels, far from the box

    result = postprocess_labels(labels, ISOTROPIC_1MM)

    assert not result[1:3, 1:5, 1:5].any()
    assert np.count_nonzero(result) == 4000


def test_all_components_kept_when_disabled():
    labels = _box_liver()
    labels[1:3, 1:5, 1:5] = LABEL_LIVER
    labels[1:4, 35:38, 35:38] = LABEL_TUMOR  # 27 mm3

    options = PostprocessOptions(keep_largest_liver_component=False, min_lesion_volume_mm3=20.0)
    result = postprocess_labels(labels, ISOTROPIC_1MM, options)

    assert np.all(result[1:3, 1:5, 1:5] == LABEL_LIVER)
    assert np.all(result[1:4, 35:38, 35:38] == LABEL_TUMOR)


def test_corner_contact_is_connected():
    # Two boxes meeting only at one corner form one 26-connected component.
    labels = np.zeros((10, 10, 10), dtype=np.uint8)
    labels[0:3, 0:3, 0:3] = LABEL_LIVER
    labels[3:5, 3:5, 3:5] = LABEL_LIVER

    result = postprocess_labels(labels, ISOTROPIC_1MM)

    np.testing.assert_array_equal(result, labels)


def test_far_tumor_dropped():
    labels = _box_liver()
    labels[8:12, 14:18, 36:40] = LABEL_TUMOR  # 7 mm of background from the liver

    result = postprocess_labels(labels, ISOTROPIC_1MM)

    assert not result[8:12, 14:18, 36:40].any()
    assert np.count_nonzero(result == LABEL_LIVER) == 4000


def test_tumor_near_liver_trimmed_at_tolerance():
    # Liver x in [10, 30), one background column at x = 30, tumor bar from x = 31 to 38.
    # The distance to the nearest liver voxel centre (x = 29) is 2, 3, ..., 9 mm.
    labels = _box_liver()
    labels[8:12, 14:18, 31:39] = LABEL_TUMOR

    result = postprocess_labels(labels, ISOTROPIC_1MM,
                                PostprocessOptions(min_lesion_volume_mm3=20.0))

    assert np.all(result[8:12, 14:18, 31:35] == LABEL_TUMOR)  # 2 to 5 mm: kept
    assert not result[8:12, 14:18, 35:39].any()  # 6 to 9 mm: dropped
    assert not result[8:12, 14:18, 30].any()  # the gap stays background


def test_tolerance_zero_drops_all_outside_tumor():
    labels = _box_liver()
    labels[8:12, 14:18, 31:35] = LABEL_TUMOR

    options = PostprocessOptions(tumor_outside_liver_tolerance_mm=0.0)
    result = postprocess_labels(labels, ISOTROPIC_1MM, options)

    assert not np.any(result == LABEL_TUMOR)


def test_tolerance_uses_anisotropic_spacing():
    # Slices 3 mm apart, 1 mm pixels. Liver z in [5, 15), x in [10, 30).
    spacing_mm = (3.0, 1.0, 1.0)
    labels = _box_liver()
    # Two slices above the top liver slice (z = 14): 2 voxels, but 6 mm, away.
    labels[16:18, 12:16, 12:16] = LABEL_TUMOR
    # Two columns beside the liver (x = 29): 2 and 3 mm away.
    labels[6:14, 12:16, 31:33] = LABEL_TUMOR

    result = postprocess_labels(labels, spacing_mm)

    assert not result[16:18, 12:16, 12:16].any()
    assert np.all(result[6:14, 12:16, 31:33] == LABEL_TUMOR)


def test_tolerance_diagonal_distance_in_mm():
    # One tumor voxel off a liver corner by (1, 2, 2) voxels at spacing (3, 1, 1) mm:
    # sqrt(3^2 + 2^2 + 2^2) = 4.12 mm, kept with 5 mm and dropped with 4 mm.
    spacing_mm = (3.0, 1.0, 1.0)
    labels = _box_liver()
    labels[15, 31, 31] = LABEL_TUMOR  # nearest liver voxel: (14, 29, 29)
    keep_all = dict(min_lesion_volume_mm3=0.0)

    within_5mm = postprocess_labels(labels, spacing_mm, PostprocessOptions(**keep_all))
    within_4mm = postprocess_labels(
        labels,
        spacing_mm,
        PostprocessOptions(tumor_outside_liver_tolerance_mm=4.0, **keep_all),
    )

    assert within_5mm[15, 31, 31] == LABEL_TUMOR
    assert within_4mm[15, 31, 31] == LABEL_BACKGROUND


def test_enclosed_hole_filled_as_liver():
    labels = _box_liver()
    labels[8:11, 18:22, 18:22] = LABEL_BACKGROUND  # cavity closed on all sides

    filled = postprocess_labels(labels, ISOTROPIC_1MM)
    unfilled = postprocess_labels(labels, ISOTROPIC_1MM, PostprocessOptions(fill_holes=False))

    assert np.all(filled[8:11, 18:22, 18:22] == LABEL_LIVER)
    assert not unfilled[8:11, 18:22, 18:22].any()


def test_channel_across_slices_filled():
    # A vessel crossing every liver slice is open in 3-D but enclosed in each slice.
    labels = _box_liver()
    labels[5:15, 18:21, 18:21] = LABEL_BACKGROUND
    # A channel running along x is open within its slices, so it stays.
    labels[9:11, 24:26, 10:30] = LABEL_BACKGROUND

    result = postprocess_labels(labels, ISOTROPIC_1MM)

    assert np.all(result[5:15, 18:21, 18:21] == LABEL_LIVER)
    assert not result[9:11, 24:26, 10:30].any()


def test_channel_filled_across_given_slice_axis():
    # Coronal storage: array axis 1 runs inferior-superior, so slices lie across axis 1.
    labels = _box_liver()
    labels[8:11, 10:30, 18:21] = LABEL_BACKGROUND  # along axis 1: enclosed in each slice
    labels[5:15, 14:16, 25:27] = LABEL_BACKGROUND  # along axis 0: open in its slices

    result = postprocess_labels(labels, ISOTROPIC_1MM, slice_axis_zyx=1)
    axial_result = postprocess_labels(labels, ISOTROPIC_1MM, slice_axis_zyx=0)

    assert np.all(result[8:11, 10:30, 18:21] == LABEL_LIVER)
    assert not result[5:15, 14:16, 25:27].any()
    assert not axial_result[8:11, 10:30, 18:21].any()
    assert np.all(axial_result[5:15, 14:16, 25:27] == LABEL_LIVER)


def test_hole_inside_tumor_filled_as_tumor():
    labels = _box_liver()
    labels[6:14, 12:20, 12:20] = LABEL_TUMOR
    labels[8:12, 14:18, 14:18] = LABEL_LIVER  # liver core enclosed by tumor
    labels[6:14, 22:28, 22:28] = LABEL_TUMOR
    labels[9:11, 24:26, 24:26] = LABEL_BACKGROUND  # background core enclosed by tumor

    result = postprocess_labels(labels, ISOTROPIC_1MM)

    assert np.all(result[6:14, 12:20, 12:20] == LABEL_TUMOR)
    assert np.all(result[6:14, 22:28, 22:28] == LABEL_TUMOR)


def test_invalid_inputs_rejected():
    labels = _box_liver()
    with pytest.raises(ValueError, match="3-D"):
        postprocess_labels(labels[0], ISOTROPIC_1MM)
    with pytest.raises(ValueError, match="values from 2 to 3"):
        postprocess_labels(labels + 2, ISOTROPIC_1MM)
    with pytest.raises(ValueError, match="spacing_mm_zyx"):
        postprocess_labels(labels, (1.0, 0.0, 1.0))
    with pytest.raises(ValueError, match="dtype"):
        postprocess_labels(labels.astype(np.float32), ISOTROPIC_1MM)
    with pytest.raises(ValueError, match="slice_axis_zyx"):
        postprocess_labels(labels, ISOTROPIC_1MM, slice_axis_zyx=3)


def test_invalid_options_rejected():
    with pytest.raises(ValueError, match="min_lesion_volume_mm3"):
        PostprocessOptions(min_lesion_volume_mm3=-1.0)
    with pytest.raises(ValueError, match="tumor_outside_liver_tolerance_mm"):
        PostprocessOptions(tumor_outside_liver_tolerance_mm=float("nan"))


def test_components_numbered_by_size():
    mask = np.zeros((5, 10, 10), dtype=bool)
    mask[0, 0, 0] = True  # 1 voxel, found first
    mask[2:4, 2:5, 2:5] = True  # 18 voxels
    mask[0, 8:10, 8:10] = True  # 4 voxels

    ids, sizes = label_components_by_size(mask)

    assert ids.dtype == np.int32
    np.testing.assert_array_equal(sizes, [18, 4, 1])
    assert np.all(ids[2:4, 2:5, 2:5] == 1)
    assert np.all(ids[0, 8:10, 8:10] == 2)
    assert ids[0, 0, 0] == 3


def test_bounding_box_of_mask():
    mask = np.zeros((4, 5, 6), dtype=bool)
    assert bounding_box(mask) is None
    mask[1, 2, 3] = True
    mask[2, 4, 0] = True
    assert bounding_box(mask) == (slice(1, 3), slice(2, 5), slice(0, 4))


def test_real_reference_labels_nearly_unchanged(shared_data_dir):
    # The reference mask of a real case is clean: post-processing may fill vessels
    # enclosed in a slice but keeps both tumors and almost all of the liver.
    path = shared_data_dir / "fixtures" / "ircadb1.17_small_coronal_stack_label.mha"
    image = sitk.ReadImage(str(path))
    labels = sitk.GetArrayFromImage(image)
    geometry = ImageGeometry.from_image(image)
    frame = axial_frame(geometry)

    result = postprocess_labels(
        labels,
        geometry.spacing_mm_xyz[::-1],
        slice_axis_zyx=frame.input_slice_axis_zyx,
    )

    whole_before = np.count_nonzero(labels)
    whole_after = np.count_nonzero(result)
    assert whole_before <= whole_after <= whole_before * 1.02
    assert np.count_nonzero(result == LABEL_TUMOR) == np.count_nonzero(labels == LABEL_TUMOR)
    assert np.all(result[labels > 0] > 0)  # nothing of the reference liver is removed
    _, sizes = label_components_by_size(result == LABEL_TUMOR)
    assert sizes.size == 2


_MEMORY_SCRIPT = textwrap.dedent(
    """
    import json, time
    import numpy as np
    from livertumorai.postprocess import postprocess_labels

    # 512 x 512 x 300 at 1 x 0.7 x 0.7 mm (z, y, x): an ellipsoid liver (about 3 L) with
    # two box tumors, an enclosed hole, a stray liver blob and 5000 scattered tumor
    # voxels below the liver. Built slice by slice so that making the phantom needs
    # less memory than post-processing it.
    shape = (300, 512, 512)
    labels = np.zeros(shape, dtype=np.uint8)
    y, x = np.ogrid[:300, :320]
    for z in range(120):
        in_slice = ((z - 60) / 60.0) ** 2 + ((y - 150) / 150.0) ** 2 + ((x - 160) / 160.0) ** 2
        labels[100 + z, 100:400, 80:400][in_slice <= 1] = 1
    ellipsoid_voxels = int(np.count_nonzero(labels))
    labels[150:170, 230:260, 200:240] = 2
    labels[150:160, 200:220, 200:220] = 2
    labels[160:165, 300:310, 300:310] = 0
    labels[10:20, 480:500, 480:500] = 1
    rng = np.random.default_rng(0)
    labels[:100].reshape(-1)[rng.integers(0, 100 * 512 * 512, 5000)] = 2

    def status_kib(field):
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith(field + ":"):
                    return int(line.split()[1])

    # VmHWM is the peak resident size of this process image. Writing 5 to clear_refs
    # resets it to the current size (Linux 4.0 and later). Where that is not allowed,
    # VmHWM keeps the lower peak of building the phantom.
    try:
        with open("/proc/self/clear_refs", "w") as clear_refs:
            clear_refs.write("5")
    except OSError:
        pass
    before_kib = status_kib("VmRSS")
    start = time.perf_counter()
    result = postprocess_labels(labels, (1.0, 0.7, 0.7))
    seconds = time.perf_counter() - start
    peak_kib = status_kib("VmHWM")
    print(json.dumps({
        "extra_mib": (peak_kib - before_kib) / 1024,
        "seconds": seconds,
        "ellipsoid_voxels": ellipsoid_voxels,
        "tumor_voxels": int(np.count_nonzero(result == 2)),
        "liver_voxels": int(np.count_nonzero(result == 1)),
    }))
    """
)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/status")
def test_full_size_volume_memory():
    # A fresh interpreter, so that the peak resident size belongs to this run alone.
    completed = subprocess.run(
        [sys.executable, "-c", _MEMORY_SCRIPT], capture_output=True, text=True, check=True
    )
    report = json.loads(completed.stdout.strip().splitlines()[-1])
    tumor_voxels = 20 * 30 * 40 + 10 * 20 * 20

    assert report["extra_mib"] < 512, report
    assert report["tumor_voxels"] == tumor_voxels, report
    # The hole is filled, and the stray blob and the scattered voxels are removed.
    assert report["liver_voxels"] == report["ellipsoid_voxels"] - tumor_voxels, report
