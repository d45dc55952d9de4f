"""Volumes, tumor burden and per-lesion measurements of a label map.

Label maps are integer arrays in NumPy (z, y, x) order on the input grid, with 0
background, 1 liver (liver tissue outside tumors) and 2 tumor. The whole liver is liver
plus tumor. Every coordinate reported here is RAS in mm (+x toward the patient's right,
+y anterior, +z superior), and every slice index is an index along the input array axis
that runs inferior-superior.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
from scipy import ndimage
from scipy.spatial import ConvexHull, QhullError
from scipy.spatial.distance import pdist

from livertumorai.constants import LABEL_BACKGROUND, LABEL_TUMOR
from livertumorai.geometry import AxialFrame, ImageGeometry
from livertumorai.postprocess import bounding_box, label_components, label_components_by_size

logger = logging.getLogger(__name__)

__all__ = [
    "Lesion",
    "Measurements",
    "label_lesions",
    "measure",
    "slice_areas_mm2",
]

_MM3_PER_ML = 1000.0

# Decimals kept by to_dict. Volumes keep 0.001 mL (1 mm3, the order of one CT voxel),
# percentages keep 0.01, and lengths and coordinates keep 0.01 mm.
_VOLUME_DECIMALS = 3
_PERCENT_DECIMALS = 2
_LENGTH_DECIMALS = 2


@dataclass(frozen=True)
class Lesion:
    """One 26-connected tumor component.

    Attributes:
        lesion_id: 1..n, ordered by volume, largest first. Equals the component's value
            in the array returned by :func:`label_lesions`.
        volume_ml: voxel count times voxel volume, in mL.
        longest_axial_diameter_mm: maximum over axial slices of the lesion's in-plane
            maximum Feret diameter, in mm, measured between pixel centres (see
            :func:`measure`).
        centroid_ras: mean position of the lesion's voxel centres, RAS, in mm.
        slice_range: (first, last) index, inclusive and with first <= last, along the
            input array axis that runs inferior-superior, of the slices the lesion touches.
        voxel_count: number of voxels.
    """

    lesion_id: int
    volume_ml: float
    longest_axial_diameter_mm: float
    centroid_ras: tuple[float, float, float]
    slice_range: tuple[int, int]
    voxel_count: int

    def to_dict(self) -> dict:
        """Return a JSON-ready dict with rounded values."""
        return {
            "lesion_id": self.lesion_id,
            "volume_ml": round(self.volume_ml, _VOLUME_DECIMALS),
            "longest_axial_diameter_mm": round(self.longest_axial_diameter_mm, _LENGTH_DECIMALS),
            "centroid_ras": [round(v, _LENGTH_DECIMALS) for v in self.centroid_ras],
            "slice_range": [int(v) for v in self.slice_range],
            "voxel_count": self.voxel_count,
        }


@dataclass(frozen=True)
class Measurements:
    """Volumes and lesions of one label map.

    Attributes:
        liver_volume_ml: whole-liver volume (liver plus tumor), in mL.
        tumor_volume_ml: tumor volume, in mL.
        tumor_burden_percent: tumor volume over whole-liver volume times 100; 0.0 when
            there is no liver.
        liver_centroid_ras: mean position of the whole-liver voxel centres, RAS, in mm;
            None when there is no liver.
        lesions: the tumor components, largest first.
    """

    liver_volume_ml: float
    tumor_volume_ml: float
    tumor_burden_percent: float
    liver_centroid_ras: tuple[float, float, float] | None
    lesions: tuple[Lesion, ...]

    def to_dict(self) -> dict:
        """Return a JSON-ready dict with rounded values; coordinates are RAS in mm."""
        centroid = self.liver_centroid_ras
        return {
            "liver_volume_ml": round(self.liver_volume_ml, _VOLUME_DECIMALS),
            "tumor_volume_ml": round(self.tumor_volume_ml, _VOLUME_DECIMALS),
            "tumor_burden_percent": round(self.tumor_burden_percent, _PERCENT_DECIMALS),
            "liver_centroid_ras": (
                None if centroid is None else [round(v, _LENGTH_DECIMALS) for v in centroid]
            ),
            "lesion_count": len(self.lesions),
            "lesions": [lesion.to_dict() for lesion in self.lesions],
        }


def label_lesions(labels_zyx: np.ndarray) -> tuple[np.ndarray, int]:
    """Label the 3-D connected components of the tumor label, largest first.

    Components are 26-connected (voxels sharing a face, an edge or a corner belong to
    the same lesion). They are numbered 1..n by decreasing voxel count; ties keep the
    order in which SciPy found them (first voxel in C order). Background and liver are 0.

    Args:
        labels_zyx: integer label map in (z, y, x) order.

    Returns:
        An int32 array of the same shape with lesion ids, and the number of lesions.
    """
    _check_labels(labels_zyx)
    lesion_ids = np.zeros(labels_zyx.shape, dtype=np.int32)
    box = bounding_box(labels_zyx == LABEL_TUMOR)
    if box is None:
        return lesion_ids, 0
    cropped_ids, sizes = label_components_by_size(labels_zyx[box] == LABEL_TUMOR)
    lesion_ids[box] = cropped_ids
    return lesion_ids, int(sizes.size)


def measure(labels_zyx: np.ndarray, geometry: ImageGeometry, frame: AxialFrame) -> Measurements:
    """Measure the whole liver, the tumor burden and each lesion of a label map.

    Volumes are voxel counts times the voxel volume. Centroids are the mean voxel index,
    mapped to RAS through the image geometry (so direction and origin are honoured).

    The longest axial diameter is measured on the axial stack (``frame.to_axial``). In
    each slice the lesion's pixel centres are placed at (row, column) times the in-plane
    spacing in mm, and the largest distance between two of them is found from the
    vertices of their convex hull. The convention is centre to centre, with no pixel
    width added. So a lesion of one pixel in every slice measures 0 mm, and a disc of
    radius r measures slightly less than 2r. Two pixels, or pixels on one line, are
    measured directly without a hull. The result is the maximum over slices.

    Args:
        labels_zyx: integer label map in (z, y, x) order with values 0, 1, 2, on the grid
            described by `geometry`.
        geometry: grid of the label map (spacing, origin, direction).
        frame: the axial frame of `geometry` (``axial_frame(geometry)``).

    Returns:
        The measurements; lesions are ordered by volume, largest first.

    Raises:
        ValueError: if the label map is not 3-D, contains values other than 0, 1 and 2, or
            its shape does not match `geometry`.
    """
    _check_labels(labels_zyx)
    expected_shape = tuple(int(v) for v in geometry.size_xyz[::-1])
    if labels_zyx.shape != expected_shape:
        raise ValueError(
            f"labels_zyx has shape {labels_zyx.shape} but the geometry's size (x, y, z) "
            f"{geometry.size_xyz} needs {expected_shape} in (z, y, x) order; pass the "
            "geometry of the image the labels were made on."
        )
    voxel_ml = geometry.voxel_volume_mm3 / _MM3_PER_ML

    # Every count below works in the whole liver's bounding box, a fraction of the CT.
    liver_box = bounding_box(labels_zyx > LABEL_BACKGROUND)
    if liver_box is None:
        liver_box = tuple(slice(0, 0) for _ in range(3))
    cropped = labels_zyx[liver_box]
    offset_zyx = tuple(part.start for part in liver_box)
    whole_liver = cropped > LABEL_BACKGROUND
    whole_liver_voxels = int(np.count_nonzero(whole_liver))
    tumor_voxels = int(np.count_nonzero(cropped == LABEL_TUMOR))
    liver_centroid_ras = _centroid_ras(whole_liver, offset_zyx, geometry)
    del whole_liver

    lesions = _measure_lesions(cropped, offset_zyx, geometry, frame, voxel_ml)

    liver_volume_ml = whole_liver_voxels * voxel_ml
    tumor_volume_ml = tumor_voxels * voxel_ml
    burden_percent = 100.0 * tumor_voxels / whole_liver_voxels if whole_liver_voxels else 0.0
    logger.info(
        "Measured whole liver %.1f mL, tumor %.2f mL (%.2f %% burden), %d lesions.",
        liver_volume_ml,
        tumor_volume_ml,
        burden_percent,
        len(lesions),
    )
    return Measurements(
        liver_volume_ml=liver_volume_ml,
        tumor_volume_ml=tumor_volume_ml,
        tumor_burden_percent=burden_percent,
        liver_centroid_ras=liver_centroid_ras,
        lesions=lesions,
    )


def slice_areas_mm2(labels_zyx: np.ndarray, frame: AxialFrame) -> tuple[np.ndarray, np.ndarray]:
    """Return the whole-liver and tumor area of each axial slice, in mm^2.

    Args:
        labels_zyx: integer label map in (z, y, x) order.
        frame: axial frame of the label map's geometry.

    Returns:
        Two float64 arrays with one value per axial-stack slice, ordered inferior to
        superior: whole-liver area (liver plus tumor) and tumor area, each the pixel
        count times ``frame.spacing_mm[1] * frame.spacing_mm[2]``. Map a stack index to
        the input slice index with ``frame.input_slice_index``.
    """
    _check_labels(labels_zyx)
    stack = frame.to_axial(labels_zyx)
    pixel_area_mm2 = float(frame.spacing_mm[1]) * float(frame.spacing_mm[2])
    liver_pixels = np.count_nonzero(stack > LABEL_BACKGROUND, axis=(1, 2))
    tumor_pixels = np.count_nonzero(stack == LABEL_TUMOR, axis=(1, 2))
    return (
        liver_pixels.astype(np.float64) * pixel_area_mm2,
        tumor_pixels.astype(np.float64) * pixel_area_mm2,
    )


def _measure_lesions(
    labels_zyx: np.ndarray,
    offset_zyx: tuple[int, int, int],
    geometry: ImageGeometry,
    frame: AxialFrame,
    voxel_ml: float,
) -> tuple[Lesion, ...]:
    """Measure each tumor component, working inside the tumors' bounding box.

    `labels_zyx` may be a box of the full label map, whose first voxel lies at index
    `offset_zyx` of the full map.
    """
    tumor_box = bounding_box(labels_zyx == LABEL_TUMOR)
    if tumor_box is None:
        return ()
    # Components keep cc3d's ids here and are visited largest first, which numbers them
    # as label_lesions does without renumbering every voxel of the box.
    component_ids, sizes = label_components(labels_zyx[tumor_box] == LABEL_TUMOR)
    component_boxes = ndimage.find_objects(component_ids)
    tumor_offset = tuple(o + part.start for o, part in zip(offset_zyx, tumor_box))
    row_spacing_mm, column_spacing_mm = float(frame.spacing_mm[1]), float(frame.spacing_mm[2])

    lesions = []
    for index, component_index in enumerate(np.argsort(-sizes, kind="stable"), start=1):
        lesion_box = component_boxes[component_index]
        mask = component_ids[lesion_box] == component_index + 1
        offset = tuple(o + part.start for o, part in zip(tumor_offset, lesion_box))
        voxel_count = int(np.count_nonzero(mask))

        # The axial stack of the box runs inferior to superior like that of the full
        # array, so its slice k lies at box input index input_slice_index(k, box depth).
        stack = frame.to_axial(mask)
        occupied = np.flatnonzero(np.any(stack, axis=(1, 2)))
        box_depth = mask.shape[frame.input_slice_axis_zyx]
        box_start = offset[frame.input_slice_axis_zyx]
        ends = [
            box_start + frame.input_slice_index(int(k), box_depth)
            for k in (occupied[0], occupied[-1])
        ]
        diameter_mm = max(
            _max_feret_diameter_mm(stack[k], row_spacing_mm, column_spacing_mm) for k in occupied
        )
        lesions.append(
            Lesion(
                lesion_id=index,
                volume_ml=voxel_count * voxel_ml,
                longest_axial_diameter_mm=diameter_mm,
                centroid_ras=_centroid_ras(mask, offset, geometry),
                slice_range=(min(ends), max(ends)),
                voxel_count=voxel_count,
            )
        )
        logger.debug("Lesion %s.", lesions[-1])
    return tuple(lesions)


def _centroid_ras(
    mask_zyx: np.ndarray, offset_zyx: tuple[int, int, int], geometry: ImageGeometry
) -> tuple[float, float, float] | None:
    """Return the RAS centroid of a mask's voxel centres, or None for an empty mask.

    The mean index along each axis comes from the mask's projection on that axis, which
    needs no per-voxel coordinate arrays.
    """
    total = np.count_nonzero(mask_zyx)
    if total == 0:
        return None
    mean_index_zyx = []
    for axis in range(3):
        other_axes = tuple(a for a in range(3) if a != axis)
        counts = np.count_nonzero(mask_zyx, axis=other_axes)
        indices = np.arange(counts.size, dtype=np.float64) + offset_zyx[axis]
        mean_index_zyx.append(float(np.dot(counts, indices)) / total)
    ras = geometry.index_to_ras(mean_index_zyx[::-1])
    return (float(ras[0]), float(ras[1]), float(ras[2]))


def _max_feret_diameter_mm(
    mask_2d: np.ndarray, row_spacing_mm: float, column_spacing_mm: float
) -> float:
    """Return the largest centre-to-centre distance between two pixels of a 2-D mask, in mm.

    Only the first and last pixel of each row can be hull vertices, so the hull is built
    from those. Qhull fails on fewer than three points or on points along one line, and
    then the maximum is taken over all pairs of those (few) points.
    """
    rows = np.flatnonzero(np.any(mask_2d, axis=1))
    if rows.size == 0:
        return 0.0
    row_pixels = mask_2d[rows]
    first_columns = np.argmax(row_pixels, axis=1)
    last_columns = row_pixels.shape[1] - 1 - np.argmax(row_pixels[:, ::-1], axis=1)
    points_mm = np.column_stack(
        (
            np.concatenate((rows, rows)) * row_spacing_mm,
            np.concatenate((first_columns, last_columns)) * column_spacing_mm,
        )
    )
    points_mm = np.unique(points_mm, axis=0)
    if len(points_mm) < 2:
        return 0.0
    if len(points_mm) >= 3:
        try:
            points_mm = points_mm[ConvexHull(points_mm).vertices]
        except QhullError:
            pass  # collinear points: every pair is compared below
    return float(pdist(points_mm).max())


def _check_labels(labels_zyx: np.ndarray) -> None:
    if not isinstance(labels_zyx, np.ndarray) or labels_zyx.ndim != 3:
        shape = getattr(labels_zyx, "shape", type(labels_zyx).__name__)
        raise ValueError(f"labels_zyx must be a 3-D NumPy array, got {shape}.")
    if not np.issubdtype(labels_zyx.dtype, np.integer):
        raise ValueError(
            f"labels_zyx must hold integer labels 0, 1, 2, got dtype {labels_zyx.dtype}."
        )
    if labels_zyx.size and (labels_zyx.min() < LABEL_BACKGROUND or labels_zyx.max() > LABEL_TUMOR):
        raise ValueError(
            f"labels_zyx contains values from {labels_zyx.min()} to {labels_zyx.max()}, but only "
            "0 (background), 1 (liver) and 2 (tumor) are allowed."
        )
