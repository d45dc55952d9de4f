"""Reading a CT volume from an image file or a DICOM folder, with input checks.

Files are read with SimpleITK: NIfTI (.nii, .nii.gz), NRRD (.nrrd, .nhdr), MetaImage
(.mha, .mhd) and DICOM. A DICOM folder is searched recursively for series with GDCM, which
sorts the slices of a series by their position along the slice normal. The CT series with
the most slices is read once, and every other series is reported as skipped.

The returned image keeps its geometry as read: spacing in mm, origin and direction in LPS
(the frame of DICOM and ITK). Its voxels are float32 Hounsfield units. NumPy views of it are
in (z, y, x) order. Every rejected input raises `InvalidInputError`, whose message names the
path and the value found and whose hint gives the next step.
"""

from __future__ import annotations

import contextlib
import gzip
import logging
import os
import re
import struct
import time
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from .errors import InvalidInputError

logger = logging.getLogger(__name__)

__all__ = [
    "AIR_CHECK_PERCENTILE",
    "AIR_CHECK_MAX_HU",
    "HU_FLOOR",
    "SPACING_MIN_MM",
    "SPACING_MAX_MM",
    "LoadedCT",
    "read_ct",
    "check_ct_image",
]

# Air is -1000 HU. Scanners store 12-bit values with intercept -1024, so -1024 is the lowest
# value that means air. Lower values (-2048, -3024) pad the outside of the reconstructed field
# of view and are raised to this floor.
HU_FLOOR = -1024.0

# An abdominal CT always contains air: around the body, in the bowel and at the lung bases.
# Its lowest 0.5 % of voxels lie near -1000 HU. An MR scan, a mask, or a CT stored without its
# rescale intercept has no voxel this low.
AIR_CHECK_PERCENTILE = 0.5
AIR_CHECK_MAX_HU = -500.0

# Plausible voxel spacing of a CT volume. Clinical CT voxels range from about 0.2 mm
# (ultra-high-resolution in-plane) to 10 mm (thick slices). Values outside these wider limits
# usually mean a unit error in the header (metres or centimetres written as millimetres).
SPACING_MIN_MM = 0.05
SPACING_MAX_MM = 50.0

# Relative deviation from the nominal slice spacing above which the slice positions of a DICOM
# series count as uneven (a missing or duplicated slice).
SLICE_SPACING_TOLERANCE = 0.1

# Largest number of voxels the percentile checks look at. Larger volumes are subsampled with a
# regular stride, which is enough for percentiles of 0.5 % and above.
_PERCENTILE_SAMPLE_VOXELS = 1 << 20

_CT_MODALITY = "CT"
_TAG_MODALITY = "0008|0060"
_TAG_SERIES_DESCRIPTION = "0008|103e"
_TAG_SERIES_UID = "0020|000e"
_TAG_IMAGE_POSITION = "0020|0032"
_TAG_SLICE_THICKNESS = "0018|0050"
_TAG_SPACING_BETWEEN_SLICES = "0018|0088"

_DICOM_IMAGE_IO = "GDCMImageIO"
_NIFTI_IMAGE_IO = "NiftiImageIO"
_IMAGE_FILE_SUFFIXES = (".nii", ".nii.gz", ".nrrd", ".nhdr", ".mha", ".mhd")
_SUPPORTED_FORMATS = (
    "a NIfTI (.nii, .nii.gz), NRRD (.nrrd, .nhdr) or MetaImage (.mha, .mhd) file, "
    "or a folder of DICOM files"
)

_SCALAR_PIXEL_IDS = frozenset(
    {
        sitk.sitkUInt8,
        sitk.sitkInt8,
        sitk.sitkUInt16,
        sitk.sitkInt16,
        sitk.sitkUInt32,
        sitk.sitkInt32,
        sitk.sitkUInt64,
        sitk.sitkInt64,
        sitk.sitkFloat32,
        sitk.sitkFloat64,
    }
)


@dataclass(frozen=True)
class LoadedCT:
    """A CT volume as read, with where it came from and what was noticed on reading.

    Attributes:
        image: 3-D scalar image, sitkFloat32, in Hounsfield units, geometry as read (LPS).
        source_path: absolute path that was read (a file or a folder).
        source_kind: "file" for an image file, "dicom" for a DICOM series.
        series_uid: DICOM SeriesInstanceUID of the series read, or None (image file, or a
            series without the tag).
        num_files: number of DICOM files read, or 1 for an image file.
        warnings: messages about recoverable problems (skipped series, raised values).
    """

    image: sitk.Image
    source_path: Path
    source_kind: str
    series_uid: str | None
    num_files: int
    warnings: tuple[str, ...]


