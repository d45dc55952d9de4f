"""The engine's public entry point: one CT in, one output folder out.

`segment_ct` reads a CT and classifies every axial slice (VGG16). It segments liver and
tumor (U-Net) on the slices that may hold liver, then post-processes and measures the
result. Everything is written on the input grid into an output folder that appears only
when complete.
The command line, the Slicer child process and the benchmark all call it.
"""

from __future__ import annotations

import logging
import math
import os
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack, contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from . import __version__
from .constants import (
    DEFAULT_BATCH_SIZE,
    DEFAULT_MIN_LESION_VOLUME_MM3,
    DEFAULT_TUMOR_THRESHOLD,
    SLICE_CLASS_NAMES,
    slice_class_from_labels,
)
from .errors import ConfigurationError, RunCancelledError
from .geometry import AxialFrame, ImageGeometry, axial_frame
from .inference import (
    CancelCheck,
    LiverEnds,
    ProgressCallback,
    SegmentationMaps,
    classify_slices,
    default_thread_count,
    gate_slices,
    segment_slices,
    select_autocast_dtype,
    select_device,
)
from .io_ct import LoadedCT, read_ct
from .measure import Measurements, measure, slice_areas_mm2
from .outputs import (
    OutputFolder,
    write_json,
    write_labelmap,
    write_probability_map,
    write_segmentation_nrrd,
    write_slices_csv,
)
from .postprocess import PostprocessOptions, postprocess_labels
from .preprocess import SlicePreprocessor, body_center_rc
from .weights import Manifest, load_manifest, load_model

logger = logging.getLogger(__name__)

__all__ = ["SegmentOptions", "Report", "segment_ct", "STAGES", "OUTPUT_FILES"]

STAGES = ("read", "preprocess", "classify", "segment", "postprocess", "write")
OUTPUT_FILES = {
    "segmentation": "segmentation.seg.nrrd",
    "slices": "slices.csv",
    "report": "report.json",
    "overview": "overview.png",
    "labelmap": "labels.nii.gz",
    "tumor_probability": "tumor_probability.nii.gz",
}


@dataclass(frozen=True)
class SegmentOptions:
    """Settings of one run; the command line exposes each of them.

    Attributes:
        device: 'auto' (CUDA when present, else CPU), 'cpu', 'gpu'/'cuda' or 'cuda:N'.
        weights: manifest file or folder; None uses the user cache, then the bundled weights.
        tumor_threshold: tumor probability (0..1) from which a voxel is labelled tumor.
        min_lesion_volume_mm3: tumor components smaller than this become liver.
        classifier_gating: run the U-Net only on slices the classifier finds liver in
            (widened by `gating_margin_mm`), and only up to the ends of the liver the U-Net
            finds (`livertumorai.inference.LiverEnds`); False runs it on every slice.
        gating_threshold: liver probability (tumor plus no tumor) from which a slice is segmented.
        gating_margin_mm: slices within this distance of a gated slice are segmented too,
            and a liver-free gap this long ends the segmentation in that direction.
        batch_size: slices per network batch.
        precision: 'auto', 'fp32', 'bf16' or 'fp16' (autocast); 'auto' picks bf16 on CPUs
            with native support, fp16 on CUDA, else fp32.
        plain: reference path for benchmarks: every slice through both networks, fp32,
            default memory layout, no gating, the U-Net's whole input.
        threads: CPU threads for torch; None uses every core this process may use.
        write_labelmap: also write `labels.nii.gz` (uint8 0/1/2).
        write_probability_map: also write `tumor_probability.nii.gz` (uint8, 0..255).
        write_overview: write `overview.png`.
        overwrite: replace an existing output folder.
    """

    device: str = "auto"
    weights: str | None = None
    tumor_threshold: float = DEFAULT_TUMOR_THRESHOLD
    min_lesion_volume_mm3: float = DEFAULT_MIN_LESION_VOLUME_MM3
    classifier_gating: bool = True
    gating_threshold: float = 0.05
    gating_margin_mm: float = 10.0
    batch_size: int = DEFAULT_BATCH_SIZE
    precision: str = "auto"
    plain: bool = False
    threads: int | None = None
    write_labelmap: bool = False
    write_probability_map: bool = False
    write_overview: bool = True
    overwrite: bool = False

    def validate(self) -> None:
        """Raise ConfigurationError for values outside their range."""
        _check_range("tumor threshold", self.tumor_threshold, 0.0, 1.0, "", False,
                     "Use a probability such as 0.5.")
        _check_range("minimum lesion volume", self.min_lesion_volume_mm3, 0.0, None, "mm3", True,
                     "Use 0 to keep every lesion.")
        _check_range("gating threshold", self.gating_threshold, 0.0, 1.0, "", True,
                     "Use a probability such as 0.05, or --no-gating.")
        _check_range("gating margin", self.gating_margin_mm, 0.0, None, "mm", True,
                     "Use a distance such as 10 mm.")
        _check_range("batch size", self.batch_size, 1, None, "slices", True,
                     f"Use a positive number of slices such as {DEFAULT_BATCH_SIZE}.")
        if self.threads is not None:
            cores = default_thread_count()
            _check_range("thread count", self.threads, 1, cores + 1, "threads", True,
                         f"Use 1 to {cores} (the cores this process may use), or leave it "
                         "out to use them all.")


