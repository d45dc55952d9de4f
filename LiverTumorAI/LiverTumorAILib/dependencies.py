"""Python packages the engine needs inside Slicer, and their installation.

Slicer's Python ships numpy, SimpleITK and requests. Slicer itself and other modules rely
on those exact builds (Slicer's SimpleITK carries Slicer's own ITK IO classes), so this
module never replaces them. The engine also needs torch, which comes from the PyTorch
extension's installer (PyTorchUtils picks the CUDA or CPU build that fits the machine and
installs torchvision with it), and a few small packages from PyPI.

Order of installation: torch first (through PyTorchUtils), then the rest with pip and a
constraints file that pins every protected package to its installed version, so pip fails
rather than replace one of them.

Checks read package metadata (`importlib.metadata`) and never import torch: importing it
in the application process loads large libraries and locks its files until Slicer exits.
"""

from __future__ import annotations

import logging
import re
import sys
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Optional

logger = logging.getLogger(__name__)

__all__ = [
    "Requirement",
    "TORCH_REQUIREMENTS",
    "PIP_REQUIREMENTS",
    "REQUIREMENTS",
    "PROTECTED_PACKAGES",
    "DependencyError",
    "installed_version",
    "version_at_least",
    "missing_requirements",
    "constraints_text",
    "pip_install_arguments",
    "install_dependencies",
]


@dataclass(frozen=True)
class Requirement:
    """A distribution the engine needs, with its minimum version and its installer.

    Attributes:
        name: distribution name on PyPI.
        minimum_version: lowest version that works, e.g. '2.1'.
        installer: 'pytorch' (the PyTorch extension's installer) or 'pip'.
    """

    name: str
    minimum_version: str
    installer: str

    @property
    def specifier(self) -> str:
        return f"{self.name}>={self.minimum_version}"


# Minimum versions match the engine's pyproject.toml. The engine imports torch only.
TORCH_REQUIREMENTS = (Requirement("torch", "2.1", "pytorch"),)
# PyTorchUtils installs torchvision together with torch; this keeps the pair compatible.
TORCHVISION_REQUIREMENT = ">=0.16"
PIP_REQUIREMENTS = (
    Requirement("safetensors", "0.4", "pip"),
    Requirement("scipy", "1.9", "pip"),
    Requirement("connected-components-3d", "3.12", "pip"),  # imported as cc3d
    # NOTE: the engine imports matplotlib (overview image) even with --no-overview.
    Requirement("matplotlib", "3.5", "pip"),
)
REQUIREMENTS = TORCH_REQUIREMENTS + PIP_REQUIREMENTS

# Installed in Slicer by Slicer or by the PyTorch extension; pip must keep these versions.
PROTECTED_PACKAGES = ("numpy", "SimpleITK", "requests", "torch", "torchvision")

VersionLookup = Callable[[str], Optional[str]]


class DependencyError(Exception):
    """Installing or checking the engine's packages failed.

    Attributes:
        message: what failed.
        hint: what the user can do.
        restart_required: Slicer must restart before the packages can be used.
    """

    def __init__(self, message: str, hint: str = "", restart_required: bool = False) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint
        self.restart_required = restart_required

    def __str__(self) -> str:
        return f"{self.message} {self.hint}".strip()


def installed_version(name: str) -> str | None:
    """Return the installed version of distribution `name`, or None when absent."""
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def version_at_least(version: str, minimum: str) -> bool:
    """Compare release numbers: True when `version` (e.g. '2.5.1+cu121') >= `minimum`.

    Only the leading dotted numbers count; pre-release and local labels are ignored.
    """
    return _release(version) >= _release(minimum)


def _release(version: str) -> tuple[int, ...]:
    match = re.match(r"\s*v?(\d+(?:\.\d+)*)", version)
    if match is None:
        return (0,)
    numbers = [int(part) for part in match.group(1).split(".")]
    while len(numbers) > 1 and numbers[-1] == 0:
        numbers.pop()
    return tuple(numbers)


def missing_requirements(requirements: Sequence[Requirement] = REQUIREMENTS,
                         version_lookup: VersionLookup = installed_version) -> list[Requirement]:
    """Return the requirements that are absent or older than their minimum version."""
    missing = []
    for requirement in requirements:
        version = version_lookup(requirement.name)
        if version is None or not version_at_least(version, requirement.minimum_version):
            missing.append(requirement)
    return missing


def constraints_text(protected: Sequence[str] = PROTECTED_PACKAGES,
                     version_lookup: VersionLookup = installed_version) -> str:
    """Return a pip constraints file pinning each installed protected package to its version.

    Protected packages that are not installed are left out, so pip may install them.
    """
    lines = []
    for name in protected:
        version = version_lookup(name)
        if version is not None:
            lines.append(f"{name}=={version}")
    return "\n".join(lines) + "\n"


