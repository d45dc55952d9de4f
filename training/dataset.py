"""Training data: case discovery, patient-level split, slice cache, augmentation, DataModule.

Cases are read in one of three layouts (see `discover_cases`), oriented and preprocessed with
exactly the engine's code (`livertumorai.geometry.axial_frame`, `livertumorai.preprocess`),
and cached on disk as NumPy files that later epochs memory-map, so NIfTI files are read once
per preprocessing setting. Arrays are axial stacks: (slice, row, column), slices inferior to
superior, rows anterior to posterior, columns patient right to left.

Cache layout (one folder per case and preprocessing block)::

    <cache_dir>/<case_id>-<sha256 of the preprocessing block and cache format, 12 hex>/
        slices.npy   (S, H, W) float16, each stack slice windowed to [0, 1], resampled, cropped
        labels.npy   (S, H, W) uint8, labels 0/1/2 resampled by nearest neighbour
        classes.npy  (S,) uint8 slice classes from the full-resolution labels
        meta.json    source files (size, mtime), spacing, context offsets, preprocessing

The cache stores each slice once with one channel. A sample's 2.5-D context channels are
gathered at load time with the engine's context offsets, clamped at the ends. Because the
engine preprocesses every channel independently, this gives the same values as
`SlicePreprocessor.images` and takes 2 * context_slices + 1 times less disk than an
(S, C, H, W) array.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import random
import re
import shutil
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import lightning as L
import numpy as np
import SimpleITK as sitk
import torch
from torch.utils.data import DataLoader, Dataset, WeightedRandomSampler
from torchvision import tv_tensors
from torchvision.transforms import InterpolationMode, v2

from livertumorai.constants import LABEL_TUMOR, SLICE_CLASS_NAMES, slice_class_from_labels
from livertumorai.geometry import ImageGeometry, axial_frame
from livertumorai.preprocess import SlicePreprocessor, body_center_rc
from livertumorai.weights import Preprocessing
from training.synthetic_tumors import SyntheticTumorConfig, SyntheticTumorTransform, case_geometries

logger = logging.getLogger(__name__)

__all__ = [
    "LAYOUTS",
    "TASKS",
    "CaseRecord",
    "DataSplit",
    "discover_cases",
    "split_cases",
    "write_split",
    "read_split",
    "read_ct_image",
    "AxialCT",
    "read_axial_ct",
    "select_cases",
    "add_case_arguments",
    "cases_from_args",
    "preprocessing_key",
    "CachedCase",
    "cache_case",
    "SliceAugmentation",
    "SliceTransform",
    "SliceDataset",
    "LiverSliceDataModule",
    "unit_to_hu",
    "hu_to_unit",
]

LAYOUTS = ("auto", "folders", "lits", "msd")
TASKS = ("classification", "segmentation")
CACHE_FORMAT_VERSION = 1  # bump when the cached arrays change meaning
_CT_SUFFIXES = (".nii.gz", ".nii", ".nrrd", ".mha", ".mhd")
_MAX_LABEL_VALUE = LABEL_TUMOR
_CACHE_BATCH_SLICES = 32  # slices preprocessed per call while building the cache (memory only)

# A slice-level transform receives (image, mask, case_id, slice_index) and returns
# (image, mask): image (C, H, W) float32 in window units, mask (H, W) int64 labels 0/1/2.
SliceTransform = Callable[[torch.Tensor, torch.Tensor, str, int], tuple]


# --------------------------------------------------------------------------- discovery


@dataclass(frozen=True)
class CaseRecord:
    """One labelled CT.

    Attributes:
        case_id: unique name of the scan (folder name, `lits-N` or the MSD file stem).
        image_path: CT file (HU).
        label_path: label file on the same grid (0 background, 1 liver, 2 tumor).
        patient_id: patient the scan belongs to; the split never separates a patient's scans.
    """

    case_id: str
    image_path: Path
    label_path: Path
    patient_id: str


def discover_cases(
    data_dir: str | os.PathLike,
    layout: str = "auto",
    patient_pattern: str | None = None,
) -> list[CaseRecord]:
    """Find the labelled cases under `data_dir`, sorted by case id.

    Layouts:
        folders: one subfolder per case holding `ct.<ext>` and `label.<ext>` (ext one of
            .nii.gz, .nii, .nrrd, .mha, .mhd); the case id is the folder name.
        lits: `volume-N.nii[.gz]` with `segmentation-N.nii[.gz]` anywhere below `data_dir`
            (the LiTS download keeps them in "Training Batch 1/2"); the case id is `lits-N`.
        msd: Medical Segmentation Decathlon task folder with `dataset.json`, whose
            `training` list names `imagesTr/*.nii.gz` and `labelsTr/*.nii.gz`; the case id
            is the file stem (for example `liver_12`).
        auto: msd when `dataset.json` exists, lits when a `volume-*.nii*` file exists,
            else folders.

    Args:
        data_dir: root folder of the data set.
        layout: one of ``LAYOUTS``.
        patient_pattern: regular expression searched in the case id; its first group (or
            the whole match) is the patient id. Without it every case is its own patient,
            which is right for LiTS, MSD Task03 and the shared cases (one scan per patient).

    Raises:
        FileNotFoundError: `data_dir` does not exist or contains no case of the layout.
        ValueError: unknown layout, duplicate case ids or an invalid `dataset.json`.
    """
    root = Path(data_dir).expanduser().resolve()
    if not root.is_dir():
        raise FileNotFoundError(f"data folder {root} does not exist; pass --data-dir")
    if layout not in LAYOUTS:
        raise ValueError(f"unknown layout {layout!r}; use one of {', '.join(LAYOUTS)}")
    if layout == "auto":
        layout = _detect_layout(root)
        logger.info("Detected the %s layout in %s", layout, root)

    pairs = {"folders": _discover_folders, "lits": _discover_lits, "msd": _discover_msd}[layout](root)
    if not pairs:
        raise FileNotFoundError(
            f"no labelled case of the {layout} layout in {root}; check --data-dir and --layout"
        )
    ids = [case_id for case_id, _, _ in pairs]
    duplicates = sorted({case_id for case_id in ids if ids.count(case_id) > 1})
    if duplicates:
        raise ValueError(f"duplicate case ids {duplicates} in {root}; rename the cases")

    records = [CaseRecord(case_id, image, label, _patient_id(case_id, patient_pattern))
               for case_id, image, label in pairs]
    return sorted(records, key=lambda record: _natural_key(record.case_id))


def _detect_layout(root: Path) -> str:
    if (root / "dataset.json").is_file():
        return "msd"
    if next(root.rglob("volume-*.nii*"), None) is not None:
        return "lits"
    return "folders"


def _discover_folders(root: Path) -> list[tuple[str, Path, Path]]:
    pairs = []
    for folder in sorted(p for p in root.iterdir() if p.is_dir()):
        image = _find_with_suffix(folder, "ct")
        label = _find_with_suffix(folder, "label")
        if image is None or label is None:
            logger.debug("Skipping %s: no ct.* and label.* pair", folder)
            continue
        pairs.append((folder.name, image, label))
    return pairs


def _find_with_suffix(folder: Path, stem: str) -> Path | None:
    for suffix in _CT_SUFFIXES:
        candidate = folder / f"{stem}{suffix}"
        if candidate.is_file():
            return candidate
    return None


def _discover_lits(root: Path) -> list[tuple[str, Path, Path]]:
    volumes = {}
    segmentations = {}
    pattern = re.compile(r"^(volume|segmentation)-(\d+)\.nii(\.gz)?$")
    for path in root.rglob("*.nii*"):
        match = pattern.match(path.name)
        if match:
            target = volumes if match.group(1) == "volume" else segmentations
            target[int(match.group(2))] = path
    missing = sorted(set(volumes) - set(segmentations))
    if missing:
        logger.warning("Skipping LiTS volumes without a segmentation file: %s", missing)
    return [(f"lits-{n}", volumes[n], segmentations[n]) for n in sorted(volumes)
            if n in segmentations]


def _discover_msd(root: Path) -> list[tuple[str, Path, Path]]:
    description_path = root / "dataset.json"
    try:
        description = json.loads(description_path.read_text(encoding="utf-8"))
        training = description["training"]
    except (OSError, ValueError, KeyError) as err:
        raise ValueError(
            f"cannot read the training list of {description_path}: {err!r}; an MSD task "
            "folder needs a dataset.json with a 'training' list of image/label pairs"
        ) from err
    pairs = []
    for item in training:
        # normpath, not resolve: a symbolic link keeps its own name as the case id.
        image = Path(os.path.normpath(root / item["image"]))
        label = Path(os.path.normpath(root / item["label"]))
        if not image.is_file() or not label.is_file():
            logger.warning("Skipping %s: image or label file missing", item)
            continue
        case_id = image.name
        for suffix in _CT_SUFFIXES:
            if case_id.endswith(suffix):
                case_id = case_id[: -len(suffix)]
                break
        pairs.append((case_id, image, label))
    return pairs


def _patient_id(case_id: str, pattern: str | None) -> str:
    if pattern is None:
        return case_id
    match = re.search(pattern, case_id)
    if match is None:
        raise ValueError(
            f"patient pattern {pattern!r} does not match case id {case_id!r}; "
            "fix --patient-pattern so that it matches every case id"
        )
    return match.group(1) if match.groups() else match.group(0)


def _natural_key(text: str) -> list:
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", text)]


# --------------------------------------------------------------------------- split


@dataclass(frozen=True)
class DataSplit:
    """Case ids for training and validation, with what produced them."""

    train: tuple[str, ...]
    val: tuple[str, ...]
    seed: int
    val_fraction: float
    excluded: tuple[str, ...] = ()

    def to_dict(self) -> dict:
        return {"train": list(self.train), "val": list(self.val), "seed": self.seed,
                "val_fraction": self.val_fraction, "excluded": list(self.excluded)}


def split_cases(
    cases: Sequence[CaseRecord],
    val_fraction: float = 0.2,
    seed: int = 0,
    val_cases: Sequence[str] = (),
    exclude: Sequence[str] = (),
) -> DataSplit:
    """Split cases into training and validation by patient, reproducibly.

    Patients are shuffled with `random.Random(seed)` and the first ones go to validation
    until `val_fraction` of the patients is reached (at least one when there are two or
    more patients). Explicit `val_cases` replace the random choice; every other scan of
    their patients goes to validation too.

    Raises:
        ValueError: an id in `val_cases` or `exclude` is unknown, or no training case is left.
    """
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction={val_fraction} must be in [0, 1)")
    known = {case.case_id for case in cases}
    for name, ids in (("--val-cases", val_cases), ("--exclude", exclude)):
        unknown = sorted(set(ids) - known)
        if unknown:
            raise ValueError(f"{name} names unknown case ids {unknown}; known: {sorted(known)}")

    included = [case for case in cases if case.case_id not in set(exclude)]
    patients = sorted({case.patient_id for case in included}, key=_natural_key)
    if val_cases:
        val_patients = {case.patient_id for case in included if case.case_id in set(val_cases)}
    else:
        count = round(val_fraction * len(patients))
        if val_fraction > 0 and len(patients) >= 2:
            count = min(max(count, 1), len(patients) - 1)
        shuffled = list(patients)
        random.Random(seed).shuffle(shuffled)
        val_patients = set(shuffled[:count])

    train = tuple(c.case_id for c in included if c.patient_id not in val_patients)
    val = tuple(c.case_id for c in included if c.patient_id in val_patients)
    if not train:
        raise ValueError("no training case is left after the split; lower --val-fraction "
                         "or shorten --val-cases / --exclude")
    return DataSplit(train=train, val=val, seed=seed, val_fraction=val_fraction,
                     excluded=tuple(sorted(exclude)))


def write_split(path: str | os.PathLike, split: DataSplit) -> Path:
    """Write a split as JSON (readable by `read_split` and train.py --split-file)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(split.to_dict(), indent=2) + "\n", encoding="utf-8")
    return path