def _check_range(name: str, value, low, high, unit: str, low_inclusive: bool, hint: str) -> None:
    """Raise ConfigurationError unless `value` is finite and lies between `low` and `high`.

    `high` is exclusive, and `low` is inclusive when `low_inclusive`.
    """
    value_text = f"{value} {unit}".strip()
    if isinstance(value, float) and not math.isfinite(value):
        raise ConfigurationError(f"The {name} is {value_text}, not a finite number.", hint)
    too_low = value < low if low_inclusive else value <= low
    too_high = high is not None and value >= high
    if too_low or too_high:
        bound = f"at least {low}" if low_inclusive else f"above {low}"
        if high is not None:
            bound += f" and below {high}"
        if isinstance(low, int) and isinstance(high, int) and low_inclusive:
            bound = f"from {low} to {high - 1}"
        raise ConfigurationError(f"The {name} is {value_text}, but it must be {bound}.", hint)


@dataclass
class Report:
    """Result of one run: the measurements and the `report.json` content."""

    output_dir: Path
    measurements: Measurements
    data: dict = field(default_factory=dict)

    @property
    def summary(self) -> dict:
        return self.data["summary"]

    def to_dict(self) -> dict:
        return self.data


class _StageClock:
    """Per-stage wall times and progress events."""

    def __init__(self, progress: ProgressCallback | None) -> None:
        self.progress = progress
        self.timings_s: dict[str, float] = {}

    @contextmanager
    def stage(self, name: str, message: str) -> Iterator[None]:
        logger.info("%s: %s", name, message)
        if self.progress:
            self.progress(name, 0, 1, message)
        start = time.perf_counter()
        yield
        elapsed = time.perf_counter() - start
        self.timings_s[name] = self.timings_s.get(name, 0.0) + elapsed
        logger.info("%s finished in %.2f s", name, elapsed)
        if self.progress:
            self.progress(name, 1, 1, f"{name} finished in {elapsed:.1f} s")


