"""Inference-only copies of the networks: batch norm folded, ReLU fused, no concatenation.

In eager PyTorch a conv-BN-ReLU block costs three passes over memory, and a U-Net decoder
copies its two inputs into one tensor before convolving them. In a bf16 profile of the U-Net
on the 2-core CPU of `benchmarks/BENCHMARKS.md`, batch norm, ReLU and `torch.cat` took about
half of the time. The convolutions themselves ran at about two thirds of the matmul
throughput. The copies made here remove that overhead and give the same results up to
rounding:

- Batch norm is folded into the preceding convolution's weight and bias
  (`torch.nn.utils.fusion.fuse_conv_bn_weights`).
- On the CPU the convolution and its ReLU run as one oneDNN call,
  `torch.ops.mkldnn._convolution_pointwise`. Elsewhere, or when that kernel is missing,
  `conv2d` runs and then an in-place ReLU.
- A U-Net decoder's first convolution over ``cat([up, skip])`` is split by input channels
  into ``conv(up, W_up) + conv(skip, W_skip)``. The sum is fused into the second call.
- Weights are stored once in the compute dtype and channels-last layout, so no autocast
  cast runs per batch.
- 2x2 max pooling is the maximum of strided views, rows first. `max_pool2d` also writes
  int64 indices, and took about four times as long on the U-Net's first level.

The copies contain no training state and expect inputs already in their dtype and layout
(`FusedNetwork.prepare_input`). `flop_reference` keeps the original network, because
`torch.utils.flop_counter` does not count the oneDNN calls.
"""

from __future__ import annotations

import copy
import functools
import logging

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_weights

from .classifier import SliceClassifier
from .unet import UNet2D

logger = logging.getLogger(__name__)

__all__ = ["FusedNetwork", "fuse_for_inference", "onednn_fusion_available"]

_FUSED_DTYPES = (torch.float32, torch.bfloat16)


def _onednn_ops():
    """Return the (unary, binary) oneDNN fused convolution ops, or None if torch has none."""
    try:
        unary = torch.ops.mkldnn._convolution_pointwise
        return unary.default, unary.binary
    except (AttributeError, RuntimeError):
        return None


@functools.lru_cache(maxsize=None)
def onednn_fusion_available(dtype: torch.dtype) -> bool:
    """Return True when a fused oneDNN conv+ReLU runs and matches conv2d on this CPU in `dtype`.

    The probe runs once per dtype and process.
    """
    ops = _onednn_ops()
    if ops is None or dtype not in _FUSED_DTYPES or not torch.backends.mkldnn.is_available():
        return False
    generator = torch.Generator().manual_seed(0)
    probe = torch.rand(1, 4, 8, 8, generator=generator).to(dtype)
    probe = probe.contiguous(memory_format=torch.channels_last)
    weight = torch.randn(4, 4, 3, 3, generator=generator).to(dtype)
    weight = weight.contiguous(memory_format=torch.channels_last)
    try:
        with torch.inference_mode():
            fused = ops[0](probe, weight, None, [1, 1], [1, 1], [1, 1], 1, "relu", [], "")
            expected = F.relu(F.conv2d(probe, weight, padding=1))
    except RuntimeError as err:
        logger.info("oneDNN fused convolution failed in %s (%s), so conv2d and ReLU run "
                    "separately.", dtype, err)
        return False
    return bool(torch.allclose(fused.float(), expected.float(), rtol=0.02, atol=0.05))


def _folded(conv: nn.Conv2d, norm: nn.BatchNorm2d) -> tuple[torch.Tensor, torch.Tensor]:
    """Return the weight and bias of `conv` followed by `norm` in evaluation mode."""
    weight, bias = fuse_conv_bn_weights(conv.weight, conv.bias, norm.running_mean,
                                        norm.running_var, norm.eps, norm.weight, norm.bias)
    return weight.detach(), bias.detach()


def _frozen(tensor: torch.Tensor, dtype: torch.dtype, device: torch.device) -> nn.Parameter:
    """Return `tensor` as a frozen parameter in `dtype` on `device`, channels-last if 4-D."""
    tensor = tensor.detach().to(device=device, dtype=dtype)
    if tensor.dim() == 4:
        tensor = tensor.contiguous(memory_format=torch.channels_last)
    return nn.Parameter(tensor, requires_grad=False)


