"""The output folder of a run and the writers of its files.

Every writer puts its file under a temporary name in the destination folder and renames it
into place with `os.replace`, so a reader never sees a half-written file. The whole output
folder is built the same way by :class:`OutputFolder`: it is filled under a hidden sibling
name and renamed into place only when the run succeeds.

Arrays are in NumPy (z, y, x) order on the input grid described by an
:class:`~livertumorai.geometry.ImageGeometry` (LPS, mm). The segmentation is written as a
Slicer `.seg.nrrd`: one layer of uint8 label values plus one `Segment{i}_*` group of
header fields per segment. Field names and formats follow Slicer's
`vtkMRMLSegmentationStorageNode`; the tests read the files back with that storage node
(slicer-core 5.13) and with slicerio 1.4.
"""

from __future__ import annotations

import contextlib
import csv
import json
import logging
import os
import secrets
import shutil
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from livertumorai.constants import SEGMENT_LIVER, SEGMENT_TUMOR, SegmentDefinition
from livertumorai.errors import ConfigurationError, OutputExistsError, OutputWriteError
from livertumorai.geometry import ImageGeometry, xyz_to_zyx

logger = logging.getLogger(__name__)

__all__ = [
    "OutputFolder",
    "atomic_path",
    "write_segmentation_nrrd",
    "write_labelmap",
    "write_probability_map",
    "write_slices_csv",
    "write_json",
]

# Slicer's segment status tag. "inprogress" marks the segments in Segment Editor as an
# automatic result still to be reviewed. Slicer's other values are "notstarted",
# "completed" and "flagged".
SEGMENT_STATUS = "inprogress"

# Slicer's representation names and conversion parameter name (vtkSegmentationConverter).
BINARY_LABELMAP_REPRESENTATION = "Binary labelmap"
REFERENCE_GEOMETRY_PARAMETER = "Reference image geometry"

# Extent that Slicer writes and reads for a segment without voxels (min > max on every axis).
EMPTY_EXTENT = (0, -1, 0, -1, 0, -1)

_LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0])


class OutputFolder:
    """Context manager that builds an output folder under a temporary name.

    NOTE: a process killed with SIGKILL leaves its hidden `.{name}.partial-<random>` folder
    behind. Later runs do not remove it, because another run may still be writing there.

    Writes go into a hidden sibling folder (same parent, named `.{name}.partial-<random>`),
    which is renamed to `output_dir` when the `with` block ends without an exception. On
    any exception the temporary folder is removed and an existing `output_dir` is left
    untouched. With `overwrite`, an existing folder is first renamed aside, the new one is
    renamed into place and only then the old one is deleted, so `output_dir` is never
    half-written (it is absent for the moment between the two renames).

    Example:
        with OutputFolder("results/case1", overwrite=True) as folder:
            write_json(folder / "report.json", report)

    Args:
        output_dir: the folder to create. Missing parent folders are created on entry.
        overwrite: replace an existing, non-empty `output_dir`.

    Raises:
        OutputExistsError: `output_dir` exists, is not an empty folder, and `overwrite` is
            False. Raised here, before any work is done.
        OutputWriteError: the nearest existing parent folder is not writable (raised here),
            or the folder cannot be created on entry.
        ConfigurationError: `output_dir` is a file, a parent of it is a file, it lies
            inside an input folder, or replacing it would delete one of
            `protected_paths`, the current folder, the home folder or the file system root.
    """

    def __init__(self, output_dir: str | os.PathLike, overwrite: bool = False,
                 protected_paths: Sequence[str | os.PathLike] = ()) -> None:
        if not str(output_dir).strip():
            raise ConfigurationError("The output folder is an empty string.",
                                     "Pass a folder name with -o.")
        self.output_dir = Path(output_dir).expanduser().absolute()
        self.overwrite = overwrite
        self._temporary_dir: Path | None = None
        _check_not_protected(self.output_dir, protected_paths)
        _check_output_dir(self.output_dir, overwrite)

    def __enter__(self) -> Path:
        parent = self.output_dir.parent
        try:
            parent.mkdir(parents=True, exist_ok=True)
            self._temporary_dir = _make_sibling_dir(self.output_dir, "partial")
        except OSError as error:
            raise OutputWriteError(
                f"Failed to create the output folder in {parent}: {error.strerror or error}.",
                "Choose an output folder in a writable location.",
            ) from error
        logger.debug("Writing outputs into %s", self._temporary_dir)
        return self._temporary_dir

    def __exit__(self, exc_type, exc_value, traceback) -> bool:
        temporary_dir = self._temporary_dir
        self._temporary_dir = None
        if temporary_dir is None:
            return False
        if exc_type is not None:
            shutil.rmtree(temporary_dir, ignore_errors=True)
            logger.debug("Removed %s after %s", temporary_dir, exc_type.__name__)
            return False
        try:
            self._move_into_place(temporary_dir)
        except BaseException:
            shutil.rmtree(temporary_dir, ignore_errors=True)
            raise
        logger.info("Wrote output folder %s", self.output_dir)
        return False

    def _move_into_place(self, temporary_dir: Path) -> None:
        target = self.output_dir
        if not _path_exists(target):
            os.replace(temporary_dir, target)
            return

        # The folder may have been created or filled while the run was going on.
        _check_output_dir(target, self.overwrite)
        old_dir = _sibling_name(target, "old")
        os.replace(target, old_dir)
        try:
            os.replace(temporary_dir, target)
        except BaseException:
            os.replace(old_dir, target)
            raise
        shutil.rmtree(old_dir, ignore_errors=True)


