"""Smoke run on real CT: train both networks briefly, reload, export, load in the engine."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from livertumorai.pipeline import SegmentOptions, segment_ct
from livertumorai.weights import Preprocessing, load_manifest, load_model
from training import evaluate, export, predict_classification, predict_segmentation, train
from training.dataset import LiverSliceDataModule
from training.lit_model import ClassificationModule, SegmentationModule

REPOSITORY_ROOT = Path(__file__).resolve().parents[2]
SEGMENTATION_PREP = Preprocessing(40.0, 400.0, 4.0, (96, 96), 1, 3.0)


@pytest.fixture(scope="module")
def runs(shared_data_dir, tmp_path_factory) -> dict:
    """Train a tiny U-Net and classifier on ircadb1.17, validating on chaos_ct3."""
    root = tmp_path_factory.mktemp("runs")
    common = ["--data-dir", str(shared_data_dir / "train"), "--cache-dir", str(root / "cache"),
              "--val-cases", "chaos_ct3", "--exclude", "ircadb1.7", "--precision", "32-true",
              "--log-every-n-steps", "1", "--limit-val-batches", "2", "--seed", "0",
              "--accelerator", "cpu", "--devices", "1"]
    train.main(common + ["--task", "segmentation", "--output-dir", str(root / "unet"),
                         "--features", "8", "16", "32", "--image-size", "96",
                         "--spacing-mm", "4", "--context-slices", "1", "--epochs", "3",
                         "--batch-size", "8", "--lr", "3e-3"])
    train.main(common + ["--task", "classification", "--output-dir", str(root / "classifier"),
                         "--width-divisor", "16", "--image-size", "64", "--spacing-mm", "6",
                         "--epochs", "1", "--limit-train-batches", "6", "--batch-size", "8"])
    return {"root": root, "unet": root / "unet", "classifier": root / "classifier",
            "cache": root / "cache", "data": shared_data_dir / "train"}


def _logged_losses(run_dir: Path) -> list[float]:
    with open(run_dir / "csv" / "version_0" / "metrics.csv", newline="") as stream:
        return [float(row["train/loss_step"]) for row in csv.DictReader(stream)
                if row.get("train/loss_step")]


def _validation_batch(runs: dict) -> torch.Tensor:
    module = LiverSliceDataModule(runs["data"], "segmentation", SEGMENTATION_PREP,
                                  cache_dir=runs["cache"], val_cases=["chaos_ct3"],
                                  exclude=["ircadb1.7"], batch_size=4)
    module.setup("fit")
    images, _ = next(iter(module.val_dataloader()))
    return images


def test_segmentation_loss_goes_down(runs):
    losses = _logged_losses(runs["unet"])
    assert len(losses) >= 30
    assert np.mean(losses[-5:]) < 0.9 * np.mean(losses[:5])


def test_run_folder_contents(runs):
    split = json.loads((runs["unet"] / "split.json").read_text())
    assert split["train"] == ["ircadb1.17"]
    assert split["val"] == ["chaos_ct3"]
    assert (runs["unet"] / "checkpoints" / "last.ckpt").is_file()
    assert list((runs["unet"] / "checkpoints").glob("best-*.ckpt"))
    assert _logged_losses(runs["classifier"])


def test_checkpoint_reloads(runs):
    module = SegmentationModule.load_from_checkpoint(
        runs["unet"] / "checkpoints" / "last.ckpt", map_location="cpu")
    assert module.preprocessing == SEGMENTATION_PREP
    assert module.hparams.architecture["features"] == [8, 16, 32]
    assert module.hparams.training_info["split"]["train"] == ["ircadb1.17"]
    classifier = ClassificationModule.load_from_checkpoint(
        runs["classifier"] / "checkpoints" / "last.ckpt", map_location="cpu")
    assert classifier.preprocessing.input_size == (64, 64)


def test_export_float32_matches_module(runs, tmp_path):
    checkpoint = runs["unet"] / "checkpoints" / "last.ckpt"
    export.export_checkpoint(checkpoint, tmp_path, dtype=torch.float32,
                             metrics={"val_dice_liver": 0.5})
    entry = load_manifest(tmp_path).model_for("segmentation")
    assert entry.preprocessing == SEGMENTATION_PREP
    assert entry.extra["split"]["val"] == ["chaos_ct3"]
    assert entry.extra["metrics"] == {"val_dice_liver": 0.5}
    engine_model = load_model(entry)
    module = SegmentationModule.load_from_checkpoint(checkpoint, map_location="cpu").eval()
    images = _validation_batch(runs)
    with torch.inference_mode():
        expected = module(images)
        actual = engine_model(images)
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5)


def test_export_float16_merges_and_runs_in_engine(runs, shared_data_dir, tmp_path):
    weights = tmp_path / "weights"
    unet_checkpoint = runs["unet"] / "checkpoints" / "last.ckpt"
    export.export_checkpoint(unet_checkpoint, weights)
    export.export_checkpoint(runs["classifier"] / "checkpoints" / "last.ckpt", weights)
    export.export_checkpoint(unet_checkpoint, weights, version="0.1.1")  # replaces the U-Net
    manifest = load_manifest(weights)
    assert sorted(e.task for e in manifest.models) == ["classification", "segmentation"]
    assert manifest.model_for("segmentation").version == "0.1.1"

    module = SegmentationModule.load_from_checkpoint(unet_checkpoint, map_location="cpu").eval()
    images = _validation_batch(runs)
    with torch.inference_mode():
        expected = torch.softmax(module(images), dim=1)
        actual = torch.softmax(load_model(manifest.model_for("segmentation"))(images), dim=1)
    torch.testing.assert_close(actual, expected, rtol=0, atol=2e-2)

    fixture = shared_data_dir / "fixtures" / "ircadb1.17_small_axial_lps.nii.gz"
    report = segment_ct(fixture, tmp_path / "engine", SegmentOptions(weights=str(weights),
                                                                     write_overview=False))
    assert (report.output_dir / "segmentation.seg.nrrd").is_file()
    assert (report.output_dir / "slices.csv").is_file()


def test_predict_and_evaluate_scripts(runs, shared_data_dir, tmp_path, capsys):
    fixture = shared_data_dir / "fixtures" / "ircadb1.17_small_axial_lps.nii.gz"
    predict_classification.main(["--model", str(runs["classifier"] / "checkpoints" / "last.ckpt"),
                                 "--input", str(fixture), "--device", "cpu"])
    printed = capsys.readouterr().out
    assert "slice 0: class " in printed
    assert "probabilities [" in printed

    predict_segmentation.main(["--model", str(runs["unet"] / "checkpoints" / "last.ckpt"),
                               "--data-dir", str(runs["data"]), "--cases", "chaos_ct3",
                               "--output-dir", str(tmp_path / "predictions"), "--device", "cpu",
                               "--quiet"])
    assert (tmp_path / "predictions" / "chaos_ct3" / "labels.nii.gz").is_file()
    evaluate.main(["--data-dir", str(runs["data"]), "--cases", "chaos_ct3",
                   "--predictions", str(tmp_path / "predictions"),
                   "--output-dir", str(tmp_path / "eval")])
    report = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert 0.0 <= report["summary"]["liver_dice_global"] <= 1.0
    assert report["summary"]["reference_lesions"] == 0


def test_scripts_describe_options():
    result = subprocess.run([sys.executable, "training/train.py", "--help"], cwd=REPOSITORY_ROOT,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    for option in ("--task", "--data-dir", "--precision", "--strategy", "--num-nodes",
                   "--resume", "--time-limit-min", "--split-file"):
        assert option in result.stdout
    for script in (export, evaluate, predict_classification, predict_segmentation):
        assert "--" in script.build_parser().format_help()
