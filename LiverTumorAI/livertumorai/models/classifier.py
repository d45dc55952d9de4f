"""Per-slice classifier: VGG16 (with batch normalisation) in torchvision's layer layout.

Input: (batch, 3, height, width) float32, three adjacent axial slices windowed to [0, 1].
Output: (batch, 3) logits in the class order of `livertumorai.constants`
(0 background, 1 tumor, 2 no tumor); softmax gives the probabilities.

Deviations from the textbook VGG16 (Simonyan and Zisserman, arXiv 1409.1556), and why:
- Channel widths are divided by `width_divisor` (default 4: 16-32-64-128-128 instead of
  64-128-256-512-512). The full width costs about 15.5 GMAC per 224x224 slice and 138 M
  parameters, while the bundled weights must stay under 60 MB and a CT has hundreds of slices.
- Batch normalisation after every convolution (torchvision's `vgg16_bn` layout), because the
  network is trained from scratch on few cases.
- The three 4096-wide fully connected layers are replaced by global average pooling, dropout
  and one linear layer: they hold 90 % of VGG16's parameters and need a fixed 224x224 input.
The 13 convolutions and 5 max-pooling stages keep torchvision's order and module names
(`features`, `avgpool`, `classifier`), so `features.N` parameter names match
`torchvision.models.vgg16_bn`. The layers are built here rather than with torchvision's
`make_layers` because importing `torchvision.models` costs about a second per process.
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["SliceClassifier", "VGG16_LAYERS"]

# Output channels of the 13 convolutions, "M" for 2x2 max pooling (configuration "D" of
# Simonyan and Zisserman, table 1).
VGG16_LAYERS = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M",
                512, 512, 512, "M")


def _vgg_features(config, in_channels: int) -> nn.Sequential:
    """Build conv-BN-ReLU layers and max pooling in torchvision's `vgg16_bn` order."""
    layers: list[nn.Module] = []
    channels = in_channels
    for item in config:
        if item == "M":
            layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
            continue
        layers += [nn.Conv2d(channels, item, kernel_size=3, padding=1),
                   nn.BatchNorm2d(item), nn.ReLU(inplace=True)]
        channels = item
    return nn.Sequential(*layers)


class SliceClassifier(nn.Module):
    """VGG16-BN feature extractor with a pooled linear head.

    Args:
        in_channels: number of context slices; VGG's first layer takes 3.
        num_classes: number of output classes (3).
        width_divisor: divides every convolution's channel count (1 is textbook VGG16).
        dropout: dropout probability before the linear layer.
    """

    def __init__(
        self,
        in_channels: int = 3,
        num_classes: int = 3,
        width_divisor: int = 4,
        dropout: float = 0.3,
    ) -> None:
        super().__init__()
        if in_channels != 3:
            raise ValueError(
                f"in_channels={in_channels}: the VGG16 layout takes 3 input channels; "
                "set context_slices to 1 (one slice on each side) for the classifier"
            )
        if width_divisor < 1:
            raise ValueError(f"width_divisor={width_divisor} must be a positive integer")
        config = [v if v == "M" else int(v) // width_divisor for v in VGG16_LAYERS]
        self.features = _vgg_features(config, in_channels)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Sequential(
            nn.Flatten(1),
            nn.Dropout(p=dropout),
            nn.Linear(config[-2], num_classes),
        )
        self._init_weights()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.features(x)
        x = self.avgpool(x)
        return self.classifier(x)

    def _init_weights(self) -> None:
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
                nn.init.zeros_(module.bias)
            elif isinstance(module, nn.BatchNorm2d):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)
            elif isinstance(module, nn.Linear):
                nn.init.normal_(module.weight, 0, 0.01)
                nn.init.zeros_(module.bias)