def read_split(path: str | os.PathLike) -> DataSplit:
    """Read a split written by `write_split`.

    Raises:
        ValueError: the file is not a split (missing 'train' or 'val').
    """
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        return DataSplit(train=tuple(data["train"]), val=tuple(data["val"]),
                         seed=int(data.get("seed", 0)),
                         val_fraction=float(data.get("val_fraction", 0.0)),
                         excluded=tuple(data.get("excluded", ())))
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise ValueError(f"cannot read the split file {path}: {err!r}; it needs 'train' "
                         "and 'val' lists of case ids") from err


# --------------------------------------------------------------------------- cache


def read_ct_image(path: str | os.PathLike) -> sitk.Image:
    """Read a CT in HU as float32 the way the engine does.

    Uses the engine's reader `livertumorai.io_ct.read_ct` when it is installed, else
    SimpleITK directly (same pixel values for NIfTI, NRRD and MHA files).
    """
    try:
        from livertumorai.io_ct import read_ct
    except ImportError:
        return sitk.ReadImage(str(path), sitk.sitkFloat32)
    return read_ct(path).image


@dataclass
class AxialCT:
    """A CT read as the engine reads it, with its axial stack.

    Attributes:
        image: the CT as read (float32 HU, input grid).
        geometry: its grid.
        frame: transpose and flips between the input (z, y, x) array and the stack.
        stack_hu: axial stack (slice, row, column) in HU, a view of the image's array.
        center_rc: body centre (row, column) in stack pixels, the crop centre.
    """

    image: sitk.Image
    geometry: ImageGeometry
    frame: object
    stack_hu: np.ndarray
    center_rc: tuple[float, float]

    def preprocessor(self, preprocessing: Preprocessing) -> SlicePreprocessor:
        """Return the engine's slice preprocessor of this stack for one model."""
        return SlicePreprocessor(preprocessing, self.stack_hu.shape, self.frame.spacing_mm,
                                 self.center_rc)


