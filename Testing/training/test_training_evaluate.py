"""Evaluation metrics on hand-built masks with known values, and the command line on files."""

from __future__ import annotations

import csv
import json
import math

import numpy as np
import pytest
import SimpleITK as sitk

from training.evaluate import (
    auroc_one_vs_rest,
    average_symmetric_surface_distance,
    confusion_matrix,
    dice,
    evaluate_segmentation,
    lesion_detection,
    detection_scores,
    main,
    reference_slice_classes,
    relative_volume_difference,
    summarize,
    training_cases_of,
    volume_overlap_error,
)
from livertumorai.geometry import ImageGeometry


def _masks_4_and_2() -> tuple[np.ndarray, np.ndarray]:
    reference = np.zeros((3, 4, 4), dtype=bool)
    reference[1, 1:3, 1:3] = True  # 4 voxels
    prediction = np.zeros_like(reference)
    prediction[1, 1, 1:3] = True  # 2 voxels, both inside the reference
    return reference, prediction


def test_overlap_metrics_known_values():
    reference, prediction = _masks_4_and_2()
    assert dice(reference, prediction) == pytest.approx(2 * 2 / 6)
    assert volume_overlap_error(reference, prediction) == pytest.approx(0.5)
    assert relative_volume_difference(reference, prediction) == pytest.approx(-0.5)
    assert relative_volume_difference(prediction, reference) == pytest.approx(1.0)


def test_overlap_metrics_empty_masks():
    empty = np.zeros((2, 3, 3), dtype=bool)
    full = np.ones_like(empty)
    assert dice(empty, empty) == 1.0
    assert volume_overlap_error(empty, empty) == 0.0
    assert relative_volume_difference(empty, empty) == 0.0
    assert average_symmetric_surface_distance(empty, empty, (1, 1, 1)) == 0.0
    assert dice(empty, full) == 0.0
    assert volume_overlap_error(empty, full) == 1.0
    assert math.isnan(relative_volume_difference(empty, full))
    assert math.isnan(average_symmetric_surface_distance(empty, full, (1, 1, 1)))
    assert math.isnan(average_symmetric_surface_distance(full, empty, (1, 1, 1)))


def test_assd_single_voxels_with_spacing():
    reference = np.zeros((3, 3, 8), dtype=bool)
    prediction = np.zeros_like(reference)
    reference[1, 1, 1] = True
    prediction[1, 1, 4] = True  # 3 columns away at 0.5 mm
    assert average_symmetric_surface_distance(reference, prediction, (2.0, 1.0, 0.5)) == (
        pytest.approx(1.5))


def test_assd_concentric_cubes():
    # Inner 3x3x3 cube: 26 surface voxels, each 1 voxel from the 5x5x5 cube's shell.
    # Shell (98 voxels): 54 at distance 1, 36 at sqrt(2), 8 at sqrt(3) from the inner surface.
    inner = np.zeros((7, 7, 7), dtype=bool)
    outer = np.zeros_like(inner)
    inner[2:5, 2:5, 2:5] = True
    outer[1:6, 1:6, 1:6] = True
    expected = (26 + 54 + 36 * math.sqrt(2) + 8 * math.sqrt(3)) / (26 + 98)
    assert average_symmetric_surface_distance(inner, outer, (1, 1, 1)) == pytest.approx(expected)
    assert average_symmetric_surface_distance(outer, outer, (1, 1, 1)) == 0.0


def test_lesion_detection_counts():
    reference = np.zeros((6, 10, 10), dtype=bool)
    reference[1:3, 1:3, 1:3] = True  # lesion A, 8 voxels
    reference[4, 8, 8] = True  # lesion B, 1 voxel, missed
    prediction = np.zeros_like(reference)
    prediction[1:3, 1:3, 1:3] = True  # matches A exactly
    prediction[4, 1, 8] = True  # false positive
    counts = lesion_detection(reference, prediction)
    assert counts.reference_lesions == 2
    assert counts.predicted_lesions == 2
    assert counts.detected_reference == 1
    assert counts.false_positive_lesions == 1
    assert counts.matched_iou == 1
    scores = detection_scores(counts)
    assert scores["lesion_precision"] == pytest.approx(0.5)
    assert scores["lesion_recall"] == pytest.approx(0.5)
    assert scores["lesion_f1"] == pytest.approx(0.5)


def test_lesion_small_overlap_detected_not_matched():
    reference = np.zeros((4, 4, 4), dtype=bool)
    reference[0:2, 0:2, 0:2] = True
    prediction = np.zeros_like(reference)
    prediction[0, 0, 0] = True  # IoU 1/8
    counts = lesion_detection(reference, prediction)
    assert counts.detected_reference == 1
    assert counts.matched_iou == 0
    assert detection_scores(counts)["lesion_recall_iou50"] == 0.0


def test_lesions_corner_neighbours_are_one():
    mask = np.zeros((3, 3, 3), dtype=bool)
    mask[0, 0, 0] = mask[1, 1, 1] = True
    assert lesion_detection(mask, mask).reference_lesions == 1


def test_lesion_scores_empty():
    empty = np.zeros((2, 2, 2), dtype=bool)
    scores = detection_scores(lesion_detection(empty, empty))
    assert scores["lesion_precision"] == 1.0
    assert scores["lesion_recall"] == 1.0
    assert scores["lesion_f1"] == 1.0
    one = empty.copy()
    one[0, 0, 0] = True
    missed = detection_scores(lesion_detection(one, empty))
    assert missed["lesion_recall"] == 0.0
    assert missed["lesion_f1"] == 0.0


