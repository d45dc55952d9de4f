"""The engine's child process: command line, JSON progress events, process-tree cancel.

The Slicer module never imports torch or runs a network in the application process. It
starts ``livertumorai segment ... --progress json`` with Slicer's own Python launcher
(``PythonSlicer``) and reads one JSON object per line from the child's stdout. Two reader
threads move stdout and stderr lines into a queue. Every other method runs on the caller's
thread, so a Qt timer in Slicer (or a plain loop in a test) polls without blocking.

The child starts in its own process group (POSIX) or process group and console (Windows),
so cancelling reaches every process it started. Nothing here imports `slicer` or Qt.
"""

from __future__ import annotations

import json
import logging
import os
import queue
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Union

logger = logging.getLogger(__name__)

__all__ = [
    "ENGINE_STAGES",
    "ProgressEvent",
    "DoneEvent",
    "ErrorEvent",
    "EngineEvent",
    "parse_event_line",
    "overall_fraction",
    "ChildProcess",
    "default_python_executable",
    "module_directory",
    "engine_command",
    "device_probe_command",
    "parse_device_probe",
]

# Stages of `livertumorai segment` in the order it runs them, each with its share (percent)
# of the progress bar. The shares are estimates of a CPU run of the bundled networks, where
# the U-Net dominates; they only shape the bar and affect nothing else.
ENGINE_STAGES = (
    ("read", 5),
    ("preprocess", 3),
    ("classify", 30),
    ("segment", 50),
    ("postprocess", 7),
    ("write", 5),
)

# Lines of the child's stderr kept for error details (the end of a traceback fits).
STDERR_TAIL_LINES = 60

# Python code the child runs: put the folder that contains the `livertumorai` package first
# on sys.path, then run its command line. This works whether or not the launcher keeps
# PYTHONPATH (PythonSlicer sets its own paths).
_ENGINE_BOOTSTRAP = (
    "import sys; sys.path.insert(0, sys.argv.pop(1)); "
    "from livertumorai.cli import run; run()"
)
_DEVICE_PROBE = (
    "import json, torch; cuda = torch.cuda.is_available(); "
    "print(json.dumps({'torch': torch.__version__, 'cuda': cuda, "
    "'name': torch.cuda.get_device_name(0) if cuda else ''}))"
)


@dataclass(frozen=True)
class ProgressEvent:
    """One `{"event": "progress", ...}` line: `done` of `total` steps of `stage` finished."""

    stage: str
    done: int
    total: int
    message: str = ""


@dataclass(frozen=True)
class DoneEvent:
    """The `{"event": "done", ...}` line: the output folder and the report summary."""

    output_dir: str
    summary: dict = field(default_factory=dict)


@dataclass(frozen=True)
class ErrorEvent:
    """The `{"event": "error", ...}` line: error code, message and what to do about it."""

    code: str
    message: str
    hint: str = ""


EngineEvent = Union[ProgressEvent, DoneEvent, ErrorEvent]


def parse_event_line(line: str) -> Optional[EngineEvent]:
    """Parse one stdout line of `livertumorai segment --progress json`.

    Returns:
        The event, or None for a blank line, a line that is not a JSON object, or an
        object whose `event` is not progress, done or error.
    """
    text = line.strip()
    if not text.startswith("{"):
        return None
    try:
        data = json.loads(text)
    except ValueError:
        return None
    if not isinstance(data, dict):
        return None
    kind = data.get("event")
    if kind == "progress":
        return ProgressEvent(str(data.get("stage", "")), int(data.get("done", 0)),
                             int(data.get("total", 0)), str(data.get("message", "")))
    if kind == "done":
        return DoneEvent(str(data.get("output_dir", "")), dict(data.get("summary") or {}))
    if kind == "error":
        return ErrorEvent(str(data.get("code", "error")), str(data.get("message", "")),
                          str(data.get("hint", "")))
    return None


