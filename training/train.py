"""Train the slice classifier or the liver and tumor U-Net with PyTorch Lightning.

Example (CPU, the shared cases)::

    python training/train.py --task segmentation --data-dir ../shared/data/train \\
        --output-dir runs/unet --epochs 20 --batch-size 8

Writes into --output-dir: `split.json` (the case split, reusable with --split-file),
`run.json` (the command-line options), `checkpoints/best-*.ckpt` and `checkpoints/last.ckpt`,
`csv/` metrics and, when TensorBoard is installed, `tensorboard/` event files.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import lightning as L
from lightning.pytorch.callbacks import LearningRateMonitor, ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.utilities import rank_zero_only

from livertumorai.weights import Preprocessing
from training.dataset import LAYOUTS, TASKS, LiverSliceDataModule, write_split
from training.synthetic_tumors import SyntheticTumorConfig
from training.lit_model import (
    DEFAULT_ARCHITECTURES,
    DEFAULT_PREPROCESSING,
    ClassificationModule,
    SegmentationModule,
)

logger = logging.getLogger("training.train")

# Checkpoint selection: the U-Net by mean Dice of liver and tumor, the classifier by
# balanced accuracy (slice classes are imbalanced, background slices dominate).
MONITORED_METRIC = {"segmentation": ("val/dice_mean", "max"),
                    "classification": ("val/balanced_accuracy", "max")}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="Train the LiverTumorAI slice classifier (VGG16-BN) or liver and tumor "
                    "U-Net on labelled CT. Preprocessing defaults are the engine's.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    data = parser.add_argument_group("data")
    data.add_argument("--task", choices=TASKS, required=True, help="network to train")
    data.add_argument("--data-dir", nargs="+", required=True,
                      help="data folder(s); cases of several folders are pooled")
    data.add_argument("--layout", choices=LAYOUTS, default="auto",
                      help="folders: <case>/ct.* and label.*; lits: volume-N/segmentation-N; "
                           "msd: imagesTr, labelsTr and dataset.json")
    data.add_argument("--cache-dir", default="training_cache",
                      help="folder of the preprocessed slice cache (reused across runs)")
    data.add_argument("--split-file", help="reuse the split in this JSON file (from split.json)")
    data.add_argument("--val-fraction", type=float, default=0.2,
                      help="share of patients drawn for validation")
    data.add_argument("--val-cases", nargs="*", default=[],
                      help="validation case ids (replaces the random draw)")
    data.add_argument("--exclude", nargs="*", default=[], help="case ids to leave out")
    data.add_argument("--patient-pattern",
                      help="regular expression whose first group in a case id is the patient id "
                           "(default: one patient per case)")
    data.add_argument("--max-cases", type=int,
                      help="use only the first N training and validation cases (smoke runs)")
    data.add_argument("--num-workers", type=int, default=0, help="DataLoader worker processes")
    data.add_argument("--no-augment", action="store_true", help="switch augmentation off")
    data.add_argument("--no-balance", action="store_true",
                      help="classification: draw slices uniformly instead of class-balanced")
    data.add_argument("--seg-margin-mm", type=float, default=10.0,
                      help="segmentation: train on liver slices plus this margin on each side")
    data.add_argument("--seg-background-fraction", type=float, default=0.1,
                      help="segmentation: share of the remaining (liver-free) slices added")

    prep = parser.add_argument_group("preprocessing (written into the manifest at export)")
    prep.add_argument("--window-center-hu", type=float, help="HU window centre (default 40)")
    prep.add_argument("--window-width-hu", type=float, help="HU window width (default 400)")
    prep.add_argument("--spacing-mm", type=float,
                      help="in-plane pixel size (default 3.0 classification, 2.0 segmentation)")
    prep.add_argument("--image-size", type=int, nargs="+",
                      help="input height [width] in pixels (default 128 classification, "
                           "192 segmentation)")
    prep.add_argument("--context-slices", type=int,
                      help="context slices on each side (default 1 classification, "
                           "2 segmentation; the classifier takes exactly 1)")
    prep.add_argument("--context-step-mm", type=float,
                      help="distance between context slices in mm (default 3.0)")

    synthesis = parser.add_argument_group("synthetic tumors")
    synthesis.add_argument("--synthetic-tumors", type=float, default=0.0, metavar="P",
                           help="probability (0-1) that a training slice with liver gets "
                                "synthetic tumors inserted; 0 switches synthesis off")
    synthesis.add_argument("--synthetic-diameter-mm", type=float, nargs=2,
                           metavar=("MIN", "MAX"),
                           help="range of synthetic lesion diameters in mm (default 5 60)")
    synthesis.add_argument("--synthetic-count", type=int, nargs=2, metavar=("MIN", "MAX"),
                           help="synthetic lesions per slice (default 1 3)")
    synthesis.add_argument("--synthetic-max-outside-fraction", type=float, metavar="F",
                           help="largest share (0-1) of a lesion's core that may lie outside "
                                "the liver and is cut off there (default 0.3)")

    model = parser.add_argument_group("model and optimisation")
    model.add_argument("--features", type=int, nargs="+",
                       help="U-Net channels per level (default 16 32 64 128 256)")
    model.add_argument("--width-divisor", type=int,
                       help="VGG16 channel divisor (default 4; 1 is textbook VGG16)")
    model.add_argument("--lr", type=float, default=1e-3, help="peak Adam learning rate")
    model.add_argument("--weight-decay", type=float, default=1e-5, help="Adam weight decay")
    model.add_argument("--warmup-fraction", type=float, default=0.05,
                       help="share of steps with linear learning-rate warm-up before cosine decay")
    model.add_argument("--class-weights", type=float, nargs=3,
                       help="classification: cross-entropy weights of background, tumor, no tumor")
    model.add_argument("--dice-weight", type=float, default=1.0,
                       help="segmentation: weight of the soft Dice loss next to cross-entropy")

    run = parser.add_argument_group("run")
    run.add_argument("--output-dir", default=None,
                     help="run folder (default runs/<task>)")
    run.add_argument("--epochs", type=int, default=50, help="maximum number of epochs")
    run.add_argument("--max-steps", type=int, default=-1,
                     help="maximum optimiser steps (-1: limited by --epochs)")
    run.add_argument("--time-limit-min", type=float,
                     help="stop after this many minutes (checkpoints are still written)")
    run.add_argument("--batch-size", type=int, default=16, help="slices per batch and device")
    run.add_argument("--precision", default="bf16-mixed",
                     help="Lightning precision: 32-true, bf16-mixed (CPUs with AMX or "
                          "AVX512-BF16, recent GPUs) or 16-mixed (GPU)")
    run.add_argument("--accelerator", default="auto", help="cpu, gpu or auto")
    run.add_argument("--devices", default="auto",
                     help="number of devices, a list such as 0,1, or auto")
    run.add_argument("--num-nodes", type=int, default=1, help="number of machines")
    run.add_argument("--strategy", default="auto",
                     help="Lightning strategy, for example ddp for several GPUs or nodes")
    run.add_argument("--seed", type=int, default=0, help="seed of the split, sampling and weights")
    run.add_argument("--resume", help="checkpoint to resume from (for example .../last.ckpt)")
    run.add_argument("--limit-train-batches", type=float, default=1.0,
                     help="batches per epoch: a fraction, or a count when above 1")
    run.add_argument("--limit-val-batches", type=float, default=1.0,
                     help="validation batches: a fraction, or a count when above 1")
    run.add_argument("--val-every-n-epochs", type=int, default=1,
                     help="validate every N epochs")
    run.add_argument("--log-every-n-steps", type=int, default=10, help="logging interval in steps")
    return parser


_RECORDED_SETTINGS = ("epochs", "max_steps", "time_limit_min", "batch_size", "lr",
                      "weight_decay", "precision", "no_augment", "dice_weight", "class_weights")


def synthetic_tumor_config_from_args(args: argparse.Namespace) -> SyntheticTumorConfig | None:
    """Return the synthesis configuration, or None when synthesis is off."""
    if not 0.0 <= args.synthetic_tumors <= 1.0:
        raise SystemExit(f"--synthetic-tumors {args.synthetic_tumors} is not a probability in [0, 1]")
    if args.synthetic_tumors == 0.0:
        return None
    overrides = {}
    if args.synthetic_diameter_mm:
        overrides["diameter_range_mm"] = tuple(args.synthetic_diameter_mm)
    if args.synthetic_count:
        overrides["count_range"] = tuple(args.synthetic_count)
    if args.synthetic_max_outside_fraction is not None:
        overrides["max_outside_fraction"] = args.synthetic_max_outside_fraction
    return SyntheticTumorConfig(**overrides)


def preprocessing_from_args(args: argparse.Namespace) -> Preprocessing:
    """Return the engine default preprocessing of the task with the options applied."""
    default = DEFAULT_PREPROCESSING[args.task]
    size = default.input_size
    if args.image_size:
        size = (args.image_size[0], args.image_size[-1])
    return Preprocessing(
        window_center_hu=_pick(args.window_center_hu, default.window_center_hu),
        window_width_hu=_pick(args.window_width_hu, default.window_width_hu),
        in_plane_spacing_mm=_pick(args.spacing_mm, default.in_plane_spacing_mm),
        input_size=tuple(int(v) for v in size),
        context_slices=_pick(args.context_slices, default.context_slices),
        context_step_mm=_pick(args.context_step_mm, default.context_step_mm),
    )


def architecture_from_args(args: argparse.Namespace, preprocessing: Preprocessing) -> dict:
    """Return the task's default architecture with the options applied."""
    architecture = dict(DEFAULT_ARCHITECTURES[args.task])
    architecture["in_channels"] = preprocessing.in_channels
    if args.task == "segmentation" and args.features:
        architecture["features"] = list(args.features)
    if args.task == "classification" and args.width_divisor:
        architecture["width_divisor"] = args.width_divisor
    return architecture


