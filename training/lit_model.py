"""LightningModules that train the engine's networks, and loading of trained networks.

The networks themselves come from `livertumorai.models.build_model`, so a checkpoint contains
exactly the module the engine runs. Each module records its architecture and preprocessing
blocks with `save_hyperparameters`, which is what export.py writes into the manifest.

Metric keys: `train/loss`, `val/loss`; classification `val/accuracy`,
`val/balanced_accuracy`, `val/auroc_<class>`; segmentation `train/dice_loss`,
`val/dice_liver`, `val/dice_tumor`, `val/dice_mean`.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import lightning as L
import torch
import torch.nn.functional as F
from torch import nn
from torchmetrics import Metric
from torchmetrics.classification import MulticlassAccuracy, MulticlassAUROC

from livertumorai.constants import LABEL_LIVER, LABEL_TUMOR, SLICE_CLASS_NAMES
from livertumorai.models import build_model
from livertumorai.weights import Preprocessing, load_manifest, load_model

logger = logging.getLogger(__name__)

__all__ = [
    "DEFAULT_ARCHITECTURES",
    "DEFAULT_PREPROCESSING",
    "ClassificationModule",
    "SegmentationModule",
    "GlobalDice",
    "soft_dice_loss",
    "module_class_for_task",
    "load_network",
]

# Engine defaults: the classifier is a VGG16-BN at a quarter of the width on three context
# slices, the U-Net has four levels on five context slices.
DEFAULT_ARCHITECTURES = {
    "classification": {"name": "vgg16_bn", "in_channels": 3, "num_classes": 3,
                       "width_divisor": 4},
    "segmentation": {"name": "unet2d", "in_channels": 5, "num_classes": 3,
                     "features": [16, 32, 64, 128, 256]},
}
DEFAULT_PREPROCESSING = {
    "classification": Preprocessing(40.0, 400.0, 3.0, (128, 128), 1, 3.0),
    "segmentation": Preprocessing(40.0, 400.0, 2.0, (192, 192), 2, 3.0),
}
SEGMENTATION_CLASS_NAMES = ("background", "liver", "tumor")
_DICE_SMOOTH = 1.0  # added to numerator and denominator of the soft Dice (voxels)


class _TrainingModule(L.LightningModule):
    """Shared optimiser, schedule and network construction."""

    task = ""

    def __init__(self, architecture: Mapping, preprocessing: Mapping, learning_rate: float,
                 weight_decay: float, warmup_fraction: float) -> None:
        super().__init__()
        self.model = build_model(dict(architecture))
        self.preprocessing = Preprocessing.from_dict(preprocessing, "hyperparameters")
        if self.preprocessing.in_channels != architecture.get("in_channels"):
            raise ValueError(
                f"context_slices={self.preprocessing.context_slices} gives "
                f"{self.preprocessing.in_channels} channels, but the architecture takes "
                f"in_channels={architecture.get('in_channels')}; make them agree"
            )

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.model(images)

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["livertumorai_task"] = self.task

    def configure_optimizers(self):
        """Adam with a linear warm-up and a cosine decay to zero over the whole run."""
        optimizer = torch.optim.Adam(self.parameters(), lr=self.hparams.learning_rate,
                                     weight_decay=self.hparams.weight_decay)
        total_steps = self.trainer.estimated_stepping_batches
        if not math.isfinite(total_steps) or total_steps <= 0:
            logger.warning("The number of training steps is unknown: constant learning rate. "
                           "Set --epochs or --max-steps for the cosine schedule.")
            return optimizer
        total_steps = int(total_steps)
        warmup_steps = max(1, int(self.hparams.warmup_fraction * total_steps))

        def factor(step: int) -> float:
            if step < warmup_steps:
                return (step + 1) / warmup_steps
            progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
            return 0.5 * (1.0 + math.cos(math.pi * progress))

        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
        return {"optimizer": optimizer,
                "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


class ClassificationModule(_TrainingModule):
    """Slice classifier (VGG16-BN): cross-entropy, accuracy and one-vs-rest AUROC per class.

    Args:
        architecture: manifest architecture block (see ``DEFAULT_ARCHITECTURES``).
        preprocessing: manifest preprocessing block, as a dict.
        learning_rate: peak Adam learning rate.
        weight_decay: Adam L2 penalty.
        warmup_fraction: share of the steps with a linear learning-rate warm-up.
        class_weights: optional cross-entropy weight per class (background, tumor, no tumor).
        label_smoothing: cross-entropy label smoothing in [0, 1).
        training_info: data set, case lists and split, stored for export.py.
    """

    task = "classification"

    def __init__(
        self,
        architecture: Mapping | None = None,
        preprocessing: Mapping | None = None,
        learning_rate: float = 1e-3,
        weight_decay: float = 1e-4,
        warmup_fraction: float = 0.05,
        class_weights: Sequence[float] | None = None,
        label_smoothing: float = 0.0,
        training_info: Mapping | None = None,
    ) -> None:
        architecture = dict(architecture or DEFAULT_ARCHITECTURES[self.task])
        preprocessing = dict(preprocessing or DEFAULT_PREPROCESSING[self.task].to_dict())
        super().__init__(architecture, preprocessing, learning_rate, weight_decay,
                         warmup_fraction)
        # Records the resolved architecture and preprocessing dicts (frame locals).
        self.save_hyperparameters()
        num_classes = len(SLICE_CLASS_NAMES)
        weight = None if class_weights is None else torch.tensor(class_weights, dtype=torch.float32)
        self.register_buffer("class_weights", weight, persistent=False)
        self.val_accuracy = MulticlassAccuracy(num_classes=num_classes, average="micro")
        self.val_balanced_accuracy = MulticlassAccuracy(num_classes=num_classes, average="macro")
        self.val_auroc = MulticlassAUROC(num_classes=num_classes, average=None)

    def _loss(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(logits.float(), targets, weight=self.class_weights,
                               label_smoothing=self.hparams.label_smoothing)

    def training_step(self, batch, batch_idx: int) -> torch.Tensor:
        images, targets = batch
        loss = self._loss(self(images), targets)
        self.log("train/loss", loss, on_step=True, on_epoch=True, prog_bar=True,
                 batch_size=len(targets))
        return loss

    def validation_step(self, batch, batch_idx: int) -> None:
        images, targets = batch
        logits = self(images).float()
        self.log("val/loss", self._loss(logits, targets), on_epoch=True, prog_bar=True,
                 batch_size=len(targets), sync_dist=True)
        probabilities = torch.softmax(logits, dim=1)
        self.val_accuracy.update(probabilities, targets)
        self.val_balanced_accuracy.update(probabilities, targets)
        self.val_auroc.update(probabilities, targets)

    def on_validation_epoch_end(self) -> None:
        self.log("val/accuracy", self.val_accuracy.compute(), prog_bar=True)
        self.log("val/balanced_accuracy", self.val_balanced_accuracy.compute())
        # AUROC of a class absent from the validation slices is undefined. Torchmetrics 1.9
        # then logs 0 with a warning, so read it together with the class counts.
        for name, value in zip(SLICE_CLASS_NAMES, self.val_auroc.compute()):
            self.log(f"val/auroc_{name.replace(' ', '_')}", value)
        for metric in (self.val_accuracy, self.val_balanced_accuracy, self.val_auroc):
            metric.reset()


class GlobalDice(Metric):
    """Dice per class over every voxel seen since the last reset.

    Dice = 2 |P & R| / (|P| + |R|) with intersections and sizes summed over all slices
    (and processes) before the ratio, so slices without the class add only false
    positives. A class absent from both prediction and reference gets Dice 1.
    """

    full_state_update = False

    def __init__(self, num_classes: int) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.add_state("intersection", torch.zeros(num_classes, dtype=torch.float64),
                       dist_reduce_fx="sum")
        self.add_state("total", torch.zeros(num_classes, dtype=torch.float64),
                       dist_reduce_fx="sum")

    def update(self, predicted: torch.Tensor, reference: torch.Tensor) -> None:
        """Add label maps predicted and reference, both (batch, H, W) integer."""
        for k in range(self.num_classes):
            p = predicted == k
            r = reference == k
            self.intersection[k] += (p & r).sum()
            self.total[k] += p.sum() + r.sum()

    def compute(self) -> torch.Tensor:
        empty = self.total == 0
        dice = 2 * self.intersection / self.total.clamp(min=1)
        return torch.where(empty, torch.ones_like(dice), dice).float()


def soft_dice_loss(logits: torch.Tensor, targets: torch.Tensor,
                   classes: Sequence[int] = (LABEL_LIVER, LABEL_TUMOR)) -> torch.Tensor:
    """Return 1 - mean soft Dice over `classes`, pooled over the batch ("batch Dice").

    Soft Dice of class k = (2 sum(p_k * r_k) + s) / (sum(p_k) + sum(r_k) + s), with p_k the
    softmax probability, r_k the one-hot reference and s = 1 voxel. Pooling over the
    batch keeps the tumor term defined when most slices contain no tumor.

    Args:
        logits: (batch, classes, H, W).
        targets: (batch, H, W) int64 labels.
    """
    probabilities = torch.softmax(logits.float(), dim=1)
    losses = []
    for k in classes:
        p = probabilities[:, k]
        r = (targets == k).float()
        intersection = (p * r).sum()
        losses.append(1.0 - (2.0 * intersection + _DICE_SMOOTH)
                      / (p.sum() + r.sum() + _DICE_SMOOTH))
    return torch.stack(losses).mean()


class SegmentationModule(_TrainingModule):
    """U-Net for liver and tumor: cross-entropy plus soft Dice loss, global Dice per class.

    Args:
        architecture: manifest architecture block (see ``DEFAULT_ARCHITECTURES``).
        preprocessing: manifest preprocessing block, as a dict.
        learning_rate: peak Adam learning rate.
        weight_decay: Adam L2 penalty.
        warmup_fraction: share of the steps with a linear learning-rate warm-up.
        dice_weight: weight of the soft Dice term (cross-entropy has weight 1).
        training_info: data set, case lists and split, stored for export.py.
    """

    task = "segmentation"

    def __init__(
        self,
        architecture: Mapping | None = None,
        preprocessing: Mapping | None = None,
        learning_rate: float = 1e-3,
        weight_decay: float = 1e-5,
        warmup_fraction: float = 0.05,
        dice_weight: float = 1.0,
        training_info: Mapping | None = None,
    ) -> None:
        architecture = dict(architecture or DEFAULT_ARCHITECTURES[self.task])
        preprocessing = dict(preprocessing or DEFAULT_PREPROCESSING[self.task].to_dict())
        super().__init__(architecture, preprocessing, learning_rate, weight_decay,
                         warmup_fraction)
        # Records the resolved architecture and preprocessing dicts (frame locals).
        self.save_hyperparameters()
        self.val_dice = GlobalDice(num_classes=len(SEGMENTATION_CLASS_NAMES))

    def _losses(self, logits: torch.Tensor, targets: torch.Tensor):
        cross_entropy = F.cross_entropy(logits.float(), targets)
        dice = soft_dice_loss(logits, targets)
        return cross_entropy + self.hparams.dice_weight * dice, cross_entropy, dice

    def training_step(self, batch, batch_idx: int) -> torch.Tensor:
        images, targets = batch
        loss, cross_entropy, dice = self._losses(self(images), targets)
        size = len(targets)
        self.log("train/loss", loss, on_step=True, on_epoch=True, prog_bar=True, batch_size=size)
        self.log("train/ce_loss", cross_entropy, on_step=True, on_epoch=True, batch_size=size)
        self.log("train/dice_loss", dice, on_step=True, on_epoch=True, batch_size=size)
        return loss

    def validation_step(self, batch, batch_idx: int) -> None:
        images, targets = batch
        logits = self(images).float()
        loss, _, _ = self._losses(logits, targets)
        self.log("val/loss", loss, on_epoch=True, prog_bar=True, batch_size=len(targets),
                 sync_dist=True)
        self.val_dice.update(logits.argmax(dim=1), targets)

    def on_validation_epoch_end(self) -> None:
        dice = self.val_dice.compute()
        self.log("val/dice_liver", dice[LABEL_LIVER], prog_bar=True)
        self.log("val/dice_tumor", dice[LABEL_TUMOR], prog_bar=True)
        self.log("val/dice_mean", (dice[LABEL_LIVER] + dice[LABEL_TUMOR]) / 2)
        self.val_dice.reset()


def module_class_for_task(task: str) -> type[_TrainingModule]:
    """Return the LightningModule class of 'classification' or 'segmentation'."""
    modules = {"classification": ClassificationModule, "segmentation": SegmentationModule}
    if task not in modules:
        raise ValueError(f"task {task!r} is not one of {sorted(modules)}")
    return modules[task]


def load_network(path: str | os.PathLike, task: str) -> tuple[nn.Module, Preprocessing, str]:
    """Load a trained network from a Lightning checkpoint or an exported manifest.

    Args:
        path: a `.ckpt` file, or a `manifest.json` (or its folder) written by export.py.
        task: 'classification' or 'segmentation'; picks the manifest entry.

    Returns:
        (network in eval mode on the CPU, its preprocessing, a description for logs).
    """
    path = Path(path)
    if path.suffix == ".ckpt":
        module = module_class_for_task(task).load_from_checkpoint(path, map_location="cpu")
        return module.model.eval(), module.preprocessing, f"checkpoint {path}"
    entry = load_manifest(path).model_for(task)
    return load_model(entry, "cpu"), entry.preprocessing, f"{entry.name} {entry.version}"