def overall_fraction(event: ProgressEvent) -> float:
    """Return the fraction (0..1) of the whole run finished at a progress event.

    Stages before `event.stage` count as finished; the current stage counts by
    `done / total`. An unknown stage returns 0.
    """
    finished_percent = 0.0
    for stage, share_percent in ENGINE_STAGES:
        if stage == event.stage:
            within = event.done / event.total if event.total > 0 else 0.0
            finished_percent += share_percent * min(max(within, 0.0), 1.0)
            return finished_percent / 100.0
        finished_percent += share_percent
    return 0.0


def module_directory() -> Path:
    """Return the folder holding `LiverTumorAI.py` and the `livertumorai` engine package."""
    return Path(__file__).resolve().parent.parent


def default_python_executable() -> str:
    """Return the Python that runs the engine: Slicer's `PythonSlicer`, else this Python.

    Inside the Slicer application `sys.executable` is the application itself, so the
    launcher `PythonSlicer` (which sets Slicer's library paths) is looked up on PATH.
    """
    slicer_module = sys.modules.get("slicer")
    if slicer_module is not None and hasattr(slicer_module, "app"):
        launcher = shutil.which("PythonSlicer")
        if launcher:
            return launcher
        logger.warning("PythonSlicer was not found on PATH; running the engine with %s",
                       sys.executable)
    return sys.executable


def engine_command(python_executable: str, input_path: str | os.PathLike,
                   output_dir: str | os.PathLike, arguments: Sequence[str] = (),
                   engine_parent_dir: str | os.PathLike | None = None) -> list[str]:
    """Build the child command `livertumorai segment INPUT -o OUTPUT --progress json ...`.

    Args:
        python_executable: interpreter to run (see `default_python_executable`).
        input_path: CT file the engine reads.
        output_dir: folder the engine creates.
        arguments: further `livertumorai segment` options.
        engine_parent_dir: folder that contains the `livertumorai` package; defaults to
            `module_directory()`.
    """
    parent = Path(engine_parent_dir) if engine_parent_dir else module_directory()
    return [
        python_executable, "-c", _ENGINE_BOOTSTRAP, str(parent),
        "segment", str(input_path), "-o", str(output_dir), "--progress", "json",
        *arguments,
    ]


def device_probe_command(python_executable: str) -> list[str]:
    """Build a command that prints torch's version and CUDA device as one JSON line."""
    return [python_executable, "-c", _DEVICE_PROBE]


def parse_device_probe(stdout_lines: Sequence[str]) -> dict | None:
    """Return the probe's JSON object ({'torch', 'cuda', 'name'}) or None if absent."""
    for line in reversed(stdout_lines):
        text = line.strip()
        if text.startswith("{"):
            try:
                data = json.loads(text)
            except ValueError:
                continue
            if isinstance(data, dict) and "cuda" in data:
                return data
    return None


