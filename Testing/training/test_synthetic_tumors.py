"""Tests of training/synthetic_tumors.py on real CT: the small ircadb1.17 fixture (2.97 x 2.97 x
3.2 mm, two real tumors) and a block of ircadb1.7 resampled to 0.7 x 0.7 x 3.2 mm."""

from __future__ import annotations

import json
import logging

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from scipy import ndimage

from livertumorai.constants import LABEL_LIVER, LABEL_TUMOR
from livertumorai.geometry import ImageGeometry, axial_frame
from livertumorai.preprocess import SlicePreprocessor
from livertumorai.weights import Preprocessing
from training.synthetic_tumors import (
    CaseGeometry,
    SyntheticTumorConfig,
    SyntheticTumorTransform,
    case_geometries,
    insert_tumors,
)

SEGMENTATION_PREPROCESSING = Preprocessing(40.0, 400.0, 2.0, (192, 192), 2, 3.0)
ANISOTROPIC_SPACING_XYZ = (0.7, 0.7, 3.2)
# Spheres with a fixed 1 mm edge: their extents can be predicted from the diameter.
SPHERES = SyntheticTumorConfig(count_range=(1, 1), diameter_range_mm=(12.0, 24.0),
                               axis_ratio_range=(1.0, 1.0), distortion_range=(0.0, 0.0),
                               edge_softness_range_mm=(1.0, 1.0))


@pytest.fixture(scope="module")
def fixture_volume(shared_data_dir):
    """(ct int16, labels uint8, spacing (z, y, x) mm) of the small ircadb1.17 fixture."""
    folder = shared_data_dir / "fixtures"
    image = sitk.ReadImage(str(folder / "ircadb1.17_small_axial_lps.nii.gz"))
    labels = sitk.ReadImage(str(folder / "ircadb1.17_small_axial_lps_label.nii.gz"))
    spacing_zyx = tuple(reversed(image.GetSpacing()))
    return sitk.GetArrayFromImage(image), sitk.GetArrayFromImage(labels), spacing_zyx


@pytest.fixture(scope="module")
def anisotropic_volume(shared_data_dir):
    """A 98 x 98 x 96 mm block of ircadb1.7 about its liver centroid, 0.7 x 0.7 x 3.2 mm."""
    folder = shared_data_dir / "train" / "ircadb1.7"
    image = sitk.ReadImage(str(folder / "ct.nii.gz"), sitk.sitkFloat32)
    labels = sitk.ReadImage(str(folder / "label.nii.gz"))
    statistics = sitk.LabelShapeStatisticsImageFilter()
    statistics.Execute(labels > 0)
    size_xyz = (140, 140, 30)
    direction = np.array(image.GetDirection()).reshape(3, 3)
    half_extent = direction @ (np.array(size_xyz) * np.array(ANISOTROPIC_SPACING_XYZ) / 2.0)
    reference = sitk.Image(size_xyz, sitk.sitkFloat32)
    reference.SetSpacing(ANISOTROPIC_SPACING_XYZ)
    reference.SetOrigin(tuple(np.array(statistics.GetCentroid(1)) - half_extent))
    reference.SetDirection(image.GetDirection())
    ct = sitk.Resample(image, reference, sitk.Transform(), sitk.sitkLinear, -1000.0)
    label = sitk.Resample(labels, reference, sitk.Transform(), sitk.sitkNearestNeighbor, 0)
    return (sitk.GetArrayFromImage(ct), sitk.GetArrayFromImage(label),
            tuple(reversed(ANISOTROPIC_SPACING_XYZ)))


