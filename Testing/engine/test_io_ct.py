"""Tests of the CT reader on real DICOM, NIfTI, NRRD and MetaImage data and on bad inputs.

Bad inputs and DICOM variants are built in `tmp_path`: DICOM variants are the CHAOS fixture
slices rewritten by SimpleITK's GDCM writer with changed tags or compression.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from livertumorai.errors import InvalidInputError
from livertumorai.geometry import ImageGeometry
from livertumorai.io_ct import HU_FLOOR, check_ct_image, read_ct

IRCADB_DICOM = "ct_unlabelled/ircadb1.1_dicom"
IRCADB_SERIES_UID = "1.2.826.0.1.3680043.2.1125.9647753419956608505832502991212815128"
SIEMENS_DICOM = "ct_unlabelled/siemens_abdomen_dicom"
CHAOS_DICOM = "fixtures/chaos_ct3_feet_first_dicom"
CHAOS_SERIES_UID = "1.2.840.113704.1.1762661655.11024.1129934350.12"
SMALL_AXIAL_LPS = "fixtures/ircadb1.17_small_axial_lps.nii.gz"
SMALL_OTHER_STORAGE = (
    "fixtures/ircadb1.17_small_axial_flipped_xy.nii.gz",
    "fixtures/ircadb1.17_small_feet_first.nrrd",
    "fixtures/ircadb1.17_small_coronal_stack.mha",
)
PELVIS_NIFTI = "fixtures/siemens_pelvis_abdomen_3mm.nii.gz"

JPEG_2000_LOSSLESS_UID = b"1.2.840.10008.1.2.4.90"
JPEG_LOSSLESS_UID = b"1.2.840.10008.1.2.4.70"
IDENTITY_DIRECTION = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0)


# ---------------------------------------------------------------------------------------------
# Helpers


def _array(ct) -> np.ndarray:
    return sitk.GetArrayFromImage(ct.image)


def _synthetic_ct_zyx(num_slices: int = 4, size: int = 32, seed: int = 0) -> np.ndarray:
    """Air at -1000 HU around a disc of soft tissue (40 HU with noise), in (z, y, x) order."""
    rng = np.random.default_rng(seed)
    _, y, x = np.mgrid[0:num_slices, 0:size, 0:size]
    body = (y - size / 2) ** 2 + (x - size / 2) ** 2 < (0.35 * size) ** 2
    tissue = 40.0 + rng.normal(0.0, 10.0, body.shape)
    return np.where(body, tissue, -1000.0).astype(np.float32)


def _write(array_zyx: np.ndarray, path: Path, spacing_mm=(0.8, 0.8, 2.5)) -> Path:
    image = sitk.GetImageFromArray(array_zyx)
    image.SetSpacing(spacing_mm[: image.GetDimension()])
    sitk.WriteImage(image, str(path))
    return path


def _write_metaimage(path: Path, spacing_text: str) -> Path:
    """Write a 4 x 4 x 4 int16 MetaImage by hand, so the header can hold any spacing."""
    array = _synthetic_ct_zyx(num_slices=4, size=4).astype("<i2")
    header = (
        "ObjectType = Image\nNDims = 3\nDimSize = 4 4 4\n"
        f"ElementSpacing = {spacing_text}\nElementType = MET_SHORT\n"
        "ElementByteOrderMSB = False\nElementDataFile = LOCAL\n"
    )
    path.write_bytes(header.encode("ascii") + array.tobytes())
    return path


def _rewrite_dicom(sources, folder: Path, compressor: str | None = None, **tags) -> list[Path]:
    """Rewrite DICOM files with GDCM, with DICOM tags changed (keyword `tag_gggg_eeee`)."""
    folder.mkdir(parents=True, exist_ok=True)
    written = []
    for source in sources:
        reader = sitk.ImageFileReader()
        reader.SetFileName(str(source))
        image = reader.Execute()
        output = sitk.Cast(image, sitk.sitkInt16)
        for key in image.GetMetaDataKeys():
            output.SetMetaData(key, image.GetMetaData(key))
        for keyword, value in tags.items():
            _, group, element = keyword.split("_")
            output.SetMetaData(f"{group}|{element}", value)

        writer = sitk.ImageFileWriter()
        writer.SetImageIO("GDCMImageIO")
        writer.KeepOriginalImageUIDOn()
        if compressor:
            writer.UseCompressionOn()
            writer.SetCompressor(compressor)
        writer.SetFileName(str(folder / Path(source).name))
        writer.Execute(output)
        written.append(folder / Path(source).name)
    return written


def _copy_files(sources, folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for source in sources:
        (folder / source.name).write_bytes(source.read_bytes())


def _assert_invalid(path, *expected_words: str) -> InvalidInputError:
    with pytest.raises(InvalidInputError) as info:
        read_ct(path)
    error = info.value
    assert str(Path(path).name) in error.message
    for word in expected_words:
        assert word in error.message
    assert error.hint
    return error


@pytest.fixture(scope="module")
def ircadb_ct(shared_data_dir):
    return read_ct(shared_data_dir / IRCADB_DICOM)


@pytest.fixture(scope="module")
def chaos_dir(shared_data_dir) -> Path:
    return shared_data_dir / CHAOS_DICOM


@pytest.fixture(scope="module")
def chaos_files(chaos_dir) -> list[Path]:
    """The CHAOS slices in file-name order, which is the reverse of their position order."""
    return sorted(chaos_dir.iterdir())


@pytest.fixture(scope="module")
def chaos_ct(chaos_dir):
    return read_ct(chaos_dir)


# ---------------------------------------------------------------------------------------------
# Real DICOM series


def test_ircadb_dicom_size_and_spacing(ircadb_ct):
    image = ircadb_ct.image
    assert image.GetPixelID() == sitk.sitkFloat32
    assert image.GetSize() == (512, 512, 129)
    np.testing.assert_allclose(image.GetSpacing(), (0.57, 0.57, 1.6), atol=1e-4)
    assert ircadb_ct.source_kind == "dicom"
    assert ircadb_ct.num_files == 129
    assert ircadb_ct.series_uid == IRCADB_SERIES_UID
    assert ircadb_ct.warnings == ()


def test_ircadb_superior_at_higher_index(ircadb_ct, shared_data_dir):
    geometry = ImageGeometry.from_image(ircadb_ct.image)
    assert geometry.direction_lps == IDENTITY_DIRECTION
    # LPS z points to the head: the last slice lies 128 x 1.6 mm above the first.
    z_first = geometry.index_to_lps([0, 0, 0])[2]
    z_last = geometry.index_to_lps([0, 0, 128])[2]
    assert z_last - z_first == pytest.approx(204.8, abs=1e-3)

    # image_k contains the slice at z = 1.6 k mm, so it must land at index k.
    array = _array(ircadb_ct)
    for index in (0, 64, 128):
        single = sitk.ReadImage(str(shared_data_dir / IRCADB_DICOM / f"image_{index}"))
        np.testing.assert_array_equal(array[index], sitk.GetArrayFromImage(single)[0])


def test_ircadb_hu_range(ircadb_ct):
    array = _array(ircadb_ct)
    assert array.min() == HU_FLOOR
    assert np.mean(array < -950) > 0.1  # air around the body
    assert -100 < np.median(array[:, 200:312, 200:312]) < 150


def test_siemens_jpeg2000_values_in_hu(shared_data_dir):
    folder = shared_data_dir / SIEMENS_DICOM
    first_file = sorted(folder.iterdir())[0]
    assert JPEG_2000_LOSSLESS_UID in first_file.read_bytes()[:2048]

    ct = read_ct(folder)
    image = ct.image
    assert image.GetSize() == (512, 512, 20)
    assert ct.num_files == 20
    assert ct.series_uid is None  # the files carry an empty SeriesInstanceUID
    np.testing.assert_allclose(image.GetSpacing(), (0.9765625, 0.9765625, 2.0), atol=1e-6)
    assert image.GetOrigin()[2] == pytest.approx(-804.5)  # the lowest slice comes first

    # Stored values are unsigned with intercept -1024: unscaled, air would be near 24.
    array = _array(ct)
    assert array.min() == HU_FLOOR
    air = array[(array > HU_FLOOR) & (array < -500)]
    counts, edges = np.histogram(air, bins=np.arange(-1020, -499, 10))
    assert -1020 <= edges[np.argmax(counts)] <= -980
    assert 0 <= np.median(array[:, 200:312, 200:312]) <= 100


def test_chaos_feet_first_in_position_order(chaos_ct, chaos_files):
    image = chaos_ct.image
    assert image.GetSize() == (512, 512, 16)
    assert chaos_ct.num_files == 16
    assert chaos_ct.series_uid == CHAOS_SERIES_UID
    assert image.GetDirection() == IDENTITY_DIRECTION
    assert image.GetSpacing()[2] == pytest.approx(2.0)
    assert image.GetOrigin()[2] == pytest.approx(1620.5)

    # File names run from the highest position (i0020, z 1650.5) to the lowest (i0035).
    array = _array(chaos_ct)
    for index, source in ((0, chaos_files[-1]), (15, chaos_files[0])):
        single = sitk.GetArrayFromImage(sitk.ReadImage(str(source)))[0]
        np.testing.assert_array_equal(array[index], single)


def test_chaos_hu_plausible(chaos_ct):
    array = _array(chaos_ct)
    assert array.min() == -1000.0  # stored 0 with intercept -1000
    assert np.mean(array <= -950) > 0.1
    assert 0 <= np.median(array[:, 200:312, 200:312]) <= 200


def test_chaos_rescale_matches_pydicom(chaos_ct, chaos_files):
    pydicom = pytest.importorskip("pydicom")
    dataset = pydicom.dcmread(chaos_files[-1])
    expected = dataset.pixel_array * float(dataset.RescaleSlope) + float(dataset.RescaleIntercept)
    assert float(dataset.RescaleIntercept) == -1000.0
    np.testing.assert_array_equal(_array(chaos_ct)[0], expected.astype(np.float32))


def test_single_dicom_file_reads_its_series(chaos_ct, chaos_files):
    ct = read_ct(chaos_files[5])
    assert ct.source_kind == "dicom"
    assert ct.num_files == 16
    assert ct.image.GetOrigin() == chaos_ct.image.GetOrigin()
    np.testing.assert_array_equal(_array(ct), _array(chaos_ct))


def test_single_dicom_file_alone_is_one_slice(chaos_files, tmp_path):
    _copy_files(chaos_files[:1], tmp_path)
    ct = read_ct(tmp_path / chaos_files[0].name)
    assert ct.image.GetSize() == (512, 512, 1)
    assert ct.num_files == 1
    assert ct.image.GetSpacing()[2] == pytest.approx(3.2)  # SliceThickness of the file
    assert any("1 slice" in warning for warning in ct.warnings)


def test_jpeg_lossless_series_matches_uncompressed(chaos_ct, chaos_files, tmp_path):
    written = _rewrite_dicom(chaos_files, tmp_path / "jpeg", compressor="JPEG")
    assert JPEG_LOSSLESS_UID in written[0].read_bytes()[:2048]

    ct = read_ct(tmp_path / "jpeg")
    assert ct.num_files == 16
    assert ct.image.GetOrigin() == chaos_ct.image.GetOrigin()
    np.testing.assert_array_equal(_array(ct), _array(chaos_ct))


def test_folder_reads_series_with_most_files(chaos_files, tmp_path):
    _copy_files(chaos_files, tmp_path / "study" / "a")
    _rewrite_dicom(chaos_files[:5], tmp_path / "study" / "b", tag_0020_000e="1.2.826.0.1.99.5")

    ct = read_ct(tmp_path / "study")
    assert ct.num_files == 16
    assert ct.series_uid == CHAOS_SERIES_UID
    assert len(ct.warnings) == 1
    assert "skipped 1 other series" in ct.warnings[0]
    assert "5 files, UID 1.2.826.0.1.99.5" in ct.warnings[0]


def test_series_split_over_folders_sorted(chaos_ct, chaos_files, tmp_path):
    _copy_files(chaos_files[0::2], tmp_path / "part1")
    _copy_files(chaos_files[1::2], tmp_path / "part2")

    ct = read_ct(tmp_path)
    assert ct.num_files == 16
    assert ct.warnings == ()
    assert ct.image.GetOrigin() == chaos_ct.image.GetOrigin()
    np.testing.assert_array_equal(_array(ct), _array(chaos_ct))


def test_mr_series_rejected(chaos_files, tmp_path):
    _rewrite_dicom(chaos_files, tmp_path / "mr", tag_0008_0060="MR")
    _assert_invalid(tmp_path / "mr", "No CT series", "MR, 16 files")


def test_single_mr_file_rejected(chaos_files, tmp_path):
    (written,) = _rewrite_dicom(chaos_files[:1], tmp_path / "mr", tag_0008_0060="MR")
    _assert_invalid(written, "modality MR, not CT")


def test_ct_series_preferred_over_larger_mr(chaos_files, tmp_path):
    _rewrite_dicom(chaos_files, tmp_path / "study" / "mr", tag_0008_0060="MR")
    _rewrite_dicom(chaos_files[:4], tmp_path / "study" / "ct", tag_0020_000e="1.2.826.0.1.99.4")

    ct = read_ct(tmp_path / "study")
    assert ct.num_files == 4
    assert ct.series_uid == "1.2.826.0.1.99.4"
    assert "MR, 16 files" in ct.warnings[0]


def test_colour_dicom_rejected(tmp_path):
    rgb = sitk.GetImageFromArray(np.zeros((32, 32, 3), dtype=np.uint8), isVector=True)
    rgb.SetMetaData("0008|0060", "CT")
    sitk.WriteImage(rgb, str(tmp_path / "screenshot.dcm"))
    _assert_invalid(tmp_path, "3 components per pixel")


def test_truncated_slice_in_series_rejected(chaos_files, tmp_path):
    _copy_files(chaos_files, tmp_path)
    damaged = tmp_path / chaos_files[7].name
    damaged.write_bytes(damaged.read_bytes()[:200_000])

    with pytest.raises(InvalidInputError, match="uneven") as raised:
        read_ct(tmp_path)

    assert damaged.name in raised.value.message
    assert "line up" in raised.value.message


# ---------------------------------------------------------------------------------------------
# Image files


def test_fixture_formats_read_same_values(shared_data_dir):
    reference = read_ct(shared_data_dir / SMALL_AXIAL_LPS)
    raw = sitk.GetArrayFromImage(sitk.ReadImage(str(shared_data_dir / SMALL_AXIAL_LPS)))
    np.testing.assert_array_equal(_array(reference), raw.astype(np.float32))

    for name in SMALL_OTHER_STORAGE:
        ct = read_ct(shared_data_dir / name)
        assert ct.source_kind == "file"
        assert ct.num_files == 1
        assert ct.series_uid is None
        assert ct.warnings == ()
        assert ct.image.GetPixelID() == sitk.sitkFloat32
        # The grids share their voxel centres, so nearest-neighbour resampling is exact.
        on_reference_grid = sitk.Resample(ct.image, reference.image, sitk.Transform(),
                                          sitk.sitkNearestNeighbor, -5000.0)
        np.testing.assert_array_equal(
            sitk.GetArrayFromImage(on_reference_grid), _array(reference), err_msg=name
        )


def test_values_below_floor_raised(shared_data_dir):
    path = shared_data_dir / PELVIS_NIFTI
    raw = sitk.GetArrayFromImage(sitk.ReadImage(str(path))).astype(np.float32)
    assert raw.min() == -1207  # resampling overshoot in the published file

    ct = read_ct(path)
    array = _array(ct)
    below = raw < HU_FLOOR
    assert np.all(array[below] == HU_FLOOR)
    np.testing.assert_array_equal(array[~below], raw[~below])
    assert len(ct.warnings) == 1
    assert f"{np.count_nonzero(below)} voxels" in ct.warnings[0]
    assert "lowest -1207 HU" in ct.warnings[0]


@pytest.mark.parametrize("pixel_type", [sitk.sitkInt16, sitk.sitkInt32, sitk.sitkInt64,
                                        sitk.sitkFloat32, sitk.sitkFloat64])
def test_scalar_pixel_types_read_as_float32(pixel_type, tmp_path):
    array = np.round(_synthetic_ct_zyx())
    image = sitk.Cast(sitk.GetImageFromArray(array), pixel_type)
    sitk.WriteImage(image, str(tmp_path / "ct.nrrd"))

    ct = read_ct(tmp_path / "ct.nrrd")
    assert ct.image.GetPixelID() == sitk.sitkFloat32
    np.testing.assert_array_equal(_array(ct), array)


def test_one_slice_volume_accepted(tmp_path):
    path = _write(_synthetic_ct_zyx(num_slices=1), tmp_path / "one.nrrd")
    ct = read_ct(path)
    assert ct.image.GetSize() == (32, 32, 1)
    assert ct.image.GetSpacing()[2] == pytest.approx(2.5)
    assert any("1 slice" in warning for warning in ct.warnings)


def test_2d_image_becomes_one_slice(tmp_path):
    path = _write(_synthetic_ct_zyx(num_slices=1)[0], tmp_path / "slice.nrrd")
    ct = read_ct(path)
    assert ct.image.GetDimension() == 3
    assert ct.image.GetSize() == (32, 32, 1)
    assert ct.image.GetSpacing() == pytest.approx((0.8, 0.8, 1.0))
    assert any("2-D image" in warning for warning in ct.warnings)


def test_4d_image_with_one_frame_accepted(tmp_path):
    volume = sitk.GetImageFromArray(_synthetic_ct_zyx())
    sitk.WriteImage(sitk.JoinSeries([volume]), str(tmp_path / "frame.nrrd"))
    ct = read_ct(tmp_path / "frame.nrrd")
    assert ct.image.GetSize() == (32, 32, 4)
    assert any("one frame" in warning for warning in ct.warnings)


def test_negative_metaimage_spacing_is_a_flip(tmp_path):
    # ITK stores a negative spacing as a positive spacing along a reversed axis.
    ct = read_ct(_write_metaimage(tmp_path / "flipped.mha", "1 1 -2"))
    assert ct.image.GetSpacing() == (1.0, 1.0, 2.0)
    assert ct.image.GetDirection()[8] == -1.0


# ---------------------------------------------------------------------------------------------
# Rejected inputs


def test_missing_path_rejected(tmp_path):
    _assert_invalid(tmp_path / "absent.nii.gz", "not found")


def test_empty_file_rejected(tmp_path):
    (tmp_path / "empty.nii.gz").write_bytes(b"")
    _assert_invalid(tmp_path / "empty.nii.gz", "empty (0 bytes)")


def test_truncated_nifti_gz_rejected(shared_data_dir, tmp_path):
    data = (shared_data_dir / SMALL_AXIAL_LPS).read_bytes()
    (tmp_path / "half.nii.gz").write_bytes(data[: len(data) // 2])
    _assert_invalid(tmp_path / "half.nii.gz", "truncated", "1933664 bytes")


def test_truncated_nifti_rejected(tmp_path):
    path = _write(_synthetic_ct_zyx(), tmp_path / "ct.nii")
    path.write_bytes(path.read_bytes()[:-100])
    _assert_invalid(path, "truncated")


@pytest.mark.parametrize("name", ["ircadb1.17_small_feet_first.nrrd",
                                  "ircadb1.17_small_coronal_stack.mha"])
def test_truncated_nrrd_and_metaimage_rejected(name, shared_data_dir, tmp_path):
    data = (shared_data_dir / "fixtures" / name).read_bytes()
    (tmp_path / name).write_bytes(data[: len(data) // 2])
    _assert_invalid(tmp_path / name, "Could not read")


def test_truncated_dicom_file_rejected(chaos_files, tmp_path):
    path = tmp_path / "slice.dcm"
    path.write_bytes(chaos_files[0].read_bytes()[:1000])
    _assert_invalid(path, "DICOM header", "truncated")


def test_text_file_rejected(tmp_path):
    (tmp_path / "notes.txt").write_text("not an image\n")
    _assert_invalid(tmp_path / "notes.txt", "not an image")


def test_folder_of_text_files_rejected(tmp_path):
    for index in range(3):
        (tmp_path / f"note_{index}").write_text("not DICOM\n")
    _assert_invalid(tmp_path, "No DICOM series", "3 files in 1 folders")


def test_empty_folder_rejected(tmp_path):
    _assert_invalid(tmp_path, "is empty")


def test_folder_with_nifti_names_the_file(tmp_path):
    _write(_synthetic_ct_zyx(), tmp_path / "ct.nii.gz")
    error = _assert_invalid(tmp_path, "No DICOM series")
    assert "ct.nii.gz" in error.hint


def test_4d_image_rejected(tmp_path):
    volume = sitk.GetImageFromArray(_synthetic_ct_zyx())
    sitk.WriteImage(sitk.JoinSeries([volume, volume]), str(tmp_path / "series.nii.gz"))
    _assert_invalid(tmp_path / "series.nii.gz", "4-D image", "32 x 32 x 4 x 2")


def test_vector_image_rejected(tmp_path):
    rgb = np.zeros((4, 32, 32, 3), dtype=np.uint8)
    sitk.WriteImage(sitk.GetImageFromArray(rgb, isVector=True), str(tmp_path / "rgb.nrrd"))
    _assert_invalid(tmp_path / "rgb.nrrd", "3 component(s) per voxel")


def test_uint8_volume_rejected(tmp_path):
    array = np.clip(_synthetic_ct_zyx() + 1000, 0, 255).astype(np.uint8)
    _assert_invalid(_write(array, tmp_path / "mask.nrrd"), "within 0 to 255")


def test_unit_range_volume_rejected(tmp_path):
    array = np.random.default_rng(1).uniform(0.0, 1.0, (4, 32, 32)).astype(np.float32)
    _assert_invalid(_write(array, tmp_path / "probability.nrrd"), "within 0 to 1 ")


@pytest.mark.parametrize("value, word", [(np.nan, "1 NaN"), (np.inf, "1 infinite")])
def test_non_finite_voxels_rejected(value, word, tmp_path):
    array = _synthetic_ct_zyx()
    array[2, 16, 16] = value
    _assert_invalid(_write(array, tmp_path / "ct.nrrd"), word)


def test_mr_like_volume_rejected(tmp_path):
    array = np.random.default_rng(2).uniform(0.0, 1500.0, (4, 32, 32)).astype(np.float32)
    error = _assert_invalid(_write(array, tmp_path / "mr.nii.gz"), "MR scan", "percentile")
    assert "Hounsfield" in error.hint


def test_unsigned_ct_without_rescale_rejected(tmp_path):
    stored = np.round(_synthetic_ct_zyx() + 1024).astype(np.uint16)  # air stored as 24
    _assert_invalid(_write(stored, tmp_path / "stored.nrrd"), "rescale intercept",
                    "percentile of its values is 24")


def test_ct_cropped_inside_body_rejected(tmp_path):
    array = np.random.default_rng(3).uniform(-150.0, 150.0, (4, 32, 32)).astype(np.float32)
    _assert_invalid(_write(array, tmp_path / "crop.nrrd"), "cropped inside the body")


def test_constant_volume_rejected(tmp_path):
    array = np.full((4, 32, 32), -1000.0, dtype=np.float32)
    _assert_invalid(_write(array, tmp_path / "blank.nrrd"), "blank")


@pytest.mark.parametrize("spacing_mm, word", [((0.8, 0.8, 60.0), "above 50"),
                                               ((0.0008, 0.0008, 0.0025), "below 0.05")])
def test_implausible_spacing_rejected(spacing_mm, word, tmp_path):
    path = _write(_synthetic_ct_zyx(), tmp_path / "ct.nrrd", spacing_mm=spacing_mm)
    _assert_invalid(path, word)


def test_zero_spacing_rejected(tmp_path):
    _assert_invalid(_write_metaimage(tmp_path / "flat.mha", "1 1 0"), "spacing")


# ---------------------------------------------------------------------------------------------
# check_ct_image


def test_check_ct_image_accepts_ct():
    image = sitk.GetImageFromArray(_synthetic_ct_zyx())
    assert check_ct_image(image, "synthetic") == []


def test_check_ct_image_rejects_2d():
    image = sitk.GetImageFromArray(_synthetic_ct_zyx()[0])
    with pytest.raises(InvalidInputError, match="synthetic is a 2-D image"):
        check_ct_image(image, "synthetic")


def test_check_ct_image_rejects_line():
    image = sitk.GetImageFromArray(_synthetic_ct_zyx(size=32)[:, :1, :1])
    with pytest.raises(InvalidInputError, match="at least two axes"):
        check_ct_image(image, "synthetic")


@pytest.mark.parametrize("suffix", [".nii", ".nii.gz"])
def test_nifti_nan_rejected(tmp_path, suffix):
    """SimpleITK reads NaN in NIfTI as 0, so the reader scans the raw data itself."""
    array = np.full((6, 32, 32), -1000.0, dtype=np.float32)
    array[:, 8:24, 8:24] = 40.0
    array[3, 16, 16] = np.nan
    array[2, 10, 10] = np.inf
    path = tmp_path / f"nan{suffix}"
    sitk.WriteImage(sitk.GetImageFromArray(array), str(path))

    with pytest.raises(InvalidInputError, match="2 NaN or infinite"):
        read_ct(path)
