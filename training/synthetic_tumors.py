"""Synthetic liver tumors inserted into CT, so the networks can learn tumors without tumor labels.

The ingredients come from Hu et al., "Label-Free Liver Tumor Segmentation" (CVPR 2023,
arXiv 2303.14869). Lesions have shapes of distorted ellipsoids and a texture of scaled-up
Gaussian noise, and they sit inside the liver without colliding with vessels. Sizes include
tiny lesions, and edges are soft. This module is an independent implementation, and the
details below are its own choices. It models no mass effect: tissue around a lesion is not
pushed aside.

Arrays are (z, y, x) NumPy order, which for the engine's axial stacks is (slice, row, column):
slices inferior to superior, rows anterior to posterior, columns patient right to left.
Positions are in mm from the centre of voxel (0, 0, 0) along the array axes, so anisotropic
spacing gives physically round lesions.

How a lesion changes the CT (all choices here, not the paper's numbers):

* Shape: an ellipsoid with semi-axes in ``axis_ratio_range`` of the longest one and a random
  3-D orientation. Its surface is pushed in or out along the radius by a smooth random field
  of relative amplitude ``distortion`` (a cubic-spline interpolated noise lattice whose
  spacing scales with the lesion). The longest semi-axis is shrunk by ``1 + distortion`` so
  that every changed voxel lies within ``diameter_mm / 2`` of the centre. The sampled
  diameter is therefore the maximum extent of the lesion along any axis.
* Edge: the blending weight goes from 1 to 0 with a smoothstep over the inner
  ``edge_softness_mm`` of the lesion, measured along the radius.
* Intensity: the CT gets ``weight * (contrast_hu + texture_hu)`` added. The CT's own noise and
  fine structure stay, so the lesion has the scanner's noise like a real one. Contrast is to
  the surrounding liver: mostly darker (hypodense), with ``bright_probability`` brighter.
  The texture is clipped to keep the sign of the contrast and at least
  ``1 - texture_clip_fraction`` of its magnitude, so the lesion has no interior holes.
* Placement: centres are drawn among liver voxels (label 1). A voxel of the liver is a
  vessel when its CT smoothed by ``vessel_smoothing_mm`` is more than
  ``vessel_threshold_hu`` above the median of the nearby liver. Vessels are never centres
  and keep their values. Voxels darker than that median by more than
  ``dark_tissue_threshold_hu`` (fat at the liver edge, cysts) also keep their values. A
  location is rejected when more than ``max_vessel_fraction`` of the lesion's core (its
  undistorted ellipsoid) is vessel, or more than ``max_outside_fraction`` of it lies
  outside the liver or the array. The lesion is clipped to the liver (label 1), so
  existing tumors and voxels outside the liver never change. Lesions do not overlap.
* Labels: label 2 is set exactly on the liver voxels whose CT value changed by more than
  ``label_threshold_hu``. The rest of the soft edge changes the CT by less than that and
  stays label 1.

Two entry points use the same lesion model: `insert_tumors` for a 3-D stack in HU, and
`SyntheticTumorTransform` for the cached 2.5-D training samples of training/dataset.py.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from scipy import ndimage

from livertumorai.constants import LABEL_LIVER, LABEL_TUMOR

logger = logging.getLogger(__name__)

__all__ = [
    "SyntheticTumorConfig",
    "LesionInfo",
    "CaseGeometry",
    "case_geometries",
    "insert_tumors",
    "SyntheticTumorTransform",
]

# Radius of liver around a lesion whose median is the local liver reference (mm). Small
# lesions still get a reference from a few thousand voxels.
_REFERENCE_RADIUS_MM = 15.0
# Shortest lattice spacing of the shape distortion field (mm).
_MIN_DISTORTION_SPACING_MM = 1.0
# Samples of the texture and distortion lattices outside the lesion's bounding cube, so the
# cubic spline never reads past the lattice edge.
_LATTICE_PAD = 2


# --------------------------------------------------------------------------- configuration


@dataclass(frozen=True)
class SyntheticTumorConfig:
    """Parameters of synthetic tumor insertion. Every range is (min, max), inclusive.

    Attributes:
        count_range: lesions per call: per volume in `insert_tumors`, per sample in the
            transform. A lesion whose location is rejected ``max_attempts`` times is skipped.
        diameter_range_mm: diameter of the sphere that contains every changed voxel, drawn
            log-uniformly, so for (5, 60) 44 % of lesions are under 15 mm.
        dark_contrast_range_hu: mean change of a darker lesion from the liver (negative).
        bright_contrast_range_hu: mean change of a brighter lesion (positive).
        bright_probability: chance that a lesion is brighter than the liver.
        texture_std_range_hu: standard deviation of the texture lattice values.
        texture_grain_range_mm: spacing of the texture lattice, the size of its blotches.
        texture_clip_fraction: the texture may move the contrast by at most this fraction of
            it, in [0, 1).
        edge_softness_range_mm: width of the blending ramp at the lesion edge. It is capped
            at half the smallest radius of the lesion.
        axis_ratio_range: semi-axes as fractions of the longest one, in (0, 1].
        distortion_range: amplitude of the surface distortion as a fraction of the radius,
            in [0, 1).
        distortion_scale: lattice spacing of the distortion field as a fraction of the
            diameter (larger gives smoother, lobulated shapes).
        vessel_threshold_hu: liver voxels brighter than the local liver median by more than
            this (after smoothing) count as vessels.
        dark_tissue_threshold_hu: liver voxels darker than the local liver median by more
            than this (after smoothing) are left unchanged.
        vessel_smoothing_mm: Gaussian sigma applied before both thresholds (in-plane only
            in the transform, whose channels are not evenly spaced).
        max_vessel_fraction: largest share of the lesion core (the undistorted ellipsoid)
            that may be vessel.
        max_outside_fraction: largest share of the lesion core that may lie outside the
            liver (label 1) or the array; the part outside is clipped.
        label_threshold_hu: a liver voxel is labelled tumor when its CT changed by more
            than this.
        slice_offset_fraction: transform only: the lesion centre lies at most this fraction
            of the lesion's smallest radius above or below the labelled slice, so that slice
            always cuts the lesion core.
        max_attempts: locations tried per lesion.
    """

    count_range: tuple[int, int] = (1, 3)
    diameter_range_mm: tuple[float, float] = (5.0, 60.0)
    dark_contrast_range_hu: tuple[float, float] = (-90.0, -20.0)
    bright_contrast_range_hu: tuple[float, float] = (20.0, 60.0)
    bright_probability: float = 0.1
    texture_std_range_hu: tuple[float, float] = (5.0, 20.0)
    texture_grain_range_mm: tuple[float, float] = (2.0, 8.0)
    texture_clip_fraction: float = 0.6
    edge_softness_range_mm: tuple[float, float] = (0.5, 4.0)
    axis_ratio_range: tuple[float, float] = (0.7, 1.0)
    distortion_range: tuple[float, float] = (0.0, 0.3)
    distortion_scale: float = 0.35
    vessel_threshold_hu: float = 30.0
    dark_tissue_threshold_hu: float = 80.0
    vessel_smoothing_mm: float = 1.0
    max_vessel_fraction: float = 0.05
    max_outside_fraction: float = 0.3
    label_threshold_hu: float = 5.0
    slice_offset_fraction: float = 0.7
    max_attempts: int = 10

    def __post_init__(self) -> None:
        for name in (item.name for item in dataclasses.fields(self)):
            if name.endswith("_range") or "_range_" in name:
                value = tuple(getattr(self, name))
                object.__setattr__(self, name, value)
                if len(value) != 2 or value[0] > value[1]:
                    raise ValueError(f"{name}={value} must be a (min, max) pair with "
                                     "min <= max")
        self._check()

    def _check(self) -> None:
        checks = (
            (self.count_range[0] >= 0, "count_range must not be negative"),
            (self.diameter_range_mm[0] > 0, "diameter_range_mm must be positive"),
            (self.dark_contrast_range_hu[1] < 0, "dark_contrast_range_hu must be negative"),
            (self.bright_contrast_range_hu[0] > 0, "bright_contrast_range_hu must be positive"),
            (0.0 <= self.bright_probability <= 1.0, "bright_probability must be in [0, 1]"),
            (self.texture_std_range_hu[0] >= 0, "texture_std_range_hu must not be negative"),
            (self.texture_grain_range_mm[0] > 0, "texture_grain_range_mm must be positive"),
            (0.0 <= self.texture_clip_fraction < 1.0, "texture_clip_fraction must be in [0, 1)"),
            (self.edge_softness_range_mm[0] >= 0, "edge_softness_range_mm must not be negative"),
            (0.0 < self.axis_ratio_range[0] and self.axis_ratio_range[1] <= 1.0,
             "axis_ratio_range must lie in (0, 1]"),
            (0.0 <= self.distortion_range[0] and self.distortion_range[1] < 1.0,
             "distortion_range must lie in [0, 1)"),
            (self.distortion_scale > 0, "distortion_scale must be positive"),
            (self.vessel_smoothing_mm >= 0, "vessel_smoothing_mm must not be negative"),
            (0.0 <= self.max_vessel_fraction <= 1.0, "max_vessel_fraction must be in [0, 1]"),
            (0.0 <= self.max_outside_fraction <= 1.0, "max_outside_fraction must be in [0, 1]"),
            (self.label_threshold_hu > 0, "label_threshold_hu must be positive"),
            (0.0 <= self.slice_offset_fraction <= 1.0, "slice_offset_fraction must be in [0, 1]"),
            (self.max_attempts >= 1, "max_attempts must be at least 1"),
        )
        for ok, message in checks:
            if not ok:
                raise ValueError(f"invalid synthetic tumor configuration: {message} ({self})")
        weakest_hu = (1.0 - self.texture_clip_fraction) * min(
            -self.dark_contrast_range_hu[1],
            self.bright_contrast_range_hu[0] if self.bright_probability > 0 else math.inf,
        )
        if weakest_hu <= self.label_threshold_hu:
            raise ValueError(
                f"the weakest lesion changes the CT by {weakest_hu:.1f} HU, not more than "
                f"label_threshold_hu={self.label_threshold_hu}, so its interior would not be "
                "labelled; raise the smallest contrast or lower texture_clip_fraction"
            )

    def to_dict(self) -> dict:
        """Return the parameters as a JSON-ready dict (ranges as lists)."""
        return {key: list(value) if isinstance(value, tuple) else value
                for key, value in dataclasses.asdict(self).items()}

    @classmethod
    def from_dict(cls, data: Mapping[str, object]) -> SyntheticTumorConfig:
        """Build a configuration from `to_dict` output; missing keys take the defaults.

        Raises:
            ValueError: an unknown key, or a value rejected by the checks above.
        """
        known = {field.name for field in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown synthetic tumor parameters {unknown}; known: "
                             f"{sorted(known)}")
        return cls(**{key: tuple(value) if isinstance(value, list) else value
                      for key, value in data.items()})


@dataclass(frozen=True)
class LesionInfo:
    """One inserted lesion, as drawn and as applied.

    Attributes:
        center_mm: centre (z, y, x) in mm from the centre of voxel (0, 0, 0).
        center_index: voxel nearest the centre, (z, y, x).
        diameter_mm: diameter of the sphere about the centre that contains every changed voxel.
        semi_axes_mm: semi-axes of the undistorted ellipsoid.
        distortion: surface distortion amplitude as a fraction of the radius.
        contrast_hu: mean change of the CT in the lesion interior.
        texture_std_hu: standard deviation of the texture lattice.
        texture_grain_mm: spacing of the texture lattice.
        edge_softness_mm: width of the blending ramp after capping.
        changed_voxels: voxels whose CT value changed.
        labelled_voxels: voxels that became label 2.
        clipped_voxels: voxels the lesion would have changed but which are vessel, dark
            tissue, outside the liver or taken by an earlier lesion.
        attempts: locations tried before this one was accepted.
    """

    center_mm: tuple[float, float, float]
    center_index: tuple[int, int, int]
    diameter_mm: float
    semi_axes_mm: tuple[float, float, float]
    distortion: float
    contrast_hu: float
    texture_std_hu: float
    texture_grain_mm: float
    edge_softness_mm: float
    changed_voxels: int
    labelled_voxels: int
    clipped_voxels: int
    attempts: int

    def to_dict(self) -> dict:
        return {key: list(value) if isinstance(value, tuple) else value
                for key, value in dataclasses.asdict(self).items()}


# --------------------------------------------------------------------------- lesion model


class _NoiseLattice:
    """Gaussian noise on a cubic lattice about the lesion centre, read by cubic spline."""

    def __init__(self, rng: np.random.Generator, half_size_mm: float, spacing_mm: float) -> None:
        self.spacing_mm = spacing_mm
        self.origin_mm = -half_size_mm - _LATTICE_PAD * spacing_mm
        count = int(math.ceil(2.0 * half_size_mm / spacing_mm)) + 1 + 2 * _LATTICE_PAD
        values = rng.standard_normal((count, count, count))
        self.coefficients = ndimage.spline_filter(values, order=3, mode="nearest")

    def sample(self, offsets_mm: np.ndarray) -> np.ndarray:
        """Interpolate at (n, 3) offsets from the lesion centre, mm; returns (n,)."""
        coordinates = (offsets_mm.T - self.origin_mm) / self.spacing_mm
        return ndimage.map_coordinates(self.coefficients, coordinates, order=3,
                                       mode="nearest", prefilter=False)


@dataclass
class _Lesion:
    """Shape and intensity of one lesion, evaluated at any offsets from its centre."""

    diameter_mm: float
    semi_axes_mm: np.ndarray  # (3,) along the columns of `rotation`
    rotation: np.ndarray  # (3, 3) orthonormal, columns are the lesion axes in (z, y, x)
    distortion: float
    distortion_field: _NoiseLattice
    contrast_hu: float
    texture_std_hu: float
    texture_grain_mm: float
    texture_field: _NoiseLattice
    texture_clip_fraction: float
    edge_softness_mm: float

    @property
    def radius_mm(self) -> float:
        return self.diameter_mm / 2.0

    @property
    def inner_radius_mm(self) -> float:
        """Smallest distance from the centre to the distorted surface."""
        return float(self.semi_axes_mm.min()) * (1.0 - self.distortion)

    def ellipsoid_mask(self, offsets_mm: np.ndarray) -> np.ndarray:
        """Return whether (..., 3) offsets from the centre (mm) lie in the plain ellipsoid."""
        in_axes = offsets_mm @ self.rotation / self.semi_axes_mm
        return (in_axes * in_axes).sum(axis=-1) <= 1.0

    def evaluate(self, offsets_mm: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Return blending weight in [0, 1] and HU change at full weight, both (n,) float32.

        Args:
            offsets_mm: (n, 3) positions relative to the centre, (z, y, x) mm.
        """
        distance_mm = np.sqrt((offsets_mm * offsets_mm).sum(axis=1))
        in_axes = offsets_mm @ self.rotation / self.semi_axes_mm
        ellipsoid_radius = np.sqrt((in_axes * in_axes).sum(axis=1))
        field = np.clip(self.distortion_field.sample(offsets_mm), -1.0, 1.0)
        normalised_radius = ellipsoid_radius / (1.0 + self.distortion * field)

        # Distance to the surface along the ray from the centre, negative inside.
        centre = normalised_radius < 1e-9
        surface_mm = distance_mm / np.where(centre, 1.0, normalised_radius)
        signed_distance_mm = np.where(centre, -self.inner_radius_mm, distance_mm - surface_mm)
        if self.edge_softness_mm > 0:
            ramp = np.clip(-signed_distance_mm / self.edge_softness_mm, 0.0, 1.0)
            weight = ramp * ramp * (3.0 - 2.0 * ramp)
        else:
            weight = (signed_distance_mm < 0).astype(np.float64)

        change_hu = self.contrast_hu + self.texture_std_hu * self.texture_field.sample(offsets_mm)
        low, high = sorted((self.contrast_hu * (1.0 - self.texture_clip_fraction),
                            self.contrast_hu * (1.0 + self.texture_clip_fraction)))
        change_hu = np.clip(change_hu, low, high)
        return weight.astype(np.float32), change_hu.astype(np.float32)