def _pick(value, default):
    return default if value is None else value


def _limit(value: float) -> int | float:
    return int(value) if value > 1 else value


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    output_dir = Path(args.output_dir or Path("runs") / args.task)
    output_dir.mkdir(parents=True, exist_ok=True)
    L.seed_everything(args.seed, workers=True)

    preprocessing = preprocessing_from_args(args)
    architecture = architecture_from_args(args, preprocessing)
    synthetic_config = synthetic_tumor_config_from_args(args)
    datamodule = LiverSliceDataModule(
        data_dirs=args.data_dir, task=args.task, preprocessing=preprocessing,
        layout=args.layout, cache_dir=args.cache_dir, split_file=args.split_file,
        val_fraction=args.val_fraction, seed=args.seed, val_cases=args.val_cases,
        exclude=args.exclude, patient_pattern=args.patient_pattern,
        batch_size=args.batch_size, num_workers=args.num_workers,
        augment=not args.no_augment, balance_classes=not args.no_balance,
        seg_margin_mm=args.seg_margin_mm, seg_background_fraction=args.seg_background_fraction,
        max_cases=args.max_cases,
        slice_transform_probability=args.synthetic_tumors,
        synthetic_tumors=synthetic_config,
    )
    split = datamodule.resolve_split()
    _write_run_files(output_dir, split, args)
    logger.info("Split: %d training cases %s, %d validation cases %s", len(split.train),
                list(split.train), len(split.val), list(split.val))

    training_info = {
        "data_dirs": [str(d) for d in args.data_dir],  # as given: no machine's absolute path
        "layout": args.layout,
        "split": split.to_dict(),
        "seed": args.seed,
        "settings": {key: getattr(args, key) for key in _RECORDED_SETTINGS},
        "synthetic_tumors": (None if synthetic_config is None else {
            "probability": args.synthetic_tumors, "config": synthetic_config.to_dict()}),
    }
    module = _build_module(args, architecture, preprocessing, training_info)
    trainer = _build_trainer(args, output_dir, has_validation=bool(split.val))
    trainer.fit(module, datamodule=datamodule, ckpt_path=args.resume)
    # ModelCheckpoint refreshes last.ckpt only when it validates; a run that stops on
    # --max-steps or --time-limit-min between validations would otherwise lose its tail.
    trainer.save_checkpoint(output_dir / "checkpoints" / "last.ckpt")

    best = trainer.checkpoint_callback.best_model_path if trainer.checkpoint_callback else ""
    logger.info("Best checkpoint: %s", best or "(none: no validation metric)")
    logger.info("Last checkpoint: %s", output_dir / "checkpoints" / "last.ckpt")
    return 0