def _check_not_protected(output_dir: Path, protected_paths: Sequence[str | os.PathLike]) -> None:
    """Raise if replacing `output_dir` would delete the input or a folder the user works in.

    The output folder is replaced as a whole with --overwrite, so it must not be the
    current folder or one of its parents, the home folder, the root, the input itself or
    a folder that contains the input.
    """
    resolved = output_dir.resolve()
    reserved = {Path.cwd().resolve(), Path.home().resolve(), Path(resolved.anchor)}
    reserved.update(Path.cwd().resolve().parents)
    if resolved in reserved:
        raise ConfigurationError(
            f"The output folder {output_dir} is the current folder, one of its parents, "
            "the home folder or the root, which an output folder replaces as a whole.",
            "Choose a new folder for the outputs, for example -o outputs/case1.",
        )
    for protected in protected_paths:
        protected = Path(protected).expanduser().resolve()
        if protected == resolved or resolved in protected.parents:
            raise ConfigurationError(
                f"The output folder {output_dir} contains the input {protected}.",
                "Choose an output folder outside the input's folder.",
            )
        if protected.is_dir() and protected in resolved.parents:
            # The input is a folder, such as a DICOM series. Its subfolders are searched
            # for DICOM files, so outputs inside it would be read with the next input.
            raise ConfigurationError(
                f"The output folder {output_dir} lies inside the input folder {protected}.",
                "Choose an output folder outside the input's folder.",
            )


def _check_output_dir(output_dir: Path, overwrite: bool) -> None:
    """Raise unless `output_dir` can be created or (with `overwrite`) replaced."""
    hint_exists = "Pass --overwrite to replace it, or choose another output folder."
    if output_dir.is_symlink():
        # The finished folder is renamed into place, which would replace the link itself.
        raise ConfigurationError(
            f"The output folder {output_dir} is a symbolic link to {os.readlink(output_dir)}.",
            f"Pass the folder it points to ({output_dir.resolve()}) or another folder with -o.",
        )
    if output_dir.is_file() or (_path_exists(output_dir) and not output_dir.is_dir()):
        if not overwrite:
            raise OutputExistsError(
                f"The output path {output_dir} exists and is a file.",
                "Choose another output folder; --overwrite replaces folders only.",
            )
        raise ConfigurationError(
            f"The output path {output_dir} is a file, not a folder, and is not replaced.",
            "Choose another output folder.",
        )
    if output_dir.is_dir() and any(output_dir.iterdir()) and not overwrite:
        raise OutputExistsError(f"The output folder {output_dir} exists and is not empty.", hint_exists)

    ancestor = output_dir.parent
    while not _path_exists(ancestor):
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise ConfigurationError(
            f"The output folder {output_dir} cannot be created because {ancestor} is a file.",
            "Choose an output folder whose parent is a folder.",
        )
    if not os.access(ancestor, os.W_OK | os.X_OK):
        raise OutputWriteError(
            f"The output folder {output_dir} cannot be created because {ancestor} is not writable.",
            "Choose an output folder in a writable location.",
        )


def _path_exists(path: Path) -> bool:
    """Return whether `path` exists, counting a broken symbolic link as existing."""
    return os.path.lexists(path)


def _sibling_name(path: Path, kind: str) -> Path:
    """Return an unused hidden name `.{name}.{kind}-<random>` beside `path`."""
    while True:
        candidate = path.with_name(f".{path.name}.{kind}-{secrets.token_hex(4)}")
        if not _path_exists(candidate):
            return candidate


