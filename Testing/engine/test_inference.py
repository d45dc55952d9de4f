"""Device choice, gating and batched inference with progress and cancel."""

from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from livertumorai.errors import ConfigurationError, RunCancelledError
from livertumorai.inference import (
    LiverEnds,
    _BatchOrder,
    classify_slices,
    gate_slices,
    segment_slices,
    select_autocast_dtype,
    select_device,
)
from livertumorai.models import SliceClassifier, UNet2D
from livertumorai.preprocess import SlicePreprocessor
from livertumorai.weights import Preprocessing


def _stack(num_slices=10):
    rng = np.random.default_rng(0)
    stack = np.full((num_slices, 64, 64), -1000.0, dtype=np.float32)
    stack[:, 10:54, 8:56] = rng.normal(40, 20, (num_slices, 44, 48))
    return stack


def _preprocessor(stack, size=32, context=1):
    prep = Preprocessing(40, 400, 2.0, (size, size), context, 2.0)
    return SlicePreprocessor(prep, stack.shape, (2.0, 1.0, 1.0), (32, 32))


def test_select_device_auto_and_cpu():
    assert select_device("cpu").type == "cpu"
    assert select_device("auto").type in ("cpu", "cuda")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error without CUDA")
def test_select_device_gpu_without_cuda():
    with pytest.raises(ConfigurationError, match="CUDA is not available"):
        select_device("gpu")


def test_select_device_unknown():
    with pytest.raises(ConfigurationError, match="unknown device 'tpu7'"):
        select_device("tpu7")


def test_precision_choices():
    cpu = torch.device("cpu")
    assert select_autocast_dtype(cpu, "fp32") is None
    assert select_autocast_dtype(cpu, "bf16") is torch.bfloat16
    with pytest.raises(ConfigurationError, match="fp16 needs a CUDA device"):
        select_autocast_dtype(cpu, "fp16")
    with pytest.raises(ConfigurationError, match="unknown precision"):
        select_autocast_dtype(cpu, "int8")


def test_gate_slices_widens_by_margin():
    probabilities = np.zeros((20, 3), dtype=np.float32)
    probabilities[:, 0] = 1.0
    probabilities[10] = (0.2, 0.3, 0.5)

    gated = gate_slices(probabilities, threshold=0.1, margin_mm=4.0, slice_spacing_mm=2.0)

    np.testing.assert_array_equal(gated, [8, 9, 10, 11, 12])


def test_gate_slices_none_without_liver():
    probabilities = np.tile([1.0, 0.0, 0.0], (5, 1)).astype(np.float32)

    assert gate_slices(probabilities, 0.1, 10.0, 2.0).size == 0


def test_classify_probabilities_sum_to_one():
    stack = _stack()
    model = SliceClassifier(width_divisor=16)

    probabilities = classify_slices(model, stack, _preprocessor(stack), torch.device("cpu"),
                                    batch_size=4)

    assert probabilities.shape == (10, 3)
    np.testing.assert_allclose(probabilities.sum(axis=1), 1.0, atol=1e-5)


def test_bf16_agrees_with_fp32():
    torch.manual_seed(0)
    stack = _stack()
    model = UNet2D(in_channels=3, features=(4, 8, 16)).eval()
    preprocessor = _preprocessor(stack)

    fp32 = segment_slices(model, stack, preprocessor, range(10), torch.device("cpu"), None)
    bf16 = segment_slices(model, stack, preprocessor, range(10), torch.device("cpu"),
                          torch.bfloat16)

    assert np.abs(fp32.foreground.astype(int) - bf16.foreground.astype(int)).mean() < 3


def test_segment_only_requested_slices():
    stack = _stack()
    model = UNet2D(in_channels=3, features=(4, 8, 16))

    maps = segment_slices(model, stack, _preprocessor(stack), [2, 3], torch.device("cpu"))

    assert maps.foreground.shape == stack.shape
    assert not maps.foreground[[0, 1, 4, 5, 6, 7, 8, 9]].any()
    np.testing.assert_array_equal(maps.segmented_slices, [2, 3])


def test_cancel_stops_within_one_batch():
    stack = _stack(12)
    model = UNet2D(in_channels=3, features=(4, 8, 16))
    calls = []

    def progress(stage, done, total, message):
        calls.append(done)

    with pytest.raises(RunCancelledError):
        segment_slices(model, stack, _preprocessor(stack), range(12), torch.device("cpu"),
                       batch_size=4, progress=progress, cancel=lambda: len(calls) >= 1)

    assert calls == [4]


def test_labels_from_maps_apply_threshold():
    stack = _stack(2)
    model = UNet2D(in_channels=3, features=(4, 8, 16))
    maps = segment_slices(model, stack, _preprocessor(stack), [0, 1], torch.device("cpu"))
    maps.foreground[:] = 0
    maps.tumor[:] = 0
    maps.foreground[0, 5, 5] = 200
    maps.tumor[0, 5, 5] = 100
    maps.foreground[0, 6, 6] = 200

    labels = maps.labels(tumor_threshold=0.3)

    assert labels[0, 5, 5] == 2
    assert labels[0, 6, 6] == 1
    assert labels.sum() == 3
    assert maps.labels(tumor_threshold=0.5)[0, 5, 5] == 1