def _draw_lesion(rng: np.random.Generator, config: SyntheticTumorConfig) -> _Lesion:
    """Draw the size, shape and intensity of one lesion (location is drawn separately)."""
    low, high = config.diameter_range_mm
    diameter_mm = float(np.exp(rng.uniform(np.log(low), np.log(high))))
    distortion = float(rng.uniform(*config.distortion_range))

    ratios = rng.uniform(*config.axis_ratio_range, size=3)
    ratios[rng.integers(3)] = 1.0
    semi_axes_mm = ratios * (diameter_mm / 2.0) / (1.0 + distortion)
    inner_radius_mm = float(semi_axes_mm.min()) * (1.0 - distortion)

    distortion_spacing_mm = max(config.distortion_scale * diameter_mm, _MIN_DISTORTION_SPACING_MM)
    distortion_field = _NoiseLattice(rng, diameter_mm / 2.0, distortion_spacing_mm)

    bright = rng.random() < config.bright_probability
    contrast_range = config.bright_contrast_range_hu if bright else config.dark_contrast_range_hu
    contrast_hu = float(rng.uniform(*contrast_range))
    texture_std_hu = float(rng.uniform(*config.texture_std_range_hu))
    texture_grain_mm = float(rng.uniform(*config.texture_grain_range_mm))
    texture_field = _NoiseLattice(rng, diameter_mm / 2.0, texture_grain_mm)
    edge_softness_mm = min(float(rng.uniform(*config.edge_softness_range_mm)),
                           0.5 * inner_radius_mm)

    return _Lesion(
        diameter_mm=diameter_mm,
        semi_axes_mm=semi_axes_mm,
        rotation=_random_rotation(rng),
        distortion=distortion,
        distortion_field=distortion_field,
        contrast_hu=contrast_hu,
        texture_std_hu=texture_std_hu,
        texture_grain_mm=texture_grain_mm,
        texture_field=texture_field,
        texture_clip_fraction=config.texture_clip_fraction,
        edge_softness_mm=edge_softness_mm,
    )