def segment_ct(
    input_path: str | os.PathLike,
    output_dir: str | os.PathLike,
    options: SegmentOptions | None = None,
    progress: ProgressCallback | None = None,
    cancel: CancelCheck | None = None,
) -> Report:
    """Classify and segment one CT and write every output into `output_dir`.

    Args:
        input_path: NIfTI, NRRD or MHA file, or a DICOM folder.
        output_dir: folder to create; it appears only once every file is written.
        options: run settings (defaults: `SegmentOptions()`).
        progress: called as ``progress(stage, done, total, message)``.
        cancel: returns True to stop the run; checked before every network batch.

    Returns:
        The report, also written as `report.json`.

    Raises:
        InvalidInputError, WeightsError, ConfigurationError, OutputExistsError,
        RunCancelledError: see `livertumorai.errors`.
    """
    options = options or SegmentOptions()
    options.validate()
    output_dir = Path(output_dir).expanduser().absolute()  # fixed before the folder changes
    start = time.perf_counter()
    clock = _StageClock(progress)
    device = select_device(options.device)
    autocast_dtype = None if options.plain else select_autocast_dtype(device, options.precision)
    threads = options.threads or default_thread_count()
    if device.type == "cpu":
        torch.set_num_threads(threads)
    manifest = load_manifest(options.weights)
    classifier_entry = manifest.model_for("classification")
    segmenter_entry = manifest.model_for("segmentation")

    with OutputFolder(output_dir, overwrite=options.overwrite,
                      protected_paths=[input_path]) as work_dir, ExitStack() as background:
        classifier = load_model(classifier_entry, device)
        segmenter = load_model(segmenter_entry, device)

        with clock.stage("read", f"reading {input_path}"):
            ct = read_ct(input_path)
        with clock.stage("preprocess", "orienting the volume into axial slices"):
            geometry = ImageGeometry.from_image(ct.image)
            frame = axial_frame(geometry)
            stack_hu = frame.to_axial(_array_view(ct.image))
            center_rc = body_center_rc(stack_hu)

        channels_last = not options.plain
        with clock.stage("classify", f"classifying {stack_hu.shape[0]} slices"):
            classifier_prep = SlicePreprocessor(classifier_entry.preprocessing, stack_hu.shape,
                                                frame.spacing_mm, center_rc)
            probabilities = classify_slices(
                classifier, stack_hu, classifier_prep, device, autocast_dtype,
                batch_size=max(options.batch_size, 1) * 2, channels_last=channels_last,
                fuse=not options.plain,
                progress=progress, cancel=cancel,
            )
        gated = options.classifier_gating and not options.plain
        slice_indices = (
            gate_slices(probabilities, options.gating_threshold, options.gating_margin_mm,
                        frame.spacing_mm[0])
            if gated else np.arange(stack_hu.shape[0])
        )
        with clock.stage("segment", f"segmenting {len(slice_indices)} slices"):
            segmenter_prep = SlicePreprocessor(segmenter_entry.preprocessing, stack_hu.shape,
                                               frame.spacing_mm, center_rc)
            maps = segment_slices(
                segmenter, stack_hu, segmenter_prep, slice_indices, device, autocast_dtype,
                batch_size=options.batch_size, channels_last=channels_last,
                fuse=not options.plain, crop_to_image=not options.plain,
                progress=progress, cancel=cancel,
                liver_ends=_liver_ends(probabilities, slice_indices, frame, options) if gated
                else None,
            )
        with clock.stage("postprocess", "cleaning up the label map and measuring lesions"):
            labels_zyx = frame.from_axial(maps.labels(options.tumor_threshold))
            labels_zyx = postprocess_labels(
                labels_zyx, tuple(geometry.spacing_mm_xyz[::-1]),
                PostprocessOptions(min_lesion_volume_mm3=options.min_lesion_volume_mm3),
                slice_axis_zyx=frame.input_slice_axis_zyx,
            )
            # The files that need only the label map are written by a second thread from
            # here on, while this one measures and draws the overview. The second thread
            # spends most of its time in SimpleITK and NumPy, which release the GIL.
            label_writes = _LabelWrites(work_dir, geometry, frame, labels_zyx, maps,
                                        probabilities, options)
            background.enter_context(label_writes)
            measurements = measure(labels_zyx, geometry, frame)
        _raise_if_cancelled(cancel)

        with clock.stage("write", f"writing outputs to {output_dir}"):
            data = _report_data(
                ct, geometry, frame, stack_hu.shape, center_rc, probabilities, maps.segmented_slices,
                measurements, options,
                [classifier_entry, segmenter_entry], manifest, device, autocast_dtype, threads,
            )
            if options.write_overview:
                _write_overview(work_dir, ct, frame, stack_hu, labels_zyx, probabilities,
                                measurements, data)
            data["outputs"] = {**label_writes.wait(), **data["outputs"],
                               "report": OUTPUT_FILES["report"]}
        # The report is written last so it can carry the timing of every stage.
        data["timings_s"] = {k: round(v, 3) for k, v in clock.timings_s.items()}
        data["timings_s"]["total"] = round(time.perf_counter() - start, 3)
        write_json(work_dir / OUTPUT_FILES["report"], data)
        _raise_if_cancelled(cancel)  # a signal during writing still discards the folder

    logger.info("Done in %.1f s: %s", time.perf_counter() - start, data["summary"]["message"])
    return Report(output_dir=output_dir, measurements=measurements, data=data)