@dataclass(frozen=True)
class _DicomSeries:
    """One DICOM series found by GDCM, with the header fields of its first file."""

    series_id: str  # GDCM's identifier: SeriesInstanceUID plus geometry details
    files: tuple[str, ...]  # sorted by GDCM along the slice normal
    modality: str | None
    series_uid: str | None
    description: str
    num_components: int

    def describe(self) -> str:
        modality = self.modality or "no modality tag"
        files = "1 file" if len(self.files) == 1 else f"{len(self.files)} files"
        text = f"{modality}, {files}, UID {self.series_uid or 'missing'}"
        if self.description:
            text += f", '{self.description}'"
        return f"{os.path.dirname(self.files[0])} ({text})"


def read_ct(path: str | os.PathLike) -> LoadedCT:
    """Read a CT volume from an image file, a DICOM folder or one DICOM file.

    A DICOM folder is searched recursively. Of its series, the CT series with the most files
    is read, and the others are listed in the warnings. A single DICOM file is read together
    with the files of its series in the same folder. A 2-D image becomes a volume of one
    slice. Voxels below `HU_FLOOR` are raised to it.

    Args:
        path: image file, DICOM folder, or one file of a DICOM series.

    Returns:
        The volume as float32 HU with its geometry as read (LPS, mm).

    Raises:
        InvalidInputError: if the path is missing, empty, truncated, unreadable or contains
            no DICOM series. Also if the image is not one scalar 3-D volume, the DICOM
            modality is not CT, the spacing is implausible, or the values do not look like CT
            in HU (see `check_ct_image`).
    """
    start = time.perf_counter()
    source_path = Path(os.path.abspath(Path(path).expanduser()))
    source = str(source_path)
    if not source_path.exists():
        raise InvalidInputError(
            f"Input not found: {source}.",
            f"Check the path. Pass {_SUPPORTED_FORMATS}.",
        )

    series = None
    if source_path.is_dir():
        image, series, warnings = _read_dicom_folder(source_path)
    else:
        _check_file_readable(source_path)
        if _image_io_name(source_path) == _DICOM_IMAGE_IO:
            image, series, warnings = _read_dicom_file(source_path)
        else:
            image, warnings = _read_image_file(source_path), []

    image, shape_warnings = _as_volume(image, source)
    # Checking before the float32 cast scans the stored type, often int16: half the bytes.
    check_warnings = check_ct_image(image, source)
    image = sitk.Cast(image, sitk.sitkFloat32)
    image, floor_warnings = _raise_to_hu_floor(image, source)
    warnings = [*warnings, *shape_warnings, *check_warnings, *floor_warnings]
    for warning in warnings:
        logger.warning(warning)

    loaded = LoadedCT(
        image=image,
        source_path=source_path,
        source_kind="file" if series is None else "dicom",
        series_uid=None if series is None else series.series_uid,
        num_files=1 if series is None else len(series.files),
        warnings=tuple(warnings),
    )
    logger.info(
        "Read %s (%s, %d file(s)): size %s, spacing %s mm, %.1f s",
        source,
        loaded.source_kind,
        loaded.num_files,
        image.GetSize(),
        tuple(round(s, 3) for s in image.GetSpacing()),
        time.perf_counter() - start,
    )
    return loaded


def check_ct_image(image: sitk.Image, source: str) -> list[str]:
    """Check that an image is a plausible CT volume in Hounsfield units.

    Rejects an image that is not a 3-D scalar volume or has a spacing outside
    [`SPACING_MIN_MM`, `SPACING_MAX_MM`]. Also rejects NaN or infinite values, a constant
    image, and values entirely within 0..1 (a mask or a probability map) or 0..255 (a label
    map or an 8-bit image). Finally, the `AIR_CHECK_PERCENTILE` percentile must be below
    `AIR_CHECK_MAX_HU`, because a CT contains air. An MR scan, a CT stored without its rescale
    intercept or a CT cropped inside the body fails this check.

    Args:
        image: the volume, any scalar pixel type.
        source: path or name of the volume, used in messages.

    Returns:
        Warnings about usable but unusual volumes (fewer than three slices along an axis).

    Raises:
        InvalidInputError: naming `source` and the value found.
    """
    _check_scalar_volume(image, source)
    _check_spacing(image, source)
    _check_hu_values(sitk.GetArrayViewFromImage(image), source)

    warnings = []
    size = image.GetSize()
    if min(size) < 3:
        warnings.append(
            f"{source} has only {min(size)} slice(s) along one axis (size "
            f"{_format_size(size)}), so volumes measured on it cover only those slices."
        )
    return warnings