def _random_rotation(rng: np.random.Generator) -> np.ndarray:
    """Return a rotation matrix drawn uniformly (QR of a Gaussian matrix, signs fixed)."""
    q, r = np.linalg.qr(rng.standard_normal((3, 3)))
    q = q * np.sign(np.diag(r))
    if np.linalg.det(q) < 0:
        q[:, 0] = -q[:, 0]
    return q


# --------------------------------------------------------------------------- insertion core


@dataclass
class _Stack:
    """Working arrays shared by the lesions of one call.

    Attributes:
        ct_hu: (S, H, W) float32 CT, changed in place.
        liver: (S, H, W) bool, voxels a lesion may change before vessel and dark-tissue checks.
        available: `liver` minus voxels taken by earlier lesions.
        touched: (S, H, W) bool, voxels changed by any lesion so far.
        spacing_mm: (slice, row, column) spacing, mm; the slice entry is unused when
            `slice_z_mm` is given.
        slice_z_mm: (S,) explicit z position of each slice, mm, for stacks whose slices are
            not evenly spaced (the transform's context channels). None for a volume, whose
            grid continues past its edges, so that a lesion there counts as partly
            outside the liver.
        smoothing_sigma: Gaussian sigma per axis in voxels for the vessel test.
    """

    ct_hu: np.ndarray
    liver: np.ndarray
    available: np.ndarray
    touched: np.ndarray
    spacing_mm: tuple[float, float, float]
    slice_z_mm: np.ndarray | None
    smoothing_sigma: tuple[float, float, float]

    def position_mm(self, index: Sequence[int]) -> np.ndarray:
        """Return the (z, y, x) position of a voxel, mm."""
        z = (self.slice_z_mm[index[0]] if self.slice_z_mm is not None
             else index[0] * self.spacing_mm[0])
        return np.array([z, index[1] * self.spacing_mm[1], index[2] * self.spacing_mm[2]],
                        dtype=np.float64)


