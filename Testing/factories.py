"""Test data made on the fly: small weights with the bundled models' structure."""

from __future__ import annotations

from pathlib import Path

import torch

from livertumorai.constants import SLICE_CLASS_NAMES
from livertumorai.models import build_model
from livertumorai.weights import Preprocessing, save_model, write_manifest

# Small networks with the bundled models' structure: fast enough for every test.
TINY_CLASSIFIER = {"name": "vgg16_bn", "in_channels": 3, "num_classes": 3, "width_divisor": 16}
TINY_SEGMENTER = {"name": "unet2d", "in_channels": 3, "num_classes": 3, "features": [4, 8, 16]}
TINY_CLASSIFIER_PREP = Preprocessing(40.0, 400.0, 6.0, (64, 64), 1, 3.0)
TINY_SEGMENTER_PREP = Preprocessing(40.0, 400.0, 4.0, (96, 96), 1, 3.0)



def make_tiny_weights(folder: Path, seed: int = 0) -> Path:
    """Write randomly initialised tiny classifier and U-Net weights plus a manifest."""
    torch.manual_seed(seed)
    entries = []
    for name, task, architecture, prep, classes in (
        ("tiny-classifier", "classification", TINY_CLASSIFIER, TINY_CLASSIFIER_PREP,
         SLICE_CLASS_NAMES),
        ("tiny-segmenter", "segmentation", TINY_SEGMENTER, TINY_SEGMENTER_PREP,
         ("background", "liver", "tumor")),
    ):
        model = build_model(architecture)
        entries.append(save_model(model, folder, name=name, task=task, version="0.0.0-test",
                                  architecture=architecture, preprocessing=prep,
                                  classes=classes, extra={"training": "random initialisation"}))
    return write_manifest(folder, entries)