def _liver_ends(probabilities: np.ndarray, slice_indices: np.ndarray, frame: AxialFrame,
                options: SegmentOptions) -> LiverEnds | None:
    """Return where the U-Net starts and when it stops beyond the liver's ends.

    It starts at the gated slice with the highest classifier liver probability. A
    direction ends after a liver-free gap as long as the gating margin, and longer than
    the distance within which post-processing keeps tumor outside the liver. A pixel
    counts as liver-free below nine tenths of the lower of 0.5 and the tumor threshold.
    """
    if len(slice_indices) == 0:
        return None
    liver_probability = probabilities[slice_indices, 1] + probabilities[slice_indices, 2]
    gap_mm = max(options.gating_margin_mm,
                 PostprocessOptions().tumor_outside_liver_tolerance_mm)
    return LiverEnds(
        seed_slice=int(slice_indices[int(np.argmax(liver_probability))]),
        empty_slices=math.ceil(gap_mm / frame.spacing_mm[0]) + 1,
        empty_below=0.9 * min(0.5, options.tumor_threshold),
    )


def _raise_if_cancelled(cancel: CancelCheck | None) -> None:
    if cancel is not None and cancel():
        raise RunCancelledError("The run was cancelled.", "Start it again when ready.")


def _array_view(image) -> np.ndarray:
    import SimpleITK as sitk

    return sitk.GetArrayViewFromImage(image)


def _slice_positions_ras_z(geometry: ImageGeometry, frame: AxialFrame,
                           num_slices: int) -> np.ndarray:
    """Return the RAS z coordinate (mm) of each axial-stack slice centre."""
    size = np.asarray(geometry.size_xyz, dtype=np.float64)
    slice_axis_xyz = 2 - frame.input_slice_axis_zyx
    indices = np.tile((size - 1) / 2.0, (num_slices, 1))
    stack_to_input = [frame.input_slice_index(s, num_slices) for s in range(num_slices)]
    indices[:, slice_axis_xyz] = stack_to_input
    return geometry.index_to_ras(indices)[:, 2]


