"""Segment liver and tumor in CT volumes with a trained U-Net and write the masks.

Loads a train.py checkpoint or exported weights and runs the U-Net on every axial slice
with the engine's preprocessing and batched inference (`livertumorai.inference`), without
the classifier gating of the full engine. Prints the liver and tumor area of each slice
that contains either, and writes `<case>/labels.nii.gz` and `<case>/segmentation.seg.nrrd`
on the input grid. With --postprocess the engine's clean-up runs first (largest liver
component, holes filled, small lesions relabelled as liver). Reference labels, when known,
give the Dice per case.
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

from livertumorai.constants import LABEL_TUMOR
from livertumorai.geometry import xyz_to_zyx
from livertumorai.inference import segment_slices, select_autocast_dtype, select_device
from livertumorai.outputs import write_labelmap, write_segmentation_nrrd
from livertumorai.postprocess import PostprocessOptions, postprocess_labels
from training.dataset import AxialCT, add_case_arguments, cases_from_args, read_axial_ct
from training.evaluate import dice
from training.lit_model import load_network

logger = logging.getLogger("training.predict_segmentation")


def predict_case(model, preprocessing, ct: AxialCT, device, autocast_dtype, batch_size: int,
                 tumor_threshold: float = 0.5) -> np.ndarray:
    """Return the predicted label map (z, y, x) uint8 on the input grid."""
    maps = segment_slices(model, ct.stack_hu, ct.preprocessor(preprocessing),
                          np.arange(ct.stack_hu.shape[0]), device, autocast_dtype,
                          batch_size=batch_size)
    return ct.frame.from_axial(maps.labels(tumor_threshold))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="Segment liver (1) and tumor (2) with a train.py checkpoint or exported "
                    "weights; write labels.nii.gz and segmentation.seg.nrrd on the input grid.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--model", required=True,
                        help="checkpoint (.ckpt) or manifest.json / weights folder")
    add_case_arguments(parser)
    parser.add_argument("--output-dir", required=True, help="one folder per case is written here")
    parser.add_argument("--tumor-threshold", type=float, default=0.5,
                        help="tumor probability from which a voxel is labelled tumor")
    parser.add_argument("--postprocess", action="store_true",
                        help="apply the engine's post-processing before writing")
    parser.add_argument("--device", default="auto", help="auto, cpu, gpu or cuda:N")
    parser.add_argument("--precision", default="auto", help="auto, fp32, bf16 or fp16")
    parser.add_argument("--batch-size", type=int, default=16, help="slices per batch")
    parser.add_argument("--quiet", action="store_true", help="print only per-case summaries")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    model, preprocessing, description = load_network(args.model, "segmentation")
    device = select_device(args.device)
    autocast_dtype = select_autocast_dtype(device, args.precision)
    logger.info("U-Net: %s", description)

    for case_id, image_path, label_path in cases_from_args(args):
        ct = read_axial_ct(image_path)
        labels = predict_case(model, preprocessing, ct, device, autocast_dtype,
                              args.batch_size, args.tumor_threshold)
        spacing_zyx = xyz_to_zyx(ct.geometry.spacing_mm_xyz)
        if args.postprocess:
            labels = postprocess_labels(labels, spacing_zyx, PostprocessOptions())
        print(f"# {case_id} ({image_path})")
        if not args.quiet:
            _print_slices(ct, labels)
        if label_path is not None:
            reference = sitk.GetArrayFromImage(sitk.ReadImage(str(label_path)))
            print(f"# {case_id}: liver Dice {dice(reference > 0, labels > 0):.3f}, tumor Dice "
                  f"{dice(reference == LABEL_TUMOR, labels == LABEL_TUMOR):.3f}")
        folder = Path(args.output_dir) / case_id
        folder.mkdir(parents=True, exist_ok=True)
        write_labelmap(labels, ct.geometry, folder / "labels.nii.gz")
        write_segmentation_nrrd(labels, ct.geometry, folder / "segmentation.seg.nrrd")
    return 0


def _print_slices(ct: AxialCT, labels_zyx: np.ndarray) -> None:
    stack = ct.frame.to_axial(labels_zyx)
    pixel_mm2 = ct.frame.spacing_mm[1] * ct.frame.spacing_mm[2]
    num_slices = stack.shape[0]
    rows = []
    for stack_index in range(num_slices):
        liver_px = int((stack[stack_index] > 0).sum())
        if liver_px == 0:
            continue
        tumor_px = int((stack[stack_index] == LABEL_TUMOR).sum())
        rows.append((ct.frame.input_slice_index(stack_index, num_slices), liver_px, tumor_px))
    for index, liver_px, tumor_px in sorted(rows):
        print(f"slice {index}: liver and tumor {liver_px * pixel_mm2:.0f} mm2, "
              f"tumor {tumor_px * pixel_mm2:.0f} mm2")


if __name__ == "__main__":
    sys.exit(main())