def read_axial_ct(path: str | os.PathLike) -> AxialCT:
    """Read a CT and orient it into the engine's axial stack."""
    image = read_ct_image(path)
    geometry = ImageGeometry.from_image(image)
    frame = axial_frame(geometry)
    stack_hu = frame.to_axial(sitk.GetArrayViewFromImage(image))
    return AxialCT(image, geometry, frame, stack_hu, body_center_rc(stack_hu))


def select_cases(
    data_dirs: Sequence[str | os.PathLike],
    layout: str = "auto",
    patient_pattern: str | None = None,
    case_ids: Sequence[str] = (),
    split_file: str | os.PathLike | None = None,
    subset: str = "val",
) -> list[CaseRecord]:
    """Return the cases named by `case_ids` and by the `subset` of a split file.

    Without either, every case of `data_dirs` is returned.

    Raises:
        ValueError: a named case is not in `data_dirs`, or `subset` is unknown.
    """
    records = {}
    for data_dir in data_dirs:
        for record in discover_cases(data_dir, layout, patient_pattern):
            records[record.case_id] = record
    names = list(case_ids)
    if split_file:
        split = read_split(split_file)
        subsets = {"val": split.val, "train": split.train, "all": split.train + split.val}
        if subset not in subsets:
            raise ValueError(f"subset {subset!r} is not one of {sorted(subsets)}")
        names += list(subsets[subset])
    if not names:
        names = list(records)
    unknown = sorted(set(names) - set(records))
    if unknown:
        raise ValueError(f"unknown case ids {unknown}; known: {sorted(records)}")
    return [records[name] for name in dict.fromkeys(names)]


