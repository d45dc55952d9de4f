"""Image geometry and the axial slice stack the networks see.

SimpleITK reports size, spacing and origin in (x, y, z) order and in the LPS frame; its
NumPy arrays are in (z, y, x) order. This module is the one place that reverses between
the two. An *axial stack* is the input array transposed and flipped (never resampled) so
that its axes are (slice, row, column) = (inferior to superior, anterior to posterior,
patient's right to patient's left): the usual radiological view with the patient's right
on the left of the image. Results are mapped back with the exact inverse, so they land on
the input grid.

Oblique volumes use the nearest axis: a volume tilted by up to
``OBLIQUE_WARNING_DEG`` is treated as axial without comment, beyond that a warning is
logged because the networks then see tilted slices.
"""

from __future__ import annotations

import itertools
import logging
import math
from dataclasses import dataclass

import numpy as np
import SimpleITK as sitk

logger = logging.getLogger(__name__)

__all__ = [
    "OBLIQUE_WARNING_DEG",
    "ImageGeometry",
    "AxialFrame",
    "axial_frame",
    "xyz_to_zyx",
    "lps_to_ras",
]

# Past this tilt between a volume axis and the nearest patient axis the slices shown to the
# 2-D networks differ visibly from training slices (which are axial within a few degrees).
OBLIQUE_WARNING_DEG = 20.0


def xyz_to_zyx(values_xyz):
    """Reverse a SimpleITK (x, y, z) tuple into NumPy (z, y, x) order (and back)."""
    return tuple(values_xyz)[::-1]


def lps_to_ras(point_lps) -> tuple[float, float, float]:
    """Convert a point or vector from LPS (DICOM, ITK) to RAS (Slicer) by negating x and y."""
    x, y, z = (float(v) for v in point_lps)
    return (-x, -y, z)


@dataclass(frozen=True)
class ImageGeometry:
    """The grid of a 3-D image: what a result must match to lie on the input grid.

    Attributes:
        size_xyz: voxels along the image's i, j, k axes.
        spacing_mm_xyz: voxel spacing along i, j, k in mm.
        origin_lps: centre of the first voxel in LPS, mm.
        direction_lps: 3x3 direction matrix, row-major; column j is axis j in LPS.
    """

    size_xyz: tuple[int, int, int]
    spacing_mm_xyz: tuple[float, float, float]
    origin_lps: tuple[float, float, float]
    direction_lps: tuple[float, ...]

    @classmethod
    def from_image(cls, image: sitk.Image) -> ImageGeometry:
        """Read the geometry of a SimpleITK image."""
        return cls(
            size_xyz=tuple(int(v) for v in image.GetSize()),
            spacing_mm_xyz=tuple(float(v) for v in image.GetSpacing()),
            origin_lps=tuple(float(v) for v in image.GetOrigin()),
            direction_lps=tuple(float(v) for v in image.GetDirection()),
        )

    def apply_to(self, image: sitk.Image) -> sitk.Image:
        """Give `image` this geometry (its size must already match) and return it."""
        if tuple(image.GetSize()) != self.size_xyz:
            raise ValueError(f"image size {image.GetSize()} does not match {self.size_xyz}")
        image.SetSpacing(self.spacing_mm_xyz)
        image.SetOrigin(self.origin_lps)
        image.SetDirection(self.direction_lps)
        return image

    def image_from_array(self, array_zyx: np.ndarray) -> sitk.Image:
        """Wrap a (z, y, x) array as a SimpleITK image on this grid."""
        return self.apply_to(sitk.GetImageFromArray(array_zyx))

    @property
    def direction_matrix(self) -> np.ndarray:
        return np.asarray(self.direction_lps, dtype=np.float64).reshape(3, 3)

    @property
    def voxel_volume_mm3(self) -> float:
        return float(np.prod(self.spacing_mm_xyz))

    def index_to_lps(self, index_xyz) -> np.ndarray:
        """Map continuous voxel indices (x, y, z order; shape (3,) or (n, 3)) to LPS mm."""
        index = np.asarray(index_xyz, dtype=np.float64)
        scaled = index * np.asarray(self.spacing_mm_xyz)
        return scaled @ self.direction_matrix.T + np.asarray(self.origin_lps)

    def index_to_ras(self, index_xyz) -> np.ndarray:
        """Map continuous voxel indices (x, y, z order) to RAS mm."""
        return self.index_to_lps(index_xyz) * np.array([-1.0, -1.0, 1.0])


