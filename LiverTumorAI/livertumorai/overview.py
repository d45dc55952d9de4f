"""Overview PNG of a run: axial slices, a coronal reformat and the slice probabilities.

The inputs are axial stacks as :meth:`livertumorai.geometry.AxialFrame.to_axial` returns
them: axes (slice, row, column) = (inferior to superior, anterior to posterior, patient's
right to patient's left). Axial views are therefore shown as radiologists read them (the
patient's right on the left of the image, anterior at the top) and the coronal view with
superior at the top and the patient's right on the left.

The figure is drawn with matplotlib's Agg canvas on a `Figure` object, so the pyplot
backend of a calling program is neither used nor changed. The image views are composed
as RGB arrays at their final pixel size, with the label outlines burned in, and placed
with `Figure.figimage`; only the probability plot is a matplotlib `Axes`. Timed alone on
the 512x512x129 CT of `benchmarks/BENCHMARKS.md`, this drew the overview in 0.145 s,
against 0.165 s with four image axes and contour lines.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.ticker import MaxNLocator

from livertumorai.constants import (
    LABEL_TUMOR,
    SEGMENT_LIVER,
    SEGMENT_TUMOR,
    SLICE_CLASS_NAMES,
)
from livertumorai.outputs import atomic_path

logger = logging.getLogger(__name__)

__all__ = [
    "OVERVIEW_SIZE_PX",
    "ABDOMEN_WINDOW_HU",
    "choose_axial_slices",
    "write_overview_png",
]

# Figure size: 12 x 8 inches at 100 dots per inch gives a 1200 x 800 pixel PNG.
OVERVIEW_SIZE_IN = (12.0, 8.0)
OVERVIEW_DPI = 100
OVERVIEW_SIZE_PX = (1200, 800)  # (width, height)

# Abdomen soft-tissue window (width 400 HU, level 40 HU), the usual window for liver CT.
ABDOMEN_WINDOW_HU = (400.0, 40.0)

MAX_AXIAL_VIEWS = 3

# Below this many slices a coronal reformat is a strip too thin to read.
MIN_CORONAL_SLICES = 3

# Boxes of the image views in figure pixels: (left, bottom, width, height), origin at the
# lower left. Each image is scaled to fit its box with square pixels in mm and centred.
_AXIAL_BOXES_PX = tuple((30 + 390 * index, 375, 360, 360) for index in range(MAX_AXIAL_VIEWS))
_CORONAL_BOX_PX = (30, 45, 360, 290)
# The probability plot, as figure fractions (left, bottom, width, height).
_PROBABILITY_AXES = (0.385, 0.085, 0.595, 0.325)
_TITLE_GAP_PX = 6
_OUTLINE_WIDTH_PX = 2
_PNG_COMPRESS_LEVEL = 1

# Line colours of the class probabilities, in SLICE_CLASS_NAMES order.
_PROBABILITY_COLORS = ("tab:gray", "tab:red", "tab:blue")
_MARKER_COLOR = "yellow"


def write_overview_png(
    path: str | os.PathLike,
    ct_axial_hu: np.ndarray,
    labels_axial: np.ndarray,
    spacing_mm: tuple[float, float, float],
    probabilities: np.ndarray,
    lesion_slices: Sequence[int],
    title: str,
) -> Path:
    """Draw the overview figure of one CT and write it as a PNG of OVERVIEW_SIZE_PX.

    Top row: up to three axial slices, through the largest lesions (`lesion_slices`, in
    the caller's order), else through the liver's largest cross-section, else the middle
    slice with a "No liver found" message. Bottom row: a coronal reformat through the
    largest tumor (or liver) cross-section, and the three classifier probabilities along
    the slices. Every image view has the abdomen window (W400 L40), liver and tumor
    outlines and an "R" on the patient's right side.

    Args:
        path: the PNG to write.
        ct_axial_hu: CT in HU, axial stack (slice, row, column).
        labels_axial: labels 0 background, 1 liver, 2 tumor, same shape as the CT.
        spacing_mm: spacing along (slice, row, column), in mm.
        probabilities: (slices, 3) classifier probabilities, in SLICE_CLASS_NAMES order.
        lesion_slices: axial stack indices of the slices through the largest lesions,
            largest first. Only the first three distinct ones are shown.
        title: figure title, for example the case name.

    Returns:
        `path` as a Path.

    Raises:
        ValueError: shapes do not match, or a lesion slice index is out of range.
    """
    path = Path(path)
    ct = np.asarray(ct_axial_hu)
    labels = np.asarray(labels_axial)
    probabilities = np.asarray(probabilities, dtype=np.float64)
    _check_inputs(ct, labels, spacing_mm, probabilities)
    axial_slices, reason = choose_axial_slices(labels, lesion_slices)

    figure = Figure(figsize=OVERVIEW_SIZE_IN, dpi=OVERVIEW_DPI)
    FigureCanvasAgg(figure)
    figure.suptitle(title, y=0.985)
    for position, slice_index in enumerate(axial_slices):
        _draw_axial(figure, _AXIAL_BOXES_PX[position], ct, labels, spacing_mm, slice_index,
                    reason)
    _draw_coronal(figure, _CORONAL_BOX_PX, ct, labels, spacing_mm)
    _draw_probabilities(figure.add_axes(_PROBABILITY_AXES), probabilities, axial_slices)

    with atomic_path(path) as temporary:
        # zlib level 1 encoded an overview in half the time of level 6, at a similar size.
        figure.savefig(temporary, format="png", dpi=OVERVIEW_DPI,
                       pil_kwargs={"compress_level": _PNG_COMPRESS_LEVEL})
    logger.info("Wrote overview %s (axial slices %s)", path, axial_slices)
    return path


def _check_inputs(
    ct: np.ndarray,
    labels: np.ndarray,
    spacing_mm: Sequence[float],
    probabilities: np.ndarray,
) -> None:
    if ct.ndim != 3 or ct.shape[0] == 0:
        raise ValueError(f"The CT stack has shape {ct.shape}; pass a (slice, row, column) stack.")
    if labels.shape != ct.shape:
        raise ValueError(f"The label stack has shape {labels.shape} but the CT stack has {ct.shape}.")
    if len(spacing_mm) != 3 or not all(float(s) > 0 for s in spacing_mm):
        raise ValueError(f"The spacing {spacing_mm} must be three positive values in mm.")
    expected = (ct.shape[0], len(SLICE_CLASS_NAMES))
    if probabilities.shape != expected:
        raise ValueError(
            f"The probabilities have shape {probabilities.shape}; expected {expected} "
            f"(slices, classes {', '.join(SLICE_CLASS_NAMES)})."
        )


def choose_axial_slices(labels_axial: np.ndarray, lesion_slices: Sequence[int]) -> tuple[list[int], str]:
    """Choose the axial slices to show and the reason for the choice.

    Returns:
        The slice indices and one of "lesion" (the first three distinct `lesion_slices`),
        "liver" (the slice with the most liver and tumor voxels) or "no liver" (the middle
        slice).

    Raises:
        ValueError: a lesion slice index is outside the stack.
    """
    num_slices = labels_axial.shape[0]
    chosen: list[int] = []
    for index in lesion_slices:
        index = int(index)
        if not 0 <= index < num_slices:
            raise ValueError(f"Lesion slice {index} is outside the axial stack of {num_slices} slices.")
        if index not in chosen:
            chosen.append(index)
        if len(chosen) == MAX_AXIAL_VIEWS:
            break
    if chosen:
        return chosen, "lesion"

    liver_voxels_per_slice = np.count_nonzero(labels_axial.reshape(num_slices, -1), axis=1)
    if liver_voxels_per_slice.max() > 0:
        return [int(np.argmax(liver_voxels_per_slice))], "liver"
    return [num_slices // 2], "no liver"


def _compose_view(image_hu: np.ndarray, labels: np.ndarray, pixel_mm: tuple[float, float],
                  box_px: tuple[int, int, int, int]) -> tuple[np.ndarray, int, int]:
    """Return an RGB view of a 2-D image scaled to fit `box_px`, and its lower-left corner.

    Row 0 is the top of the view. The image is windowed to ABDOMEN_WINDOW_HU, resampled by
    nearest neighbour so that a pixel covers the same mm in both directions, and the
    outlines of the liver (labels > 0) and the tumor are drawn over it.
    """
    left, bottom, box_width, box_height = box_px
    height_mm, width_mm = image_hu.shape[0] * pixel_mm[0], image_hu.shape[1] * pixel_mm[1]
    scale_px_per_mm = min(box_width / width_mm, box_height / height_mm)
    height = max(1, round(height_mm * scale_px_per_mm))
    width = max(1, round(width_mm * scale_px_per_mm))
    rows = ((np.arange(height) + 0.5) * image_hu.shape[0] / height).astype(np.intp)
    columns = ((np.arange(width) + 0.5) * image_hu.shape[1] / width).astype(np.intp)
    shown_hu = image_hu[rows[:, None], columns[None, :]].astype(np.float32)
    shown_labels = labels[rows[:, None], columns[None, :]]

    width_hu, level_hu = ABDOMEN_WINDOW_HU
    gray = np.clip((shown_hu - (level_hu - width_hu / 2)) * (255.0 / width_hu), 0, 255)
    view = np.repeat(gray.astype(np.uint8)[:, :, None], 3, axis=2)
    for mask, color in ((shown_labels > 0, SEGMENT_LIVER.color_rgb),
                        (shown_labels == LABEL_TUMOR, SEGMENT_TUMOR.color_rgb)):
        view[_outline(mask, _OUTLINE_WIDTH_PX)] = np.round(np.asarray(color) * 255)
    corner = (left + (box_width - width) // 2, bottom + (box_height - height) // 2)
    return view, corner[0], corner[1]


def _outline(mask: np.ndarray, width_px: int) -> np.ndarray:
    """Return the pixels of `mask` within `width_px` of a pixel outside it (4-neighbours)."""
    inside = mask.copy()
    for _ in range(width_px):
        eroded = inside.copy()
        eroded[1:] &= inside[:-1]
        eroded[:-1] &= inside[1:]
        eroded[:, 1:] &= inside[:, :-1]
        eroded[:, :-1] &= inside[:, 1:]
        inside = eroded
    return mask & ~inside


def _show_view(figure, image_hu, labels, pixel_mm, box_px, title: str) -> tuple[int, int, int, int]:
    """Place a composed view in `box_px` with a title above it and an "R" on its left.

    Returns the view's (left, bottom, width, height) in figure pixels.
    """
    view, left, bottom = _compose_view(image_hu, labels, pixel_mm, box_px)
    figure.figimage(view, xo=left, yo=bottom, origin="upper")
    height, width = view.shape[:2]
    width_px, height_px = OVERVIEW_SIZE_PX
    figure.text((left + width / 2) / width_px, (bottom + height + _TITLE_GAP_PX) / height_px,
                title, ha="center", va="bottom", fontsize=10)
    figure.text((left + 0.03 * width) / width_px, (bottom + height / 2) / height_px, "R",
                color=_MARKER_COLOR, fontsize=14, fontweight="bold", ha="left", va="center")
    return left, bottom, width, height


def _draw_axial(figure, box_px, ct, labels, spacing_mm, slice_index: int, reason: str) -> None:
    captions = {
        "lesion": "lesion",
        "liver": "largest liver section",
        "no liver": "no liver",
    }
    left, bottom, width, height = _show_view(
        figure, ct[slice_index], labels[slice_index], (spacing_mm[1], spacing_mm[2]), box_px,
        f"Axial slice {slice_index} of {ct.shape[0]} ({captions[reason]})")
    if reason == "no liver":
        width_px, height_px = OVERVIEW_SIZE_PX
        figure.text((left + width / 2) / width_px, (bottom + height / 2) / height_px,
                    "No liver found", color=_MARKER_COLOR, fontsize=14, ha="center",
                    va="center")


def _draw_coronal(figure, box_px, ct, labels, spacing_mm) -> None:
    """Draw the coronal plane through the row with the most tumor, else liver, voxels."""
    width_px, height_px = OVERVIEW_SIZE_PX
    left, bottom, box_width, box_height = box_px
    if ct.shape[0] < MIN_CORONAL_SLICES:
        figure.text((left + box_width / 2) / width_px, (bottom + box_height / 2) / height_px,
                    f"No coronal view: the volume has {ct.shape[0]} axial slice(s)",
                    ha="center", va="center")
        return
    row = _coronal_row(labels)
    # Stack slices run inferior to superior; reverse them so superior is at the top.
    view_left, view_bottom, view_width, _ = _show_view(
        figure, ct[::-1, row, :], labels[::-1, row, :], (spacing_mm[0], spacing_mm[2]), box_px,
        f"Coronal, row {row} of {ct.shape[1]} (superior at top)")
    legend_handles = [
        Line2D([], [], color=SEGMENT_LIVER.color_rgb, label=SEGMENT_LIVER.name),
        Line2D([], [], color=SEGMENT_TUMOR.color_rgb, label=SEGMENT_TUMOR.name),
    ]
    figure.legend(handles=legend_handles, loc="lower right", fontsize=8, framealpha=0.6,
                  bbox_to_anchor=((view_left + view_width) / width_px, view_bottom / height_px))


def _coronal_row(labels: np.ndarray) -> int:
    """Return the anterior-posterior row with the most tumor voxels, else liver, else the middle."""
    # Every second slice and column is enough to find the row, at a quarter of the cost.
    sample = labels[::2, :, ::2]
    for mask in (sample == LABEL_TUMOR, sample > 0):
        voxels_per_row = np.count_nonzero(mask, axis=(0, 2))
        if voxels_per_row.max() > 0:
            return int(np.argmax(voxels_per_row))
    return labels.shape[1] // 2


def _draw_probabilities(axes, probabilities: np.ndarray, axial_slices: Sequence[int]) -> None:
    num_slices = probabilities.shape[0]
    slice_indices = np.arange(num_slices)
    # A single slice draws no line, so mark the points.
    marker = "o" if num_slices < 2 else None
    for class_index, name in enumerate(SLICE_CLASS_NAMES):
        axes.plot(
            slice_indices,
            probabilities[:, class_index],
            color=_PROBABILITY_COLORS[class_index],
            marker=marker,
            linewidth=1.2,
            label=name,
        )
    for slice_index in axial_slices:
        axes.axvline(slice_index, color="black", linestyle=":", linewidth=1.0)
    axes.set_xlim(-0.5, num_slices - 0.5)
    if num_slices <= 10:
        axes.set_xticks(slice_indices)
    else:
        axes.xaxis.set_major_locator(MaxNLocator(integer=True))
    axes.set_ylim(-0.02, 1.02)
    axes.set_xlabel("Axial slice (inferior to superior); dotted: slices shown above")
    axes.set_ylabel("Slice class probability")
    # A fixed place, because loc="best" tests every plotted point to place the legend.
    axes.legend(loc="upper right", fontsize=8, framealpha=0.8)
    axes.grid(alpha=0.3)
