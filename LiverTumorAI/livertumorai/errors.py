"""Exception types of the engine, one per kind of failure.

The command line maps each type to its own exit code and to the `code` field of the JSON
error event. The Slicer module shows `str(error)` and `error.hint` in a message box.
"""

from __future__ import annotations

__all__ = [
    "LiverTumorAIError",
    "InvalidInputError",
    "WeightsError",
    "RunCancelledError",
    "OutputExistsError",
    "ConfigurationError",
]


class LiverTumorAIError(Exception):
    """Base class of the engine's errors.

    Args:
        message: what failed, naming the value.
        hint: what the user can do about it.
    """

    code = "error"

    def __init__(self, message: str, hint: str = "") -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return f"{self.message} {self.hint}".strip()


class InvalidInputError(LiverTumorAIError):
    """The input CT is missing, unreadable, or not a usable CT volume."""

    code = "invalid_input"


class WeightsError(LiverTumorAIError):
    """A weights file or the manifest is missing, corrupt or does not fit its model."""

    code = "weights"


class RunCancelledError(LiverTumorAIError):
    """The run was cancelled through the cancel flag or a signal."""

    code = "cancelled"


class OutputExistsError(LiverTumorAIError):
    """The output folder exists and overwriting was not requested."""

    code = "output_exists"


class ConfigurationError(LiverTumorAIError):
    """An option is invalid or cannot be met here (for example a GPU that is not present)."""

    code = "usage"


class OutputWriteError(LiverTumorAIError):
    """An output folder that cannot be created or written: no permission, a read-only or full disk."""

    code = "output_write"
