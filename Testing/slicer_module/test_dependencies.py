"""Dependency checks of the Slicer module against this environment's installed packages."""

from __future__ import annotations

from importlib import metadata

import pytest

from LiverTumorAILib.dependencies import (
    PIP_REQUIREMENTS,
    PROTECTED_PACKAGES,
    REQUIREMENTS,
    TORCH_REQUIREMENTS,
    Requirement,
    constraints_text,
    install_dependencies,
    installed_version,
    missing_requirements,
    pip_install_arguments,
    version_at_least,
)


@pytest.mark.parametrize("version, minimum, expected", [
    ("2.5.1+cu121", "2.1", True),
    ("2.0.1", "2.1", False),
    ("0.16", "0.16.0", True),
    ("1.10.0", "1.9", True),
    ("1.9", "1.10", False),
    ("0.4.0rc1", "0.4", True),
    ("3", "3.5", False),
])
def test_version_at_least(version, minimum, expected):
    assert version_at_least(version, minimum) is expected


def test_engine_requirements_installed_here():
    # The test environment runs the engine, so it has every package the module installs.
    assert missing_requirements() == []


def test_missing_requirements_finds_absent_and_old():
    absent = Requirement("livertumorai-absent-package", "1.0", "pip")
    too_old = Requirement("numpy", "999", "pip")
    satisfied = Requirement("numpy", "1.0", "pip")

    assert missing_requirements([absent, too_old, satisfied]) == [absent, too_old]


def test_torch_installed_by_pytorch_extension():
    assert {r.name for r in TORCH_REQUIREMENTS} == {"torch"}
    assert {r.installer for r in TORCH_REQUIREMENTS} == {"pytorch"}
    assert {r.installer for r in PIP_REQUIREMENTS} == {"pip"}
    assert REQUIREMENTS[:len(TORCH_REQUIREMENTS)] == TORCH_REQUIREMENTS


def test_constraints_pin_installed_protected_packages():
    text = constraints_text(("numpy", "livertumorai-absent-package"))

    assert text == f"numpy=={metadata.version('numpy')}\n"


def test_constraints_cover_slicer_packages():
    assert {"numpy", "SimpleITK", "requests", "torch"} <= set(PROTECTED_PACKAGES)
    pinned = constraints_text()
    assert f"SimpleITK=={installed_version('SimpleITK')}" in pinned.splitlines()


def test_pip_install_arguments():
    arguments = pip_install_arguments(PIP_REQUIREMENTS, "/tmp/constraints.txt")

    assert arguments == ["safetensors>=0.4", "scipy>=1.9", "connected-components-3d>=3.12",
                         "matplotlib>=3.5",
                         "--constraint", "/tmp/constraints.txt", "--only-binary", ":all:"]


def test_install_skipped_when_nothing_missing():
    def confirm(question: str) -> bool:
        raise AssertionError(f"asked to install although nothing is missing: {question}")

    assert install_dependencies(confirm) is False