@dataclass
class _Box:
    """Voxels within a distance of a point along each axis, possibly past the array edges.

    Attributes:
        indices: per axis, voxel indices clipped into the array (for reading).
        positions_mm: per axis, the unclipped positions of those voxels, mm.
        valid: per axis, whether the unclipped index lies inside the array.
    """

    indices: tuple[np.ndarray, np.ndarray, np.ndarray]
    positions_mm: tuple[np.ndarray, np.ndarray, np.ndarray]
    valid: tuple[np.ndarray, np.ndarray, np.ndarray]

    @classmethod
    def around(cls, stack: _Stack, centre_mm: np.ndarray, radius_mm: float) -> _Box | None:
        indices, positions, valid = [], [], []
        for axis in range(3):
            if axis == 0 and stack.slice_z_mm is not None:
                index = np.flatnonzero(np.abs(stack.slice_z_mm - centre_mm[0]) <= radius_mm)
                position = stack.slice_z_mm[index]
            else:
                spacing = stack.spacing_mm[axis]
                first = int(math.floor((centre_mm[axis] - radius_mm) / spacing))
                last = int(math.ceil((centre_mm[axis] + radius_mm) / spacing))
                index = np.arange(first, last + 1)
                position = index * spacing
            inside = (index >= 0) & (index < stack.ct_hu.shape[axis])
            if not inside.any():
                return None
            indices.append(np.clip(index, 0, stack.ct_hu.shape[axis] - 1))
            positions.append(position)
            valid.append(inside)
        return cls(tuple(indices), tuple(positions), tuple(valid))

    def read(self, array: np.ndarray) -> np.ndarray:
        """Return the box's values, edge voxels repeated past the array edges."""
        return array[np.ix_(*self.indices)]

    def valid_mask(self) -> np.ndarray:
        """Return (s, h, w) bool, True where the voxel lies inside the array."""
        slices, rows, cols = self.valid
        return slices[:, None, None] & rows[None, :, None] & cols[None, None, :]

    def write(self, array: np.ndarray, values: np.ndarray) -> None:
        """Write the part of `values` that lies inside the array."""
        inner = tuple(slice(int(v.argmax()), int(len(v) - v[::-1].argmax())) for v in self.valid)
        target = np.ix_(*(index[part] for index, part in zip(self.indices, inner)))
        array[target] = values[inner]

    def offsets_mm(self, centre_mm: np.ndarray) -> np.ndarray:
        """Return (s, h, w, 3) offsets of the box's voxels from `centre_mm`, mm."""
        grids = np.meshgrid(*(p - c for p, c in zip(self.positions_mm, centre_mm)),
                            indexing="ij")
        return np.stack(grids, axis=-1)