@rank_zero_only
def _write_run_files(output_dir: Path, split, args: argparse.Namespace) -> None:
    # Every process draws the same split from the seed; only rank 0 writes it.
    write_split(output_dir / "split.json", split)
    (output_dir / "run.json").write_text(json.dumps(vars(args), indent=2) + "\n",
                                         encoding="utf-8")


def _build_module(args, architecture: dict, preprocessing: Preprocessing,
                  training_info: dict):
    common = dict(architecture=architecture, preprocessing=preprocessing.to_dict(),
                  learning_rate=args.lr, weight_decay=args.weight_decay,
                  warmup_fraction=args.warmup_fraction, training_info=training_info)
    if args.task == "classification":
        return ClassificationModule(class_weights=args.class_weights, **common)
    return SegmentationModule(dice_weight=args.dice_weight, **common)


def _build_trainer(args, output_dir: Path, has_validation: bool) -> L.Trainer:
    monitor, mode = MONITORED_METRIC[args.task]
    if not has_validation:
        logger.warning("No validation case: keeping only the last checkpoint.")
    checkpoint = ModelCheckpoint(
        dirpath=output_dir / "checkpoints",
        filename="best-{epoch:03d}-{step:06d}",
        monitor=monitor if has_validation else None,
        mode=mode,
        save_top_k=1,
        save_last=True,
        auto_insert_metric_name=False,
    )
    loggers = [CSVLogger(output_dir, name="csv")]
    try:
        from lightning.pytorch.loggers import TensorBoardLogger
        import tensorboard  # noqa: F401  (TensorBoardLogger needs it to write events)

        loggers.append(TensorBoardLogger(output_dir, name="tensorboard"))
    except ImportError:
        logger.info("TensorBoard is not installed: logging to CSV only.")
    max_time = {"minutes": args.time_limit_min} if args.time_limit_min else None
    return L.Trainer(
        accelerator=args.accelerator,
        devices=args.devices,
        num_nodes=args.num_nodes,
        strategy=args.strategy,
        precision=args.precision,
        max_epochs=args.epochs,
        max_steps=args.max_steps,
        max_time=max_time,
        limit_train_batches=_limit(args.limit_train_batches),
        limit_val_batches=_limit(args.limit_val_batches) if has_validation else 0,
        check_val_every_n_epoch=args.val_every_n_epochs,
        log_every_n_steps=args.log_every_n_steps,
        callbacks=[checkpoint, LearningRateMonitor(logging_interval="step")],
        logger=loggers,
        deterministic=False,
        default_root_dir=output_dir,
    )


if __name__ == "__main__":
    sys.exit(main())