@pytest.fixture(scope="module")
def fixture_samples(fixture_volume, shared_data_dir):
    """Segmentation samples of the fixture as the dataset builds them: (5, 192, 192) images."""
    image = sitk.ReadImage(str(shared_data_dir / "fixtures" / "ircadb1.17_small_axial_lps.nii.gz"),
                           sitk.sitkFloat32)
    frame = axial_frame(ImageGeometry.from_image(image))
    stack = frame.to_axial(sitk.GetArrayFromImage(image))
    labels = frame.to_axial(fixture_volume[1])
    centre_rc = ((stack.shape[1] - 1) / 2.0, (stack.shape[2] - 1) / 2.0)
    context = SlicePreprocessor(SEGMENTATION_PREPROCESSING, stack.shape, frame.spacing_mm,
                                centre_rc)
    single = SlicePreprocessor(
        Preprocessing(40.0, 400.0, 2.0, (192, 192), 0, 3.0), stack.shape, frame.spacing_mm,
        centre_rc)
    geometry = CaseGeometry(
        pixel_spacing_mm=(2.0, 2.0),
        slice_spacing_mm=float(frame.spacing_mm[0]),
        context_offsets=tuple(int(v) for v in context.context_offsets),
        window_center_hu=40.0,
        window_width_hu=400.0,
        num_slices=stack.shape[0],
    )
    liver_slices = np.flatnonzero((labels == LABEL_LIVER).any(axis=(1, 2)))
    chosen = [int(i) for i in liver_slices[5:-5:4]]
    images = context.images(stack, chosen)
    masks = single.labels(labels, chosen)
    return geometry, [(images[k], masks[k], index) for k, index in enumerate(chosen)]


def added_tumor(labels_in, labels_out):
    return (labels_out == LABEL_TUMOR) & (labels_in == LABEL_LIVER)


def changed_voxels(ct_in, ct_out):
    return ct_out != np.asarray(ct_in, dtype=np.float32)


def extents_mm(mask, spacing_mm):
    """Distance between the outermost voxel centres of `mask` along each axis, mm."""
    return np.array([np.ptp(axis) * s for axis, s in zip(np.nonzero(mask), spacing_mm)])


# --------------------------------------------------------------------------- volumes


def test_lesions_inside_liver(fixture_volume):
    ct, labels, spacing = fixture_volume
    config = SyntheticTumorConfig(count_range=(4, 4))
    ct_out, labels_out, lesions = insert_tumors(ct, labels, spacing, 0, config)

    assert len(lesions) == 4
    added = added_tumor(labels, labels_out)
    assert added.any()
    assert np.all(labels[changed_voxels(ct, ct_out)] == LABEL_LIVER)
    assert np.array_equal(labels_out[labels != LABEL_LIVER], labels[labels != LABEL_LIVER])
    assert set(np.unique(labels_out[labels == LABEL_LIVER])) <= {LABEL_LIVER, LABEL_TUMOR}


def test_labels_match_changed_ct(fixture_volume):
    ct, labels, spacing = fixture_volume
    config = SyntheticTumorConfig(count_range=(4, 4))
    for seed in range(4):
        ct_out, labels_out, lesions = insert_tumors(ct, labels, spacing, seed, config)
        difference_hu = np.abs(ct_out - ct.astype(np.float32))
        expected = (difference_hu > config.label_threshold_hu) & (labels == LABEL_LIVER)
        assert np.array_equal(added_tumor(labels, labels_out), expected)
        assert sum(lesion.labelled_voxels for lesion in lesions) == int(expected.sum())
        assert sum(lesion.changed_voxels for lesion in lesions) == int((difference_hu > 0).sum())


def test_ct_unchanged_outside_lesions(fixture_volume):
    ct, labels, spacing = fixture_volume
    config = SyntheticTumorConfig(count_range=(4, 4))
    max_margin_mm = config.edge_softness_range_mm[1] + max(spacing)
    for seed in range(4):
        ct_out, labels_out, lesions = insert_tumors(ct, labels, spacing, seed, config)
        changed = changed_voxels(ct, ct_out)

        # Every changed voxel lies within its lesion's bounding sphere.
        positions_mm = np.argwhere(changed) * np.asarray(spacing)
        within = np.zeros(len(positions_mm), dtype=bool)
        for lesion in lesions:
            distance_mm = np.linalg.norm(positions_mm - np.asarray(lesion.center_mm), axis=1)
            within |= distance_mm < lesion.diameter_mm / 2.0
        assert within.all()

        # Unlabelled changes form the soft edge: within the edge width (plus a voxel) of
        # the labelled lesion.
        distance_to_label_mm = ndimage.distance_transform_edt(
            ~added_tumor(labels, labels_out), sampling=spacing)
        edge = changed & ~added_tumor(labels, labels_out)
        assert np.all(distance_to_label_mm[edge] <= max_margin_mm)

        # Bit-for-bit equal everywhere else.
        unchanged = ~changed
        assert np.array_equal(ct_out[unchanged].view(np.uint32),
                              ct.astype(np.float32)[unchanged].view(np.uint32))


