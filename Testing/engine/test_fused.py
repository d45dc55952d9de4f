"""Fused inference copies compute what their source networks compute."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from livertumorai.inference import segment_slices
from livertumorai.models import SliceClassifier, UNet2D
from livertumorai.models import fused as fused_module
from livertumorai.models.fused import fuse_for_inference, onednn_fusion_available
from livertumorai.preprocess import SlicePreprocessor
from livertumorai.weights import Preprocessing


def _trained_looking(model: nn.Module, seed: int = 0) -> nn.Module:
    """Give every batch-norm layer non-trivial statistics, as training would."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.BatchNorm2d):
                size = module.num_features
                module.running_mean.copy_(torch.rand(size, generator=generator) - 0.5)
                module.running_var.copy_(torch.rand(size, generator=generator) * 1.5 + 0.5)
                module.weight.copy_(torch.rand(size, generator=generator) + 0.5)
                module.bias.copy_(torch.rand(size, generator=generator) * 0.4 - 0.2)
    return model.eval()


def _networks():
    torch.manual_seed(0)
    unet = _trained_looking(UNet2D(in_channels=5, features=(8, 16, 32, 64)))
    classifier = _trained_looking(SliceClassifier(width_divisor=16))
    return [(unet, (5, 64, 64)), (classifier, (3, 64, 64))]


@pytest.fixture(params=[True, False], ids=["onednn", "conv2d"])
def onednn(request, monkeypatch):
    """Run each test with the oneDNN kernels and with the plain conv2d fallback."""
    if request.param and not onednn_fusion_available(torch.float32):
        pytest.skip("this torch build has no oneDNN fused convolution")
    if not request.param:
        monkeypatch.setattr(fused_module, "onednn_fusion_available", lambda dtype: False)
    return request.param


@pytest.mark.parametrize("index", [0, 1], ids=["unet", "classifier"])
def test_float32_copy_matches_source(onednn, index):
    model, item_shape = _networks()[index]
    images = torch.rand(4, *item_shape, generator=torch.Generator().manual_seed(1))

    fused = fuse_for_inference(model, torch.float32)
    with torch.inference_mode():
        expected = model(images)
        actual = fused(fused.prepare_input(images))

    torch.testing.assert_close(actual, expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("index", [0, 1], ids=["unet", "classifier"])
def test_bfloat16_copy_near_source(onednn, index):
    model, item_shape = _networks()[index]
    images = torch.rand(4, *item_shape, generator=torch.Generator().manual_seed(2))

    fused = fuse_for_inference(model, torch.bfloat16)
    with torch.inference_mode():
        expected = torch.softmax(model(images), dim=1)
        actual = torch.softmax(fused(fused.prepare_input(images)).float(), dim=1)

    assert actual.dtype == torch.float32
    assert (actual - expected).abs().max() < 0.05


def test_source_network_unchanged():
    model, _ = _networks()[0]
    before = {name: tensor.clone() for name, tensor in model.state_dict().items()}

    fuse_for_inference(model, torch.bfloat16)

    after = model.state_dict()
    assert all(torch.equal(before[name], after[name]) for name in before)
    assert any(isinstance(module, nn.BatchNorm2d) for module in model.modules())


def test_fused_copy_without_batch_norm():
    model, _ = _networks()[0]

    fused = fuse_for_inference(model, torch.float32)

    assert not any(isinstance(module, nn.BatchNorm2d) for module in fused.modules())
    assert fused.network_name == "UNet2D"
    assert fused.flop_reference is model


def test_other_networks_rejected():
    with pytest.raises(TypeError, match="Sequential"):
        fuse_for_inference(nn.Sequential(nn.Conv2d(1, 1, 3)).eval(), torch.float32)


def test_training_mode_rejected():
    model, _ = _networks()[0]

    with pytest.raises(ValueError, match="training mode"):
        fuse_for_inference(model.train(), torch.float32)


def test_fused_segmentation_matches_unfused(onednn):
    rng = np.random.default_rng(0)
    stack = np.full((6, 64, 64), -1000.0, dtype=np.float32)
    stack[:, 10:54, 8:56] = rng.normal(40, 60, (6, 44, 48))
    preprocessing = Preprocessing(40, 400, 2.0, (32, 32), 2, 2.0)
    preprocessor = SlicePreprocessor(preprocessing, stack.shape, (2.0, 1.0, 1.0), (32, 32))
    model, _ = _networks()[0]

    unfused = segment_slices(model, stack, preprocessor, range(6), torch.device("cpu"),
                             fuse=False)
    fused = segment_slices(model, stack, preprocessor, range(6), torch.device("cpu"),
                           fuse=True)

    difference = np.abs(unfused.foreground.astype(int) - fused.foreground.astype(int))
    assert difference.max() <= 1  # uint8 rounding of the same probabilities


@pytest.mark.parametrize("shape", [(2, 3, 8, 8), (1, 4, 7, 9), (2, 2, 3, 5)])
def test_max_pool_matches_torch(shape):
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(4))

    pooled = fused_module._MaxPool2x2()(x.contiguous(memory_format=torch.channels_last))

    torch.testing.assert_close(pooled, nn.MaxPool2d(2)(x), rtol=0, atol=0)


def test_unet_copy_rejects_indivisible_size():
    model, _ = _networks()[0]  # three poolings: sizes must be multiples of 8
    fused = fuse_for_inference(model, torch.float32)

    with pytest.raises(ValueError, match="divisible by 8"):
        fused(fused.prepare_input(torch.rand(1, 5, 36, 64)))