def test_image_box_covers_ct_on_pooling_grid():
    # 512 columns of 0.57 mm span 146 pixels of 2 mm, centred in a 192-pixel input.
    prep = Preprocessing(40, 400, 2.0, (192, 192), 2, 3.0)
    preprocessor = SlicePreprocessor(prep, (10, 512, 512), (1.6, 0.57, 0.57), (255.5, 255.5))
    covered, _ = preprocessor._overlap()

    box = preprocessor.image_box(16)

    assert box == (slice(16, 176), slice(16, 176))
    for part, inside in zip(box, covered):
        assert part.start % 16 == 0
        assert part.stop % 16 == 0
        assert part.start <= inside.start
        assert inside.stop <= part.stop


def test_image_box_whole_for_large_ct():
    prep = Preprocessing(40, 400, 2.0, (64, 64), 1, 2.0)
    preprocessor = SlicePreprocessor(prep, (4, 100, 100), (2.0, 2.0, 2.0), (50.0, 50.0))

    assert preprocessor.image_box(16) == (slice(0, 64), slice(0, 64))


def test_crop_to_image_agrees_with_whole_input(shared_data_dir):
    """Bundled U-Net on a real CT cut to a 285 mm field of view: cropped input agrees."""
    from livertumorai.geometry import ImageGeometry, axial_frame
    from livertumorai.preprocess import body_center_rc
    from livertumorai.weights import load_manifest, load_model

    image = sitk.ReadImage(str(shared_data_dir / "fixtures" / "ircadb1.17_small_axial_lps.nii.gz"))
    frame = axial_frame(ImageGeometry.from_image(image))
    stack = np.ascontiguousarray(frame.to_axial(sitk.GetArrayFromImage(image)), np.float32)
    stack = stack[:, 16:112, 16:112]  # 96 pixels of 2.97 mm
    entry = load_manifest(None).model_for("segmentation")
    model = load_model(entry, torch.device("cpu"))
    preprocessor = SlicePreprocessor(entry.preprocessing, stack.shape, frame.spacing_mm,
                                     body_center_rc(stack))
    assert preprocessor.image_box(16) != (slice(0, 192), slice(0, 192))
    slices = range(stack.shape[0])

    whole = segment_slices(model, stack, preprocessor, slices, torch.device("cpu"))
    cropped = segment_slices(model, stack, preprocessor, slices, torch.device("cpu"),
                             crop_to_image=True)

    liver_whole, liver_cropped = whole.foreground > 127, cropped.foreground > 127
    assert liver_whole.sum() > 10_000
    dice = 2 * np.sum(liver_whole & liver_cropped) / (liver_whole.sum() + liver_cropped.sum())
    assert dice > 0.98


def _run_order(indices, liver, batch_size, seed, empty_slices):
    """Return the slices `_BatchOrder` runs when the slices in `liver` contain liver."""
    order = _BatchOrder(indices, batch_size, LiverEnds(seed, empty_slices, 0.45))
    while (batch := order.next_batch()) is not None:
        order.record([0.9 if index in liver else 0.1 for index in batch])
    return order.done


def test_liver_ends_stop_after_empty_gap():
    done = _run_order(list(range(129)), set(range(32, 129)), 16, 80, 7)

    assert sorted(done) == list(range(24, 129))  # 8 empty slices below the liver, then stop
    assert len(done) == len(set(done))


def test_liver_ends_without_liver_at_seed():
    assert sorted(_run_order(list(range(60)), set(range(50, 55)), 8, 10, 3)) == list(range(60))
    assert sorted(_run_order(list(range(60)), set(), 8, 10, 3)) == list(range(60))


def test_liver_ends_keep_connected_liver():
    rng = np.random.default_rng(0)
    for _ in range(500):
        indices = sorted(rng.choice(200, size=int(rng.integers(1, 80)), replace=False).tolist())
        low = int(rng.integers(0, 200))
        high = low + int(rng.integers(0, 60))
        liver = {i for i in indices if low <= i <= high}
        seed = int(rng.choice(sorted(liver) or indices))
        done = _run_order(indices, liver, int(rng.integers(1, 20)), seed,
                          int(rng.integers(1, 8)))
        assert len(done) == len(set(done))
        assert set(done) <= set(indices)
        assert liver <= set(done)


def test_liver_ends_leave_result_unchanged(shared_data_dir, tmp_path, monkeypatch):
    """A pelvis-to-abdomen CT: fewer slices through the U-Net, the same segmentation."""
    from livertumorai import pipeline

    source = shared_data_dir / "fixtures" / "siemens_pelvis_abdomen_3mm.nii.gz"
    with_ends = pipeline.segment_ct(source, tmp_path / "ends")
    monkeypatch.setattr(pipeline, "_liver_ends", lambda *args: None)
    without = pipeline.segment_ct(source, tmp_path / "all")

    assert with_ends.data["slices"]["segmented"] < 0.8 * without.data["slices"]["segmented"]
    assert with_ends.summary["liver_found"]
    read = lambda folder: sitk.GetArrayFromImage(  # noqa: E731
        sitk.ReadImage(str(folder / "segmentation.seg.nrrd")))
    np.testing.assert_array_equal(read(tmp_path / "ends"), read(tmp_path / "all"))