# ---------------------------------------------------------------------------------------------
# Image files


def _check_file_readable(path: Path) -> None:
    try:
        with open(path, "rb") as stream:
            first_byte = stream.read(1)
    except OSError as err:
        raise InvalidInputError(
            f"Input file {path} cannot be opened: {err.strerror}.",
            "Check that the file exists and that you have permission to read it.",
        ) from err
    if not first_byte:
        raise InvalidInputError(
            f"Input file {path} is empty (0 bytes).",
            "The file was not written or copied completely, so copy it again from its source.",
        )


def _image_io_name(path: Path) -> str:
    """Return the name of the SimpleITK ImageIO that can read `path`, or "" if none can."""
    try:
        return sitk.ImageFileReader().GetImageIOFromFileName(str(path))
    except RuntimeError:
        return ""


def _read_image_file(path: Path) -> sitk.Image:
    io_name = _image_io_name(path)
    if not io_name:
        raise _unreadable_file_error(path)

    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    reader.SetImageIO(io_name)
    try:
        reader.ReadImageInformation()
        if io_name == _NIFTI_IMAGE_IO:
            _check_nifti_data_size(path, reader)
            _check_nifti_float_data_finite(path, reader)
        return reader.Execute()
    except RuntimeError as err:
        raise _read_failed_error(path, err) from err


def _unreadable_file_error(path: Path) -> InvalidInputError:
    with open(path, "rb") as stream:
        preamble = stream.read(132)
    if preamble[128:132] == b"DICM":
        return InvalidInputError(
            f"{path} has a DICOM header but GDCM cannot read it: the file may be truncated "
            "or corrupt.",
            "Copy the file again from its source. To read a whole series, pass its folder.",
        )
    return InvalidInputError(
        f"{path} is not an image that SimpleITK can read.",
        f"Pass {_SUPPORTED_FORMATS}. If the file has one of these formats, it may be "
        "truncated or corrupt, so copy it again from its source.",
    )


def _read_failed_error(path: Path, err: RuntimeError) -> InvalidInputError:
    reason = _itk_error_reason(err)
    if "spacing" in reason.lower():
        return InvalidInputError(
            f"Could not read {path}: its header gives an invalid voxel spacing ({reason}).",
            "Fix the spacing in the file header or export the CT again from the original data.",
        )
    return InvalidInputError(
        f"Could not read {path}: {reason}",
        "The file may be truncated or corrupt, so copy it again from its source. "
        f"Supported inputs: {_SUPPORTED_FORMATS}.",
    )