def add_case_arguments(parser) -> None:
    """Add the input options of the predict scripts: --input, or data folder and cases."""
    group = parser.add_argument_group("input (either --input or --data-dir)")
    group.add_argument("--input", nargs="+", default=[],
                       help="CT files or DICOM folders (no reference labels)")
    group.add_argument("--data-dir", nargs="+", default=[],
                       help="data folder(s) of labelled cases")
    group.add_argument("--layout", choices=LAYOUTS, default="auto", help="data folder layout")
    group.add_argument("--patient-pattern", help="see train.py --patient-pattern")
    group.add_argument("--cases", nargs="*", default=[], help="case ids of --data-dir")
    group.add_argument("--split-file", help="split.json written by train.py")
    group.add_argument("--subset", choices=("val", "train", "all"), default="val",
                       help="cases of --split-file to run")


def cases_from_args(args) -> list[tuple[str, Path, Path | None]]:
    """Return (case id, CT path, label path or None) for the options of `add_case_arguments`.

    Raises:
        SystemExit: no input was given, or a case id is unknown.
    """
    cases: list[tuple[str, Path, Path | None]] = []
    for path in args.input:
        name = Path(path).name
        for suffix in _CT_SUFFIXES:
            if name.endswith(suffix):
                name = name[: -len(suffix)]
                break
        cases.append((name, Path(path), None))
    if args.data_dir:
        try:
            records = select_cases(args.data_dir, args.layout, args.patient_pattern, args.cases,
                                   args.split_file, args.subset)
        except (ValueError, FileNotFoundError) as err:
            raise SystemExit(str(err)) from err
        cases.extend((r.case_id, r.image_path, r.label_path) for r in records)
    if not cases:
        raise SystemExit("no input: pass --input CT files or --data-dir with labelled cases")
    return cases


def unit_to_hu(unit: torch.Tensor, preprocessing: Preprocessing) -> torch.Tensor:
    """Map windowed values back to HU: hu = center - width / 2 + unit * width.

    The window is linear, so this is exact for 0 < unit < 1. Values at 0 or 1 were clipped
    by the window and stand for any HU at or beyond its ends.
    """
    low = preprocessing.window_center_hu - preprocessing.window_width_hu / 2.0
    return unit * preprocessing.window_width_hu + low


def hu_to_unit(hu: torch.Tensor, preprocessing: Preprocessing) -> torch.Tensor:
    """Map HU to windowed values in [0, 1], as `livertumorai.preprocess.window_to_unit`."""
    low = preprocessing.window_center_hu - preprocessing.window_width_hu / 2.0
    return ((hu - low) / preprocessing.window_width_hu).clamp(0.0, 1.0)


def preprocessing_key(preprocessing: Preprocessing) -> str:
    """Return 12 hex digits identifying a preprocessing block and the cache format."""
    blob = json.dumps({"format": CACHE_FORMAT_VERSION, **preprocessing.to_dict()}, sort_keys=True)
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()[:12]


class CachedCase:
    """Memory-mapped preprocessed slices of one case.

    The arrays are opened on first use in each process and are not pickled, so DataLoader
    workers started with 'spawn' open their own maps instead of copying the data.
    """

    def __init__(self, folder: Path) -> None:
        self.folder = Path(folder)
        self.meta = json.loads((self.folder / "meta.json").read_text(encoding="utf-8"))
        self.case_id = str(self.meta["case_id"])
        self.num_slices = int(self.meta["num_slices"])
        self.context_offsets = np.asarray(self.meta["context_offsets"], dtype=np.int64)
        self.classes = np.load(self.folder / "classes.npy")
        self._slices: np.ndarray | None = None
        self._labels: np.ndarray | None = None

    @property
    def slices(self) -> np.ndarray:
        """(S, H, W) float16 windowed slices, memory-mapped."""
        if self._slices is None:
            self._slices = np.load(self.folder / "slices.npy", mmap_mode="r")
        return self._slices

    @property
    def labels(self) -> np.ndarray:
        """(S, H, W) uint8 labels, memory-mapped."""
        if self._labels is None:
            self._labels = np.load(self.folder / "labels.npy", mmap_mode="r")
        return self._labels

    def image(self, slice_index: int) -> np.ndarray:
        """Return the network input of one slice, (C, H, W) float32 in [0, 1]."""
        channels = np.clip(slice_index + self.context_offsets, 0, self.num_slices - 1)
        return self.slices[channels].astype(np.float32)

    def liver_slices(self) -> np.ndarray:
        """Return the stack indices of slices with liver or tumor."""
        return np.flatnonzero(self.classes != 0)

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["_slices"] = None
        state["_labels"] = None
        return state


