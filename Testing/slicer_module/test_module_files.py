"""Static checks of the Slicer module: .ui names, CMake file lists, metadata, no torch import.

These read the files only; they need neither Slicer nor slicer-core.
"""

from __future__ import annotations

import ast
import fnmatch
import re
import struct
import xml.etree.ElementTree as ElementTree
from pathlib import Path

REPOSITORY_ROOT = Path(__file__).resolve().parents[2]
MODULE_DIR = REPOSITORY_ROOT / "LiverTumorAI"
MODULE_FILE = MODULE_DIR / "LiverTumorAI.py"
UI_FILE = MODULE_DIR / "Resources" / "UI" / "LiverTumorAI.ui"
MODULE_CMAKE = MODULE_DIR / "CMakeLists.txt"
EXTENSION_CMAKE = REPOSITORY_ROOT / "CMakeLists.txt"
# Build and packaging by-products that are never installed with the extension.
IGNORED_PARTS = ("__pycache__",)
IGNORED_SUFFIXES = (".pyc", ".egg-info")


def _ui_widget_names() -> set[str]:
    tree = ElementTree.parse(UI_FILE)
    return {widget.get("name") for widget in tree.iter("widget")}


def _ui_parameter_names() -> set[str]:
    names = set()
    for widget in ElementTree.parse(UI_FILE).iter("widget"):
        for prop in widget.findall("property"):
            if prop.get("name") == "SlicerParameterName":
                names.add(prop.findtext("string"))
    return names


def _parameter_node_fields() -> set[str]:
    tree = ast.parse(MODULE_FILE.read_text(encoding="utf-8"))
    for node in tree.body:
        if isinstance(node, ast.ClassDef) and node.name == "LiverTumorAIParameterNode":
            return {item.target.id for item in node.body if isinstance(item, ast.AnnAssign)}
    raise AssertionError("class LiverTumorAIParameterNode is missing from LiverTumorAI.py")


def _cmake_listed_files() -> list[str]:
    """Return the SCRIPTS and RESOURCES entries and GLOB patterns of the module CMakeLists."""
    text = MODULE_CMAKE.read_text(encoding="utf-8")
    text = re.sub(r"#.*", "", text).replace("${MODULE_NAME}", "LiverTumorAI")
    entries = []
    for block in re.findall(r"set\((MODULE_PYTHON_\w+)(.*?)\)", text, flags=re.S):
        entries += [word for word in block[1].split() if not word.startswith("${")]
    for block in re.findall(r"file\(GLOB\s+\w+(.*?)\)", text, flags=re.S):
        entries += [word for word in block.split()
                    if "/" in word and not word.startswith("${")]
    return entries


def _module_files() -> list[str]:
    files = []
    for path in MODULE_DIR.rglob("*"):
        relative = path.relative_to(MODULE_DIR)
        if not path.is_file() or path == MODULE_CMAKE:
            continue
        if any(part in IGNORED_PARTS or part.endswith(IGNORED_SUFFIXES)
               for part in relative.parts):
            continue
        files.append(relative.as_posix())
    return sorted(files)


def _png_size(path: Path) -> tuple[int, int]:
    header = path.read_bytes()[:24]
    assert header[:8] == b"\x89PNG\r\n\x1a\n", f"{path} is not a PNG file"
    return struct.unpack(">II", header[16:24])


def test_ui_has_every_widget_used():
    used = set(re.findall(r"self\.ui\.(\w+)", MODULE_FILE.read_text(encoding="utf-8")))
    missing = sorted(used - _ui_widget_names())
    assert used, "LiverTumorAI.py uses no self.ui widgets; the pattern no longer matches"
    assert missing == []


def test_ui_parameters_exist_in_parameter_node():
    parameters = _ui_parameter_names()
    assert "inputVolume" in parameters
    assert sorted(parameters - _parameter_node_fields()) == []


def test_cmake_lists_every_module_file():
    listed = _cmake_listed_files()
    unlisted = [f for f in _module_files()
                if not any(fnmatch.fnmatchcase(f, pattern) for pattern in listed)]
    assert unlisted == []


def test_cmake_lists_only_existing_files():
    listed = [entry for entry in _cmake_listed_files() if "*" not in entry]
    assert "LiverTumorAI.py" in listed
    assert "Resources/UI/LiverTumorAI.ui" in listed
    assert sorted(entry for entry in listed if not (MODULE_DIR / entry).is_file()) == []


def test_cmake_builds_module_with_tests():
    text = MODULE_CMAKE.read_text(encoding="utf-8")
    assert "slicerMacroBuildScriptedModule(" in text
    assert "WITH_GENERIC_TESTS" in text
    assert "slicer_add_python_unittest(SCRIPT ${MODULE_NAME}.py)" in text


def test_extension_metadata():
    text = EXTENSION_CMAKE.read_text(encoding="utf-8")
    assert re.search(r'set\(EXTENSION_DEPENDS\s+"PyTorch"\)', text)
    assert re.search(r'set\(EXTENSION_CATEGORY\s+"Segmentation"\)', text)
    assert "add_subdirectory(LiverTumorAI)" in text
    for name in ("HOMEPAGE", "CONTRIBUTORS", "DESCRIPTION", "ICONURL", "SCREENSHOTURLS"):
        assert f"set(EXTENSION_{name} " in text


def test_icons_are_128_pixel_pngs():
    for path in (REPOSITORY_ROOT / "Resources" / "LiverTumorAI.png",
                 MODULE_DIR / "Resources" / "Icons" / "LiverTumorAI.png"):
        assert _png_size(path) == (128, 128)


def test_module_never_imports_torch():
    # The application process must stay free of torch: importing it locks its files
    # (no reinstall without a restart) and loads CUDA. Only the engine child imports it.
    sources = [MODULE_FILE, *sorted((MODULE_DIR / "LiverTumorAILib").glob("*.py"))]
    offenders = []
    for path in sources:
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                names = [node.module or ""]
            else:
                continue
            offenders += [f"{path.name}:{node.lineno}" for name in names
                          if name.split(".")[0] in ("torch", "torchvision")
                          or name.startswith("livertumorai.") and name not in (
                              "livertumorai.constants", "livertumorai.errors")]
    assert offenders == []
