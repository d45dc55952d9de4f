"""Helpers of the Slicer module tests: volumes read like Slicer does, engine runs, snapshots."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

# 128 x 128 x 59 version of case ircadb1.17 (3 mm) with its liver and tumor labels.
SMALL_CT = "ircadb1.17_small_axial_lps.nii.gz"
SMALL_CT_LABEL = "ircadb1.17_small_axial_lps_label.nii.gz"
# Full-size case (512 x 512 x 151): slow enough on the CPU to cancel mid-run.
LARGE_CT = Path("train") / "ircadb1.7" / "ct.nii.gz"


def skip_without_slicer_core() -> None:
    """Skip the calling test (or test module) unless slicer-core's `slicer` can be used."""
    if sys.version_info < (3, 10):
        pytest.skip("slicer-core needs Python 3.10 or later", allow_module_level=True)
    try:
        import slicer
    except ImportError:
        pytest.skip("slicer-core is not installed", allow_module_level=True)
    if not hasattr(slicer, "vtkMRMLScene"):
        pytest.skip("the installed 'slicer' package is not slicer-core; the unrelated PyPI "
                    "package 'slicer' replaces it", allow_module_level=True)


def load_volume(scene, path: Path, name: str):
    """Read a CT file into a new scalar volume node the way Slicer's volume reader does."""
    import slicer

    node = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", name)
    storage = slicer.vtkMRMLVolumeArchetypeStorageNode()
    storage.SetFileName(str(path))
    if not storage.ReadData(node):
        raise RuntimeError(f"reading {path} into a volume node failed")
    node.CreateDefaultDisplayNodes()
    return node


def run_engine_cli(input_path: Path, output_dir: Path, *arguments: str) -> None:
    """Run `livertumorai segment` in a child Python and fail the test when it fails."""
    command = [sys.executable, "-m", "livertumorai", "segment", str(input_path), "-o",
               str(output_dir), "--device", "cpu", "-q", *arguments]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300, check=False)
    assert result.returncode == 0, result.stderr


def scene_snapshot(scene) -> list[tuple]:
    """Return (ID, class, name, modified time) of every node, to compare scene states."""
    nodes = [scene.GetNthNode(i) for i in range(scene.GetNumberOfNodes())]
    return [(node.GetID(), node.GetClassName(), node.GetName(), node.GetMTime())
            for node in nodes]