class ChildProcess:
    """A child process whose output lines are read without blocking the caller.

    Args:
        command: program and arguments.
        env: environment; None inherits this process's environment.
        cwd: working folder of the child.

    Call `read_lines()` now and then to collect output; `poll()` returns the exit status
    once the child has exited and both pipes are drained. `stderr_tail` keeps the last
    `STDERR_TAIL_LINES` lines of stderr for error messages.
    """

    def __init__(self, command: Sequence[str], env: dict | None = None,
                 cwd: str | os.PathLike | None = None) -> None:
        self.command = list(command)
        self.stderr_tail: deque[str] = deque(maxlen=STDERR_TAIL_LINES)
        self.last_output_time_s = time.monotonic()
        self._lines: queue.Queue = queue.Queue()
        self._open_streams = 2
        self._kill_deadline_s: float | None = None
        self._cancel_requested = False
        self.process = subprocess.Popen(
            self.command, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            stdin=subprocess.DEVNULL, env=env, cwd=cwd, text=True, encoding="utf-8",
            errors="replace", bufsize=1, **_new_process_group_options(),
        )
        logger.debug("started pid %d: %s", self.process.pid, " ".join(self.command))
        for name, stream in (("stdout", self.process.stdout), ("stderr", self.process.stderr)):
            thread = threading.Thread(target=self._pump, args=(name, stream),
                                      name=f"LiverTumorAI {name} reader", daemon=True)
            thread.start()

    @property
    def pid(self) -> int:
        return self.process.pid

    def _pump(self, name: str, stream) -> None:
        try:
            for line in stream:
                self._lines.put((name, line.rstrip("\r\n")))
        finally:
            stream.close()
            self._lines.put((name, None))

    def read_lines(self) -> list[tuple[str, str]]:
        """Return the (stream name, line) pairs read since the last call, in order."""
        lines = []
        while True:
            try:
                name, line = self._lines.get_nowait()
            except queue.Empty:
                break
            if line is None:
                self._open_streams -= 1
                continue
            self.last_output_time_s = time.monotonic()
            if name == "stderr":
                self.stderr_tail.append(line)
            lines.append((name, line))
        return lines

    def poll(self) -> int | None:
        """Return the exit status once the child has exited and its output is read, else None.

        While a cancel is pending this also escalates to a forced kill after the grace time.
        """
        status = self.process.poll()
        if status is None:
            if self._kill_deadline_s is not None and time.monotonic() >= self._kill_deadline_s:
                self.kill_tree()
            return None
        if self._cancel_requested and self._kill_deadline_s is not None:
            # The child has exited; processes it started may still hold the pipes open.
            self.kill_tree()
        if self._open_streams > 0:
            return None
        return status

    def cancel(self, grace_s: float = 5.0) -> None:
        """Ask the whole process tree to stop, and kill it if still running after `grace_s`.

        On POSIX the process group gets SIGTERM, on which the engine stops before its next
        batch and removes its partial output. `poll()` sends SIGKILL when the grace time
        has passed. On Windows the tree is killed at once with `taskkill /T /F`, because a
        console child cannot be sent SIGTERM. Returns without waiting.
        """
        if self.process.poll() is not None:
            return
        self._cancel_requested = True
        if os.name == "nt":
            self.kill_tree()
            return
        logger.info("sending SIGTERM to process group %d", self.process.pid)
        _signal_group(self.process.pid, signal.SIGTERM)
        self._kill_deadline_s = time.monotonic() + grace_s

    def kill_tree(self) -> None:
        """Kill the child and every process in its group now."""
        if os.name == "nt":
            subprocess.run(["taskkill", "/PID", str(self.process.pid), "/T", "/F"],
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=False,
                           creationflags=getattr(subprocess, "CREATE_NO_WINDOW", 0))
        else:
            logger.info("sending SIGKILL to process group %d", self.process.pid)
            _signal_group(self.process.pid, signal.SIGKILL)
        self._kill_deadline_s = None

    def wait(self, timeout_s: float,
             poll_interval_s: float = 0.05) -> tuple[int | None, list[tuple[str, str]]]:
        """Poll until the child exits or `timeout_s` passes.

        Returns:
            The exit status (None on timeout) and the (stream name, line) pairs read.
        """
        lines = []
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            lines += self.read_lines()
            status = self.poll()
            if status is not None:
                return status, lines
            time.sleep(poll_interval_s)
        return None, lines


def _new_process_group_options() -> dict:
    if os.name == "nt":
        flags = (getattr(subprocess, "CREATE_NEW_PROCESS_GROUP", 0)
                 | getattr(subprocess, "CREATE_NO_WINDOW", 0))
        return {"creationflags": flags}
    return {"start_new_session": True}


def _signal_group(group_id: int, signum: int) -> None:
    try:
        os.killpg(group_id, signum)
    except ProcessLookupError:
        pass  # the group has already exited
