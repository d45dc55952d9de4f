"""Shared pytest fixtures: the real CT folder and small weights made on the fly."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

from factories import make_tiny_weights

REPOSITORY_ROOT = Path(__file__).resolve().parents[1]
if str(REPOSITORY_ROOT) not in sys.path:  # makes the `training` package importable
    sys.path.insert(0, str(REPOSITORY_ROOT))
SHARED_DATA_DIR = Path(
    os.environ.get("LIVERTUMORAI_SHARED_DATA", REPOSITORY_ROOT.parent / "shared" / "data")
)


@pytest.fixture(scope="session")
def shared_data_dir() -> Path:
    if not SHARED_DATA_DIR.is_dir():
        pytest.skip(f"real CT folder {SHARED_DATA_DIR} is absent; set LIVERTUMORAI_SHARED_DATA")
    return SHARED_DATA_DIR


@pytest.fixture(scope="session")
def tiny_weights(tmp_path_factory) -> Path:
    """A manifest of random tiny weights (for plumbing tests, not accuracy)."""
    return make_tiny_weights(tmp_path_factory.mktemp("tiny_weights"))