def _slice_rows(geometry, frame, probabilities, labels_zyx, slice_indices) -> list[dict]:
    num_slices = probabilities.shape[0]
    liver_mm2, tumor_mm2 = slice_areas_mm2(labels_zyx, frame)
    positions = _slice_positions_ras_z(geometry, frame, num_slices)
    segmented = np.zeros(num_slices, dtype=bool)
    segmented[slice_indices] = True
    rows = []
    for stack_index in range(num_slices):
        p = probabilities[stack_index]
        predicted = int(np.argmax(p))
        rows.append({
            "slice_index": frame.input_slice_index(stack_index, num_slices),
            "position_ras_z_mm": round(float(positions[stack_index]), 3),
            "p_background": round(float(p[0]), 4),
            "p_tumor": round(float(p[1]), 4),
            "p_no_tumor": round(float(p[2]), 4),
            "predicted_class": predicted,
            "predicted_name": SLICE_CLASS_NAMES[predicted],
            "liver_area_mm2": round(float(liver_mm2[stack_index]), 2),
            "tumor_area_mm2": round(float(tumor_mm2[stack_index]), 2),
            # The class the segmentation implies, beside the classifier's own.
            "segmentation_class": slice_class_from_labels(bool(liver_mm2[stack_index] > 0),
                                                          bool(tumor_mm2[stack_index] > 0)),
            "segmented": bool(segmented[stack_index]),
        })
    rows.sort(key=lambda row: row["slice_index"])
    return rows


def _summary(measurements: Measurements, probabilities: np.ndarray) -> dict:
    predicted = probabilities.argmax(axis=1)
    counts = {name: int((predicted == k).sum()) for k, name in enumerate(SLICE_CLASS_NAMES)}
    liver_found = measurements.liver_volume_ml > 0
    tumor_found = len(measurements.lesions) > 0
    if not liver_found:
        message = "no liver found"
    elif not tumor_found:
        message = f"liver {measurements.liver_volume_ml:.1f} mL, no tumor found"
    else:
        message = (
            f"liver {measurements.liver_volume_ml:.1f} mL, tumor "
            f"{measurements.tumor_volume_ml:.1f} mL ({measurements.tumor_burden_percent:.1f} % "
            f"burden), {len(measurements.lesions)} lesion(s)"
        )
    return {
        "message": message,
        "liver_found": liver_found,
        "tumor_found": tumor_found,
        "liver_volume_ml": round(measurements.liver_volume_ml, 3),
        "tumor_volume_ml": round(measurements.tumor_volume_ml, 3),
        "tumor_burden_percent": round(measurements.tumor_burden_percent, 2),
        "lesion_count": len(measurements.lesions),
        "slices_by_predicted_class": counts,
    }


def _report_data(ct: LoadedCT, geometry, frame, stack_shape, center_rc, probabilities,
                 slice_indices, measurements, options, entries, manifest: Manifest, device,
                 autocast_dtype, threads) -> dict:
    warnings = list(ct.warnings)
    middle_slice = (stack_shape[0] - 1) / 2.0
    center_zyx = frame.stack_to_input_index_zyx((middle_slice, *center_rc), stack_shape)
    body_center_ras = geometry.index_to_ras(center_zyx[::-1])
    summary = _summary(measurements, probabilities)
    if not summary["liver_found"]:
        warnings.append("No liver found: the segmentation is empty.")
    elif not summary["tumor_found"]:
        warnings.append("No tumor found: the 'Liver tumor' segment is empty.")
    if frame.obliquity_deg > 20.0:
        warnings.append(
            f"Oblique volume ({frame.obliquity_deg:.1f} degrees): slices were processed along "
            "the nearest axis.")
    summary["warnings"] = warnings
    return {
        "software": {"name": "LiverTumorAI", "version": __version__},
        "input": {
            "path": str(ct.source_path),
            "kind": ct.source_kind,
            "num_files": ct.num_files,
            "series_uid": ct.series_uid,
            "size_xyz": list(geometry.size_xyz),
            "spacing_mm_xyz": [round(v, 6) for v in geometry.spacing_mm_xyz],
            "origin_lps": [round(v, 6) for v in geometry.origin_lps],
            "direction_lps": [round(v, 9) for v in geometry.direction_lps],
            "axial_slice_axis_zyx": frame.input_slice_axis_zyx,
            "obliquity_deg": round(frame.obliquity_deg, 3),
            "body_center_ras": [round(v, 2) for v in body_center_ras],
        },
        "summary": summary,
        "liver": {
            "volume_ml": round(measurements.liver_volume_ml, 3),
            "centroid_ras": (None if measurements.liver_centroid_ras is None
                             else [round(v, 2) for v in measurements.liver_centroid_ras]),
        },
        "measurements": measurements.to_dict(),
        "slices": {
            "count": int(probabilities.shape[0]),
            "segmented": int(len(slice_indices)),
        },
        "models": [entry.summary() for entry in entries],
        "manifest": str(manifest.path),
        "device": str(device),
        "precision": "fp32" if autocast_dtype is None else str(autocast_dtype).replace("torch.", ""),
        "threads": threads if device.type == "cpu" else None,
        "settings": asdict(options),
        "warnings": warnings,
        "outputs": {},
    }


