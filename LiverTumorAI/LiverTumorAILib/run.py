"""One run of the engine on a volume node: start, poll, cancel, load the results.

`SegmentationRun` writes the input volume to a temporary NRRD, starts the engine in a
child process, turns its JSON lines into progress, and on success puts the results into
the scene with `scene.update_scene`. The scene is modified only at that last step, so a
run that fails or is cancelled leaves the scene exactly as it was before `start()`.

`poll()` does not wait for the child. In Slicer a Qt timer calls it; in tests and scripts
`wait()` calls it in a loop.
"""

from __future__ import annotations

import enum
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from livertumorai.constants import DEFAULT_MIN_LESION_VOLUME_MM3, DEFAULT_TUMOR_THRESHOLD

from . import scene as scene_updates
from .process import (
    ChildProcess,
    DoneEvent,
    ErrorEvent,
    ProgressEvent,
    default_python_executable,
    engine_command,
    overall_fraction,
    parse_event_line,
)

logger = logging.getLogger(__name__)

__all__ = ["RunOptions", "RunState", "EngineRunError", "SegmentationRun"]

# A run whose child writes nothing to stdout or stderr for this long is stopped and
# reported as hanging. The engine prints one progress line per batch of slices. A batch is
# expected to take seconds on a CPU, so 15 minutes of silence means the child is stuck.
DEFAULT_STALL_TIMEOUT_S = 15 * 60
# Time the engine gets to stop after SIGTERM before the process tree is killed.
CANCEL_GRACE_S = 5.0
_INPUT_FILE = "input.nrrd"
_OUTPUT_FOLDER = "output"


class RunState(enum.Enum):
    """State of a run."""

    CREATED = "created"
    RUNNING = "running"
    CANCELLING = "cancelling"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"

    @property
    def finished(self) -> bool:
        return self in (RunState.SUCCEEDED, RunState.FAILED, RunState.CANCELLED)


class EngineRunError(Exception):
    """A run failed: what happened, what to do, and the details for a "Details" box.

    Attributes:
        code: the engine's error code ('invalid_input', 'weights', 'out_of_memory', ...),
            or 'crashed', 'stalled', 'start_failed', 'results' for failures outside it.
        message: what failed.
        hint: what the user can do.
        details: the end of the child's stderr, and its exit status.
    """

    def __init__(self, message: str, hint: str = "", details: str = "",
                 code: str = "error") -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint
        self.details = details
        self.code = code

    def __str__(self) -> str:
        return f"{self.message} {self.hint}".strip()


@dataclass(frozen=True)
class RunOptions:
    """Engine settings of one run (see `livertumorai segment --help`).

    Attributes:
        device: 'auto', 'cpu' or 'gpu'.
        tumor_threshold: tumor probability (0..1) from which a voxel is tumor.
        min_lesion_volume_mm3: smaller lesions become liver, in mm^3.
        classifier_gating: run the U-Net only on slices the classifier finds liver in.
        keep_probability_map: also load the tumor probability map as a volume.
        weights: weights manifest or folder; None lets the engine choose (user cache,
            then the bundled weights).
        batch_size: slices per U-Net batch; None keeps the engine's default.
        extra_arguments: further command-line options passed unchanged.
    """

    device: str = "auto"
    tumor_threshold: float = DEFAULT_TUMOR_THRESHOLD
    min_lesion_volume_mm3: float = DEFAULT_MIN_LESION_VOLUME_MM3
    classifier_gating: bool = True
    keep_probability_map: bool = False
    weights: str | None = None
    batch_size: int | None = None
    extra_arguments: tuple[str, ...] = ()

    def engine_arguments(self) -> list[str]:
        """Return the `livertumorai segment` options for these settings."""
        arguments = [
            "--device", self.device,
            "--tumor-threshold", repr(float(self.tumor_threshold)),
            "--min-lesion-mm3", repr(float(self.min_lesion_volume_mm3)),
            # The scene shows everything the overview image would; skip the image.
            "--no-overview",
            "-v",
        ]
        if not self.classifier_gating:
            arguments.append("--no-gating")
        if self.keep_probability_map:
            arguments.append("--probability-map")
        if self.weights:
            arguments += ["--weights", str(self.weights)]
        if self.batch_size is not None:
            arguments += ["--batch-size", str(int(self.batch_size))]
        return arguments + list(self.extra_arguments)


