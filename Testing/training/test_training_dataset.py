"""Case discovery in three layouts, the patient-level split, the slice cache and augmentation."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from livertumorai.preprocess import SlicePreprocessor
from livertumorai.weights import Preprocessing
from training.dataset import (
    CaseRecord,
    LiverSliceDataModule,
    SliceAugmentation,
    cache_case,
    discover_cases,
    hu_to_unit,
    read_axial_ct,
    read_split,
    split_cases,
    unit_to_hu,
    write_split,
)

SMALL_PREP = Preprocessing(40.0, 400.0, 4.0, (96, 96), 2, 3.0)


@pytest.fixture(scope="module")
def train_dir(shared_data_dir) -> Path:
    return shared_data_dir / "train"


def _link(target: Path, link: Path) -> None:
    link.parent.mkdir(parents=True, exist_ok=True)
    link.symlink_to(target)


def test_folders_layout(train_dir):
    cases = discover_cases(train_dir)
    assert [c.case_id for c in cases] == ["chaos_ct3", "ircadb1.7", "ircadb1.17"]
    assert cases[2].image_path == (train_dir / "ircadb1.17" / "ct.nii.gz").resolve()
    assert cases[2].label_path == (train_dir / "ircadb1.17" / "label.nii.gz").resolve()
    assert cases[2].patient_id == "ircadb1.17"


def test_lits_layout(train_dir, tmp_path):
    _link(train_dir / "ircadb1.17" / "ct.nii.gz", tmp_path / "Training Batch 1" / "volume-0.nii.gz")
    _link(train_dir / "ircadb1.17" / "label.nii.gz",
          tmp_path / "Training Batch 1" / "segmentation-0.nii.gz")
    _link(train_dir / "chaos_ct3" / "ct.nii.gz", tmp_path / "Training Batch 2" / "volume-10.nii.gz")
    _link(train_dir / "chaos_ct3" / "label.nii.gz",
          tmp_path / "Training Batch 2" / "segmentation-10.nii.gz")
    _link(train_dir / "ircadb1.7" / "ct.nii.gz", tmp_path / "Training Batch 2" / "volume-2.nii.gz")

    cases = discover_cases(tmp_path)  # auto detects LiTS; volume-2 has no segmentation
    assert [c.case_id for c in cases] == ["lits-0", "lits-10"]
    assert cases[0].image_path.name == "volume-0.nii.gz"
    assert cases[0].label_path.name == "segmentation-0.nii.gz"
    assert cases[1].label_path.parent.name == "Training Batch 2"


def test_msd_layout(train_dir, tmp_path):
    for number, case in ((0, "ircadb1.17"), (1, "chaos_ct3")):
        _link(train_dir / case / "ct.nii.gz", tmp_path / "imagesTr" / f"liver_{number}.nii.gz")
        _link(train_dir / case / "label.nii.gz", tmp_path / "labelsTr" / f"liver_{number}.nii.gz")
    # macOS metadata files as found in the MSD archive; dataset.json does not list them.
    (tmp_path / "imagesTr" / "._liver_0.nii.gz").write_bytes(b"\0")
    description = {"name": "Liver", "labels": {"0": "background", "1": "liver", "2": "cancer"},
                   "training": [{"image": f"./imagesTr/liver_{n}.nii.gz",
                                 "label": f"./labelsTr/liver_{n}.nii.gz"} for n in (0, 1)],
                   "test": []}
    (tmp_path / "dataset.json").write_text(json.dumps(description))

    cases = discover_cases(tmp_path)
    assert [c.case_id for c in cases] == ["liver_0", "liver_1"]
    assert cases[0].image_path.parent.name == "imagesTr"
    assert cases[0].label_path.parent.name == "labelsTr"


def test_lits_reader_matches_folder_reader(train_dir, tmp_path):
    _link(train_dir / "chaos_ct3" / "ct.nii.gz", tmp_path / "lits" / "volume-3.nii.gz")
    _link(train_dir / "chaos_ct3" / "label.nii.gz", tmp_path / "lits" / "segmentation-3.nii.gz")
    lits_case = cache_case(discover_cases(tmp_path / "lits", "lits")[0], SMALL_PREP,
                           tmp_path / "cache")
    folder_case = cache_case(next(c for c in discover_cases(train_dir) if c.case_id == "chaos_ct3"),
                             SMALL_PREP, tmp_path / "cache")
    assert lits_case.case_id == "lits-3"
    np.testing.assert_array_equal(lits_case.slices, folder_case.slices)
    np.testing.assert_array_equal(lits_case.labels, folder_case.labels)
    # README of the shared data: 71 liver slices, none with tumor, 7 without liver.
    assert np.bincount(lits_case.classes, minlength=3).tolist() == [7, 0, 71]


def test_unknown_layout_and_empty_folder(tmp_path):
    with pytest.raises(ValueError, match="unknown layout"):
        discover_cases(tmp_path, "nnunet")
    with pytest.raises(FileNotFoundError, match="no labelled case"):
        discover_cases(tmp_path, "folders")


def _fake_cases(patients: int, scans: int) -> list[CaseRecord]:
    return [CaseRecord(f"p{p}_scan{s}", Path("ct"), Path("label"), f"p{p}")
            for p in range(patients) for s in range(scans)]


def test_split_keeps_patients_together():
    cases = _fake_cases(patients=5, scans=2)
    split = split_cases(cases, val_fraction=0.4, seed=3)
    patient = {c.case_id: c.patient_id for c in cases}
    train_patients = {patient[c] for c in split.train}
    val_patients = {patient[c] for c in split.val}
    assert len(val_patients) == 2
    assert not train_patients & val_patients
    assert len(split.train) + len(split.val) == 10


def test_split_reproducible_and_seeded():
    cases = _fake_cases(patients=8, scans=1)
    assert split_cases(cases, 0.25, seed=1) == split_cases(cases, 0.25, seed=1)
    draws = {split_cases(cases, 0.25, seed=seed).val for seed in range(6)}
    assert len(draws) > 1


def test_split_explicit_cases_and_exclusion():
    cases = _fake_cases(patients=3, scans=2)
    split = split_cases(cases, val_cases=["p1_scan0"], exclude=["p2_scan1"])
    assert split.val == ("p1_scan0", "p1_scan1")
    assert "p2_scan1" not in split.train
    assert split.excluded == ("p2_scan1",)
    with pytest.raises(ValueError, match="unknown case ids"):
        split_cases(cases, exclude=["nobody"])


def test_split_file_round_trip(tmp_path):
    split = split_cases(_fake_cases(4, 1), 0.5, seed=7)
    assert read_split(write_split(tmp_path / "split.json", split)) == split


def test_patient_pattern(tmp_path):
    for name in ("pat01_a", "pat01_b", "pat02_a"):
        for stem in ("ct", "label"):
            (tmp_path / name).mkdir(exist_ok=True)
            (tmp_path / name / f"{stem}.nii.gz").write_bytes(b"")
    cases = discover_cases(tmp_path, patient_pattern=r"^(pat\d+)_")
    assert [c.patient_id for c in cases] == ["pat01", "pat01", "pat02"]


def test_cache_matches_engine_preprocessing(train_dir, tmp_path):
    record = next(c for c in discover_cases(train_dir) if c.case_id == "ircadb1.17")
    case = cache_case(record, SMALL_PREP, tmp_path)
    ct = read_axial_ct(record.image_path)
    engine = SlicePreprocessor(SMALL_PREP, ct.stack_hu.shape, ct.frame.spacing_mm, ct.center_rc)
    for index in (0, 1, 60, case.num_slices - 1):
        expected = engine.images(ct.stack_hu, [index])[0].numpy()
        np.testing.assert_allclose(case.image(index), expected, atol=1e-3)
    # The cache is reused, not rebuilt, on the second call.
    mtime = (case.folder / "slices.npy").stat().st_mtime_ns
    assert (cache_case(record, SMALL_PREP, tmp_path).folder / "slices.npy").stat().st_mtime_ns == mtime
    # README of the shared data: 113 liver slices, 36 of them with tumor, 6 without liver.
    assert np.bincount(case.classes, minlength=3).tolist() == [6, 36, 77]


def test_hu_window_round_trip():
    hu = torch.tensor([-160.0, -100.0, 40.0, 239.0, 1000.0])
    unit = hu_to_unit(hu, SMALL_PREP)
    np.testing.assert_allclose(unit_to_hu(unit, SMALL_PREP)[:4], [-160.0, -100.0, 40.0, 239.0],
                               atol=1e-3)
    assert unit[4] == 1.0  # clipped


def test_augmentation_moves_image_and_mask_together():
    torch.manual_seed(0)
    mask = torch.zeros(96, 96, dtype=torch.int64)
    mask[30:60, 20:50] = 1
    mask[40:50, 30:40] = 2
    image = (mask.float() / 2.0)[None].repeat(3, 1, 1)
    augmentation = SliceAugmentation(intensity_scale_range=(1.0, 1.0), intensity_shift=0.0,
                                     noise_probability=0.0)
    for _ in range(5):
        out_image, out_mask = augmentation(image, mask)
        assert out_image.shape == (3, 96, 96)
        assert out_mask.dtype == torch.int64
        assert set(out_mask.unique().tolist()) <= {0, 1, 2}
        assert out_image[0][out_mask == 2].mean() > 0.9
        assert out_image[0][out_mask == 0].mean() < 0.1


def test_classifier_sampling_is_balanced(train_dir, tmp_path):
    prep = Preprocessing(40.0, 400.0, 6.0, (64, 64), 1, 3.0)
    module = LiverSliceDataModule(train_dir, "classification", prep, cache_dir=tmp_path,
                                  val_cases=["chaos_ct3"], exclude=["ircadb1.7"], batch_size=4)
    module.prepare_data()
    module.setup("fit")
    assert module.split.train == ("ircadb1.17",)
    assert module.class_counts().tolist() == [6, 36, 77]
    sampler = module.train_dataloader().sampler
    torch.manual_seed(0)
    drawn = np.concatenate([list(sampler) for _ in range(10)])
    fractions = np.bincount(module.train_dataset.slice_classes()[drawn], minlength=3) / drawn.size
    np.testing.assert_allclose(fractions, [1 / 3] * 3, atol=0.06)
    image, target = module.train_dataset[0]
    assert image.shape == (3, 64, 64)
    assert target.dtype == torch.int64
