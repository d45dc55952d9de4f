"""Overview PNG of a run: axial slices, a coronal reformat and the slice probabilities.

The inputs are axial stacks as :meth:`livertumorai.geometry.AxialFrame.to_axial` returns
them: axes (slice, row, column) = (inferior to superior, anterior to posterior, patient's
right to patient's left). Axial views are therefore shown as radiologists read them (the
patient's right on the left of the image, anterior at the top) and the coronal view with
superior at the top and the patient's right on the left.

The figure is drawn with matplotlib's Agg canvas on a `Figure` object, so the pyplot
backend of a calling program is neither used nor changed.
"""

from __future__ import annotations

import logging
import math
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

# Images are shown at most this many pixels per axis (every n-th voxel). An axial panel
# is under 400 pixels wide in the PNG, so more voxels only cost drawing time.
MAX_DISPLAY_PIXELS = 384

# Figure fractions around and between the panels (left to right, bottom to top).
_GRID_MARGINS = {"left": 0.03, "right": 0.99, "bottom": 0.07, "top": 0.92,
                 "wspace": 0.22, "hspace": 0.18}
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

    # Fixed margins replace constrained layout, which took about a third of the drawing
    # time in a profile. The layout of this figure never changes, so nothing needs measuring.
    figure = Figure(figsize=OVERVIEW_SIZE_IN, dpi=OVERVIEW_DPI)
    FigureCanvasAgg(figure)
    grid = figure.add_gridspec(2, MAX_AXIAL_VIEWS, height_ratios=(1.15, 1.0), **_GRID_MARGINS)
    figure.suptitle(title)

    for position in range(MAX_AXIAL_VIEWS):
        axes = figure.add_subplot(grid[0, position])
        if position < len(axial_slices):
            _draw_axial(axes, ct, labels, spacing_mm, axial_slices[position], reason)
        else:
            axes.set_axis_off()
    _draw_coronal(figure.add_subplot(grid[1, 0]), ct, labels, spacing_mm)
    _draw_probabilities(figure.add_subplot(grid[1, 1:]), probabilities, axial_slices)

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


def _display_steps(shape: tuple[int, ...]) -> tuple[int, ...]:
    """Return the stride per axis that keeps an image within MAX_DISPLAY_PIXELS."""
    return tuple(max(1, math.ceil(size / MAX_DISPLAY_PIXELS)) for size in shape)


def _draw_image(
    axes,
    image_hu: np.ndarray,
    labels: np.ndarray,
    pixel_mm: tuple[float, float],
) -> None:
    """Show a 2-D image (row 0 at the top) in mm with the window and label outlines.

    Column 0 must be the patient's right; the "R" marker is drawn on the left side.
    """
    steps = _display_steps(image_hu.shape)
    image = image_hu[:: steps[0], :: steps[1]].astype(np.float32)
    labels = labels[:: steps[0], :: steps[1]]
    height_mm = image.shape[0] * steps[0] * pixel_mm[0]
    width_mm = image.shape[1] * steps[1] * pixel_mm[1]

    width_hu, level_hu = ABDOMEN_WINDOW_HU
    axes.imshow(
        image,
        cmap="gray",
        vmin=level_hu - width_hu / 2,
        vmax=level_hu + width_hu / 2,
        extent=(0.0, width_mm, height_mm, 0.0),
        interpolation="nearest",
    )
    x_mm = (np.arange(image.shape[1]) + 0.5) * steps[1] * pixel_mm[1]
    y_mm = (np.arange(image.shape[0]) + 0.5) * steps[0] * pixel_mm[0]
    outlines = (
        (labels > 0, SEGMENT_LIVER.color_rgb),
        (labels == LABEL_TUMOR, SEGMENT_TUMOR.color_rgb),
    )
    for mask, color in outlines:
        # A contour needs both inside and outside pixels and at least a 2 x 2 grid.
        if min(mask.shape) >= 2 and mask.any() and not mask.all():
            axes.contour(x_mm, y_mm, mask.astype(np.float32), levels=[0.5], colors=[color], linewidths=1.2)
    axes.text(
        0.03,
        0.5,
        "R",
        transform=axes.transAxes,
        color=_MARKER_COLOR,
        fontsize=14,
        fontweight="bold",
        ha="left",
        va="center",
    )
    axes.set_xticks([])
    axes.set_yticks([])


def _draw_axial(axes, ct, labels, spacing_mm, slice_index: int, reason: str) -> None:
    _draw_image(axes, ct[slice_index], labels[slice_index], (spacing_mm[1], spacing_mm[2]))
    captions = {
        "lesion": "lesion",
        "liver": "largest liver section",
        "no liver": "no liver",
    }
    axes.set_title(f"Axial slice {slice_index} of {ct.shape[0]} ({captions[reason]})", fontsize=10)
    if reason == "no liver":
        axes.text(
            0.5,
            0.5,
            "No liver found",
            transform=axes.transAxes,
            color=_MARKER_COLOR,
            fontsize=14,
            ha="center",
            va="center",
        )


def _draw_coronal(axes, ct, labels, spacing_mm) -> None:
    """Draw the coronal plane through the row with the most tumor, else liver, voxels."""
    if ct.shape[0] < MIN_CORONAL_SLICES:
        axes.set_axis_off()
        axes.text(
            0.5,
            0.5,
            f"No coronal view: the volume has {ct.shape[0]} axial slice(s)",
            transform=axes.transAxes,
            ha="center",
            va="center",
        )
        return
    row = _coronal_row(labels)
    # Stack slices run inferior to superior; reverse them so superior is at the top.
    image = ct[::-1, row, :]
    coronal_labels = labels[::-1, row, :]
    _draw_image(axes, image, coronal_labels, (spacing_mm[0], spacing_mm[2]))
    axes.set_title(f"Coronal, row {row} of {ct.shape[1]} (superior at top)", fontsize=10)
    legend_handles = [
        Line2D([], [], color=SEGMENT_LIVER.color_rgb, label=SEGMENT_LIVER.name),
        Line2D([], [], color=SEGMENT_TUMOR.color_rgb, label=SEGMENT_TUMOR.name),
    ]
    axes.legend(handles=legend_handles, loc="lower right", fontsize=8, framealpha=0.6)


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