def test_same_seed_same_result(fixture_volume):
    ct, labels, spacing = fixture_volume
    first = insert_tumors(ct, labels, spacing, np.random.default_rng(7))
    second = insert_tumors(ct, labels, spacing, np.random.default_rng(7))
    other = insert_tumors(ct, labels, spacing, np.random.default_rng(8))

    assert np.array_equal(first[0], second[0])
    assert np.array_equal(first[1], second[1])
    assert first[2] == second[2]
    assert not np.array_equal(first[0], other[0])
    assert not np.array_equal(first[1], other[1])


def test_inputs_not_modified(fixture_volume):
    ct, labels, spacing = fixture_volume
    ct_copy, labels_copy = ct.copy(), labels.copy()
    insert_tumors(ct, labels, spacing, 0, SyntheticTumorConfig(count_range=(3, 3)))
    assert np.array_equal(ct, ct_copy)
    assert np.array_equal(labels, labels_copy)


def test_sphere_size_anisotropic_spacing(anisotropic_volume):
    ct, labels, spacing = anisotropic_volume
    measured = 0
    for seed in range(20):
        ct_out, labels_out, lesions = insert_tumors(ct, labels, spacing, seed, SPHERES)
        assert len(lesions) == 1
        lesion = lesions[0]
        assert 12.0 <= lesion.diameter_mm <= 24.0
        changed = changed_voxels(ct, ct_out)
        labelled = added_tumor(labels, labels_out)
        assert np.all(extents_mm(changed, spacing) <= lesion.diameter_mm)
        assert np.all(extents_mm(labelled, spacing) <= lesion.diameter_mm)
        if lesion.clipped_voxels > 0.05 * lesion.changed_voxels:
            continue  # cut by the liver edge or vessels

        # A sphere (almost) not clipped: the label reaches within the 1 mm edge plus one
        # voxel of the diameter along every axis, so the lesion is round in mm, not in voxels.
        measured += 1
        extent = extents_mm(labelled, spacing)
        lower_mm = lesion.diameter_mm - 2.0 * 1.0 - 2.0 * np.asarray(spacing)
        assert np.all(extent >= lower_mm), (extent, lower_mm)
        assert abs(extent[0] - extent[1]) <= 2.0 * spacing[0]
        assert abs(extent[0] - extent[2]) <= 2.0 * spacing[0]
    assert measured >= 10


def test_default_size_range_anisotropic_spacing(anisotropic_volume):
    ct, labels, spacing = anisotropic_volume
    config = SyntheticTumorConfig(count_range=(1, 1))
    for seed in range(8):
        ct_out, labels_out, lesions = insert_tumors(ct, labels, spacing, seed, config)
        for lesion in lesions:
            assert 5.0 <= lesion.diameter_mm <= 60.0
            extent = extents_mm(changed_voxels(ct, ct_out), spacing)
            assert np.all(extent <= lesion.diameter_mm), (extent, lesion.diameter_mm)


def test_diameters_log_uniform():
    # Draw only shapes: a liver block of plain 100 HU has no vessels to avoid.
    ct = np.full((40, 80, 80), 100.0, dtype=np.float32)
    labels = np.ones(ct.shape, dtype=np.uint8)
    config = SyntheticTumorConfig(count_range=(1, 1), max_outside_fraction=1.0)
    diameters = [insert_tumors(ct, labels, (2.0, 2.0, 2.0), seed, config)[2][0].diameter_mm
                 for seed in range(200)]
    # Log-uniform on [5, 60]: P(d < 15) = ln 3 / ln 12 = 0.44.
    assert 0.34 <= np.mean(np.array(diameters) < 15.0) <= 0.54
    assert min(diameters) >= 5.0
    assert max(diameters) <= 60.0