def test_confusion_and_auroc():
    reference = [0, 0, 1, 1]
    probabilities = np.array([[0.9, 0.1, 0.0], [0.6, 0.4, 0.0],
                              [0.65, 0.35, 0.0], [0.2, 0.8, 0.0]])
    matrix = confusion_matrix(reference, probabilities.argmax(axis=1))
    assert matrix.tolist() == [[2, 0, 0], [1, 1, 0], [0, 0, 0]]
    auroc = auroc_one_vs_rest(reference, probabilities)
    assert auroc[1] == pytest.approx(0.75)
    assert auroc[0] == pytest.approx(0.75)
    assert math.isnan(auroc[2])  # class absent


def test_summarize_global_dice():
    reference, prediction = _masks_4_and_2()
    labels_ref = reference.astype(np.uint8)
    labels_pred = prediction.astype(np.uint8)
    empty = np.zeros_like(labels_ref)
    cases = [evaluate_segmentation(labels_ref, labels_pred, (1, 1, 1)),
             evaluate_segmentation(empty, empty, (1, 1, 1))]
    summary = summarize(cases)
    assert summary["liver_dice_global"] == pytest.approx(4 / 6)
    assert summary["liver_dice_mean"] == pytest.approx((4 / 6 + 1.0) / 2)
    assert summary["tumor_dice_global"] == 1.0


@pytest.mark.parametrize("direction_z", [1.0, -1.0])
def test_reference_slice_classes_by_input_index(direction_z):
    labels = np.zeros((4, 5, 5), dtype=np.uint8)
    labels[1, 2, 2] = 2
    labels[2, 2, 2] = 1
    image = sitk.GetImageFromArray(labels)
    image.SetDirection((1, 0, 0, 0, 1, 0, 0, 0, direction_z))
    classes = reference_slice_classes(labels, ImageGeometry.from_image(image))
    assert classes.tolist() == [0, 1, 2, 0]


def test_command_line_on_written_files(tmp_path):
    reference = np.zeros((4, 6, 6), dtype=np.uint8)
    reference[1:3, 1:5, 1:5] = 1
    reference[1, 2:4, 2:4] = 2
    prediction = reference.copy()
    prediction[2] = 0  # half the liver missed
    case_dir = tmp_path / "data" / "case1"
    case_dir.mkdir(parents=True)
    for name, array in (("ct.nii.gz", reference.astype(np.int16)),
                        ("label.nii.gz", reference)):
        image = sitk.GetImageFromArray(array)
        image.SetSpacing((0.8, 0.8, 2.5))
        sitk.WriteImage(image, str(case_dir / name))
    predicted_dir = tmp_path / "predictions" / "case1"
    predicted_dir.mkdir(parents=True)
    predicted_image = sitk.GetImageFromArray(prediction)
    predicted_image.SetSpacing((0.8, 0.8, 2.5))
    sitk.WriteImage(predicted_image, str(predicted_dir / "labels.nii.gz"))
    with open(predicted_dir / "slices.csv", "w", newline="") as stream:
        writer = csv.writer(stream)
        writer.writerow(["slice_index", "p_background", "p_tumor", "p_no_tumor"])
        for index, p in enumerate([(0.9, 0.05, 0.05), (0.1, 0.8, 0.1),
                                   (0.1, 0.2, 0.7), (0.2, 0.1, 0.7)]):
            writer.writerow([index, *p])

    main(["--data-dir", str(tmp_path / "data"), "--predictions", str(tmp_path / "predictions"),
          "--output-dir", str(tmp_path / "eval")])

    report = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    case = report["cases"][0]
    # Whole liver: 32 reference voxels, 16 predicted, all inside.
    assert case["liver_dice"] == pytest.approx(2 * 16 / 48)
    assert case["tumor_dice"] == 1.0
    assert case["slice_accuracy"] == pytest.approx(0.75)
    assert case["slice_confusion"] == [[1, 0, 1], [0, 1, 0], [0, 0, 1]]
    assert report["summary"]["liver_dice_global"] == pytest.approx(2 / 3)
    assert "| case1 |" in (tmp_path / "eval" / "metrics.md").read_text()


@pytest.mark.parametrize("option, value", [("--min-lesion-mm3", "-5"),
                                           ("--tumor-threshold", "1.5"),
                                           ("--tumor-threshold", "nan")])
def test_bad_engine_setting_exits_early(tmp_path, capsys, option, value):
    with pytest.raises(SystemExit) as stopped:
        main(["--data-dir", str(tmp_path), "--weights", str(tmp_path), "--output-dir",
              str(tmp_path / "eval"), option, value])

    assert stopped.value.code == 2
    assert value in capsys.readouterr().err
    assert not (tmp_path / "eval").exists()


def test_unknown_case_exits_early(shared_data_dir, tiny_weights, tmp_path, capsys):
    with pytest.raises(SystemExit) as stopped:
        main(["--data-dir", str(shared_data_dir / "train"), "--weights", str(tiny_weights),
              "--cases", "nosuch", "--output-dir", str(tmp_path / "eval")])

    assert stopped.value.code == 2
    assert "nosuch" in capsys.readouterr().err
    assert not (tmp_path / "eval").exists()


def test_missing_weights_exit_early(shared_data_dir, tmp_path, capsys):
    with pytest.raises(SystemExit) as stopped:
        main(["--data-dir", str(shared_data_dir / "train"), "--weights",
              str(tmp_path / "no_weights"), "--output-dir", str(tmp_path / "eval")])

    assert stopped.value.code == 2
    assert "no_weights" in capsys.readouterr().err
    assert not (tmp_path / "eval").exists()


def test_training_cases_from_manifest():
    from livertumorai.weights import BUNDLED_WEIGHTS_DIR

    assert training_cases_of(str(BUNDLED_WEIGHTS_DIR)) == {"ircadb1.7", "chaos_ct3", "ircadb1.17"}