def pip_install_arguments(requirements: Sequence[Requirement],
                          constraints_path: str | Path) -> list[str]:
    """Return the `pip install` arguments for `requirements` under a constraints file.

    Only wheels are accepted, so a package without a wheel for this platform fails fast
    with pip's message instead of starting a compiler.
    """
    return [*(r.specifier for r in requirements), "--constraint", str(constraints_path),
            "--only-binary", ":all:"]


def install_dependencies(confirm: Callable[[str], bool]) -> bool:
    """Install whatever the engine still needs, inside Slicer.

    Args:
        confirm: shows a question and returns True when the user agrees; called once with
            the list of packages before anything is installed.

    Returns:
        True when Slicer must be restarted before the engine can use the new packages
        (a package that was already imported was replaced).

    Raises:
        DependencyError: the user declined, the PyTorch extension is missing, or an
            installation failed.
    """
    missing = missing_requirements()
    if not missing:
        return False
    names = ", ".join(r.specifier for r in missing)
    question = (f"LiverTumorAI needs these Python packages: {names}. Install them now? "
                "This downloads up to a few GB (PyTorch with CUDA) and can take several "
                "minutes.")
    if not confirm(question):
        raise DependencyError("the packages were not installed",
                              "Run again and accept the installation to use LiverTumorAI.")
    already_imported = [r.name for r in missing if r.name in sys.modules]
    torch_missing = [r for r in missing if r.installer == "pytorch"]
    if torch_missing:
        _install_torch()
    pip_missing = missing_requirements(PIP_REQUIREMENTS)
    if pip_missing:
        _pip_install(pip_missing)
    still_missing = missing_requirements()
    if still_missing:
        raise DependencyError(
            "installing " + ", ".join(r.specifier for r in still_missing) + " failed",
            "Read the Python console for pip's message, restart Slicer and try again.",
            restart_required=True)
    logger.info("installed %s", names)
    return bool(already_imported)


def _install_torch() -> None:
    """Install torch (and torchvision) through the PyTorch extension (PyTorchUtils)."""
    try:
        import PyTorchUtils  # noqa: PLC0415 (module of the PyTorch extension, only in Slicer)
    except ImportError as error:
        raise DependencyError(
            "the PyTorch extension is not installed",
            "Install 'PyTorch' in the Extensions Manager, restart Slicer and run again.",
        ) from error
    (torch_requirement,) = TORCH_REQUIREMENTS
    logic = PyTorchUtils.PyTorchUtilsLogic()
    arguments = {
        "askConfirmation": False,
        "torchVersionRequirement": f">={torch_requirement.minimum_version}",
        "torchvisionVersionRequirement": TORCHVISION_REQUIREMENT,
    }
    try:
        try:
            torch_module = logic.installTorch(**arguments)
        except TypeError:
            # PyTorchUtils releases before torchvisionVersionRequirement existed.
            del arguments["torchvisionVersionRequirement"]
            torch_module = logic.installTorch(**arguments)
    except Exception as error:  # the installer runs pip: any failure is reported the same way
        raise DependencyError(
            f"installing PyTorch failed: {error}",
            "Open the 'PyTorch Util' module, install PyTorch there, restart Slicer and run "
            "again.",
        ) from error
    if torch_module is None:
        raise DependencyError(
            "PyTorch could not be installed",
            "Open the 'PyTorch Util' module, install PyTorch there, restart Slicer and run "
            "again.")


def _pip_install(requirements: Sequence[Requirement]) -> None:
    import slicer  # noqa: PLC0415 (only inside Slicer)

    # NOTE: Slicer preview builds offer slicer.packaging with a progress dialog. They keep
    # slicer.util.pip_install as a wrapper of it, and Slicer 5.8 has only the latter.
    with tempfile.TemporaryDirectory(prefix="LiverTumorAI-pip-") as folder:
        constraints_path = Path(folder) / "constraints.txt"
        constraints_path.write_text(constraints_text(), encoding="utf-8")
        arguments = pip_install_arguments(requirements, constraints_path)
        logger.info("pip install %s", " ".join(arguments))
        try:
            slicer.util.pip_install(arguments)
        except Exception as error:  # pip_install raises CalledProcessError or RuntimeError
            raise DependencyError(
                f"pip could not install {', '.join(r.specifier for r in requirements)}: {error}",
                "Check the internet connection and the Python console for pip's message, "
                "then run again.") from error
