"""Evaluate liver and tumor segmentations and slice classifications against reference labels.

Metric functions take NumPy arrays ((z, y, x) label maps or boolean masks on one grid,
spacing in mm in the same order) and are defined for empty masks. The command line
compares an engine output folder per case with the reference labels, or first runs the
engine (`livertumorai.pipeline.segment_ct`) with given weights, and writes JSON and a
Markdown table.

Conventions:
- Liver is the whole liver, labels 1 and 2 together (as in the LiTS challenge); tumor is
  label 2.
- Empty masks: Dice is 1 and VOE 0 when both masks are empty. RVD is undefined (NaN, null
  in JSON) for an empty reference with a non-empty prediction. ASSD is 0 when both are
  empty and undefined when only one is.
- Lesions are 3-D connected components of tumor (26-connectivity). A reference lesion is
  detected when any predicted tumor component overlaps it by at least one voxel. A
  predicted component is a true positive when it overlaps any reference lesion, else a
  false positive. Precision = true-positive predicted components / predicted components,
  recall = detected reference lesions / reference lesions; each is 1 when its denominator
  is 0. The same counts are also given with a stricter rule, a match needing IoU > 0.5
  between one predicted and one reference component (a one-to-one match by construction).
- Slice classes follow the engine: 0 background, 1 tumor, 2 no tumor; AUROC is one class
  against the rest and undefined when the class is absent or is the only one present.
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import math
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np
import SimpleITK as sitk
from scipy import ndimage
from scipy.stats import rankdata

from livertumorai.constants import (
    DEFAULT_MIN_LESION_VOLUME_MM3,
    DEFAULT_TUMOR_THRESHOLD,
    LABEL_TUMOR,
    SLICE_CLASS_NAMES,
    slice_class_from_labels,
)
from livertumorai.errors import ConfigurationError, WeightsError
from livertumorai.geometry import ImageGeometry, axial_frame, xyz_to_zyx
from training.dataset import LAYOUTS, CaseRecord, select_cases

logger = logging.getLogger("training.evaluate")

__all__ = [
    "dice",
    "volume_overlap_error",
    "relative_volume_difference",
    "average_symmetric_surface_distance",
    "LesionCounts",
    "lesion_detection",
    "detection_scores",
    "auroc_one_vs_rest",
    "confusion_matrix",
    "reference_slice_classes",
    "evaluate_segmentation",
    "evaluate_classification",
    "summarize",
    "markdown_table",
]

_STRUCTURE_26 = np.ones((3, 3, 3), dtype=bool)


# --------------------------------------------------------------------------- overlap metrics


def dice(reference: np.ndarray, prediction: np.ndarray) -> float:
    """Return the Dice coefficient 2|R & P| / (|R| + |P|); 1 when both masks are empty."""
    reference, prediction = _as_masks(reference, prediction)
    total = int(reference.sum()) + int(prediction.sum())
    if total == 0:
        return 1.0
    return 2.0 * int((reference & prediction).sum()) / total


def volume_overlap_error(reference: np.ndarray, prediction: np.ndarray) -> float:
    """Return VOE = 1 - |R & P| / |R | P|; 0 when both masks are empty."""
    reference, prediction = _as_masks(reference, prediction)
    union = int((reference | prediction).sum())
    if union == 0:
        return 0.0
    return 1.0 - int((reference & prediction).sum()) / union


def relative_volume_difference(reference: np.ndarray, prediction: np.ndarray) -> float:
    """Return RVD = (|P| - |R|) / |R| (signed; positive means over-segmentation).

    0 when both masks are empty, NaN when only the reference is empty.
    """
    reference, prediction = _as_masks(reference, prediction)
    ref_size, pred_size = int(reference.sum()), int(prediction.sum())
    if ref_size == 0:
        return 0.0 if pred_size == 0 else math.nan
    return (pred_size - ref_size) / ref_size


def average_symmetric_surface_distance(reference: np.ndarray, prediction: np.ndarray,
                                       spacing_mm: Sequence[float]) -> float:
    """Return the average symmetric surface distance in mm.

    Surface voxels are mask voxels with a face neighbour outside the mask. ASSD is the mean
    of the distances from every surface voxel of one mask to the nearest surface voxel of
    the other, over both directions. 0 when both masks are empty, NaN when only one is.

    Args:
        reference, prediction: masks of the same shape, (z, y, x).
        spacing_mm: voxel spacing along the same axes, mm.
    """
    reference, prediction = _as_masks(reference, prediction)
    if not reference.any() and not prediction.any():
        return 0.0
    if not reference.any() or not prediction.any():
        return math.nan
    box = _bounding_box(reference | prediction)
    reference, prediction = reference[box], prediction[box]
    ref_surface = _surface(reference)
    pred_surface = _surface(prediction)
    to_ref = ndimage.distance_transform_edt(~ref_surface, sampling=spacing_mm)
    to_pred = ndimage.distance_transform_edt(~pred_surface, sampling=spacing_mm)
    distances = np.concatenate([to_ref[pred_surface], to_pred[ref_surface]])
    return float(distances.mean())


def _surface(mask: np.ndarray) -> np.ndarray:
    eroded = ndimage.binary_erosion(mask, structure=ndimage.generate_binary_structure(mask.ndim, 1),
                                    border_value=0)
    return mask & ~eroded


def _bounding_box(mask: np.ndarray, pad: int = 1) -> tuple[slice, ...]:
    # Padding keeps a surface at the array border a surface after cropping.
    coords = np.nonzero(mask)
    return tuple(slice(max(int(c.min()) - pad, 0), int(c.max()) + pad + 1) for c in coords)


def _as_masks(reference: np.ndarray, prediction: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    reference = np.asarray(reference, dtype=bool)
    prediction = np.asarray(prediction, dtype=bool)
    if reference.shape != prediction.shape:
        raise ValueError(f"reference shape {reference.shape} differs from prediction shape "
                         f"{prediction.shape}; compare masks on the same grid")
    return reference, prediction


# --------------------------------------------------------------------------- lesions


@dataclass(frozen=True)
class LesionCounts:
    """Lesion detection counts of one case (see the module docstring for the rules)."""

    reference_lesions: int
    predicted_lesions: int
    detected_reference: int  # reference lesions overlapped by a predicted component
    true_positive_predicted: int  # predicted components overlapping a reference lesion
    matched_iou: int  # one-to-one pairs with IoU > 0.5

    @property
    def false_positive_lesions(self) -> int:
        return self.predicted_lesions - self.true_positive_predicted

    def to_dict(self) -> dict:
        scores = detection_scores(self)
        return {
            "reference_lesions": self.reference_lesions,
            "predicted_lesions": self.predicted_lesions,
            "detected_lesions": self.detected_reference,
            "true_positive_predicted_lesions": self.true_positive_predicted,
            "false_positive_lesions": self.false_positive_lesions,
            "matched_lesions_iou50": self.matched_iou,
            **scores,
        }


def lesion_detection(reference_tumor: np.ndarray, predicted_tumor: np.ndarray,
                     iou_threshold: float = 0.5) -> LesionCounts:
    """Count reference and predicted lesions and their matches (26-connected components)."""
    reference_tumor, predicted_tumor = _as_masks(reference_tumor, predicted_tumor)
    ref_labels, num_ref = ndimage.label(reference_tumor, structure=_STRUCTURE_26)
    pred_labels, num_pred = ndimage.label(predicted_tumor, structure=_STRUCTURE_26)
    if num_ref == 0 or num_pred == 0:
        return LesionCounts(num_ref, num_pred, 0, 0, 0)

    # Overlap table: voxels shared by reference lesion i and predicted lesion j.
    both = (ref_labels > 0) & (pred_labels > 0)
    pairs = ref_labels[both].astype(np.int64) * (num_pred + 1) + pred_labels[both]
    overlap = np.bincount(pairs, minlength=(num_ref + 1) * (num_pred + 1))
    overlap = overlap.reshape(num_ref + 1, num_pred + 1)[1:, 1:]
    ref_sizes = np.bincount(ref_labels.ravel(), minlength=num_ref + 1)[1:]
    pred_sizes = np.bincount(pred_labels.ravel(), minlength=num_pred + 1)[1:]
    union = ref_sizes[:, None] + pred_sizes[None, :] - overlap
    iou = overlap / np.maximum(union, 1)
    return LesionCounts(
        reference_lesions=num_ref,
        predicted_lesions=num_pred,
        detected_reference=int((overlap > 0).any(axis=1).sum()),
        true_positive_predicted=int((overlap > 0).any(axis=0).sum()),
        matched_iou=int((iou > iou_threshold).sum()),
    )


def detection_scores(counts: LesionCounts) -> dict:
    """Return lesion precision, recall and F1, by overlap and at IoU > 0.5."""
    def scores(true_pred: int, true_ref: int, suffix: str) -> dict:
        precision = true_pred / counts.predicted_lesions if counts.predicted_lesions else 1.0
        recall = true_ref / counts.reference_lesions if counts.reference_lesions else 1.0
        f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
        return {f"lesion_precision{suffix}": precision, f"lesion_recall{suffix}": recall,
                f"lesion_f1{suffix}": f1}

    return {**scores(counts.true_positive_predicted, counts.detected_reference, ""),
            **scores(counts.matched_iou, counts.matched_iou, "_iou50")}


# --------------------------------------------------------------------------- classification


def confusion_matrix(reference: Sequence[int], predicted: Sequence[int],
                     num_classes: int = len(SLICE_CLASS_NAMES)) -> np.ndarray:
    """Return the (reference, predicted) count matrix, (num_classes, num_classes) int64."""
    reference = np.asarray(reference, dtype=np.int64)
    predicted = np.asarray(predicted, dtype=np.int64)
    flat = np.bincount(reference * num_classes + predicted, minlength=num_classes ** 2)
    return flat.reshape(num_classes, num_classes)


def auroc_one_vs_rest(reference: Sequence[int], probabilities: np.ndarray) -> list[float]:
    """Return the AUROC of each class against the rest (Mann-Whitney U, ties count half).

    Args:
        reference: (n,) class indices.
        probabilities: (n, classes) scores.

    Returns:
        One value per class; NaN when the class is absent or is the only class present.
    """
    reference = np.asarray(reference)
    probabilities = np.asarray(probabilities, dtype=np.float64)
    values = []
    for k in range(probabilities.shape[1]):
        positive = reference == k
        num_pos, num_neg = int(positive.sum()), int((~positive).sum())
        if num_pos == 0 or num_neg == 0:
            values.append(math.nan)
            continue
        ranks = rankdata(probabilities[:, k])
        u_statistic = ranks[positive].sum() - num_pos * (num_pos + 1) / 2.0
        values.append(float(u_statistic / (num_pos * num_neg)))
    return values


def reference_slice_classes(labels_zyx: np.ndarray, geometry: ImageGeometry) -> np.ndarray:
    """Return the reference class of each input slice along the inferior-superior axis.

    Index i is the input array's index along that axis, as `slice_index` in the engine's
    slices.csv.
    """
    frame = axial_frame(geometry)
    stack = frame.to_axial(labels_zyx)
    has_liver = (stack > 0).any(axis=(1, 2))
    has_tumor = (stack == LABEL_TUMOR).any(axis=(1, 2))
    num_slices = stack.shape[0]
    classes = np.zeros(num_slices, dtype=np.int64)
    for stack_index in range(num_slices):
        input_index = frame.input_slice_index(stack_index, num_slices)
        classes[input_index] = slice_class_from_labels(bool(has_liver[stack_index]),
                                                       bool(has_tumor[stack_index]))
    return classes


# --------------------------------------------------------------------------- per case


def evaluate_segmentation(reference_labels: np.ndarray, predicted_labels: np.ndarray,
                          spacing_mm: Sequence[float]) -> dict:
    """Return the liver, tumor and lesion metrics of one case.

    Args:
        reference_labels, predicted_labels: (z, y, x) label maps 0/1/2 on one grid.
        spacing_mm: voxel spacing (z, y, x) in mm.
    """
    voxel_ml = float(np.prod(spacing_mm)) / 1000.0
    result = {}
    for name, reference, prediction in (
        ("liver", reference_labels > 0, predicted_labels > 0),
        ("tumor", reference_labels == LABEL_TUMOR, predicted_labels == LABEL_TUMOR),
    ):
        result[f"{name}_dice"] = dice(reference, prediction)
        result[f"{name}_voe"] = volume_overlap_error(reference, prediction)
        result[f"{name}_rvd"] = relative_volume_difference(reference, prediction)
        result[f"{name}_assd_mm"] = average_symmetric_surface_distance(reference, prediction,
                                                                       spacing_mm)
        # Sums for the global Dice over the set.
        result[f"{name}_intersection_voxels"] = int((reference & prediction).sum())
        result[f"{name}_reference_ml"] = int(reference.sum()) * voxel_ml
        result[f"{name}_predicted_ml"] = int(prediction.sum()) * voxel_ml
        result[f"{name}_size_sum_voxels"] = int(reference.sum()) + int(prediction.sum())
    counts = lesion_detection(reference_labels == LABEL_TUMOR, predicted_labels == LABEL_TUMOR)
    result.update(counts.to_dict())
    return result


def evaluate_classification(reference_classes: np.ndarray, probabilities: np.ndarray) -> dict:
    """Return slice accuracy, confusion matrix and AUROC of one case."""
    predicted = np.asarray(probabilities).argmax(axis=1)
    reference = np.asarray(reference_classes)
    return {
        "slice_accuracy": float((predicted == reference).mean()) if reference.size else math.nan,
        "slice_confusion": confusion_matrix(reference, predicted).tolist(),
        "slice_auroc": auroc_one_vs_rest(reference, probabilities),
        "slices": int(reference.size),
    }


def summarize(cases: Sequence[Mapping], slice_records: Sequence[tuple] = ()) -> dict:
    """Return metrics over a set of evaluated cases.

    Global Dice sums intersections and sizes over all cases before the ratio; other metrics
    are means over the cases where they are defined. Lesion scores use summed counts.
    `slice_records` are (reference class, probabilities) pairs pooled over the cases.
    """
    summary: dict[str, object] = {"cases": len(cases)}
    for name in ("liver", "tumor"):
        if not cases or f"{name}_dice" not in cases[0]:
            continue
        intersection = sum(case[f"{name}_intersection_voxels"] for case in cases)
        size_sum = sum(case[f"{name}_size_sum_voxels"] for case in cases)
        summary[f"{name}_dice_global"] = 2 * intersection / size_sum if size_sum else 1.0
        for metric in ("dice", "voe", "rvd", "assd_mm"):
            values = [case[f"{name}_{metric}"] for case in cases]
            summary[f"{name}_{metric}_mean"] = _nanmean(values)
    if cases and "reference_lesions" in cases[0]:
        totals = LesionCounts(*(sum(case[key] for case in cases) for key in (
            "reference_lesions", "predicted_lesions", "detected_lesions",
            "true_positive_predicted_lesions", "matched_lesions_iou50")))
        summary.update(totals.to_dict())
    if slice_records:
        reference = np.array([record[0] for record in slice_records])
        probabilities = np.stack([record[1] for record in slice_records])
        pooled = evaluate_classification(reference, probabilities)
        summary.update(pooled)
    return summary


def _nanmean(values: Sequence[float]) -> float:
    finite = [v for v in values if v is not None and not math.isnan(v)]
    return float(np.mean(finite)) if finite else math.nan


# --------------------------------------------------------------------------- report


def markdown_table(cases: Sequence[Mapping], summary: Mapping) -> str:
    """Return a Markdown table: one row per case, then the summary."""
    columns = [("liver_dice", "liver Dice"), ("liver_voe", "liver VOE"),
               ("liver_rvd", "liver RVD"), ("liver_assd_mm", "liver ASSD mm"),
               ("tumor_dice", "tumor Dice"), ("tumor_voe", "tumor VOE"),
               ("tumor_rvd", "tumor RVD"), ("tumor_assd_mm", "tumor ASSD mm"),
               ("reference_lesions", "lesions"), ("detected_lesions", "detected"),
               ("false_positive_lesions", "false positive"), ("slice_accuracy", "slice accuracy")]
    columns = [(key, title) for key, title in columns
               if any(key in case for case in cases)]
    lines = ["| case | " + " | ".join(title for _, title in columns) + " |",
             "|---" * (len(columns) + 1) + "|"]
    for case in cases:
        lines.append(f"| {case['case_id']} | "
                     + " | ".join(_format(case.get(key)) for key, _ in columns) + " |")
    lines.append("")
    lines.append("| set metric | value |")
    lines.append("|---|---|")
    for key, value in summary.items():
        if isinstance(value, (int, float)) or value is None:
            lines.append(f"| {key} | {_format(value)} |")
        elif key == "slice_auroc":
            lines.append(f"| slice AUROC ({', '.join(SLICE_CLASS_NAMES)}) | "
                         + ", ".join(_format(v) for v in value) + " |")
        elif key == "slice_confusion":
            lines.append(f"| slice confusion (rows reference, columns predicted) | {value} |")
    return "\n".join(lines) + "\n"


def _format(value) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    if isinstance(value, float):
        return f"{value:.3f}"
    return str(value)


def _json_safe(value):
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    if isinstance(value, np.generic):
        return _json_safe(value.item())
    return value


# --------------------------------------------------------------------------- command line


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="Evaluate engine outputs against reference labels: liver and tumor Dice "
                    "(per case and global), VOE, RVD, ASSD, lesion detection and slice "
                    "classification. Writes metrics.json and metrics.md.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--data-dir", nargs="+", required=True,
                        help="data folder(s) with the reference labels")
    parser.add_argument("--layout", choices=LAYOUTS, default="auto", help="data folder layout")
    parser.add_argument("--patient-pattern", help="see train.py --patient-pattern")
    parser.add_argument("--cases", nargs="*", default=[], help="case ids to evaluate")
    parser.add_argument("--split-file", help="split.json written by train.py")
    parser.add_argument("--subset", choices=("val", "train", "all"), default="val",
                        help="cases of --split-file to evaluate")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--predictions",
                        help="folder with one engine output folder per case id, holding "
                             "labels.nii.gz or segmentation.seg.nrrd and optionally slices.csv")
    source.add_argument("--weights",
                        help="manifest.json (or its folder): run the engine on each case first")
    parser.add_argument("--output-dir", required=True,
                        help="folder for metrics.json, metrics.md and (with --weights) the "
                             "engine outputs under predictions/")
    parser.add_argument("--device", default="auto", help="engine device with --weights")
    parser.add_argument("--precision", default="auto", choices=("auto", "fp32", "bf16", "fp16"),
                        help="engine precision with --weights")
    parser.add_argument("--no-gating", action="store_true",
                        help="with --weights: run the U-Net on every slice, not only on "
                             "slices the classifier finds liver in")
    parser.add_argument("--tumor-threshold", type=float, default=DEFAULT_TUMOR_THRESHOLD,
                        help="with --weights: engine tumor probability threshold (0..1)")
    parser.add_argument("--min-lesion-mm3", type=float, default=DEFAULT_MIN_LESION_VOLUME_MM3,
                        help="with --weights: engine minimum lesion volume in mm3")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    trained_cases: set[str] = set()
    if args.weights:
        try:
            _engine_options(args)
            trained_cases = training_cases_of(args.weights)
        except (ConfigurationError, WeightsError) as err:
            parser.error(f"{err.message} {err.hint}")
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    records = _selected_cases(args, parser)
    evaluated_training_cases = sorted({record.case_id for record in records} & trained_cases)
    if evaluated_training_cases:
        logger.warning("The weights were trained on %s, so their scores measure fit to the "
                       "training data, not accuracy on unseen CT.",
                       ", ".join(evaluated_training_cases))
    output_dir = Path(args.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    predictions_dir = Path(args.predictions) if args.predictions else output_dir / "predictions"

    cases, slice_records = [], []
    for record in records:
        case_dir = predictions_dir / record.case_id
        if args.weights:
            _run_engine(record, case_dir, args)
        case_result, case_slices = evaluate_case(record, case_dir)
        cases.append(case_result)
        slice_records.extend(case_slices)
        logger.info("%s: liver Dice %s, tumor Dice %s", record.case_id,
                    _format(case_result.get("liver_dice")), _format(case_result.get("tumor_dice")))

    summary = summarize(cases, slice_records)
    summary["cases_in_training_split"] = evaluated_training_cases
    report = _json_safe({"summary": summary, "cases": cases,
                         "conventions": __doc__.split("Conventions:")[1].strip()})
    (output_dir / "metrics.json").write_text(json.dumps(report, indent=2) + "\n",
                                             encoding="utf-8")
    (output_dir / "metrics.md").write_text(markdown_table(cases, summary), encoding="utf-8")
    logger.info("Wrote %s and %s", output_dir / "metrics.json", output_dir / "metrics.md")
    return 0


def evaluate_case(record: CaseRecord, case_dir: Path) -> tuple[dict, list[tuple]]:
    """Evaluate one engine output folder against a case's reference labels.

    Returns:
        (per-case metrics, list of (reference class, probabilities) per slice).

    Raises:
        FileNotFoundError: the folder contains neither labels.nii.gz nor segmentation.seg.nrrd.
        ValueError: the prediction is not on the reference grid.
    """
    reference_image = sitk.ReadImage(str(record.label_path))
    geometry = ImageGeometry.from_image(reference_image)
    reference = sitk.GetArrayFromImage(reference_image).astype(np.uint8)
    predicted = _read_prediction(case_dir, reference_image)
    spacing_zyx = xyz_to_zyx(geometry.spacing_mm_xyz)
    result = {"case_id": record.case_id, **evaluate_segmentation(reference, predicted, spacing_zyx)}

    slice_records = []
    slices_csv = case_dir / "slices.csv"
    if slices_csv.is_file():
        reference_classes = reference_slice_classes(reference, geometry)
        indices, probabilities = _read_slices_csv(slices_csv)
        if indices.max(initial=-1) >= reference_classes.size:
            raise ValueError(f"{slices_csv} lists slice {indices.max()} but the reference has "
                             f"{reference_classes.size} slices; is it from another CT?")
        result.update(evaluate_classification(reference_classes[indices], probabilities))
        slice_records = list(zip(reference_classes[indices], probabilities))
    return result, slice_records


def _read_prediction(case_dir: Path, reference_image: sitk.Image) -> np.ndarray:
    for name in ("labels.nii.gz", "segmentation.seg.nrrd"):
        path = case_dir / name
        if path.is_file():
            break
    else:
        raise FileNotFoundError(f"no labels.nii.gz or segmentation.seg.nrrd in {case_dir}; "
                                "run the engine with --write-labelmap or pass --weights")
    image = sitk.ReadImage(str(path))
    if image.GetNumberOfComponentsPerPixel() != 1:
        raise ValueError(f"{path} has {image.GetNumberOfComponentsPerPixel()} layers; "
                         "expected one layer of label values 1 liver and 2 tumor")
    same = (image.GetSize() == reference_image.GetSize()
            and np.allclose(image.GetSpacing(), reference_image.GetSpacing(), atol=1e-3)
            and np.allclose(image.GetOrigin(), reference_image.GetOrigin(), atol=1e-2)
            and np.allclose(image.GetDirection(), reference_image.GetDirection(), atol=1e-4))
    if not same:
        raise ValueError(f"{path} is not on the reference grid (size {image.GetSize()} vs "
                         f"{reference_image.GetSize()}); evaluate outputs of the same CT")
    return sitk.GetArrayFromImage(image).astype(np.uint8)


def _read_slices_csv(path: Path) -> tuple[np.ndarray, np.ndarray]:
    with open(path, newline="", encoding="utf-8") as stream:
        rows = list(csv.DictReader(stream))
    indices = np.array([int(row["slice_index"]) for row in rows], dtype=np.int64)
    probabilities = np.array([[float(row["p_background"]), float(row["p_tumor"]),
                               float(row["p_no_tumor"])] for row in rows], dtype=np.float64)
    return indices, probabilities


def _selected_cases(args: argparse.Namespace, parser: argparse.ArgumentParser) -> list[CaseRecord]:
    try:
        return select_cases(args.data_dir, args.layout, args.patient_pattern, args.cases,
                            args.split_file, args.subset)
    except ValueError as err:
        parser.error(str(err))  # exits with status 2


def training_cases_of(weights: str | None) -> set[str]:
    """Return the case ids the manifest's models were trained on (empty when unknown)."""
    from livertumorai.weights import load_manifest

    trained = set()
    for entry in load_manifest(weights).models:
        split = entry.extra.get("split") or {}
        trained.update(str(case) for case in split.get("train", []))
    return trained


def _engine_options(args: argparse.Namespace):
    """Return the checked engine settings of a --weights run.

    Raises:
        ConfigurationError: a setting is invalid, or the device or precision is not
            available on this machine.
    """
    from livertumorai.inference import select_autocast_dtype, select_device
    from livertumorai.pipeline import SegmentOptions

    options = SegmentOptions(weights=args.weights, device=args.device, precision=args.precision,
                             classifier_gating=not args.no_gating,
                             tumor_threshold=args.tumor_threshold,
                             min_lesion_volume_mm3=args.min_lesion_mm3, write_labelmap=True,
                             write_overview=False, overwrite=True)
    options.validate()
    select_autocast_dtype(select_device(options.device), options.precision)
    return options


def _run_engine(record: CaseRecord, case_dir: Path, args: argparse.Namespace) -> None:
    from livertumorai.pipeline import segment_ct

    segment_ct(record.image_path, case_dir, _engine_options(args))


if __name__ == "__main__":
    sys.exit(main())
