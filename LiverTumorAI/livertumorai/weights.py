"""Weights manifest, weights look-up and checked loading of safetensors files.

A manifest (`manifest.json`) lists each model: name, task, version, file, sha256,
architecture, preprocessing, classes, training data and metrics. The engine reads the
preprocessing parameters from here, so new weights with another window or input size are
a drop-in. Weights are loaded only from safetensors files whose sha256 matches.

Look-up order for the manifest: an explicit path (a manifest file or a folder holding
`manifest.json`), then the user cache folder (``$LIVERTUMORAI_WEIGHTS_DIR`` or
``~/.cache/livertumorai/weights``), then the files bundled in
``LiverTumorAI/Resources/Weights``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import nn

from .errors import WeightsError
from .models import build_model

logger = logging.getLogger(__name__)

__all__ = [
    "MANIFEST_NAME",
    "BUNDLED_WEIGHTS_DIR",
    "Preprocessing",
    "ModelEntry",
    "Manifest",
    "find_manifest",
    "load_manifest",
    "load_model",
    "sha256_of_file",
    "save_model",
    "write_manifest",
]

MANIFEST_NAME = "manifest.json"
BUNDLED_WEIGHTS_DIR = Path(__file__).resolve().parent.parent / "Resources" / "Weights"
USER_WEIGHTS_ENV = "LIVERTUMORAI_WEIGHTS_DIR"
TASKS = ("classification", "segmentation")
_HASH_CHUNK_BYTES = 1 << 20


@dataclass(frozen=True)
class Preprocessing:
    """Slice preparation settings of one network.

    Attributes:
        window_center_hu, window_width_hu: HU window mapped to [0, 1] (values outside clip).
        in_plane_spacing_mm: pixel size the slices are resampled to.
        input_size: (height, width) in pixels after resampling, cropped or padded around
            the body's centre.
        context_slices: neighbours on each side fed as extra channels (2.5-D context).
        context_step_mm: distance between context slices, rounded to whole slices (at least 1).
    """

    window_center_hu: float
    window_width_hu: float
    in_plane_spacing_mm: float
    input_size: tuple[int, int]
    context_slices: int
    context_step_mm: float

    @classmethod
    def from_dict(cls, data: Mapping[str, object], source: str) -> Preprocessing:
        try:
            prep = cls(
                window_center_hu=float(data["window_center_hu"]),
                window_width_hu=float(data["window_width_hu"]),
                in_plane_spacing_mm=float(data["in_plane_spacing_mm"]),
                input_size=tuple(int(v) for v in data["input_size"]),
                context_slices=int(data["context_slices"]),
                context_step_mm=float(data["context_step_mm"]),
            )
        except KeyError as err:
            raise WeightsError(
                f"The preprocessing block in {source} has no field {err}.",
                "Each model needs window_center_hu, window_width_hu, in_plane_spacing_mm, "
                "input_size, context_slices and context_step_mm; re-export the weights.",
            ) from err
        except (TypeError, ValueError) as err:
            raise WeightsError(
                f"The preprocessing block in {source} is invalid: {err}.",
                "Each model needs window_center_hu, window_width_hu, in_plane_spacing_mm, "
                "input_size, context_slices and context_step_mm; re-export the weights.",
            ) from err
        if prep.window_width_hu <= 0 or prep.in_plane_spacing_mm <= 0 or len(prep.input_size) != 2:
            raise WeightsError(f"invalid preprocessing values in {source}: {prep}")
        return prep

    @property
    def in_channels(self) -> int:
        return 2 * self.context_slices + 1

    def to_dict(self) -> dict:
        return {
            "window_center_hu": self.window_center_hu,
            "window_width_hu": self.window_width_hu,
            "in_plane_spacing_mm": self.in_plane_spacing_mm,
            "input_size": list(self.input_size),
            "context_slices": self.context_slices,
            "context_step_mm": self.context_step_mm,
        }


@dataclass(frozen=True)
class ModelEntry:
    """One model of the manifest, with the absolute path of its weights file."""

    name: str
    task: str
    version: str
    path: Path
    sha256: str
    architecture: dict
    preprocessing: Preprocessing
    classes: tuple[str, ...]
    extra: dict = field(default_factory=dict)  # training data, split, metrics, ...

    def summary(self) -> dict:
        return {"name": self.name, "version": self.version, "file": self.path.name,
                "sha256": self.sha256}


@dataclass(frozen=True)
class Manifest:
    path: Path
    models: tuple[ModelEntry, ...]

    def model_for(self, task: str) -> ModelEntry:
        """Return the first model of `task` ('classification' or 'segmentation')."""
        for entry in self.models:
            if entry.task == task:
                return entry
        raise WeightsError(
            f"the manifest {self.path} lists no {task} model",
            "Add the model with training/export.py or point --weights at a complete manifest.",
        )


def user_weights_dir() -> Path:
    override = os.environ.get(USER_WEIGHTS_ENV)
    if override:
        return Path(override).expanduser()
    return Path.home() / ".cache" / "livertumorai" / "weights"


def find_manifest(weights: str | os.PathLike | None = None) -> Path:
    """Return the manifest to use: explicit path, user cache folder, bundled files.

    Raises:
        WeightsError: an explicit path has no manifest, or none is found anywhere.
    """
    if weights is not None:
        path = Path(weights).expanduser()
        candidate = path / MANIFEST_NAME if path.is_dir() else path
        if not candidate.is_file():
            raise WeightsError(
                f"no weights manifest at {candidate}",
                f"Pass a {MANIFEST_NAME} file or a folder that contains one.",
            )
        return candidate.resolve()
    override = os.environ.get(USER_WEIGHTS_ENV)
    if override and not (Path(override).expanduser() / MANIFEST_NAME).is_file():
        logger.warning("%s=%s contains no %s; using the bundled weights.", USER_WEIGHTS_ENV,
                       override, MANIFEST_NAME)
    for folder in (user_weights_dir(), BUNDLED_WEIGHTS_DIR):
        if (folder / MANIFEST_NAME).is_file():
            return (folder / MANIFEST_NAME).resolve()
    raise WeightsError(
        f"no weights manifest in {user_weights_dir()} or {BUNDLED_WEIGHTS_DIR}",
        "Reinstall LiverTumorAI (the weights ship with it) or pass --weights.",
    )


def load_manifest(weights: str | os.PathLike | None = None) -> Manifest:
    """Find and parse a weights manifest (files are checked only when a model is loaded)."""
    path = find_manifest(weights)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        raw_models = data["models"]
    except KeyError as err:
        raise WeightsError(
            f"The weights manifest {path} has no {err} list.",
            "Restore the file from the release or re-export it with training/export.py.",
        ) from err
    except (OSError, ValueError, TypeError) as err:
        raise WeightsError(
            f"Cannot parse the weights manifest {path}: {err}.",
            "Restore the file from the release or re-export it with training/export.py.",
        ) from err
    entries = tuple(_parse_entry(raw, path) for raw in raw_models)
    return Manifest(path=path, models=entries)


def _parse_entry(raw: Mapping[str, object], manifest_path: Path) -> ModelEntry:
    source = f"{manifest_path} (model {raw.get('name', '?')!r})"
    try:
        entry = ModelEntry(
            name=str(raw["name"]),
            task=str(raw["task"]),
            version=str(raw["version"]),
            path=(manifest_path.parent / str(raw["file"])).resolve(),
            sha256=str(raw["sha256"]).lower(),
            architecture=dict(raw["architecture"]),
            preprocessing=Preprocessing.from_dict(raw["preprocessing"], source),
            classes=tuple(str(c) for c in raw["classes"]),
            extra={k: v for k, v in raw.items() if k not in _ENTRY_KEYS},
        )
    except (KeyError, TypeError) as err:
        raise WeightsError(
            f"missing or invalid field {err} in {source}",
            "Re-export the weights with training/export.py.",
        ) from err
    if entry.task not in TASKS:
        raise WeightsError(f"task {entry.task!r} in {source} is not one of {TASKS}")
    return entry


_ENTRY_KEYS = {"name", "task", "version", "file", "sha256", "architecture", "preprocessing",
               "classes"}


def sha256_of_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as stream:
        for chunk in iter(lambda: stream.read(_HASH_CHUNK_BYTES), b""):
            digest.update(chunk)
    return digest.hexdigest()


def load_model(entry: ModelEntry, device: torch.device | str = "cpu") -> nn.Module:
    """Verify the weights file of `entry`, build its network and load the weights.

    Returns the network in eval mode, float32, on `device`.

    Raises:
        WeightsError: the file is missing, its sha256 differs from the manifest, it is not
            a readable safetensors file, or its tensors do not fit the architecture.
    """
    _verify_file(entry)
    try:
        state = load_file(str(entry.path))
    except (SafetensorError, OSError, ValueError) as err:
        raise WeightsError(
            f"cannot read the weights file {entry.path}: {err}",
            "The file is not a valid safetensors file; restore it from the release.",
        ) from err
    try:
        model = build_model(entry.architecture)
    except ValueError as err:
        raise WeightsError(f"model {entry.name!r}: {err}") from err
    state = {key: tensor.float() for key, tensor in state.items()}
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as err:
        raise WeightsError(
            f"the weights in {entry.path} do not fit the architecture {entry.architecture}: "
            f"{_first_line(err)}",
            "The manifest's architecture block and the weights file belong to different "
            "models; export both together with training/export.py.",
        ) from err
    logger.info("Loaded %s %s from %s (sha256 %s)", entry.task, entry.name, entry.path,
                entry.sha256[:12])
    return model.to(device).eval()


def _verify_file(entry: ModelEntry) -> None:
    if not entry.path.is_file():
        raise WeightsError(
            f"weights file {entry.path} for model {entry.name!r} is missing "
            f"(expected sha256 {entry.sha256})",
            f"Copy the file next to {entry.path.parent / MANIFEST_NAME}, point --weights at "
            "a complete weights folder, or reinstall LiverTumorAI for the bundled weights.",
        )
    actual = sha256_of_file(entry.path)
    if actual != entry.sha256:
        raise WeightsError(
            f"weights file {entry.path} has sha256 {actual}, but the manifest expects "
            f"{entry.sha256}",
            "The file is corrupt or from another release; restore it or re-export the "
            "weights with training/export.py, which writes a matching manifest.",
        )


def _first_line(err: Exception) -> str:
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    return " ".join(lines[:3])


def save_model(
    model: nn.Module,
    folder: str | os.PathLike,
    *,
    name: str,
    task: str,
    version: str,
    architecture: Mapping[str, object],
    preprocessing: Preprocessing,
    classes: tuple[str, ...] | list[str],
    extra: Mapping[str, object] | None = None,
    dtype: torch.dtype = torch.float16,
) -> dict:
    """Write a model's weights as safetensors into `folder` and return its manifest entry.

    Weights are stored in `dtype` (half precision by default: the engine computes in float32
    or autocast, and half the file size keeps the bundle small). The entry carries the
    sha256 of the written file. Add it to a manifest with `write_manifest`.
    """
    from safetensors.torch import save_file

    if task not in TASKS:
        raise ValueError(f"task {task!r} is not one of {TASKS}")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    file_name = f"{name}.safetensors"
    state = {key: tensor.detach().to("cpu", dtype if tensor.is_floating_point() else tensor.dtype)
             .contiguous() for key, tensor in model.state_dict().items()}
    temporary = folder / f".{file_name}.partial"
    save_file(state, str(temporary), metadata={"name": name, "version": version, "task": task})
    os.replace(temporary, folder / file_name)
    os.chmod(folder / file_name, 0o644)  # safetensors creates the file readable by its owner only
    entry = {
        "name": name,
        "task": task,
        "version": version,
        "file": file_name,
        "sha256": sha256_of_file(folder / file_name),
        "architecture": dict(architecture),
        "preprocessing": preprocessing.to_dict(),
        "classes": list(classes),
    }
    entry.update(extra or {})
    return entry


def write_manifest(folder: str | os.PathLike, entries: list[dict]) -> Path:
    """Write `manifest.json` listing `entries` into `folder`, replacing any earlier one."""
    folder = Path(folder)
    path = folder / MANIFEST_NAME
    temporary = folder / f".{MANIFEST_NAME}.partial"
    temporary.write_text(json.dumps({"format_version": 1, "models": entries}, indent=2) + "\n",
                         encoding="utf-8")
    os.replace(temporary, path)
    return path