def cache_case(record: CaseRecord, preprocessing: Preprocessing,
               cache_dir: str | os.PathLike) -> CachedCase:
    """Return the cached slices of a case, building the cache first when needed.

    The cache is rebuilt when the source files changed size or modification time.

    Raises:
        ValueError: the label file does not lie on the CT's grid or contains values above 2.
    """
    folder = Path(cache_dir) / f"{record.case_id}-{preprocessing_key(preprocessing)}"
    sources = _source_info(record)
    meta_path = folder / "meta.json"
    if meta_path.is_file():
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
        if meta.get("sources") == sources:
            return CachedCase(folder)
        logger.info("Source files of %s changed: rebuilding its cache", record.case_id)

    logger.info("Caching %s (%s) for preprocessing %s", record.case_id, record.image_path,
                preprocessing_key(preprocessing))
    temporary = folder.with_name(f".{folder.name}.partial-{os.getpid()}")
    shutil.rmtree(temporary, ignore_errors=True)
    temporary.mkdir(parents=True)
    try:
        meta = _write_case_arrays(record, preprocessing, temporary)
        meta["sources"] = sources
        (temporary / "meta.json").write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
        shutil.rmtree(folder, ignore_errors=True)
        os.replace(temporary, folder)
    finally:
        shutil.rmtree(temporary, ignore_errors=True)
    return CachedCase(folder)


def _source_info(record: CaseRecord) -> dict:
    info = {}
    for key, path in (("image", record.image_path), ("label", record.label_path)):
        stat = Path(path).stat()
        info[key] = {"path": str(path), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}
    return info


def _write_case_arrays(record: CaseRecord, preprocessing: Preprocessing, folder: Path) -> dict:
    ct = read_axial_ct(record.image_path)
    label_image = sitk.ReadImage(str(record.label_path))
    _check_same_grid(ct.image, label_image, record)

    frame, stack_hu, center_rc = ct.frame, ct.stack_hu, ct.center_rc
    labels_stack = np.ascontiguousarray(
        frame.to_axial(sitk.GetArrayFromImage(label_image)).astype(np.uint8))
    if labels_stack.max(initial=0) > _MAX_LABEL_VALUE:
        raise ValueError(
            f"label file {record.label_path} contains the invalid value {int(labels_stack.max())}; expected "
            "0 background, 1 liver, 2 tumor (merge other labels before training)"
        )

    single = dataclasses.replace(preprocessing, context_slices=0)
    single_slice = SlicePreprocessor(single, stack_hu.shape, frame.spacing_mm, center_rc)
    context = SlicePreprocessor(preprocessing, stack_hu.shape, frame.spacing_mm, center_rc)
    num_slices = stack_hu.shape[0]
    height, width = preprocessing.input_size
    slices = np.lib.format.open_memmap(folder / "slices.npy", mode="w+", dtype=np.float16,
                                       shape=(num_slices, height, width))
    labels = np.lib.format.open_memmap(folder / "labels.npy", mode="w+", dtype=np.uint8,
                                       shape=(num_slices, height, width))
    for start in range(0, num_slices, _CACHE_BATCH_SLICES):
        batch = list(range(start, min(start + _CACHE_BATCH_SLICES, num_slices)))
        slices[batch] = single_slice.images(stack_hu, batch)[:, 0].numpy().astype(np.float16)
        labels[batch] = single_slice.labels(labels_stack, batch).numpy().astype(np.uint8)
    slices.flush()
    labels.flush()
    del slices, labels

    has_liver = (labels_stack > 0).any(axis=(1, 2))
    has_tumor = (labels_stack == LABEL_TUMOR).any(axis=(1, 2))
    classes = np.array([slice_class_from_labels(bool(liver), bool(tumor))
                        for liver, tumor in zip(has_liver, has_tumor)], dtype=np.uint8)
    np.save(folder / "classes.npy", classes)
    counts = {name: int((classes == k).sum()) for k, name in enumerate(SLICE_CLASS_NAMES)}
    logger.info("%s: %d slices, slice classes %s", record.case_id, num_slices, counts)
    return {
        "case_id": record.case_id,
        "num_slices": num_slices,
        "stack_spacing_mm": list(frame.spacing_mm),
        "context_offsets": [int(v) for v in context.context_offsets],
        "center_rc": list(center_rc),
        "preprocessing": preprocessing.to_dict(),
        "slice_class_counts": counts,
        "cache_format": CACHE_FORMAT_VERSION,
    }