def _insert_lesions(
    stack: _Stack,
    candidates: np.ndarray,
    centre_z_halfrange: Callable,
    rng: np.random.Generator,
    config: SyntheticTumorConfig,
) -> list[LesionInfo]:
    """Draw and insert lesions into `stack`; return what was inserted.

    Args:
        stack: working arrays, changed in place.
        candidates: (n,) flat indices into the stack of the voxels a centre may be drawn at.
        centre_z_halfrange: maps a lesion to the largest z offset (mm) of its centre from
            the candidate voxel.
        rng: random generator.
        config: parameters.
    """
    count = int(rng.integers(config.count_range[0], config.count_range[1] + 1))
    inserted = []
    for _ in range(count):
        lesion = _draw_lesion(rng, config)
        for attempt in range(1, config.max_attempts + 1):
            index = np.unravel_index(candidates[rng.integers(len(candidates))],
                                     stack.ct_hu.shape)
            halfrange = centre_z_halfrange(lesion)
            jitter = rng.uniform(-0.5, 0.5, size=2) * np.asarray(stack.spacing_mm[1:])
            centre_mm = stack.position_mm(index)
            centre_mm += (rng.uniform(-halfrange, halfrange), jitter[0], jitter[1])
            info = _try_place(stack, lesion, centre_mm, attempt, config)
            if info is not None:
                inserted.append(info)
                break
        else:
            logger.debug("Skipped a %.1f mm lesion: no location among %d attempts passed the "
                         "vessel and liver checks", lesion.diameter_mm, config.max_attempts)
    return inserted