def _make_sibling_dir(path: Path, kind: str) -> Path:
    """Create a new hidden folder beside `path` with the process umask's permissions."""
    while True:
        candidate = _sibling_name(path, kind)
        try:
            candidate.mkdir()
        except FileExistsError:
            continue
        return candidate


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside `path`, renamed to `path` when the block succeeds.

    The temporary name ends with the name of `path`, so writers that choose the format by
    the file extension (SimpleITK, matplotlib) see the same extension. On an exception the
    temporary file is deleted and an existing `path` is left as it was.
    """
    path = Path(path)
    temporary = path.with_name(f".partial-{secrets.token_hex(4)}-{path.name}")
    try:
        yield temporary
        os.replace(temporary, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            temporary.unlink()


def write_segmentation_nrrd(
    labels_zyx: np.ndarray,
    geometry: ImageGeometry,
    path: str | os.PathLike,
    segments: Sequence[SegmentDefinition] = (SEGMENT_LIVER, SEGMENT_TUMOR),
) -> Path:
    """Write a label map as a Slicer segmentation file (`.seg.nrrd`).

    The file contains one layer of uint8 voxels with the label values of `segments`. It
    lies on exactly the grid of `geometry` (size, spacing, origin and direction), in LPS
    space, gzip-compressed.
    Each segment gets its ID, name, colour, label value, layer 0, extent, terminology and
    status. A segment without voxels is still listed, with the empty extent
    `0 -1 0 -1 0 -1`. The segmentation's reference image geometry is set to the input
    grid, so Segment Editor edits on that grid.

    Args:
        labels_zyx: integer label map, (z, y, x), values 0 or a segment's label value.
        geometry: the input grid.
        path: the file to write; its name should end with `.seg.nrrd`.
        segments: the segments to list, in this order.

    Returns:
        `path` as a Path.

    Raises:
        ValueError: the array does not match the grid, is not integer, or contains a
            value that is neither 0 nor a segment's label value.
    """
    path = Path(path)
    labels = _labels_as_uint8(labels_zyx, geometry, allowed_values=[s.label_value for s in segments])
    voxel_counts = {s.label_value: int(np.count_nonzero(labels == s.label_value))
                    for s in segments}
    layer_extent = _nonzero_extent_ijk(labels)

    image = geometry.image_from_array(labels)
    for key, value in _segmentation_fields(geometry).items():
        image.SetMetaData(key, value)
    for index, segment in enumerate(segments):
        is_empty = voxel_counts[segment.label_value] == 0
        # Slicer's storage node reads a shared layer once. Some versions crop it to the
        # extent of the layer's first segment, so that segment carries the layer's extent
        # even when it is empty. Slicer itself writes the layer's extent for every segment.
        if is_empty and index > 0:
            extent = EMPTY_EXTENT
        else:
            extent = layer_extent
        for key, value in _segment_fields(index, segment, extent).items():
            image.SetMetaData(key, value)

    with atomic_path(path) as temporary:
        sitk.WriteImage(image, str(temporary), useCompression=True)
    logger.info(
        "Wrote segmentation %s (%s)",
        path,
        ", ".join(f"{s.name}: {int(voxel_counts[s.label_value])} voxels" for s in segments),
    )
    return path


def _labels_as_uint8(
    labels_zyx: np.ndarray, geometry: ImageGeometry, allowed_values: Sequence[int] | None = None
) -> np.ndarray:
    """Check a label map against the grid and the allowed values and return it as uint8."""
    labels = np.asarray(labels_zyx)
    expected_shape = xyz_to_zyx(geometry.size_xyz)
    if labels.shape != expected_shape:
        raise ValueError(
            f"The label map has shape {labels.shape} (z, y, x) but the image grid needs "
            f"{expected_shape}; pass labels on the input grid."
        )
    if labels.dtype != np.bool_ and not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"The label map has dtype {labels.dtype}; pass an integer label map.")
    low, high = (int(labels.min()), int(labels.max())) if labels.size else (0, 0)
    if low < 0 or high > 255:
        raise ValueError(
            f"The label map contains values from {low} to {high}; "
            "label values must lie in 0..255."
        )
    labels = labels.astype(np.uint8, copy=False)
    if allowed_values is not None:
        # One comparison per unused value in [low, high]. A lookup table indexed by the map
        # would gather over every voxel.
        allowed = {0, *allowed_values}
        unexpected = [value for value in range(low, high + 1)
                      if value not in allowed and np.any(labels == value)]
        if unexpected:
            raise ValueError(
                f"The label map contains values {unexpected} that belong to no segment "
                f"(segment label values: {sorted(allowed_values)})."
            )
    return np.ascontiguousarray(labels)


def _nonzero_extent_ijk(labels_zyx: np.ndarray) -> tuple[int, ...]:
    """Return the (i_min, i_max, j_min, j_max, k_min, k_max) box of the non-zero voxels.

    i, j, k are the x, y, z voxel indices. The box is EMPTY_EXTENT when all voxels are 0.
    """
    extent = []
    for zyx_axis in (2, 1, 0):
        other_axes = tuple(axis for axis in range(3) if axis != zyx_axis)
        occupied = np.flatnonzero(np.any(labels_zyx, axis=other_axes))
        if occupied.size == 0:
            return EMPTY_EXTENT
        extent += [int(occupied[0]), int(occupied[-1])]
    return tuple(extent)


def _segmentation_fields(geometry: ImageGeometry) -> dict[str, str]:
    """Return the segmentation-wide `Segmentation_*` header fields."""
    reference_geometry = _serialize_reference_geometry(geometry)
    # Each parameter is "name|value|description" followed by "&"; Slicer drops a
    # parameter that lacks the closing "&".
    conversion_parameters = (
        f"{REFERENCE_GEOMETRY_PARAMETER}|{reference_geometry}|"
        "Grid of the labelmaps created by conversion: IJK to RAS matrix, then extent.&"
    )
    return {
        "Segmentation_MasterRepresentation": BINARY_LABELMAP_REPRESENTATION,
        "Segmentation_ContainedRepresentationNames": f"{BINARY_LABELMAP_REPRESENTATION}|",
        "Segmentation_ReferenceImageExtentOffset": "0 0 0",
        "Segmentation_ConversionParameters": conversion_parameters,
    }


def _serialize_reference_geometry(geometry: ImageGeometry) -> str:
    """Write the grid as Slicer's image geometry string.

    The format is the 16 elements of the IJK-to-RAS matrix, row by row, then the six
    extent values, each followed by ";".
    """
    ijk_to_ras = np.eye(4)
    ijk_to_ras[:3, :3] = _LPS_TO_RAS @ geometry.direction_matrix @ np.diag(geometry.spacing_mm_xyz)
    ijk_to_ras[:3, 3] = _LPS_TO_RAS @ np.asarray(geometry.origin_lps)
    extent = [value for size in geometry.size_xyz for value in (0, size - 1)]
    numbers = [repr(float(v) + 0.0) for v in ijk_to_ras.ravel()] + [str(v) for v in extent]
    return "".join(f"{number};" for number in numbers)


def _segment_fields(index: int, segment: SegmentDefinition, extent: Sequence[int]) -> dict[str, str]:
    """Return the `Segment{index}_*` header fields of one segment."""
    prefix = f"Segment{index}_"
    tags = f"Segmentation.Status:{SEGMENT_STATUS}|TerminologyEntry:{segment.terminology_entry()}|"
    return {
        prefix + "ID": segment.segment_id,
        prefix + "Name": segment.name,
        prefix + "NameAutoGenerated": "0",
        prefix + "Color": " ".join(f"{component:.6g}" for component in segment.color_rgb),
        prefix + "ColorAutoGenerated": "0",
        prefix + "LabelValue": str(segment.label_value),
        prefix + "Layer": "0",
        prefix + "Extent": " ".join(str(value) for value in extent),
        prefix + "Tags": tags,
    }


def write_labelmap(labels_zyx: np.ndarray, geometry: ImageGeometry, path: str | os.PathLike) -> Path:
    """Write a label map as a plain uint8 image (for example `labels.nii.gz`).

    The format follows the file extension (any that SimpleITK writes). The image has
    exactly the grid of `geometry`.

    Args:
        labels_zyx: integer label map, (z, y, x), values 0..255.
        geometry: the input grid.
        path: the file to write.

    Returns:
        `path` as a Path.

    Raises:
        ValueError: the array does not match the grid or is not an integer array in 0..255.
    """
    path = Path(path)
    image = geometry.image_from_array(_labels_as_uint8(labels_zyx, geometry))
    with atomic_path(path) as temporary:
        sitk.WriteImage(image, str(temporary), useCompression=True)
    logger.info("Wrote label map %s", path)
    return path


def write_probability_map(
    probabilities_zyx: np.ndarray, geometry: ImageGeometry, path: str | os.PathLike
) -> Path:
    """Write the per-voxel tumor probability as an image on the input grid.

    A uint8 array (probability scaled to 0..255) is written as uint8, a floating-point
    array (probability in 0..1) as float32.

    Args:
        probabilities_zyx: tumor probability, (z, y, x), uint8 or floating point.
        geometry: the input grid.
        path: the file to write; the format follows the extension.

    Returns:
        `path` as a Path.

    Raises:
        ValueError: the array does not match the grid, has another dtype, or contains
            floating-point values outside 0..1 (NaN included).
    """
    path = Path(path)
    probabilities = np.asarray(probabilities_zyx)
    expected_shape = xyz_to_zyx(geometry.size_xyz)
    if probabilities.shape != expected_shape:
        raise ValueError(
            f"The probability map has shape {probabilities.shape} (z, y, x) but the image "
            f"grid needs {expected_shape}; pass probabilities on the input grid."
        )
    if probabilities.dtype == np.uint8:
        pixels = probabilities
    elif np.issubdtype(probabilities.dtype, np.floating):
        pixels = probabilities.astype(np.float32, copy=False)
        if pixels.size and not (np.all(np.isfinite(pixels)) and pixels.min() >= 0 and pixels.max() <= 1):
            raise ValueError(
                "The probability map contains values outside 0..1 or NaN; pass probabilities "
                "in 0..1 (floating point) or 0..255 (uint8)."
            )
    else:
        raise ValueError(
            f"The probability map has dtype {probabilities.dtype}; pass uint8 (0..255) or "
            "floating point (0..1)."
        )
    image = geometry.image_from_array(np.ascontiguousarray(pixels))
    with atomic_path(path) as temporary:
        sitk.WriteImage(image, str(temporary), useCompression=True)
    logger.info("Wrote tumor probability map %s (%s)", path, pixels.dtype)
    return path


def write_slices_csv(
    path: str | os.PathLike,
    rows: Sequence[Mapping[str, object]],
    fieldnames: Sequence[str] | None = None,
) -> Path:
    """Write one CSV row per slice, with a header line.

    Args:
        path: the file to write (UTF-8, comma separated).
        rows: one mapping per row. Every row must have the same keys.
        fieldnames: the columns, in order. Defaults to the keys of the first row; needed
            only to write a header for zero rows.

    Returns:
        `path` as a Path.

    Raises:
        ValueError: a row has other keys than the header, or there are no rows and no
            `fieldnames`.
    """
    path = Path(path)
    if fieldnames is None:
        if not rows:
            raise ValueError(f"No rows to write to {path}; pass fieldnames to write only a header.")
        fieldnames = list(rows[0].keys())
    columns = set(fieldnames)
    for index, row in enumerate(rows):
        if set(row.keys()) != columns:
            raise ValueError(
                f"Row {index} of {path.name} has columns {sorted(row.keys())}, "
                f"expected {sorted(columns)}."
            )

    with atomic_path(path) as temporary:
        with open(temporary, "w", newline="", encoding="utf-8") as file:
            writer = csv.DictWriter(file, fieldnames=list(fieldnames))
            writer.writeheader()
            writer.writerows(rows)
    logger.info("Wrote %d rows to %s", len(rows), path)
    return path


def write_json(path: str | os.PathLike, data: Mapping) -> Path:
    """Write a mapping as UTF-8 JSON with 2-space indentation.

    NumPy scalars and arrays and `Path` values are converted to JSON types. NaN and
    infinity are rejected: in a report they mean a computation went wrong.

    Returns:
        `path` as a Path.

    Raises:
        ValueError: `data` contains NaN or infinity.
        TypeError: `data` contains a value that has no JSON form.
    """
    path = Path(path)
    try:
        text = json.dumps(data, indent=2, allow_nan=False, ensure_ascii=False, default=_json_default)
    except ValueError as error:
        raise ValueError(
            f"Cannot write {path.name}: the data contains NaN or infinity ({error}). "
            "A NaN in the results is a bug in the computation that produced it."
        ) from error
    with atomic_path(path) as temporary:
        temporary.write_text(text + "\n", encoding="utf-8")
    logger.info("Wrote %s", path)
    return path


def _json_default(value: object) -> object:
    """Convert the non-JSON types a report may contain (NumPy values, paths)."""
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    raise TypeError(f"Cannot write a value of type {type(value).__name__} to JSON: {value!r}")