class _ConvReLU(nn.Module):
    """A 2-D convolution with an optional ReLU. `forward(x, residual)` adds `residual` first.

    `weight` and `bias` may differ from those of `like`, because they are folded or split.
    Stride, padding, dilation and groups come from `like`.
    """

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, like: nn.Conv2d,
                 relu: bool, dtype: torch.dtype, device: torch.device, use_onednn: bool) -> None:
        super().__init__()
        self.weight = _frozen(weight, dtype, device)
        self.bias = None if bias is None else _frozen(bias, dtype, device)
        self.geometry = (list(like.padding), list(like.stride), list(like.dilation), like.groups)
        self.relu = relu
        self._ops = _onednn_ops() if use_onednn else None

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        if residual is not None and not self.relu:
            raise ValueError("A residual was passed to a convolution without ReLU; pass it "
                             "only to a convolution followed by ReLU.")
        if self._ops is not None and x.device.type == "cpu":
            unary, binary = self._ops
            if residual is None:
                activation = "relu" if self.relu else "none"
                return unary(x, self.weight, self.bias, *self.geometry, activation, [], "")
            return binary(x, residual, self.weight, self.bias, *self.geometry, "add", None,
                          "relu", [], "")
        # NOTE: this path has run only on the CPU, in tests. The CUDA float16 path it also
        # serves has not been run on a GPU.
        padding, stride, dilation, groups = self.geometry
        y = F.conv2d(x, self.weight, self.bias, stride, padding, dilation, groups)
        if residual is not None:
            y = y.add_(residual)
        return y.relu_() if self.relu else y