def test_volume_without_liver_unchanged(fixture_volume, caplog):
    ct, labels, spacing = fixture_volume
    no_liver = np.where(labels == LABEL_LIVER, 0, labels).astype(labels.dtype)
    with caplog.at_level(logging.INFO, logger="training.synthetic_tumors"):
        ct_out, labels_out, lesions = insert_tumors(ct, no_liver, spacing, 0)
    assert lesions == []
    assert np.array_equal(ct_out, ct.astype(np.float32))
    assert np.array_equal(labels_out, no_liver)
    messages = [r.getMessage() for r in caplog.records if r.levelno == logging.INFO]
    assert any("No liver voxel" in message for message in messages)


def test_mismatched_shapes_rejected(fixture_volume):
    ct, labels, spacing = fixture_volume
    with pytest.raises(ValueError, match="same 3-D"):
        insert_tumors(ct, labels[:-1], spacing, 0)
    with pytest.raises(ValueError, match="spacing_mm"):
        insert_tumors(ct, labels, (3.2, 0.0, 2.97), 0)


# --------------------------------------------------------------------------- configuration


def test_config_json_round_trip():
    config = SyntheticTumorConfig(count_range=(2, 5), bright_probability=0.2)
    data = json.loads(json.dumps(config.to_dict()))
    assert data["count_range"] == [2, 5]
    assert SyntheticTumorConfig.from_dict(data) == config


@pytest.mark.parametrize("changes, message", [
    ({"diameter_range_mm": (30.0, 10.0)}, "min <= max"),
    ({"dark_contrast_range_hu": (-40.0, 10.0)}, "negative"),
    ({"dark_contrast_range_hu": (-10.0, -8.0)}, "label_threshold_hu"),
    ({"distortion_range": (0.0, 1.0)}, r"\[0, 1\)"),
])
def test_config_invalid_values_rejected(changes, message):
    with pytest.raises(ValueError, match=message):
        SyntheticTumorConfig(**changes)


def test_config_unknown_key_rejected():
    with pytest.raises(ValueError, match="unknown"):
        SyntheticTumorConfig.from_dict({"diameter_mm": [5, 10]})


def test_case_geometry_from_cache_meta():
    meta = {"case_id": "a", "num_slices": 119, "stack_spacing_mm": [1.6, 0.74, 0.74],
            "context_offsets": [-4, -2, 0, 2, 4],
            "preprocessing": SEGMENTATION_PREPROCESSING.to_dict()}

    class Cached:
        case_id = "a"

    Cached.meta = meta
    geometry = case_geometries([Cached()])["a"]
    assert geometry.pixel_spacing_mm == (2.0, 2.0)
    assert geometry.context_offsets == (-4, -2, 0, 2, 4)
    # Slice 117 of 119: offsets +2 and +4 both clamp to slice 118.
    assert np.allclose(geometry.channel_z_mm(117), [-6.4, -3.2, 0.0, 1.6, 1.6])
    with pytest.raises(ValueError, match="missing"):
        CaseGeometry.from_cache_meta({"num_slices": 3})


# --------------------------------------------------------------------------- transform


def test_transform_sample_contract(fixture_samples):
    geometry, samples = fixture_samples
    transform = SyntheticTumorTransform(SyntheticTumorConfig(count_range=(2, 3)), geometry)
    torch.manual_seed(0)
    with_tumor = 0
    for image, mask, slice_index in samples:
        assert image.shape == (5, 192, 192)
        out_image, out_mask = transform(image, mask, "ircadb1.17", slice_index)

        assert out_image.shape == image.shape
        assert out_image.dtype == torch.float32
        assert out_mask.shape == mask.shape
        assert out_mask.dtype == torch.int64
        assert float(out_image.min()) >= 0.0
        assert float(out_image.max()) <= 1.0

        # Only label-1 pixels of the centre slice may change, in every channel.
        liver = (mask == LABEL_LIVER).numpy()
        changed = (out_image != image).numpy()
        assert not changed[:, ~liver].any()
        centre_changed = np.abs((out_image[2] - image[2]).numpy()) > np.float32(5.0 / 400.0)
        assert np.array_equal((out_mask == LABEL_TUMOR).numpy() & liver, centre_changed)
        assert torch.equal(out_mask[~torch.from_numpy(liver)], mask[~torch.from_numpy(liver)])
        with_tumor += bool(centre_changed.any())
    assert with_tumor >= len(samples) // 2