class _LabelWrites:
    """Writer of the outputs that need only the label map, on a second thread.

    Used as a context manager, so that the thread has finished before the output folder
    is completed or discarded. `wait` returns the written outputs by key and raises what
    the thread raised.
    """

    def __init__(self, work_dir: Path, geometry, frame, labels_zyx, maps: SegmentationMaps,
                 probabilities, options: SegmentOptions) -> None:
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="livertumorai-write")
        self._future = self._pool.submit(_write_label_outputs, work_dir, geometry, frame,
                                         labels_zyx, maps, probabilities, options)

    def wait(self) -> dict[str, str]:
        return self._future.result()

    def __enter__(self) -> "_LabelWrites":
        return self

    def __exit__(self, *exc_info) -> None:
        self._pool.shutdown(wait=True)


def _write_label_outputs(work_dir: Path, geometry, frame, labels_zyx,
                         maps: SegmentationMaps, probabilities, options) -> dict[str, str]:
    """Write the segmentation, the slice table and the optional maps; return them by key."""
    outputs = {}
    write_segmentation_nrrd(labels_zyx, geometry, work_dir / OUTPUT_FILES["segmentation"])
    outputs["segmentation"] = OUTPUT_FILES["segmentation"]
    rows = _slice_rows(geometry, frame, probabilities, labels_zyx, maps.segmented_slices)
    write_slices_csv(work_dir / OUTPUT_FILES["slices"], rows)
    outputs["slices"] = OUTPUT_FILES["slices"]
    if options.write_labelmap:
        write_labelmap(labels_zyx, geometry, work_dir / OUTPUT_FILES["labelmap"])
        outputs["labelmap"] = OUTPUT_FILES["labelmap"]
    if options.write_probability_map:
        write_probability_map(frame.from_axial(maps.tumor), geometry,
                              work_dir / OUTPUT_FILES["tumor_probability"])
        outputs["tumor_probability"] = OUTPUT_FILES["tumor_probability"]
    return outputs


def _write_overview(work_dir: Path, ct, frame, stack_hu, labels_zyx, probabilities,
                    measurements, data) -> None:
    from .overview import write_overview_png  # matplotlib is imported only when needed

    stack_labels = frame.to_axial(labels_zyx)
    lesion_slices = _lesion_stack_slices(measurements, frame, stack_hu.shape[0])
    write_overview_png(
        work_dir / OUTPUT_FILES["overview"], stack_hu, stack_labels, frame.spacing_mm,
        probabilities, lesion_slices, title=f"{Path(str(ct.source_path)).name}: "
        f"{data['summary']['message']}",
    )
    data["outputs"]["overview"] = OUTPUT_FILES["overview"]


def _lesion_stack_slices(measurements: Measurements, frame: AxialFrame,
                         num_slices: int) -> list[int]:
    """Return the axial-stack slice through the middle of each lesion, largest first."""
    slices = []
    for lesion in measurements.lesions:
        middle_input = (lesion.slice_range[0] + lesion.slice_range[1]) // 2
        # input_slice_index is its own inverse: it only reverses the order when flipped.
        slices.append(frame.input_slice_index(middle_input, num_slices))
    return slices