def _try_place(stack: _Stack, lesion: _Lesion, centre_mm: np.ndarray, attempt: int,
               config: SyntheticTumorConfig) -> LesionInfo | None:
    """Insert `lesion` at `centre_mm` when the location passes the checks; else return None."""
    box = _Box.around(stack, centre_mm, max(lesion.radius_mm, _REFERENCE_RADIUS_MM))
    if box is None:
        return None
    ct_crop = box.read(stack.ct_hu)
    liver_crop = box.read(stack.liver) & box.valid_mask()
    if not liver_crop.any():
        return None

    # Vessel and dark-tissue tests relative to the liver around this location.
    reference_hu = float(np.median(ct_crop[liver_crop]))
    smoothed = ndimage.gaussian_filter(ct_crop, stack.smoothing_sigma, mode="nearest")
    vessel = liver_crop & (smoothed > reference_hu + config.vessel_threshold_hu)
    eligible = (liver_crop & box.read(stack.available) & ~vessel
                & (smoothed >= reference_hu - config.dark_tissue_threshold_hu))

    centre_voxel = tuple(int(np.argmin(np.abs(p - c)))
                         for p, c in zip(box.positions_mm, centre_mm))
    if not eligible[centre_voxel]:
        return None

    # Reject locations where the lesion core hits vessels or leaves the liver (or the array).
    # The core is the undistorted ellipsoid, which is cheap to compute, because most
    # attempts fail.
    offsets = box.offsets_mm(centre_mm)
    core = lesion.ellipsoid_mask(offsets)
    core_count = int(core.sum())
    if core_count == 0:
        return None
    if (core & vessel).sum() > config.max_vessel_fraction * core_count:
        return None
    if (core & ~liver_crop).sum() > config.max_outside_fraction * core_count:
        return None

    # Evaluate the lesion on the voxels inside its bounding sphere.
    inside = (offsets * offsets).sum(axis=-1) < lesion.radius_mm ** 2
    weight = np.zeros(ct_crop.shape, dtype=np.float32)
    change_hu = np.zeros(ct_crop.shape, dtype=np.float32)
    weight[inside], change_hu[inside] = lesion.evaluate(offsets[inside])

    applied = np.where(eligible, weight, np.float32(0.0))
    touched = applied > 0
    new_crop = ct_crop.copy()
    new_crop[touched] = ct_crop[touched] + applied[touched] * change_hu[touched]
    changed = new_crop != ct_crop
    labelled = np.abs(new_crop - ct_crop) > np.float32(config.label_threshold_hu)

    box.write(stack.ct_hu, new_crop)
    box.write(stack.available, box.read(stack.available) & ~touched)
    box.write(stack.touched, box.read(stack.touched) | touched)

    return LesionInfo(
        center_mm=tuple(float(v) for v in centre_mm),
        center_index=tuple(int(box.indices[axis][centre_voxel[axis]]) for axis in range(3)),
        diameter_mm=lesion.diameter_mm,
        semi_axes_mm=tuple(float(v) for v in lesion.semi_axes_mm),
        distortion=lesion.distortion,
        contrast_hu=lesion.contrast_hu,
        texture_std_hu=lesion.texture_std_hu,
        texture_grain_mm=lesion.texture_grain_mm,
        edge_softness_mm=lesion.edge_softness_mm,
        changed_voxels=int(changed.sum()),
        labelled_voxels=int(labelled.sum()),
        clipped_voxels=int(((weight > 0) & ~eligible).sum()),
        attempts=attempt,
    )


# --------------------------------------------------------------------------- volumes


def insert_tumors(
    ct_hu: np.ndarray,
    labels: np.ndarray,
    spacing_mm: Sequence[float],
    rng: np.random.Generator | int | None,
    config: SyntheticTumorConfig | None = None,
) -> tuple[np.ndarray, np.ndarray, list[LesionInfo]]:
    """Insert synthetic tumors into the liver of a 3-D CT.

    Args:
        ct_hu: (z, y, x) CT in HU, any real dtype. The engine's axial stack (slice, row,
            column) is one such array.
        labels: (z, y, x) labels on the same grid: 0 background, 1 liver, 2 tumor.
        spacing_mm: voxel spacing along (z, y, x), mm.
        rng: NumPy generator, or a seed for one.
        config: parameters (defaults when None).

    Returns:
        (ct_hu, labels, lesions): new arrays, the CT as float32 and the labels in their
        own dtype, and one `LesionInfo` per inserted lesion. Label 2 is added exactly on
        label-1 voxels whose CT value changed by more than ``config.label_threshold_hu``.
        Every changed voxel lies within ``diameter_mm / 2`` of its lesion's centre. A
        volume without liver comes back unchanged and the reason is logged at INFO level.

    Raises:
        ValueError: the arrays are not 3-D on the same grid, or a spacing is not positive.
    """
    config = config or SyntheticTumorConfig()
    rng = np.random.default_rng(rng)
    ct = np.asarray(ct_hu)
    labels = np.asarray(labels)
    spacing = _check_volume(ct, labels, spacing_mm)
    ct_out = ct.astype(np.float32, copy=True)
    labels_out = labels.copy()

    liver = labels == LABEL_LIVER
    candidates = np.flatnonzero(liver)
    if candidates.size == 0:
        logger.info("No liver voxel (label %d) in the volume of shape %s: returning it "
                    "without synthetic tumors", LABEL_LIVER, ct.shape)
        return ct_out, labels_out, []

    stack = _Stack(
        ct_hu=ct_out,
        liver=liver,
        available=liver.copy(),
        touched=np.zeros(ct.shape, dtype=bool),
        spacing_mm=spacing,
        slice_z_mm=None,
        smoothing_sigma=tuple(config.vessel_smoothing_mm / s for s in spacing),
    )
    lesions = _insert_lesions(stack, candidates, lambda lesion: 0.5 * spacing[0], rng, config)

    # Only touched voxels can differ; comparing there alone saves two passes over the volume.
    touched = np.nonzero(stack.touched)
    changed_hu = np.abs(ct_out[touched] - ct[touched].astype(np.float32))
    tumor = liver[touched] & (changed_hu > np.float32(config.label_threshold_hu))
    labels_out[tuple(axis[tumor] for axis in touched)] = LABEL_TUMOR
    if not lesions:
        logger.info("No synthetic tumor fitted in the liver (%d voxels) after %d attempts "
                    "per lesion: returning the volume unchanged", len(candidates),
                    config.max_attempts)
    return ct_out, labels_out, lesions


