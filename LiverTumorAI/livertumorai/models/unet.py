"""2-D U-Net for liver and liver-tumor segmentation of axial slices.

Input: (batch, context, height, width) float32, adjacent axial slices (2.5-D context)
windowed to [0, 1]; height and width divisible by 2 ** (len(features) - 1).
Output: (batch, num_classes, height, width) logits, classes 0 background, 1 liver, 2 tumor.

The layout follows Ronneberger et al. (arXiv 1505.04597): two 3x3 convolutions per level,
max pooling down, transposed convolution up, skip connections by concatenation.

Deviations:
- padded convolutions, so the output size equals the input size;
- batch normalisation after each convolution;
- configurable widths. The default has five levels of 16 to 256 channels instead of 64 to
  1024: about 1.9 M parameters and 3.4 GFLOP per 192x192 slice. A four-level 32-to-256
  variant costs 10.4 GFLOP per slice and trained about 2.5 times slower on the 2-core CPU
  the bundled weights were trained on.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

__all__ = ["UNet2D"]


def _double_conv(in_channels: int, out_channels: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, kernel_size=3, padding=1, bias=False),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(inplace=True),
        nn.Conv2d(out_channels, out_channels, kernel_size=3, padding=1, bias=False),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(inplace=True),
    )


class UNet2D(nn.Module):
    """U-Net with `len(features)` resolution levels.

    Args:
        in_channels: number of context slices (2 * context_slices + 1).
        num_classes: number of output classes (3).
        features: channels at each level, from full resolution to the bottleneck.
    """

    def __init__(
        self,
        in_channels: int = 5,
        num_classes: int = 3,
        features: Sequence[int] = (16, 32, 64, 128, 256),
    ) -> None:
        super().__init__()
        features = [int(f) for f in features]
        if len(features) < 2:
            raise ValueError(f"features={features} needs at least two levels")
        self.downsampling_factor = 2 ** (len(features) - 1)
        self.encoders = nn.ModuleList()
        channels = in_channels
        for width in features:
            self.encoders.append(_double_conv(channels, width))
            channels = width
        self.pool = nn.MaxPool2d(2)
        self.upsamplers = nn.ModuleList()
        self.decoders = nn.ModuleList()
        for width in reversed(features[:-1]):
            self.upsamplers.append(nn.ConvTranspose2d(channels, width, kernel_size=2, stride=2))
            self.decoders.append(_double_conv(2 * width, width))
            channels = width
        self.head = nn.Conv2d(channels, num_classes, kernel_size=1)

    def check_input_size(self, x: torch.Tensor) -> None:
        """Raise ValueError unless height and width are divisible by the downsampling factor."""
        if x.shape[-1] % self.downsampling_factor or x.shape[-2] % self.downsampling_factor:
            raise ValueError(
                f"input size {tuple(x.shape[-2:])} must be divisible by "
                f"{self.downsampling_factor}; change input_size in the manifest"
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.check_input_size(x)
        skips = []
        for level, encoder in enumerate(self.encoders):
            if level > 0:
                x = self.pool(x)
            x = encoder(x)
            skips.append(x)
        skips.pop()  # the bottleneck output is x itself
        for upsample, decoder in zip(self.upsamplers, self.decoders):
            x = upsample(x)
            x = decoder(torch.cat([x, skips.pop()], dim=1))
        return self.head(x)