@dataclass(frozen=True)
class AxialFrame:
    """Transpose and flips that turn an input (z, y, x) array into an axial stack.

    Attributes:
        transpose: input array axes, in the order (superior, posterior, left).
        flip: whether each of those axes is reversed to point superior, posterior, left.
        spacing_mm: spacing of the axial stack along (slice, row, column).
        obliquity_deg: largest angle between a volume axis and its nearest patient axis.
    """

    transpose: tuple[int, int, int]
    flip: tuple[bool, bool, bool]
    spacing_mm: tuple[float, float, float]
    obliquity_deg: float

    def to_axial(self, array_zyx: np.ndarray) -> np.ndarray:
        """Return a view of an input-grid array as an axial stack (slice, row, column)."""
        stack = np.transpose(array_zyx, self.transpose + tuple(range(3, array_zyx.ndim)))
        for axis, flipped in enumerate(self.flip):
            if flipped:
                stack = np.flip(stack, axis=axis)
        return stack

    def from_axial(self, stack: np.ndarray) -> np.ndarray:
        """Map an axial stack (slice, row, column, ...) back to the input (z, y, x) grid."""
        array = stack
        for axis, flipped in enumerate(self.flip):
            if flipped:
                array = np.flip(array, axis=axis)
        inverse = tuple(int(i) for i in np.argsort(self.transpose))
        return np.ascontiguousarray(np.transpose(array, inverse + tuple(range(3, array.ndim))))

    def input_slice_index(self, stack_index: int, num_slices: int) -> int:
        """Return the index along the input's slice axis of axial stack slice `stack_index`."""
        return num_slices - 1 - stack_index if self.flip[0] else stack_index

    def stack_to_input_index_zyx(self, point_stack, stack_shape) -> np.ndarray:
        """Map a continuous (slice, row, column) stack position to an input (z, y, x) index."""
        point = np.asarray(point_stack, dtype=np.float64).copy()
        for axis, flipped in enumerate(self.flip):
            if flipped:
                point[axis] = stack_shape[axis] - 1 - point[axis]
        index_zyx = np.empty(3)
        index_zyx[list(self.transpose)] = point
        return index_zyx

    @property
    def input_slice_axis_zyx(self) -> int:
        """The input array axis (NumPy order) that runs inferior-superior."""
        return self.transpose[0]


def axial_frame(geometry: ImageGeometry) -> AxialFrame:
    """Find the transpose and flips that make an input array an axial stack.

    Each patient axis (L, P, S) is paired with the image axis whose direction is closest
    to it, choosing the pairing with the largest total alignment, so any storage order,
    any flips and moderately oblique volumes are handled without resampling.
    """
    direction = geometry.direction_matrix
    best_permutation = max(
        itertools.permutations(range(3)),
        key=lambda perm: sum(abs(direction[lps_axis, perm[lps_axis]]) for lps_axis in range(3)),
    )
    # best_permutation[k] is the SimpleITK axis (x=0, y=1, z=2) closest to LPS axis k.
    cosines = [abs(direction[k, best_permutation[k]]) for k in range(3)]
    obliquity_deg = max(math.degrees(math.acos(min(1.0, c))) for c in cosines)
    if obliquity_deg > OBLIQUE_WARNING_DEG:
        logger.warning(
            "The volume is oblique: an axis is %.1f degrees from the nearest patient axis "
            "(warning above %.0f). Slices are processed along the nearest axis, so accuracy "
            "may drop; reformat the CT to axial for best results.",
            obliquity_deg,
            OBLIQUE_WARNING_DEG,
        )

    stack_order_lps = (2, 1, 0)  # stack axes are (S, P, L)
    sitk_axes = [best_permutation[k] for k in stack_order_lps]
    transpose = tuple(2 - axis for axis in sitk_axes)  # SimpleITK axis j is NumPy axis 2 - j
    flip = tuple(bool(direction[k, best_permutation[k]] < 0) for k in stack_order_lps)
    spacing_mm = tuple(geometry.spacing_mm_xyz[axis] for axis in sitk_axes)
    return AxialFrame(
        transpose=transpose,
        flip=flip,
        spacing_mm=spacing_mm,
        obliquity_deg=obliquity_deg,
    )
