"""Export a training checkpoint as engine weights: a safetensors file plus a manifest entry.

The entry carries what the engine needs to run the network (architecture, preprocessing,
classes, sha256) and what a reader needs to trust it (training data, split, metrics). It
is merged into the `manifest.json` of the output folder, replacing the entry of the same
task, so a new model is a drop-in for the engine.

Example::

    python training/export.py --checkpoint runs/unet/checkpoints/last.ckpt \\
        --output-dir LiverTumorAI/Resources/Weights --metrics-json eval/metrics.json
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections.abc import Mapping
from datetime import datetime, timezone
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch

from livertumorai.constants import SLICE_CLASS_NAMES
from livertumorai.weights import BUNDLED_WEIGHTS_DIR, MANIFEST_NAME, save_model, write_manifest
from training.lit_model import SEGMENTATION_CLASS_NAMES, module_class_for_task

logger = logging.getLogger("training.export")

__all__ = ["DEFAULT_NAMES", "export_checkpoint", "merge_manifest", "read_metrics"]

DEFAULT_NAMES = {"classification": "slice_classifier_vgg16bn",
                 "segmentation": "liver_tumor_unet2d"}
CLASS_NAMES = {"classification": list(SLICE_CLASS_NAMES),
               "segmentation": list(SEGMENTATION_CLASS_NAMES)}
DTYPES = {"float16": torch.float16, "float32": torch.float32}


def export_checkpoint(
    checkpoint_path: str | os.PathLike,
    output_dir: str | os.PathLike,
    *,
    name: str | None = None,
    version: str = "0.1.0",
    metrics: Mapping[str, object] | None = None,
    extra: Mapping[str, object] | None = None,
    dtype: torch.dtype = torch.float16,
) -> dict:
    """Write the network of a checkpoint into `output_dir` and update its manifest.

    Args:
        checkpoint_path: Lightning checkpoint written by train.py.
        output_dir: weights folder (created when missing).
        name: model name and file stem (default ``DEFAULT_NAMES[task]``).
        version: model version written into the manifest.
        metrics: validation metrics to record (for example from evaluate.py).
        extra: further manifest fields (for example a licence note).
        dtype: storage dtype of floating-point tensors (float16 halves the file size).

    Returns:
        The manifest entry that was written.

    Raises:
        ValueError: the checkpoint was not written by train.py.
    """
    checkpoint_path = Path(checkpoint_path)
    task = _checkpoint_task(checkpoint_path)
    module = module_class_for_task(task).load_from_checkpoint(checkpoint_path, map_location="cpu")
    hparams = module.hparams
    training_info = dict(hparams.get("training_info") or {})
    info = {
        "training_data": {key: training_info[key] for key in ("data_dirs", "layout")
                          if key in training_info},
        "split": training_info.get("split"),
        "training": {key: value for key, value in training_info.items()
                     if key not in ("data_dirs", "layout", "split")},
        "metrics": dict(metrics or {}),
        "checkpoint": checkpoint_path.name,
        "exported_utc": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        **dict(extra or {}),
    }
    entry = save_model(
        module.model, output_dir, name=name or DEFAULT_NAMES[task], task=task, version=version,
        architecture=dict(hparams["architecture"]), preprocessing=module.preprocessing,
        classes=CLASS_NAMES[task], extra=info, dtype=dtype,
    )
    merge_manifest(output_dir, entry)
    logger.info("Exported %s model %s %s from %s into %s, sha256 %s", task, entry["name"],
                entry["version"], checkpoint_path, output_dir, entry["sha256"][:12])
    return entry


def merge_manifest(folder: str | os.PathLike, entry: dict) -> Path:
    """Add `entry` to the manifest of `folder`, replacing any entry of the same task."""
    folder = Path(folder)
    path = folder / MANIFEST_NAME
    entries = []
    if path.is_file():
        try:
            entries = list(json.loads(path.read_text(encoding="utf-8"))["models"])
        except (ValueError, KeyError, TypeError) as err:
            raise ValueError(f"cannot read the existing manifest {path}: {err!r}; fix or remove "
                             "it before exporting") from err
    replaced = [e for e in entries if e.get("task") == entry["task"]]
    for old in replaced:
        if old.get("file") != entry["file"]:
            logger.warning("Replacing %s entry %r; its file %s is no longer referenced",
                           entry["task"], old.get("name"), old.get("file"))
    entries = [e for e in entries if e.get("task") != entry["task"]] + [entry]
    return write_manifest(folder, entries)


def read_metrics(metrics_json: str | os.PathLike | None, pairs: list[str]) -> dict:
    """Collect metrics from an evaluate.py JSON file (its `summary`) and KEY=VALUE pairs."""
    metrics: dict[str, object] = {}
    if metrics_json:
        data = json.loads(Path(metrics_json).read_text(encoding="utf-8"))
        metrics.update(data.get("summary", data))
        if "cases" in data:
            metrics["evaluated_cases"] = [case.get("case_id") for case in data["cases"]]
    for pair in pairs:
        key, separator, value = pair.partition("=")
        if not separator:
            raise ValueError(f"metric {pair!r} is not KEY=VALUE, for example val_dice_liver=0.95")
        try:
            metrics[key] = float(value)
        except ValueError:
            metrics[key] = value
    return metrics


def _checkpoint_task(path: Path) -> str:
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    checkpoint = torch.load(path, map_location="cpu", weights_only=False)
    task = checkpoint.get("livertumorai_task")
    if task is None:
        raise ValueError(f"checkpoint {path} has no LiverTumorAI task; export checkpoints "
                         "written by training/train.py")
    return task


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="Export a train.py checkpoint as engine weights (safetensors) and merge "
                    "its entry into manifest.json, replacing the entry of the same task.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--checkpoint", required=True, help="checkpoint written by train.py")
    parser.add_argument("--output-dir", default=str(BUNDLED_WEIGHTS_DIR),
                        help="weights folder holding manifest.json")
    parser.add_argument("--name", help="model name and file stem (default by task: "
                                       + ", ".join(f"{k} {v}" for k, v in DEFAULT_NAMES.items())
                                       + ")")
    parser.add_argument("--version", default="0.1.0", help="model version")
    parser.add_argument("--metrics-json", help="evaluate.py JSON whose summary is recorded")
    parser.add_argument("--metric", action="append", default=[],
                        help="KEY=VALUE metric to record (repeatable)")
    parser.add_argument("--note", action="append", default=[],
                        help="KEY=VALUE text field added to the entry, for example "
                             "licence=non-commercial research use (repeatable)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="float16",
                        help="storage dtype of the weights")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    metrics = read_metrics(args.metrics_json, args.metric)
    notes = {}
    for pair in args.note:
        key, separator, value = pair.partition("=")
        if not separator:
            raise SystemExit(f"--note {pair!r} is not KEY=VALUE")
        notes[key] = value
    entry = export_checkpoint(args.checkpoint, args.output_dir, name=args.name,
                              version=args.version, metrics=metrics, extra=notes,
                              dtype=DTYPES[args.dtype])
    logger.info("Manifest %s now lists %s", Path(args.output_dir) / MANIFEST_NAME, entry["file"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
