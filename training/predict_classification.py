"""Classify every axial slice of CT volumes with a trained slice classifier.

Loads a train.py checkpoint or exported weights, runs the engine's preprocessing and batched
inference (`livertumorai.inference.classify_slices`) and prints one line per slice, for
example ``slice 20: class 1 (tumor), probabilities [0.00 0.90 0.10]``. Slice numbers are
indices along the input's inferior-superior axis, as in the engine's slices.csv. With
--output-dir it writes `<case>/slice_classes.csv` (with the reference class when labels
are known) and `<case>/slice_classes.nii.gz`, a label map on the input grid that contains
each slice's predicted class (0 background, 1 tumor, 2 no tumor) in all its voxels.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np
import SimpleITK as sitk

from livertumorai.constants import SLICE_CLASS_NAMES
from livertumorai.inference import classify_slices, select_autocast_dtype, select_device
from livertumorai.outputs import write_labelmap, write_slices_csv
from training.dataset import AxialCT, add_case_arguments, cases_from_args, read_axial_ct
from training.evaluate import evaluate_classification, reference_slice_classes
from training.lit_model import load_network

logger = logging.getLogger("training.predict_classification")


def predict_case(model, preprocessing, ct: AxialCT, device, autocast_dtype,
                 batch_size: int) -> tuple[np.ndarray, np.ndarray]:
    """Return (input slice indices, (slices, 3) probabilities), sorted by input slice index."""
    probabilities = classify_slices(model, ct.stack_hu, ct.preprocessor(preprocessing), device,
                                    autocast_dtype, batch_size=batch_size)
    num_slices = probabilities.shape[0]
    input_indices = np.array([ct.frame.input_slice_index(s, num_slices)
                              for s in range(num_slices)])
    order = np.argsort(input_indices)
    return input_indices[order], probabilities[order]


def format_slice(index: int, probabilities: np.ndarray) -> str:
    """Return the printed line of one slice."""
    predicted = int(np.argmax(probabilities))
    values = " ".join(f"{p:.2f}" for p in probabilities)
    return (f"slice {index}: class {predicted} ({SLICE_CLASS_NAMES[predicted]}), "
            f"probabilities [{values}]")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="Classify each axial slice (0 background, 1 tumor, 2 no tumor) with a "
                    "train.py checkpoint or exported weights, and print the probabilities.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--model", required=True,
                        help="checkpoint (.ckpt) or manifest.json / weights folder")
    add_case_arguments(parser)
    parser.add_argument("--output-dir", help="write <case>/slice_classes.csv and .nii.gz here")
    parser.add_argument("--device", default="auto", help="auto, cpu, gpu or cuda:N")
    parser.add_argument("--precision", default="auto", help="auto, fp32, bf16 or fp16")
    parser.add_argument("--batch-size", type=int, default=32, help="slices per batch")
    parser.add_argument("--quiet", action="store_true", help="print only per-case summaries")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    model, preprocessing, description = load_network(args.model, "classification")
    device = select_device(args.device)
    autocast_dtype = select_autocast_dtype(device, args.precision)
    logger.info("Classifier: %s", description)

    for case_id, image_path, label_path in cases_from_args(args):
        ct = read_axial_ct(image_path)
        indices, probabilities = predict_case(model, preprocessing, ct, device,
                                              autocast_dtype, args.batch_size)
        print(f"# {case_id} ({image_path})")
        if not args.quiet:
            for index, p in zip(indices, probabilities):
                print(format_slice(int(index), p))
        reference = None
        if label_path is not None:
            labels = sitk.GetArrayFromImage(sitk.ReadImage(str(label_path)))
            reference = reference_slice_classes(labels, ct.geometry)[indices]
            metrics = evaluate_classification(reference, probabilities)
            print(f"# {case_id}: slice accuracy {metrics['slice_accuracy']:.3f}, confusion "
                  f"(rows reference) {metrics['slice_confusion']}")
        if args.output_dir:
            _write_outputs(Path(args.output_dir) / case_id, ct, indices, probabilities, reference)
    return 0


def _write_outputs(folder: Path, ct: AxialCT, indices: np.ndarray, probabilities: np.ndarray,
                   reference: np.ndarray | None) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    rows = []
    for position, (index, p) in enumerate(zip(indices, probabilities)):
        predicted = int(np.argmax(p))
        row = {"slice_index": int(index), "p_background": round(float(p[0]), 4),
               "p_tumor": round(float(p[1]), 4), "p_no_tumor": round(float(p[2]), 4),
               "predicted_class": predicted, "predicted_name": SLICE_CLASS_NAMES[predicted]}
        if reference is not None:
            row["reference_class"] = int(reference[position])
        rows.append(row)
    write_slices_csv(folder / "slice_classes.csv", rows)

    # Predicted class painted over each slice, mapped back onto the input grid.
    predicted_by_stack = np.empty(len(indices), dtype=np.uint8)
    num_slices = len(indices)
    for index, p in zip(indices, probabilities):
        predicted_by_stack[ct.frame.input_slice_index(int(index), num_slices)] = np.argmax(p)
    stack = np.broadcast_to(predicted_by_stack[:, None, None], ct.stack_hu.shape)
    write_labelmap(ct.frame.from_axial(stack), ct.geometry, folder / "slice_classes.nii.gz")


if __name__ == "__main__":
    sys.exit(main())
