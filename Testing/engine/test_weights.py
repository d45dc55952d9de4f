"""Weights manifest, look-up order and checked loading."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from factories import make_tiny_weights
from livertumorai.errors import WeightsError
from livertumorai.weights import (
    MANIFEST_NAME,
    find_manifest,
    load_manifest,
    load_model,
    sha256_of_file,
)


@pytest.fixture()
def weights_dir(tmp_path):
    make_tiny_weights(tmp_path)
    return tmp_path


def test_manifest_loads_and_models_run(weights_dir):
    manifest = load_manifest(weights_dir)
    entry = manifest.model_for("classification")

    model = load_model(entry)

    assert entry.sha256 == sha256_of_file(entry.path)
    assert model(torch.zeros(1, 3, 64, 64)).shape == (1, 3)
    assert manifest.model_for("segmentation").preprocessing.in_channels == 3


def test_checksum_mismatch_rejected(weights_dir):
    entry = load_manifest(weights_dir).model_for("segmentation")
    data = bytearray(entry.path.read_bytes())
    data[-1] ^= 0xFF
    entry.path.write_bytes(bytes(data))

    with pytest.raises(WeightsError, match="has sha256") as error:
        load_model(entry)

    assert entry.sha256 in str(error.value)
    assert str(entry.path) in str(error.value)


def test_missing_file_rejected(weights_dir):
    entry = load_manifest(weights_dir).model_for("classification")
    entry.path.unlink()

    with pytest.raises(WeightsError, match="is missing") as error:
        load_model(entry)

    assert entry.sha256 in str(error.value)


def test_wrong_architecture_rejected(weights_dir):
    manifest_path = weights_dir / MANIFEST_NAME
    data = json.loads(manifest_path.read_text())
    data["models"][1]["architecture"]["features"] = [8, 16, 32]
    manifest_path.write_text(json.dumps(data))
    entry = load_manifest(weights_dir).model_for("segmentation")

    with pytest.raises(WeightsError, match="do not fit the architecture"):
        load_model(entry)


def test_non_safetensors_file_rejected(weights_dir):
    manifest_path = weights_dir / MANIFEST_NAME
    data = json.loads(manifest_path.read_text())
    bogus = weights_dir / "bogus.safetensors"
    bogus.write_bytes(b"not a safetensors file at all")
    data["models"][0]["file"] = bogus.name
    data["models"][0]["sha256"] = sha256_of_file(bogus)
    manifest_path.write_text(json.dumps(data))
    entry = load_manifest(weights_dir).model_for("classification")

    with pytest.raises(WeightsError, match="cannot read the weights file"):
        load_model(entry)


def test_manifest_missing_field_rejected(weights_dir):
    manifest_path = weights_dir / MANIFEST_NAME
    data = json.loads(manifest_path.read_text())
    del data["models"][0]["preprocessing"]["window_width_hu"]
    manifest_path.write_text(json.dumps(data))

    with pytest.raises(WeightsError, match="window_width_hu"):
        load_manifest(weights_dir)


def test_manifest_not_json_rejected(tmp_path):
    (tmp_path / MANIFEST_NAME).write_text("{ not json")

    with pytest.raises(WeightsError, match="Cannot parse"):
        load_manifest(tmp_path)


def test_explicit_path_without_manifest_rejected(tmp_path):
    with pytest.raises(WeightsError, match="no weights manifest"):
        find_manifest(tmp_path / "nowhere")


def test_user_cache_folder_wins_over_bundled(weights_dir, tmp_path, monkeypatch):
    user_dir = tmp_path / "user"
    shutil.copytree(weights_dir, user_dir)
    monkeypatch.setenv("LIVERTUMORAI_WEIGHTS_DIR", str(user_dir))

    assert find_manifest() == (user_dir / MANIFEST_NAME).resolve()


def test_explicit_path_wins_over_user_cache(weights_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("LIVERTUMORAI_WEIGHTS_DIR", str(tmp_path / "other"))

    assert find_manifest(weights_dir / MANIFEST_NAME) == (weights_dir / MANIFEST_NAME).resolve()


def test_missing_task_rejected(weights_dir):
    manifest_path = weights_dir / MANIFEST_NAME
    data = json.loads(manifest_path.read_text())
    data["models"] = data["models"][:1]
    manifest_path.write_text(json.dumps(data))

    with pytest.raises(WeightsError, match="lists no segmentation model"):
        load_manifest(weights_dir).model_for("segmentation")