def _check_volume(ct: np.ndarray, labels: np.ndarray,
                  spacing_mm: Sequence[float]) -> tuple[float, float, float]:
    if ct.ndim != 3 or ct.shape != labels.shape:
        raise ValueError(f"CT shape {ct.shape} and label shape {labels.shape} must be the same "
                         "3-D (z, y, x) grid; pass a volume and its labels")
    spacing = tuple(float(s) for s in spacing_mm)
    if len(spacing) != 3 or not all(s > 0 for s in spacing):
        raise ValueError(f"spacing_mm={tuple(spacing_mm)} must be three positive values in mm "
                         "along (z, y, x)")
    return spacing


# --------------------------------------------------------------------------- training samples


@dataclass(frozen=True)
class CaseGeometry:
    """Grid and window of one case's cached training samples.

    Attributes:
        pixel_spacing_mm: (row, column) pixel size of the samples, the preprocessing's
            in-plane spacing.
        slice_spacing_mm: distance between stack slices, mm.
        context_offsets: stack-slice offset of each channel from the labelled slice.
        window_center_hu, window_width_hu: window that maps HU to [0, 1].
        num_slices: slices in the stack, for the clamping of context channels at the stack
            ends (None: no clamping).
    """

    pixel_spacing_mm: tuple[float, float]
    slice_spacing_mm: float
    context_offsets: tuple[int, ...]
    window_center_hu: float
    window_width_hu: float
    num_slices: int | None = None

    @classmethod
    def from_cache_meta(cls, meta: Mapping) -> CaseGeometry:
        """Read the geometry from a slice cache's meta.json (`CachedCase.meta`).

        Raises:
            ValueError: a key is missing from `meta`.
        """
        try:
            preprocessing = meta["preprocessing"]
            pixel_mm = float(preprocessing["in_plane_spacing_mm"])
            return cls(
                pixel_spacing_mm=(pixel_mm, pixel_mm),
                slice_spacing_mm=float(meta["stack_spacing_mm"][0]),
                context_offsets=tuple(int(v) for v in meta["context_offsets"]),
                window_center_hu=float(preprocessing["window_center_hu"]),
                window_width_hu=float(preprocessing["window_width_hu"]),
                num_slices=int(meta["num_slices"]),
            )
        except (KeyError, TypeError, IndexError) as err:
            raise ValueError(f"slice cache metadata is missing {err!r}; rebuild the cache "
                             "with the current training/dataset.py") from err

    def channel_z_mm(self, slice_index: int) -> np.ndarray:
        """Return each channel's z position relative to the labelled slice, mm."""
        indices = slice_index + np.asarray(self.context_offsets)
        if self.num_slices is not None:
            indices = np.clip(indices, 0, self.num_slices - 1)
        return (indices - slice_index) * self.slice_spacing_mm

    def unit_to_hu(self, unit: np.ndarray) -> np.ndarray:
        low = self.window_center_hu - self.window_width_hu / 2.0
        return (unit * np.float32(self.window_width_hu) + np.float32(low)).astype(np.float32)

    def hu_to_unit(self, hu: np.ndarray) -> np.ndarray:
        low = self.window_center_hu - self.window_width_hu / 2.0
        unit = (hu - np.float32(low)) / np.float32(self.window_width_hu)
        return np.clip(unit, 0.0, 1.0).astype(np.float32)


def case_geometries(cases: Sequence) -> dict[str, CaseGeometry]:
    """Return {case id: geometry} for cached cases (objects with `case_id` and `meta`)."""
    return {case.case_id: CaseGeometry.from_cache_meta(case.meta) for case in cases}