def _itk_error_reason(err: RuntimeError) -> str:
    """Return the first ITK or SimpleITK error line of an exception, without the object id."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    for line in lines:
        for marker in ("ITK ERROR:", "sitk::ERROR:"):
            if marker in line:
                reason = line.split(marker, 1)[1].strip()
                return re.sub(r"^\w+\s*\(0x[0-9a-fA-F]+\):\s*", "", reason)
    return lines[-1] if lines else repr(err)


def _check_nifti_data_size(path: Path, reader: sitk.ImageFileReader) -> None:
    """Raise if a .nii or .nii.gz file contains fewer bytes than its header describes.

    ITK's NIfTI reader fills missing data with zeros without an error, so a half-copied
    file would otherwise be read as a CT with a blank end.

    NOTE: NIfTI .hdr/.img pairs are not checked.
    """
    name = path.name.lower()
    if not name.endswith((".nii", ".nii.gz")):
        return
    try:
        num_dims = int(reader.GetMetaData("dim[0]"))
        dims = [int(reader.GetMetaData(f"dim[{i}]")) for i in range(1, num_dims + 1)]
        num_voxels = int(np.prod(dims))
        data_offset = int(float(reader.GetMetaData("vox_offset")))
        bits_per_voxel = int(reader.GetMetaData("bitpix"))
    except (RuntimeError, ValueError):
        logger.debug("NIfTI header fields of %s are missing, so its size is not checked", path)
        return

    expected_bytes = data_offset + num_voxels * bits_per_voxel // 8
    if name.endswith(".gz"):
        actual_bytes = _gzip_uncompressed_size(path, expected_bytes)
    else:
        actual_bytes = path.stat().st_size
    if actual_bytes < expected_bytes:
        raise InvalidInputError(
            f"{path} is truncated: its header describes {expected_bytes} bytes of header and "
            f"image data, but the file contains {actual_bytes}.",
            "The file was not written or copied completely, so copy it again from its source.",
        )


# NIfTI datatype codes of floating-point voxels: float32, float64.
_NIFTI_FLOAT_TYPES = {16: "f4", 64: "f8"}
_NIFTI_HEADER_SIZE = 348  # sizeof_hdr of NIfTI-1; its byte order is the file's byte order
_FINITE_CHECK_CHUNK_BYTES = 1 << 24


def _check_nifti_float_data_finite(path: Path, reader: sitk.ImageFileReader) -> None:
    """Raise if a floating-point .nii or .nii.gz file stores NaN or infinite voxels.

    SimpleITK 2.5's NIfTI reader returns 0 for such voxels, so the check on the image it
    returns would not see them. The raw data block is scanned in chunks instead.
    """
    name = path.name.lower()
    if not name.endswith((".nii", ".nii.gz")):
        return
    try:
        type_code = _NIFTI_FLOAT_TYPES.get(int(reader.GetMetaData("datatype")))
        data_offset = int(float(reader.GetMetaData("vox_offset")))
    except (RuntimeError, ValueError):
        return
    if type_code is None:
        return
    opener = gzip.open if name.endswith(".gz") else open
    non_finite = 0
    with opener(path, "rb") as stream:
        header_size = stream.read(4)
        byte_order = "<" if struct.unpack("<i", header_size)[0] == _NIFTI_HEADER_SIZE else ">"
        dtype = np.dtype(byte_order + type_code)
        stream.seek(data_offset)
        while chunk := stream.read(_FINITE_CHECK_CHUNK_BYTES - _FINITE_CHECK_CHUNK_BYTES % 8):
            usable = len(chunk) - len(chunk) % dtype.itemsize
            non_finite += int(np.count_nonzero(~np.isfinite(np.frombuffer(chunk[:usable], dtype))))
    if non_finite:
        raise InvalidInputError(
            f"{path} contains {non_finite} NaN or infinite voxel values.",
            "Replace them (for example with -1024 HU outside the body) and save the CT again.",
        )


def _gzip_uncompressed_size(path: Path, expected_bytes: int) -> int:
    """Return the uncompressed size of a gzip file, or the bytes decompressed before an error.

    The gzip trailer stores the size modulo 2**32. When it matches `expected_bytes` the file is
    complete, so the data is decompressed a second time only for a file that looks damaged.
    """
    with open(path, "rb") as stream:
        stream.seek(-4, os.SEEK_END)
        (stored_size,) = struct.unpack("<I", stream.read(4))
    if stored_size == expected_bytes % (1 << 32):
        return expected_bytes

    total = 0
    try:
        with gzip.open(path, "rb") as stream:
            while chunk := stream.read(1 << 16):
                total += len(chunk)
    except (EOFError, OSError, zlib.error):
        pass  # truncated or corrupt: `total` is what could be decompressed
    return total


# ---------------------------------------------------------------------------------------------
# DICOM


def _read_dicom_folder(folder: Path) -> tuple[sitk.Image, _DicomSeries, list[str]]:
    all_series, num_files, num_dirs = _find_dicom_series(folder)
    if not all_series:
        raise _no_dicom_error(folder, num_files, num_dirs)

    chosen, warnings = _choose_ct_series(all_series, folder)
    image, reader = _read_dicom_series(chosen, str(folder))
    unread_warnings = _check_unread_dicom_files(folder, all_series)
    _check_slice_positions(reader, image, str(folder), unread_warnings)
    return image, chosen, warnings + unread_warnings


def _read_dicom_file(path: Path) -> tuple[sitk.Image, _DicomSeries, list[str]]:
    if path.name.upper() == "DICOMDIR":
        return _read_dicom_folder(path.parent)

    header = _read_dicom_header(str(path))
    series = _series_of_file(path, header)
    _check_ct_modality(series, str(path))
    image, reader = _read_dicom_series(series, str(path))
    _check_slice_positions(reader, image, str(path))
    warnings: list[str] = []
    if len(series.files) > 1:
        logger.info("%s is part of a series of %d files, which are all read", path,
                    len(series.files))
    return image, series, warnings


def _find_dicom_series(folder: Path) -> tuple[list[_DicomSeries], int, int]:
    """Find every DICOM series under `folder`.

    Returns:
        The series (in folder order), the number of files looked at and of folders.
    """
    # Parts of a series keyed by GDCM's series identifier, and by folder where the
    # SeriesInstanceUID is empty, because unrelated anonymized series would otherwise merge.
    parts: dict[tuple[str, str], list[tuple[tuple[str, ...], dict[str, str]]]] = {}
    num_files = 0
    num_dirs = 0
    with _itk_warnings_off():  # GDCM warns "No Series were found" for every non-DICOM folder
        for dirpath, dirnames, filenames in os.walk(folder):
            dirnames.sort()
            num_dirs += 1
            num_files += len(filenames)
            if not filenames:
                continue
            for series_id in sitk.ImageSeriesReader.GetGDCMSeriesIDs(dirpath, True):
                files = sitk.ImageSeriesReader.GetGDCMSeriesFileNames(dirpath, series_id, True)
                header = _read_dicom_header(files[0])
                has_uid = bool(_clean_dicom_text(header.get(_TAG_SERIES_UID, "")))
                key = (series_id, "" if has_uid else dirpath)
                parts.setdefault(key, []).append((tuple(files), header))

        all_series = []
        for (series_id, _), series_parts in parts.items():
            files, header = series_parts[0]
            if len(series_parts) > 1:
                # One series spread over several folders: let GDCM sort all of its files.
                files = tuple(
                    sitk.ImageSeriesReader.GetGDCMSeriesFileNames(
                        str(folder), series_id, True, True
                    )
                )
            all_series.append(_series_from_header(series_id, files, header))
    return all_series, num_files, num_dirs


def _no_dicom_error(folder: Path, num_files: int, num_dirs: int) -> InvalidInputError:
    if num_files == 0:
        return InvalidInputError(
            f"Input folder {folder} is empty.",
            "Select the folder that contains the DICOM files of a CT series.",
        )
    image_files = sorted(
        str(p.relative_to(folder))
        for p in folder.rglob("*")
        if p.is_file() and p.name.lower().endswith(_IMAGE_FILE_SUFFIXES)
    )
    hint = (
        "Select a folder that contains the DICOM files of a CT series "
        "(files without an extension are fine)."
    )
    if image_files:
        hint = f"The folder contains {', '.join(image_files[:3])}: pass such a file instead."
    return InvalidInputError(
        f"No DICOM series found in folder {folder} ({num_files} files in {num_dirs} folders "
        "were checked).",
        hint,
    )


def _choose_ct_series(
    all_series: list[_DicomSeries], folder: Path
) -> tuple[_DicomSeries, list[str]]:
    """Pick the CT series with the most files. A series without a Modality tag counts as CT."""
    candidates = [s for s in all_series if s.modality in (_CT_MODALITY, None)]
    if not candidates:
        found = "; ".join(s.describe() for s in all_series)
        raise InvalidInputError(
            f"No CT series in DICOM folder {folder}. Found: {found}.",
            "This tool segments CT only: select a folder with a CT series (modality CT).",
        )
    chosen = max(candidates, key=lambda s: len(s.files))  # the first one on a tie
    logger.info("Reading DICOM series %s", chosen.describe())

    warnings = []
    skipped = [s for s in all_series if s is not chosen]
    if skipped:
        warnings.append(
            f"Read the CT series with the most files, {chosen.describe()}, and skipped "
            f"{len(skipped)} other series in {folder}: " + "; ".join(s.describe() for s in skipped)
        )
    if chosen.modality is None:
        warnings.append(
            f"DICOM series {chosen.describe()} has no Modality tag, so it was read as CT."
        )
    return chosen, warnings


def _series_of_file(path: Path, header: dict[str, str]) -> _DicomSeries:
    """Find the series that contains one DICOM file among the files of its folder."""
    with _itk_warnings_off():
        for series_id in sitk.ImageSeriesReader.GetGDCMSeriesIDs(str(path.parent), True):
            files = sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(path.parent), series_id, True)
            if any(os.path.samefile(f, path) for f in files):
                return _series_from_header(series_id, tuple(files), header)
    return _series_from_header("", (str(path),), header)


def _read_dicom_header(file_name: str) -> dict[str, str]:
    """Read the header of one DICOM file (its pixel data is not decoded)."""
    reader = sitk.ImageFileReader()
    reader.SetFileName(file_name)
    reader.SetImageIO(_DICOM_IMAGE_IO)
    reader.LoadPrivateTagsOff()
    try:
        with _itk_warnings_off():
            reader.ReadImageInformation()
    except RuntimeError as err:
        raise _read_failed_error(Path(file_name), err) from err
    header = {key: reader.GetMetaData(key) for key in reader.GetMetaDataKeys()}
    header["num_components"] = str(reader.GetNumberOfComponents())
    return header


def _series_from_header(
    series_id: str, files: tuple[str, ...], header: dict[str, str]
) -> _DicomSeries:
    modality = _clean_dicom_text(header.get(_TAG_MODALITY, "")).upper()
    return _DicomSeries(
        series_id=series_id,
        files=files,
        modality=modality or None,
        series_uid=_clean_dicom_text(header.get(_TAG_SERIES_UID, "")) or None,
        description=_clean_dicom_text(header.get(_TAG_SERIES_DESCRIPTION, "")),
        num_components=int(header.get("num_components", "1")),
    )


def _clean_dicom_text(value: str) -> str:
    """Strip the space and NUL padding that DICOM adds to odd-length values."""
    return value.strip(" \x00\t\r\n")


def _check_ct_modality(series: _DicomSeries, source: str) -> None:
    if series.modality not in (_CT_MODALITY, None):
        raise InvalidInputError(
            f"{source} is a DICOM series of modality {series.modality}, not CT "
            f"({series.describe()}).",
            "This tool segments CT only: select a CT series (modality CT).",
        )


def _read_dicom_series(
    series: _DicomSeries, source: str
) -> tuple[sitk.Image, sitk.ImageSeriesReader]:
    """Read the pixel data of a series once, as float32 with rescale slope and intercept applied.

    Returns:
        The image and the reader, which stores the header of every slice.
    """
    if series.num_components != 1:
        raise InvalidInputError(
            f"DICOM series {series.describe()} in {source} has {series.num_components} "
            "components per pixel (colour or multi-channel), not one value per voxel.",
            "Select the original CT series: screenshots and colour exports cannot be segmented.",
        )
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(list(series.files))
    # Float output keeps a non-integer rescale slope of any slice, because each slice is
    # rescaled on its own before conversion.
    reader.SetOutputPixelType(sitk.sitkFloat32)
    reader.MetaDataDictionaryArrayUpdateOn()
    reader.LoadPrivateTagsOff()
    try:
        with _itk_warnings_off():  # uneven slice positions are reported by this module instead
            image = reader.Execute()
    except RuntimeError as err:
        raise InvalidInputError(
            f"Could not read DICOM series {series.describe()} in {source}: "
            f"{_itk_error_reason(err)}",
            "A file of the series may be truncated or corrupt, or the slices may differ in "
            "size or pixel type. Copy the series again from its source.",
        ) from err

    if image.GetDimension() == 3 and image.GetSize()[2] == 1:
        image = _set_single_slice_thickness(image, reader)
    return image, reader


def _set_single_slice_thickness(image: sitk.Image, reader: sitk.ImageSeriesReader) -> sitk.Image:
    """Give a one-slice DICOM volume its slice thickness as z spacing (ITK reports 1 mm)."""
    for tag in (_TAG_SLICE_THICKNESS, _TAG_SPACING_BETWEEN_SLICES):
        if reader.HasMetaDataKey(0, tag):
            try:
                thickness_mm = float(_clean_dicom_text(reader.GetMetaData(0, tag)))
            except ValueError:
                continue
            if thickness_mm > 0:
                spacing = image.GetSpacing()
                image.SetSpacing((spacing[0], spacing[1], thickness_mm))
                return image
    logger.warning("One-slice DICOM image without a slice thickness, so 1 mm is assumed")
    return image


def _check_slice_positions(
    reader: sitk.ImageSeriesReader, image: sitk.Image, source: str,
    unread_warnings: Sequence[str] = (),
) -> None:
    """Raise when the slices of a series are not evenly spaced along the slice normal.

    The volume is built with one spacing, so slices beyond a gap or a duplicate would sit
    at wrong positions, and the segmentation would not line up with the series.
    `unread_warnings` (files that could not be read) are quoted as the likely cause.
    """
    num_slices = image.GetSize()[2]
    if num_slices < 3:
        return
    positions_lps = []
    for index in range(num_slices):
        if not reader.HasMetaDataKey(index, _TAG_IMAGE_POSITION):
            return
        try:
            text = _clean_dicom_text(reader.GetMetaData(index, _TAG_IMAGE_POSITION))
            positions_lps.append([float(v) for v in text.split("\\")])
        except ValueError:
            return

    normal_lps = np.asarray(image.GetDirection(), dtype=np.float64).reshape(3, 3)[:, 2]
    steps_mm = np.abs(np.diff(np.asarray(positions_lps) @ normal_lps))
    nominal_mm = image.GetSpacing()[2]
    if np.max(np.abs(steps_mm - nominal_mm)) <= SLICE_SPACING_TOLERANCE * nominal_mm:
        return
    cause = f" {' '.join(unread_warnings)}" if unread_warnings else ""
    raise InvalidInputError(
        f"Slice positions of the DICOM series in {source} are uneven: the distance between "
        f"neighbouring slices ranges from {steps_mm.min():.2f} to {steps_mm.max():.2f} mm. "
        "Slices are missing or duplicated, so a segmentation would not line up with the "
        f"series.{cause}",
        "Complete the series (replace damaged or missing files), or export it again from "
        "the scanner or PACS.",
    )


def _check_unread_dicom_files(folder: Path, all_series: list[_DicomSeries]) -> list[str]:
    """Warn about files with a DICOM preamble that belong to no series GDCM could read."""
    in_series = {os.path.normpath(f) for s in all_series for f in s.files}
    unread = []
    for dirpath, _, filenames in os.walk(folder):
        for name in sorted(filenames):
            file_name = os.path.normpath(os.path.join(dirpath, name))
            if name.upper() == "DICOMDIR" or file_name in in_series:
                continue
            try:
                with open(file_name, "rb") as stream:
                    preamble = stream.read(132)
            except OSError:
                continue
            if preamble[128:132] == b"DICM":
                unread.append(file_name)
    if not unread:
        return []
    return [
        f"{len(unread)} file(s) in {folder} have a DICOM header but belong to no readable "
        f"image series (for example {unread[0]}). Slices among them may be truncated or "
        "corrupt. Other files may be reports or structure sets."
    ]


@contextlib.contextmanager
def _itk_warnings_off():
    """Silence ITK's warnings to stderr while inside, and restore the previous setting.

    NOTE: the setting is global to the process, so other threads lose ITK warnings meanwhile.
    """
    previous = sitk.ProcessObject.GetGlobalWarningDisplay()
    sitk.ProcessObject.SetGlobalWarningDisplay(False)
    try:
        yield
    finally:
        sitk.ProcessObject.SetGlobalWarningDisplay(previous)


# ---------------------------------------------------------------------------------------------
# Shape and value checks


def _as_volume(image: sitk.Image, source: str) -> tuple[sitk.Image, list[str]]:
    """Make a scalar image 3-D: a 2-D image becomes one slice, a 4-D image of one frame 3-D."""
    _check_scalar_pixels(image, source)
    size = image.GetSize()
    if image.GetDimension() == 2:
        warning = (
            f"{source} is a 2-D image (size {_format_size(size)}), so it was read as a volume "
            "of one slice with an assumed thickness of 1 mm."
        )
        return sitk.JoinSeries(image), [warning]
    if image.GetDimension() == 4 and size[3] == 1:
        warning = (
            f"{source} is a 4-D image with one frame (size {_format_size(size)}), so that "
            "frame was read as a 3-D volume."
        )
        return sitk.Extract(image, [size[0], size[1], size[2], 0], [0, 0, 0, 0]), [warning]
    _check_scalar_volume(image, source)
    return image, []


def _check_scalar_pixels(image: sitk.Image, source: str) -> None:
    num_components = image.GetNumberOfComponentsPerPixel()
    if num_components != 1 or image.GetPixelID() not in _SCALAR_PIXEL_IDS:
        raise InvalidInputError(
            f"{source} has pixel type '{image.GetPixelIDTypeAsString()}' with {num_components} "
            "component(s) per voxel, but a CT volume has one real value per voxel.",
            "Colour (RGB) images, vector fields, complex data and label maps cannot be "
            "segmented: export the CT as a single-channel volume in Hounsfield units.",
        )


def _check_scalar_volume(image: sitk.Image, source: str) -> None:
    _check_scalar_pixels(image, source)
    if image.GetDimension() != 3:
        raise InvalidInputError(
            f"{source} is a {image.GetDimension()}-D image (size "
            f"{_format_size(image.GetSize())}), but a CT volume is 3-D.",
            "Pass a single 3-D CT volume, and split a time series (4-D) into its frames. "
            "A 2-D image file is read as a volume of one slice.",
        )
    size = image.GetSize()
    if sum(1 for n in size if n > 1) < 2:
        raise InvalidInputError(
            f"{source} has size {_format_size(size)}, which is not a CT slice or volume: "
            "at least two axes need more than one voxel.",
            "Pass a CT volume or at least one full CT slice.",
        )


def _check_spacing(image: sitk.Image, source: str) -> None:
    spacing_mm = image.GetSpacing()
    for axis, value in zip("xyz", spacing_mm):
        if SPACING_MIN_MM <= value <= SPACING_MAX_MM:
            continue
        if not np.isfinite(value) or value <= 0:
            problem = "not positive"
        elif value < SPACING_MIN_MM:
            problem = f"below {SPACING_MIN_MM} mm (the header may store metres)"
        else:
            problem = f"above {SPACING_MAX_MM} mm (the header may store another unit)"
        raise InvalidInputError(
            f"{source} has voxel spacing {_format_spacing(spacing_mm)} mm. The spacing along "
            f"{axis}, {value:g} mm, is {problem}.",
            "Fix the voxel spacing in the image header (in mm), or export the CT again from "
            "the original DICOM series.",
        )


def _check_hu_values(array: np.ndarray, source: str) -> None:
    """Raise unless the voxel values look like CT in Hounsfield units."""
    # Integer voxels are always finite.
    finite = np.isfinite(array) if np.issubdtype(array.dtype, np.floating) else True
    if not np.all(finite):
        num_nan = int(np.count_nonzero(np.isnan(array)))
        num_inf = int(array.size - np.count_nonzero(finite) - num_nan)
        raise InvalidInputError(
            f"{source} contains {num_nan} NaN and {num_inf} infinite voxel values "
            f"(of {array.size}).",
            "Export the CT again with every voxel in Hounsfield units. Voxels outside the "
            f"field of view are usually stored as {HU_FLOOR:g} HU.",
        )

    low, high = float(array.min()), float(array.max())
    if low == high:
        raise InvalidInputError(
            f"Every voxel of {source} has the value {low:g}, so the volume is blank.",
            "Pass a CT volume with image content.",
        )
    if low >= 0 and high <= 1:
        raise InvalidInputError(
            f"{source} is not CT in Hounsfield units: all values lie within 0 to 1 "
            f"(lowest {low:.4g}, highest {high:.4g}), as in a mask, a probability map or a "
            "normalized image.",
            "Pass the CT volume itself, with air near -1000 HU.",
        )
    if low >= 0 and high <= 255:
        raise InvalidInputError(
            f"{source} is not CT in Hounsfield units: all values lie within 0 to 255 "
            f"(lowest {low:.4g}, highest {high:.4g}), as in a label map, a mask or an 8-bit "
            "image such as a screenshot.",
            "Pass the CT volume itself, with air near -1000 HU.",
        )

    sample = _sample_voxels(array)
    air_percentile, median = (float(v) for v in np.percentile(sample, [AIR_CHECK_PERCENTILE, 50]))
    if air_percentile > AIR_CHECK_MAX_HU:
        raise _no_air_error(source, low, high, air_percentile, median)


def _no_air_error(
    source: str, low: float, high: float, air_percentile: float, median: float
) -> InvalidInputError:
    found = (
        f"the {AIR_CHECK_PERCENTILE:g}th percentile of its values is {air_percentile:.0f} "
        f"(range {low:.0f} to {high:.0f}, median {median:.0f})"
    )
    if low >= 0:
        cause = (
            "All values are non-negative, as in an MR scan, or in a CT stored without its "
            "rescale intercept (usually -1024), where air is near 0 instead of -1000 HU."
        )
    else:
        cause = "It may be a CT cropped inside the body, or not a CT."
    return InvalidInputError(
        f"{source} does not look like CT in Hounsfield units: {found}, but an abdominal CT "
        f"contains air (about -1000 HU), so this percentile should be below "
        f"{AIR_CHECK_MAX_HU:.0f} HU. {cause}",
        "Pass a CT volume in Hounsfield units. For CT stored without rescaling, convert it "
        "(HU = stored value x RescaleSlope + RescaleIntercept) or read the original DICOM "
        "series. For a cropped CT, pass the uncropped scan.",
    )


def _sample_voxels(array: np.ndarray) -> np.ndarray:
    flat = array.reshape(-1)
    step = max(1, flat.size // _PERCENTILE_SAMPLE_VOXELS)
    return flat[::step]


def _raise_to_hu_floor(image: sitk.Image, source: str) -> tuple[sitk.Image, list[str]]:
    """Raise voxels below `HU_FLOOR` (field-of-view padding) to it."""
    array = sitk.GetArrayViewFromImage(image)
    lowest = float(array.min())  # one pass, without the mask that counting needs
    if lowest >= HU_FLOOR:
        return image, []
    num_below = int(np.count_nonzero(array < HU_FLOOR))
    warning = (
        f"{num_below} voxels of {source} ({100.0 * num_below / array.size:.1f} %) were below "
        f"{HU_FLOOR:g} HU (lowest {lowest:g} HU), as in padding outside the field of view, "
        f"and were set to {HU_FLOOR:g} HU."
    )
    return sitk.Maximum(image, HU_FLOOR), [warning]


def _format_size(size) -> str:
    return " x ".join(str(int(n)) for n in size)


def _format_spacing(spacing_mm) -> str:
    return " x ".join(f"{s:g}" for s in spacing_mm)