class _MaxPool2x2(nn.Module):
    """2x2 max pooling with stride 2 (odd rows or columns dropped, as `MaxPool2d(2)` does)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        height, width = x.shape[-2] // 2 * 2, x.shape[-1] // 2 * 2
        x = x[..., :height, :width]
        # Rows first: in channels-last layout a row is one contiguous block, so the first
        # maximum reads whole blocks and halves the data before the strided column step.
        # This ran in two thirds of the time of four strided views in bf16.
        rows = torch.maximum(x[..., 0::2, :], x[..., 1::2, :])
        return torch.maximum(rows[..., 0::2], rows[..., 1::2])


def _as_pair(value) -> tuple:
    """Return a pooling setting as a (height, width) pair."""
    if isinstance(value, (tuple, list)):
        return tuple(value)
    return (value, value)


def _is_2x2_max_pool(module: nn.Module) -> bool:
    """Return True for `MaxPool2d(2)`: 2x2 window, stride 2, no padding, no indices."""
    if not isinstance(module, nn.MaxPool2d):
        return False
    return (_as_pair(module.kernel_size) == (2, 2) and _as_pair(module.stride) == (2, 2)
            and _as_pair(module.padding) == (0, 0) and _as_pair(module.dilation) == (1, 1)
            and not module.ceil_mode and not module.return_indices)


def _fuse_sequential(block: nn.Sequential, dtype, device, use_onednn) -> nn.Sequential:
    """Replace each Conv2d[-BatchNorm2d][-ReLU] run of `block` by one `_ConvReLU`."""
    layers = list(block)
    fused: list[nn.Module] = []
    index = 0
    while index < len(layers):
        layer = layers[index]
        index += 1
        if _is_2x2_max_pool(layer):
            fused.append(_MaxPool2x2())
            continue
        if not isinstance(layer, nn.Conv2d):
            fused.append(_cast(layer, dtype, device))
            continue
        weight, bias = layer.weight, layer.bias
        if index < len(layers) and isinstance(layers[index], nn.BatchNorm2d):
            weight, bias = _folded(layer, layers[index])
            index += 1
        relu = index < len(layers) and isinstance(layers[index], nn.ReLU)
        if relu:
            index += 1
        fused.append(_ConvReLU(weight, bias, layer, relu, dtype, device, use_onednn))
    return nn.Sequential(*fused)


def _cast(module: nn.Module, dtype, device) -> nn.Module:
    """Return a copy of `module` in `dtype` on `device`."""
    if isinstance(module, nn.BatchNorm2d):
        raise ValueError("A BatchNorm2d without a preceding Conv2d cannot be folded; only "
                         "UNet2D and SliceClassifier layouts are supported.")
    return copy.deepcopy(module).to(device=device, dtype=dtype)


class FusedNetwork(nn.Module):
    """Base class of the fused copies.

    Attributes:
        network_name: class name of the source network (for logs and benchmarks).
        dtype: compute dtype of weights and inputs.
        flop_reference: the source network, for FLOP counting; not a submodule, and not
            copied, so the fused copy costs no second set of float32 weights.
    """

    def __init__(self, source: nn.Module, dtype: torch.dtype) -> None:
        super().__init__()
        self.network_name = type(source).__name__
        self.dtype = dtype
        object.__setattr__(self, "flop_reference", source)

    def prepare_input(self, images: torch.Tensor) -> torch.Tensor:
        """Cast float32 images to the compute dtype and channels-last layout."""
        return images.to(self.dtype).contiguous(memory_format=torch.channels_last)


class FusedUNet2D(FusedNetwork):
    """`UNet2D` with folded batch norm, fused ReLU and split skip convolutions."""

    def __init__(self, source: UNet2D, dtype, device, use_onednn: bool) -> None:
        super().__init__(source, dtype)
        self.encoders = nn.ModuleList(
            _fuse_sequential(encoder, dtype, device, use_onednn) for encoder in source.encoders)
        self.pool = _MaxPool2x2() if _is_2x2_max_pool(source.pool) else source.pool
        self.upsamplers = nn.ModuleList(
            _cast(upsampler, dtype, device).to(memory_format=torch.channels_last)
            for upsampler in source.upsamplers)
        self.skip_convs = nn.ModuleList()
        self.up_convs = nn.ModuleList()
        self.second_convs = nn.ModuleList()
        for decoder in source.decoders:
            first = decoder[0]
            weight, bias = _folded(first, decoder[1])
            # UNet2D concatenates [upsampled, skip], so the first half of the input
            # channels belongs to the upsampled tensor.
            up_channels = first.in_channels // 2
            self.up_convs.append(_ConvReLU(weight[:, :up_channels], bias, first,
                                           True, dtype, device, use_onednn))
            self.skip_convs.append(_ConvReLU(weight[:, up_channels:], None, first,
                                             False, dtype, device, use_onednn))
            self.second_convs.append(_fuse_sequential(decoder[3:], dtype, device, use_onednn))
        self.head = _ConvReLU(source.head.weight, source.head.bias, source.head, False, dtype,
                              device, use_onednn)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.flop_reference.check_input_size(x)
        skips = []
        for level, encoder in enumerate(self.encoders):
            if level > 0:
                x = self.pool(x)
            x = encoder(x)
            skips.append(x)
        skips.pop()
        for upsample, up_conv, skip_conv, second in zip(
                self.upsamplers, self.up_convs, self.skip_convs, self.second_convs):
            x = upsample(x)
            x = second(up_conv(x, residual=skip_conv(skips.pop())))
        return self.head(x)


class FusedSliceClassifier(FusedNetwork):
    """`SliceClassifier` with folded batch norm and fused ReLU."""

    def __init__(self, source: SliceClassifier, dtype, device, use_onednn: bool) -> None:
        super().__init__(source, dtype)
        self.features = _fuse_sequential(source.features, dtype, device, use_onednn)
        self.avgpool = source.avgpool
        self.classifier = _cast(source.classifier, dtype, device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.avgpool(self.features(x)))


def fuse_for_inference(model: nn.Module, dtype: torch.dtype,
                       device: torch.device | str = "cpu") -> FusedNetwork:
    """Return an inference-only copy of a `UNet2D` or `SliceClassifier` in `dtype` on `device`.

    The source model is not changed and is kept as `flop_reference`. It must be in
    evaluation mode, with batch-norm running statistics from training.

    Raises:
        TypeError: `model` is neither network.
        ValueError: `model` is in training mode.
    """
    device = torch.device(device)
    if model.training:
        raise ValueError(f"{type(model).__name__} is in training mode. Call .eval() first, "
                         "so that batch norm uses its running statistics.")
    source = model
    use_onednn = device.type == "cpu" and onednn_fusion_available(dtype)
    if isinstance(source, UNet2D):
        fused: FusedNetwork = FusedUNet2D(source, dtype, device, use_onednn)
    elif isinstance(source, SliceClassifier):
        fused = FusedSliceClassifier(source, dtype, device, use_onednn)
    else:
        raise TypeError(f"Cannot fuse a {type(model).__name__}: expected a UNet2D or a "
                        "SliceClassifier.")
    logger.debug("Fused %s for inference in %s on %s (oneDNN: %s)",
                 fused.network_name, dtype, device, use_onednn)
    return fused.eval()
