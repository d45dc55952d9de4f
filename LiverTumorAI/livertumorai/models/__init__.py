"""Network definitions shared by inference and training.

`build_model` turns the `architecture` block of a weights-manifest entry into a module, so
the manifest alone decides which network a weights file belongs to.
"""

from __future__ import annotations

from collections.abc import Mapping

from torch import nn

from .classifier import SliceClassifier
from .unet import UNet2D

__all__ = ["SliceClassifier", "UNet2D", "build_model", "ARCHITECTURES"]

ARCHITECTURES = {
    "vgg16_bn": SliceClassifier,
    "unet2d": UNet2D,
}


def build_model(architecture: Mapping[str, object]) -> nn.Module:
    """Build an untrained network from a manifest `architecture` block.

    Args:
        architecture: mapping with `name` (one of ``ARCHITECTURES``) and the keyword
            arguments of that network's constructor.

    Raises:
        ValueError: the name is unknown or an argument does not fit the constructor.
    """
    params = dict(architecture)
    name = params.pop("name", None)
    if name not in ARCHITECTURES:
        raise ValueError(
            f"unknown architecture {name!r}; expected one of {sorted(ARCHITECTURES)}"
        )
    try:
        return ARCHITECTURES[name](**params)
    except TypeError as err:
        raise ValueError(f"invalid parameters for architecture {name!r}: {err}") from err