def test_transform_context_channels_show_lesion(fixture_samples):
    geometry, samples = fixture_samples
    image, mask, slice_index = max(samples, key=lambda s: int((s[1] == LABEL_LIVER).sum()))
    rng = np.random.default_rng(0)

    # Lesions of 5 to 6 mm, centred within 0.7 of their radius (at most 2.1 mm) of the
    # labelled slice, cannot reach the channels 2 slices (6.4 mm) away.
    small = SyntheticTumorConfig(count_range=(3, 3), diameter_range_mm=(5.0, 6.0))
    out_image, _ = SyntheticTumorTransform(small, geometry).apply(
        image, mask, "ircadb1.17", slice_index, rng)
    assert (out_image[2] != image[2]).any()
    assert torch.equal(out_image[0], image[0])
    assert torch.equal(out_image[4], image[4])

    # Lesions of 40 to 50 mm reach the neighbouring channels 3.2 mm away.
    large = SyntheticTumorConfig(count_range=(1, 1), diameter_range_mm=(40.0, 50.0))
    out_image, _ = SyntheticTumorTransform(large, geometry).apply(
        image, mask, "ircadb1.17", slice_index, rng)
    for channel in (1, 2, 3):
        assert (out_image[channel] != image[channel]).any()


def test_transform_clamped_channels_identical(fixture_samples):
    geometry, samples = fixture_samples
    image, mask, _ = max(samples, key=lambda s: int((s[1] == LABEL_LIVER).sum()))
    # Make the labelled slice the last one: channels 3 and 4 clamp onto it, as the cache
    # gathers them, so they must show the same cross-section.
    image = image.clone()
    image[3] = image[2]
    image[4] = image[2]
    last = CaseGeometry(geometry.pixel_spacing_mm, geometry.slice_spacing_mm,
                        geometry.context_offsets, 40.0, 400.0, num_slices=30)
    config = SyntheticTumorConfig(count_range=(2, 2), diameter_range_mm=(20.0, 40.0))
    out_image, _ = SyntheticTumorTransform(config, last).apply(
        image, mask, "ircadb1.17", 29, np.random.default_rng(3))
    assert (out_image[2] != image[2]).any()
    assert torch.equal(out_image[3], out_image[2])
    assert torch.equal(out_image[4], out_image[2])


def test_transform_seeded_by_torch(fixture_samples):
    geometry, samples = fixture_samples
    image, mask, slice_index = samples[len(samples) // 2]
    transform = SyntheticTumorTransform(None, {"ircadb1.17": geometry})
    results = []
    for seed in (5, 5, 6):
        torch.manual_seed(seed)
        results.append(transform(image, mask, "ircadb1.17", slice_index))
    assert torch.equal(results[0][0], results[1][0])
    assert torch.equal(results[0][1], results[1][1])
    assert not torch.equal(results[0][0], results[2][0])


def test_transform_slice_without_liver(fixture_samples, caplog):
    geometry, samples = fixture_samples
    image, mask, slice_index = samples[0]
    empty = torch.zeros_like(mask)
    transform = SyntheticTumorTransform(None, geometry)
    with caplog.at_level(logging.DEBUG, logger="training.synthetic_tumors"):
        out_image, out_mask = transform(image, empty, "ircadb1.17", slice_index)
    assert out_image is image
    assert out_mask is empty
    assert any("no liver pixel" in r.getMessage() for r in caplog.records)


def test_transform_rejects_wrong_inputs(fixture_samples):
    geometry, samples = fixture_samples
    image, mask, slice_index = samples[0]
    transform = SyntheticTumorTransform(None, {"ircadb1.17": geometry})
    with pytest.raises(ValueError, match="channels"):
        transform(image[:3], mask, "ircadb1.17", slice_index)
    with pytest.raises(KeyError, match="no geometry"):
        transform(image, mask, "unknown-case", slice_index)