ProgressCallback = Callable[[ProgressEvent, float], None]  # (event, overall fraction 0..1)


class SegmentationRun:
    """The engine on one input volume node, in a child process.

    Args:
        scene: the MRML scene holding `input_volume`.
        input_volume: the CT volume node.
        options: engine settings.
        python_executable: interpreter for the child; default `default_python_executable()`.
        temp_root: folder for the temporary input and output; default the system's.
        keep_edited_copies: see `scene.update_scene`.
        show_3d: build the 3D representation of the segmentation.
        progress_callback: called with each progress event and the overall fraction.
        stall_timeout_s: stop the run after this long without any output from the child.
    """

    def __init__(self, scene, input_volume, options: RunOptions | None = None, *,
                 python_executable: str | None = None, temp_root: str | os.PathLike | None = None,
                 keep_edited_copies: bool = True, show_3d: bool = True,
                 progress_callback: ProgressCallback | None = None,
                 stall_timeout_s: float = DEFAULT_STALL_TIMEOUT_S) -> None:
        self.scene = scene
        self.input_volume = input_volume
        self.options = options or RunOptions()
        self.python_executable = python_executable or default_python_executable()
        self.temp_root = temp_root
        self.keep_edited_copies = keep_edited_copies
        self.show_3d = show_3d
        self.progress_callback = progress_callback
        self.stall_timeout_s = stall_timeout_s
        self.state = RunState.CREATED
        self.last_progress: ProgressEvent | None = None
        self.fraction = 0.0
        self.result_nodes: scene_updates.ResultNodes | None = None
        self.summary: dict = {}
        self.error: EngineRunError | None = None
        self.exit_status: int | None = None
        self.elapsed_s = 0.0
        self._child: ChildProcess | None = None
        self._work_dir: Path | None = None
        self._done: DoneEvent | None = None
        self._engine_error: ErrorEvent | None = None
        self._stalled = False
        self._start_time_s = 0.0

    @property
    def child_pid(self) -> int | None:
        return self._child.pid if self._child is not None else None

    @property
    def work_dir(self) -> Path | None:
        return self._work_dir

    def start(self) -> None:
        """Write the input to a temporary NRRD and start the engine.

        Raises:
            EngineRunError: the input is unusable, or the child could not be started.
        """
        if self.state is not RunState.CREATED:
            raise RuntimeError(f"run already started (state {self.state.value})")
        reason = scene_updates.check_input_volume(self.input_volume)
        if reason:
            raise EngineRunError(reason, code="invalid_input")
        self._start_time_s = time.monotonic()
        self._work_dir = Path(tempfile.mkdtemp(prefix="LiverTumorAI-", dir=self.temp_root))
        try:
            input_path = self._work_dir / _INPUT_FILE
            scene_updates.write_volume_nrrd(self.input_volume, input_path)
            command = engine_command(self.python_executable, input_path,
                                     self._work_dir / _OUTPUT_FOLDER,
                                     self.options.engine_arguments())
            environment = dict(os.environ, PYTHONUNBUFFERED="1")
            self._child = ChildProcess(command, env=environment, cwd=self._work_dir)
        except (OSError, scene_updates.ResultsError) as error:
            self._remove_work_dir()
            raise EngineRunError(
                f"the segmentation engine could not be started: {error}",
                "Check that the temporary folder is writable and that the Python "
                f"interpreter {self.python_executable} exists.", code="start_failed",
            ) from error
        self.state = RunState.RUNNING
        logger.info("LiverTumorAI started on '%s' (pid %d) with options %s",
                    self.input_volume.GetName(), self._child.pid, self.options)

    def poll(self) -> RunState:
        """Handle the child's new output; on exit, load the results or record the error."""
        if self._child is None or self.state.finished:
            return self.state
        for stream, line in self._child.read_lines():
            self._handle_line(stream, line)
        if self.state is RunState.RUNNING and self._is_stalled():
            self._stalled = True
            self.cancel()
        status = self._child.poll()
        if status is not None:
            self._finish(status)
        return self.state

    def cancel(self) -> None:
        """Stop the child process tree; the scene stays as it was. Returns without waiting."""
        if self._child is None or self.state.finished:
            return
        if self.state is not RunState.CANCELLING:
            logger.info("cancelling LiverTumorAI run (pid %d)", self._child.pid)
            self.state = RunState.CANCELLING
            self._child.cancel(grace_s=CANCEL_GRACE_S)

    def wait(self, timeout_s: float, poll_interval_s: float = 0.1,
             idle_callback: Callable[[], None] | None = None) -> RunState:
        """Poll until the run finishes or `timeout_s` passes; return the state.

        `idle_callback` is called between polls (Slicer's tests pass
        `slicer.app.processEvents` so the application keeps drawing).
        """
        deadline = time.monotonic() + timeout_s
        while not self.poll().finished and time.monotonic() < deadline:
            if idle_callback is not None:
                idle_callback()
            time.sleep(poll_interval_s)
        return self.state

    # --- internals -----------------------------------------------------------------------

    def _handle_line(self, stream: str, line: str) -> None:
        if stream == "stderr":
            logger.info("engine: %s", line)
            return
        event = parse_event_line(line)
        if isinstance(event, ProgressEvent):
            self.last_progress = event
            self.fraction = max(self.fraction, overall_fraction(event))
            if self.progress_callback is not None:
                self.progress_callback(event, self.fraction)
        elif isinstance(event, DoneEvent):
            self._done = event
        elif isinstance(event, ErrorEvent):
            self._engine_error = event
        elif line.strip():
            logger.warning("unexpected engine output on stdout: %s", line)

    def _is_stalled(self) -> bool:
        return time.monotonic() - self._child.last_output_time_s > self.stall_timeout_s

    def _finish(self, status: int) -> None:
        self.exit_status = status
        self.elapsed_s = time.monotonic() - self._start_time_s
        try:
            if self.state is RunState.CANCELLING and not self._stalled:
                self.state = RunState.CANCELLED
                logger.info("LiverTumorAI run cancelled after %.1f s; the scene is unchanged",
                            self.elapsed_s)
            elif status == 0 and self._done is not None:
                self._load_results()
            else:
                self._fail(self._error_for(status))
        finally:
            self._remove_work_dir()

    def _load_results(self) -> None:
        output_dir = self._done.output_dir or str(self._work_dir / _OUTPUT_FOLDER)
        try:
            results = scene_updates.load_engine_results(output_dir)
            self.result_nodes = scene_updates.update_scene(
                self.scene, self.input_volume, results,
                keep_edited_copies=self.keep_edited_copies, show_3d=self.show_3d)
        except (scene_updates.ResultsError, OSError, ValueError) as error:
            self._fail(EngineRunError(
                f"the engine finished but its results could not be loaded: {error}",
                "Run again; if it fails again, report this message with the details.",
                details=self._details(0), code="results"))
            return
        self.summary = results.summary
        self.state = RunState.SUCCEEDED
        logger.info("LiverTumorAI completed in %.1f s: %s", self.elapsed_s,
                    self.summary.get("message", ""))

    def _error_for(self, status: int) -> EngineRunError:
        details = self._details(status)
        if self._stalled:
            return EngineRunError(
                f"the engine wrote nothing for {self.stall_timeout_s:.0f} s and was stopped",
                "Run again with the device set to CPU; if it hangs again, report the details.",
                details, code="stalled")
        if self._engine_error is not None:
            return EngineRunError(self._engine_error.message, self._engine_error.hint,
                                  details, code=self._engine_error.code)
        return EngineRunError(
            f"the segmentation engine stopped with exit status {status} and no error message",
            "Install the dependencies again (LiverTumorAI module, Dependencies section) "
            "and restart Slicer; if it fails again, report the details.",
            details, code="crashed")

    def _details(self, status: int) -> str:
        tail = "\n".join(self._child.stderr_tail) if self._child is not None else ""
        return f"exit status: {status}\ncommand: {' '.join(self._child.command)}\n\n{tail}"

    def _fail(self, error: EngineRunError) -> None:
        self.error = error
        self.state = RunState.FAILED
        logger.error("LiverTumorAI run failed (%s): %s %s", error.code, error.message,
                     error.hint)

    def _remove_work_dir(self) -> None:
        if self._work_dir is not None:
            shutil.rmtree(self._work_dir, ignore_errors=True)
