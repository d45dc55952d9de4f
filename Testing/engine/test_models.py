"""Network definitions: layouts, output shapes and the size budget."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torchvision.models import vgg16_bn

from livertumorai.models import SliceClassifier, UNet2D, build_model

# Bundled weights must stay under 60 MB in total; stored as float16 that is 30 M parameters.
WEIGHTS_BUDGET_PARAMETERS = 30_000_000
BUNDLED_CLASSIFIER = {"name": "vgg16_bn", "in_channels": 3, "num_classes": 3, "width_divisor": 4}
BUNDLED_SEGMENTER = {"name": "unet2d", "in_channels": 5, "num_classes": 3,
                     "features": [16, 32, 64, 128, 256]}


def _layer_kinds(module: nn.Module) -> list[type]:
    return [type(layer) for layer in module]


def test_classifier_keeps_vgg16_bn_layout():
    reference = vgg16_bn(weights=None)

    ours = SliceClassifier(width_divisor=4)

    assert _layer_kinds(ours.features) == _layer_kinds(reference.features)
    convs = [m for m in ours.features if isinstance(m, nn.Conv2d)]
    assert len(convs) == 13
    assert [c.out_channels for c in convs][:3] == [16, 16, 32]


def test_classifier_width_one_matches_torchvision_features():
    reference = vgg16_bn(weights=None)

    ours = SliceClassifier(width_divisor=1)

    reference_shapes = {k: v.shape for k, v in reference.features.state_dict().items()}
    ours_shapes = {k: v.shape for k, v in ours.features.state_dict().items()}
    assert ours_shapes == reference_shapes


def test_classifier_outputs_three_logits():
    model = SliceClassifier().eval()

    logits = model(torch.zeros(2, 3, 96, 128))

    assert logits.shape == (2, 3)


def test_classifier_rejects_other_channel_count():
    with pytest.raises(ValueError, match="in_channels=5"):
        SliceClassifier(in_channels=5)


def test_unet_output_matches_input_size():
    model = UNet2D(in_channels=5, features=(8, 16, 32)).eval()

    logits = model(torch.zeros(1, 5, 64, 96))

    assert logits.shape == (1, 3, 64, 96)


def test_unet_rejects_indivisible_size():
    model = UNet2D(in_channels=1, features=(4, 8, 16))

    with pytest.raises(ValueError, match="divisible by 4"):
        model(torch.zeros(1, 1, 30, 32))


def test_bundled_architectures_fit_budget():
    classifier = build_model(BUNDLED_CLASSIFIER)
    segmenter = build_model(BUNDLED_SEGMENTER)

    total = sum(p.numel() for m in (classifier, segmenter) for p in m.parameters())

    assert total < WEIGHTS_BUDGET_PARAMETERS


def test_build_model_rejects_unknown_name():
    with pytest.raises(ValueError, match="unknown architecture 'resnet'"):
        build_model({"name": "resnet"})


def test_build_model_rejects_bad_parameter():
    with pytest.raises(ValueError, match="invalid parameters"):
        build_model({"name": "unet2d", "channels": 3})
