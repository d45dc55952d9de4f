"""The weights that ship with LiverTumorAI: checksums, and real CT through both models."""

from __future__ import annotations

import json

import numpy as np
import pytest
import SimpleITK as sitk

from livertumorai.cli import EXIT_OK, main
from livertumorai.weights import BUNDLED_WEIGHTS_DIR, MANIFEST_NAME, load_manifest, sha256_of_file

# Bundled weights may use at most this many bytes in total.
WEIGHTS_BUDGET_BYTES = 60_000_000


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    return 2.0 * np.logical_and(a, b).sum() / max(a.sum() + b.sum(), 1)


def test_bundled_manifest_checksums():
    manifest = load_manifest(BUNDLED_WEIGHTS_DIR)

    assert manifest.path == (BUNDLED_WEIGHTS_DIR / MANIFEST_NAME).resolve()
    assert {entry.task for entry in manifest.models} == {"classification", "segmentation"}
    for entry in manifest.models:
        assert sha256_of_file(entry.path) == entry.sha256, entry.path


def test_bundled_weights_fit_budget():
    files = list(BUNDLED_WEIGHTS_DIR.glob("*.safetensors"))

    assert files
    assert sum(f.stat().st_size for f in files) <= WEIGHTS_BUDGET_BYTES


def test_bundled_manifest_documents_training():
    for entry in load_manifest(BUNDLED_WEIGHTS_DIR).models:
        assert entry.extra.get("training"), entry.name
        assert entry.extra.get("metrics"), entry.name


def test_bundled_models_segment_fixture(shared_data_dir, tmp_path):
    """The small real fixture (3 mm) through both bundled models, against its label."""
    source = shared_data_dir / "fixtures" / "ircadb1.17_small_feet_first.nrrd"
    reference = sitk.GetArrayFromImage(
        sitk.ReadImage(str(shared_data_dir / "fixtures" / "ircadb1.17_small_feet_first_label.nrrd")))
    output = tmp_path / "out"

    status = main(["segment", str(source), "-o", str(output), "--labelmap", "--device", "cpu", "-q"])

    assert status == EXIT_OK
    labels = sitk.GetArrayFromImage(sitk.ReadImage(str(output / "labels.nii.gz")))
    assert _dice(labels > 0, reference > 0) > 0.80
    report = json.loads((output / "report.json").read_text())
    assert report["summary"]["liver_found"]
    liver_x_ras = report["liver"]["centroid_ras"][0]
    body_x_ras = report["input"]["body_center_ras"][0]
    assert liver_x_ras > body_x_ras  # RAS +x is the patient's right
    rows = (output / "slices.csv").read_text().strip().splitlines()[1:]
    predicted = [int(line.split(",")[5]) for line in rows]
    assert 0 in predicted
    assert set(predicted) & {1, 2}


@pytest.mark.slow
@pytest.mark.parametrize("case", ["ircadb1.1_dicom", "siemens_abdomen_dicom"])
def test_bundled_models_find_liver_on_right(shared_data_dir, tmp_path, case):
    """Full-size DICOM: the liver lies on the patient's right of the body's centre."""
    output = tmp_path / case

    status = main(["segment", str(shared_data_dir / "ct_unlabelled" / case), "-o", str(output),
                   "-q"])

    assert status == EXIT_OK
    report = json.loads((output / "report.json").read_text())
    assert report["summary"]["liver_found"]
    assert report["liver"]["centroid_ras"][0] > report["input"]["body_center_ras"][0]
    assert 500 < report["summary"]["liver_volume_ml"] < 4000


ORIENTATIONS = {
    "axial_flipped_xy": "ircadb1.17_small_axial_flipped_xy.nii.gz",
    "feet_first": "ircadb1.17_small_feet_first.nrrd",
    "coronal_stack": "ircadb1.17_small_coronal_stack.mha",
    "oblique15": "ircadb1.17_small_oblique15.nii.gz",
}


@pytest.fixture(scope="module")
def axial_reference_labels(shared_data_dir, tmp_path_factory):
    output = tmp_path_factory.mktemp("axial") / "out"
    source = shared_data_dir / "fixtures" / "ircadb1.17_small_axial_lps.nii.gz"
    assert main(["segment", str(source), "-o", str(output), "--labelmap", "--device", "cpu",
                 "-q"]) == EXIT_OK
    return sitk.ReadImage(str(output / "labels.nii.gz"))


@pytest.mark.parametrize("name", sorted(ORIENTATIONS))
def test_orientations_give_same_liver(shared_data_dir, tmp_path, axial_reference_labels, name):
    """The same anatomy stored four other ways gives the same liver mask in physical space."""
    output = tmp_path / "out"
    assert main(["segment", str(shared_data_dir / "fixtures" / ORIENTATIONS[name]), "-o",
                 str(output), "--labelmap", "--device", "cpu", "-q"]) == EXIT_OK

    labels = sitk.ReadImage(str(output / "labels.nii.gz"))
    on_reference_grid = sitk.Resample(labels, axial_reference_labels, sitk.Transform(),
                                      sitk.sitkNearestNeighbor, 0)
    ours = sitk.GetArrayFromImage(on_reference_grid) > 0
    reference = sitk.GetArrayFromImage(axial_reference_labels) > 0

    minimum_dice = 0.85 if name == "oblique15" else 0.98
    assert _dice(ours, reference) >= minimum_dice