def _check_same_grid(image: sitk.Image, label: sitk.Image, record: CaseRecord) -> None:
    same_size = image.GetSize() == label.GetSize()
    close = (np.allclose(image.GetSpacing(), label.GetSpacing(), atol=1e-3)
             and np.allclose(image.GetOrigin(), label.GetOrigin(), atol=1e-2)
             and np.allclose(image.GetDirection(), label.GetDirection(), atol=1e-4))
    if not (same_size and close):
        raise ValueError(
            f"the labels of case {record.case_id} ({record.label_path}) are not on the CT's "
            f"grid: CT size {image.GetSize()} spacing {image.GetSpacing()}, labels size "
            f"{label.GetSize()} spacing {label.GetSpacing()}; resample the labels onto the "
            "CT (nearest neighbour) or exclude the case with --exclude"
        )


# --------------------------------------------------------------------------- augmentation


class RandomIntensity(v2.Transform):
    """Scale and shift image intensities (window units) and clip to [0, 1]; masks pass through."""

    _transformed_types = (tv_tensors.Image,)

    def __init__(self, scale_range: tuple[float, float], max_shift: float) -> None:
        super().__init__()
        self.scale_range = scale_range
        self.max_shift = max_shift

    def make_params(self, flat_inputs: list) -> dict:
        low, high = self.scale_range
        scale = float(torch.empty(1).uniform_(low, high))
        shift = float(torch.empty(1).uniform_(-self.max_shift, self.max_shift))
        return {"scale": scale, "shift": shift}

    def transform(self, inpt: torch.Tensor, params: dict) -> torch.Tensor:
        out = (inpt.as_subclass(torch.Tensor) * params["scale"] + params["shift"]).clamp_(0.0, 1.0)
        return tv_tensors.wrap(out, like=inpt)


