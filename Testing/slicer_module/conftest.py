"""Fixtures of the Slicer module tests: MRML scenes from slicer-core and CT volume nodes.

This folder is not named `slicer`. slicer-core's `slicer` package adds every folder named
`slicer` on sys.path to its own path and imports each module in it. pytest puts `Testing/`
on sys.path, so the modules of a `Testing/slicer/` folder would be imported into `slicer`.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

MODULE_DIR = Path(__file__).resolve().parents[2] / "LiverTumorAI"
if str(MODULE_DIR) not in sys.path:  # makes `LiverTumorAILib` importable
    sys.path.insert(0, str(MODULE_DIR))


@pytest.fixture(scope="session")
def slicer_core():
    """slicer-core's `slicer` package; skips the test where it cannot be used."""
    from scene_helpers import skip_without_slicer_core

    skip_without_slicer_core()
    import slicer

    return slicer


@pytest.fixture
def mrml_scene(slicer_core):
    """An empty MRML scene with the Segmentations module logic, as in the application."""
    scene = slicer_core.vtkMRMLScene()
    segmentations_logic = slicer_core.vtkSlicerSegmentationsModuleLogic()
    segmentations_logic.SetMRMLScene(scene)
    yield scene
    scene.Clear(True)
    del segmentations_logic