class SyntheticTumorTransform:
    """Insert synthetic tumors into a 2.5-D training sample (`SliceDataset`'s slice_transform).

    Each lesion is built in 3-D around the labelled (centre) slice. Every context channel
    shows the lesion's cross-section at that channel's z position, so the channels stay
    consistent. The centre is drawn among the centre slice's liver pixels (label 1), at most
    ``slice_offset_fraction`` of the lesion's smallest radius above or below it. The
    context channels have no labels, so there the lesion is clipped to the centre slice's
    liver mask and to the channel's own vessel and dark-tissue tests. Pixels at 0 or 1
    (clipped by the window) never change. Label 2 goes into the centre slice's mask only,
    exactly where its value changed by more than ``label_threshold_hu``.

    Cost, measured on one thread of a shared 2-core CPU with the default configuration: a
    (5, 192, 192) segmentation sample of ircadb1.7 or chaos_ct3 took 3 to 6 ms (median) and
    at most 22 ms. Those samples have 2 mm pixels and 3.2 or 4 mm between channels.

    Randomness: each call seeds a NumPy generator from the transform's `seed` and one draw
    of torch's global generator. DataLoader workers seed torch differently, so workers
    differ, and `torch.manual_seed` (or Lightning's seed_everything) makes a run repeatable.

    Args:
        config: parameters; ``count_range`` counts lesions per sample.
        case_geometry: one `CaseGeometry` for every case, or {case id: geometry}
            (see `case_geometries`).
        seed: mixed into every call's generator.
    """

    def __init__(self, config: SyntheticTumorConfig | None,
                 case_geometry: CaseGeometry | Mapping[str, CaseGeometry],
                 seed: int = 0) -> None:
        self.config = config or SyntheticTumorConfig()
        self.case_geometry = case_geometry
        self.seed = int(seed)

    def __call__(self, image: torch.Tensor, mask: torch.Tensor, case_id: str,
                 slice_index: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Insert tumors into image (C, H, W) float32 in [0, 1] and mask (H, W) int64."""
        draw = int(torch.randint(0, 2 ** 62, ()).item())
        rng = np.random.default_rng([self.seed, draw])
        return self.apply(image, mask, case_id, slice_index, rng)

    def apply(self, image: torch.Tensor, mask: torch.Tensor, case_id: str, slice_index: int,
              rng: np.random.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """Insert tumors with an explicit generator; see the class docstring.

        Returns:
            (image, mask): new tensors of the input dtypes, or the inputs themselves when the
            centre slice has no liver pixel.

        Raises:
            ValueError: shapes do not match each other or the case's context channels.
            KeyError: `case_id` has no geometry.
        """
        geometry = self._geometry(case_id)
        self._check_sample(image, mask, geometry)
        mask_np = mask.numpy()
        liver_centre = mask_np == LABEL_LIVER
        if not liver_centre.any():
            logger.debug("Slice %d of %s has no liver pixel: no synthetic tumor", slice_index,
                         case_id)
            return image, mask

        unit = image.numpy().astype(np.float32, copy=False)
        centre_channel = len(geometry.context_offsets) // 2
        inside_window = (unit > 0.0) & (unit < 1.0)
        liver = liver_centre[None] & inside_window
        candidates = np.flatnonzero(liver[centre_channel]) + centre_channel * liver[0].size
        if candidates.size == 0:
            logger.debug("Slice %d of %s has liver only at the window limits: no synthetic "
                         "tumor", slice_index, case_id)
            return image, mask

        smoothing_px = tuple(self.config.vessel_smoothing_mm / spacing
                             for spacing in geometry.pixel_spacing_mm)
        stack = _Stack(
            ct_hu=geometry.unit_to_hu(unit),
            liver=liver,
            available=liver.copy(),
            touched=np.zeros(unit.shape, dtype=bool),
            spacing_mm=(geometry.slice_spacing_mm,) + tuple(geometry.pixel_spacing_mm),
            slice_z_mm=geometry.channel_z_mm(slice_index),
            smoothing_sigma=(0.0,) + smoothing_px,
        )
        fraction = self.config.slice_offset_fraction
        _insert_lesions(stack, candidates, lambda lesion: fraction * lesion.inner_radius_mm,
                        rng, self.config)

        new_unit = unit.copy()
        new_unit[stack.touched] = geometry.hu_to_unit(stack.ct_hu[stack.touched])
        threshold_unit = np.float32(self.config.label_threshold_hu / geometry.window_width_hu)
        changed = np.abs(new_unit[centre_channel] - unit[centre_channel]) > threshold_unit
        new_mask = mask_np.copy()
        new_mask[liver_centre & changed] = LABEL_TUMOR
        return (torch.from_numpy(new_unit).to(image.dtype),
                torch.from_numpy(new_mask).to(mask.dtype))

    def _geometry(self, case_id: str) -> CaseGeometry:
        if isinstance(self.case_geometry, CaseGeometry):
            return self.case_geometry
        try:
            return self.case_geometry[case_id]
        except KeyError:
            raise KeyError(f"no geometry for case {case_id!r}; build the transform with "
                           "case_geometries() of every training case") from None

    @staticmethod
    def _check_sample(image: torch.Tensor, mask: torch.Tensor, geometry: CaseGeometry) -> None:
        channels = len(geometry.context_offsets)
        if image.ndim != 3 or mask.ndim != 2 or tuple(image.shape[1:]) != tuple(mask.shape):
            raise ValueError(f"image shape {tuple(image.shape)} and mask shape "
                             f"{tuple(mask.shape)} must be (C, H, W) and (H, W)")
        if image.shape[0] != channels:
            raise ValueError(f"image has {image.shape[0]} channels but the case geometry has "
                             f"{channels} context offsets; use the geometry of the cache the "
                             "sample came from")