class SliceAugmentation:
    """Random joint augmentation of a slice and its mask with torchvision.transforms.v2.

    Rotation about the crop centre and isotropic scaling are applied to image (bilinear) and
    mask (nearest neighbour) together. Intensity scale, shift and Gaussian noise touch the
    image only, in window units (a shift of 0.05 is 20 HU for a 400 HU window). There is no
    left-right flip, because the liver lies on the patient's right.

    Args:
        rotation_deg: maximum rotation either way, degrees.
        scale_range: (min, max) zoom factor.
        intensity_scale_range: (min, max) factor on window values.
        intensity_shift: maximum shift either way, window units.
        noise_sigma: standard deviation of the Gaussian noise, window units.
        noise_probability: probability of adding noise to a sample.
    """

    def __init__(
        self,
        rotation_deg: float = 15.0,
        scale_range: tuple[float, float] = (0.85, 1.15),
        intensity_scale_range: tuple[float, float] = (0.9, 1.1),
        intensity_shift: float = 0.05,
        noise_sigma: float = 0.02,
        noise_probability: float = 0.5,
    ) -> None:
        self.transform = v2.Compose([
            v2.RandomAffine(degrees=rotation_deg, scale=scale_range,
                            interpolation=InterpolationMode.BILINEAR,
                            fill={tv_tensors.Image: 0.0, tv_tensors.Mask: 0}),
            RandomIntensity(intensity_scale_range, intensity_shift),
            v2.RandomApply([v2.GaussianNoise(sigma=noise_sigma, clip=True)], p=noise_probability),
        ])

    def __call__(self, image: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Augment image (C, H, W) float32 and mask (H, W) int64 with the same geometry."""
        out_image, out_mask = self.transform(tv_tensors.Image(image), tv_tensors.Mask(mask))
        return out_image.as_subclass(torch.Tensor), out_mask.as_subclass(torch.Tensor)


# --------------------------------------------------------------------------- datasets


class SliceDataset(Dataset):
    """Slices of cached cases as network samples.

    Each item is ``(image, target)``: image (C, H, W) float32 in [0, 1]; target the slice
    class (int64 scalar) for classification, or the label map (H, W) int64 for segmentation.

    Args:
        cases: cached cases.
        index: (n, 2) int array of (case position in `cases`, stack slice index).
        task: 'classification' or 'segmentation'.
        augmentation: joint image and mask augmentation, or None (validation).
        slice_transform: optional transform run before augmentation with probability
            `slice_transform_probability` (for example synthetic tumor insertion). It gets
            window units; `unit_to_hu` and `hu_to_unit` convert with the case's window.
            For classification the target is recomputed from the transformed mask.
        slice_transform_probability: chance in [0, 1] of applying `slice_transform`.
    """

    def __init__(
        self,
        cases: Sequence[CachedCase],
        index: np.ndarray,
        task: str,
        augmentation: Callable | None = None,
        slice_transform: SliceTransform | None = None,
        slice_transform_probability: float = 0.0,
    ) -> None:
        if task not in TASKS:
            raise ValueError(f"task {task!r} is not one of {TASKS}")
        self.cases = list(cases)
        self.index = np.asarray(index, dtype=np.int64).reshape(-1, 2)
        self.task = task
        self.augmentation = augmentation
        self.slice_transform = slice_transform
        self.slice_transform_probability = slice_transform_probability

    def __len__(self) -> int:
        return len(self.index)

    def slice_classes(self) -> np.ndarray:
        """Return the reference class of every item, (n,) int64."""
        return np.array([self.cases[c].classes[s] for c, s in self.index], dtype=np.int64)

    def __getitem__(self, item: int) -> tuple[torch.Tensor, torch.Tensor]:
        case_position, slice_index = (int(v) for v in self.index[item])
        case = self.cases[case_position]
        image = torch.from_numpy(case.image(slice_index))
        mask = torch.from_numpy(np.asarray(case.labels[slice_index], dtype=np.int64))
        slice_class = int(case.classes[slice_index])

        if self.slice_transform is not None and torch.rand(()) < self.slice_transform_probability:
            image, mask = self.slice_transform(image, mask, case.case_id, slice_index)
            slice_class = slice_class_from_labels(bool((mask > 0).any()),
                                                  bool((mask == LABEL_TUMOR).any()))
        if self.augmentation is not None:
            image, mask = self.augmentation(image, mask)

        if self.task == "classification":
            return image, torch.tensor(slice_class, dtype=torch.int64)
        return image, mask


def segmentation_slices(case: CachedCase, margin_mm: float, background_fraction: float,
                        rng: np.random.Generator) -> np.ndarray:
    """Choose the stack slices the U-Net trains on.

    Slices with liver, widened by `margin_mm` on each side (the engine segments such a
    margin around the slices its classifier gates), plus a random `background_fraction` of
    the remaining slices so the network also learns to return background.
    """
    liver = case.liver_slices()
    chosen = np.zeros(case.num_slices, dtype=bool)
    if liver.size:
        spacing_mm = float(case.meta["stack_spacing_mm"][0])
        margin = int(np.ceil(margin_mm / max(spacing_mm, 1e-3)))
        chosen[max(liver.min() - margin, 0): liver.max() + margin + 1] = True
    others = np.flatnonzero(~chosen)
    extra = rng.choice(others, size=int(round(background_fraction * others.size)), replace=False)
    chosen[extra] = True
    return np.flatnonzero(chosen)


# --------------------------------------------------------------------------- data module


class LiverSliceDataModule(L.LightningDataModule):
    """Cases, split, cache and loaders for one task.

    Args:
        data_dirs: one or more data folders (their cases are pooled; ids must be unique).
        task: 'classification' or 'segmentation'.
        preprocessing: the engine preprocessing block of the model being trained.
        layout: layout of every data folder (see `discover_cases`).
        cache_dir: root of the slice cache.
        split_file: read the split from this JSON file instead of drawing one.
        val_fraction, seed, val_cases, exclude: see `split_cases`.
        patient_pattern: see `discover_cases`.
        batch_size: slices per batch.
        num_workers: DataLoader worker processes (0 loads in the training process).
        augment: augment training slices with `SliceAugmentation`.
        balance_classes: classification only: draw slices with a WeightedRandomSampler so
            each slice class is drawn equally often.
        seg_margin_mm, seg_background_fraction: see `segmentation_slices`.
        max_cases: use only the first N training cases (smoke runs).
        slice_transform, slice_transform_probability: see `SliceDataset`.
        synthetic_tumors: insert synthetic tumors into training slices with this
            configuration (with probability `slice_transform_probability`); validation
            slices stay real.
    """

    def __init__(
        self,
        data_dirs: Sequence[str | os.PathLike],
        task: str,
        preprocessing: Preprocessing,
        layout: str = "auto",
        cache_dir: str | os.PathLike = "training_cache",
        split_file: str | os.PathLike | None = None,
        val_fraction: float = 0.2,
        seed: int = 0,
        val_cases: Sequence[str] = (),
        exclude: Sequence[str] = (),
        patient_pattern: str | None = None,
        batch_size: int = 16,
        num_workers: int = 0,
        augment: bool = True,
        balance_classes: bool = True,
        seg_margin_mm: float = 10.0,
        seg_background_fraction: float = 0.1,
        max_cases: int | None = None,
        slice_transform: SliceTransform | None = None,
        slice_transform_probability: float = 0.0,
        synthetic_tumors: SyntheticTumorConfig | None = None,
    ) -> None:
        super().__init__()
        if task not in TASKS:
            raise ValueError(f"task {task!r} is not one of {TASKS}")
        self.data_dirs = [Path(d) for d in ([data_dirs] if isinstance(data_dirs, (str, Path))
                                            else data_dirs)]
        self.task = task
        self.preprocessing = preprocessing
        self.layout = layout
        self.cache_dir = Path(cache_dir)
        self.split_file = split_file
        self.val_fraction = val_fraction
        self.seed = seed
        self.val_cases = tuple(val_cases)
        self.exclude = tuple(exclude)
        self.patient_pattern = patient_pattern
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.augment = augment
        self.balance_classes = balance_classes
        self.seg_margin_mm = seg_margin_mm
        self.seg_background_fraction = seg_background_fraction
        self.max_cases = max_cases
        self.slice_transform = slice_transform
        self.slice_transform_probability = slice_transform_probability
        if synthetic_tumors is not None and slice_transform is not None:
            raise ValueError("pass either slice_transform or synthetic_tumors, not both")
        self.synthetic_tumors = synthetic_tumors
        self.records: dict[str, CaseRecord] = {}
        self.split: DataSplit | None = None
        self.train_dataset: SliceDataset | None = None
        self.val_dataset: SliceDataset | None = None

    def resolve_split(self) -> DataSplit:
        """Discover the cases and return the split (read from `split_file` or drawn)."""
        records = []
        for data_dir in self.data_dirs:
            records.extend(discover_cases(data_dir, self.layout, self.patient_pattern))
        self.records = {record.case_id: record for record in records}
        if self.split_file is not None:
            split = read_split(self.split_file)
            missing = sorted(set(split.train + split.val) - set(self.records))
            if missing:
                raise ValueError(f"split file {self.split_file} names cases not found in "
                                 f"{[str(d) for d in self.data_dirs]}: {missing}")
        else:
            split = split_cases(records, self.val_fraction, self.seed, self.val_cases,
                                self.exclude)
        if self.max_cases is not None:
            split = dataclasses.replace(split, train=split.train[: self.max_cases],
                                        val=split.val[: self.max_cases])
        self.split = split
        return split

    def prepare_data(self) -> None:
        """Build the slice cache of every case in the split (once per node)."""
        split = self.resolve_split()
        for case_id in split.train + split.val:
            cache_case(self.records[case_id], self.preprocessing, self.cache_dir)

    def setup(self, stage: str | None = None) -> None:
        split = self.split or self.resolve_split()
        train_cases = [cache_case(self.records[c], self.preprocessing, self.cache_dir)
                       for c in split.train]
        val_cases = [cache_case(self.records[c], self.preprocessing, self.cache_dir)
                     for c in split.val]
        augmentation = SliceAugmentation() if self.augment else None
        if self.synthetic_tumors is not None:
            # The transform needs each training case's spacing and context offsets, which
            # are known once the cache exists.
            self.slice_transform = SyntheticTumorTransform(
                self.synthetic_tumors, case_geometries(train_cases), seed=self.seed)
        self.train_dataset = SliceDataset(
            train_cases, self._index(train_cases, np.random.default_rng(self.seed)), self.task,
            augmentation, self.slice_transform, self.slice_transform_probability)
        self.val_dataset = SliceDataset(
            val_cases, self._index(val_cases, np.random.default_rng(self.seed + 1)), self.task)
        logger.info("%s: %d training slices from %d cases, %d validation slices from %d cases",
                    self.task, len(self.train_dataset), len(train_cases),
                    len(self.val_dataset), len(val_cases))

    def _index(self, cases: Sequence[CachedCase], rng: np.random.Generator) -> np.ndarray:
        rows = []
        for position, case in enumerate(cases):
            if self.task == "segmentation":
                slices = segmentation_slices(case, self.seg_margin_mm,
                                             self.seg_background_fraction, rng)
            else:
                slices = np.arange(case.num_slices)
            rows.append(np.stack([np.full(slices.size, position), slices], axis=1))
        return np.concatenate(rows) if rows else np.zeros((0, 2), dtype=np.int64)

    def class_counts(self) -> np.ndarray:
        """Return the number of training slices per class, (3,) int64."""
        return np.bincount(self.train_dataset.slice_classes(), minlength=len(SLICE_CLASS_NAMES))

    def train_dataloader(self) -> DataLoader:
        sampler = None
        if self.task == "classification" and self.balance_classes:
            classes = self.train_dataset.slice_classes()
            counts = np.bincount(classes, minlength=len(SLICE_CLASS_NAMES)).astype(np.float64)
            weights = 1.0 / np.maximum(counts, 1.0)
            sampler = WeightedRandomSampler(torch.from_numpy(weights[classes]),
                                            num_samples=len(classes), replacement=True)
        return DataLoader(self.train_dataset, batch_size=self.batch_size,
                          shuffle=sampler is None, sampler=sampler, drop_last=True,
                          num_workers=self.num_workers,
                          persistent_workers=self.num_workers > 0)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.val_dataset, batch_size=self.batch_size, shuffle=False,
                          num_workers=self.num_workers,
                          persistent_workers=self.num_workers > 0)
