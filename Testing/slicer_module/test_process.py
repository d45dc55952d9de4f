"""The engine's child process: JSON events, progress fraction, real runs, tree cancel.

Standard library and the real engine only; slicer-core is not needed.
"""

from __future__ import annotations

import json
import os
import sys
import textwrap
import time
from importlib import metadata

import pytest

from LiverTumorAILib.process import (
    ENGINE_STAGES,
    ChildProcess,
    DoneEvent,
    ErrorEvent,
    ProgressEvent,
    device_probe_command,
    engine_command,
    overall_fraction,
    parse_device_probe,
    parse_event_line,
)
from livertumorai.cli import EXIT_INVALID_INPUT, EXIT_OK
from scene_helpers import SMALL_CT

RUN_TIMEOUT_S = 120.0


def _events(child: ChildProcess, timeout_s: float = RUN_TIMEOUT_S):
    """Wait for the child to exit; return its exit status and its stdout events."""
    status, lines = child.wait(timeout_s)
    return status, [parse_event_line(line) for stream, line in lines if stream == "stdout"]


def _process_exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


@pytest.mark.parametrize("line, expected", [
    ('{"event": "progress", "stage": "segment", "done": 40, "total": 129, "message": "m"}',
     ProgressEvent("segment", 40, 129, "m")),
    ('{"event": "done", "output_dir": "/tmp/out", "summary": {"lesion_count": 2}}',
     DoneEvent("/tmp/out", {"lesion_count": 2})),
    ('{"event": "error", "code": "weights", "message": "bad file", "hint": "reinstall"}',
     ErrorEvent("weights", "bad file", "reinstall")),
    ("  {\"event\": \"progress\", \"stage\": \"read\", \"done\": 0, \"total\": 1}\n",
     ProgressEvent("read", 0, 1, "")),
    ("WARNING some log line", None),
    ("[1, 2]", None),
    ('{"event": "other"}', None),
    ('{"event": "progress", ', None),
    ("", None),
])
def test_parse_event_line(line, expected):
    assert parse_event_line(line) == expected


@pytest.mark.parametrize("event, expected", [
    (ProgressEvent("read", 0, 1), 0.0),
    (ProgressEvent("classify", 15, 30), (5 + 3 + 15) / 100),
    (ProgressEvent("segment", 0, 0), (5 + 3 + 30) / 100),
    (ProgressEvent("write", 1, 1), 1.0),
    (ProgressEvent("unknown", 1, 1), 0.0),
])
def test_overall_fraction(event, expected):
    assert overall_fraction(event) == pytest.approx(expected)


def test_stage_shares_sum_to_100_percent():
    assert sum(share for _, share in ENGINE_STAGES) == 100


def test_engine_command_runs_engine(shared_data_dir, tiny_weights, tmp_path):
    output = tmp_path / "out"
    command = engine_command(sys.executable, shared_data_dir / "fixtures" / SMALL_CT, output,
                             ["--weights", str(tiny_weights), "--device", "cpu",
                              "--no-overview"])
    child = ChildProcess(command, env=dict(os.environ), cwd=tmp_path)

    status, events = _events(child)

    assert status == EXIT_OK, "\n".join(child.stderr_tail)
    stages = [e.stage for e in events if isinstance(e, ProgressEvent)]
    assert list(dict.fromkeys(stages)) == [stage for stage, _ in ENGINE_STAGES]
    assert isinstance(events[-1], DoneEvent)
    assert events[-1].output_dir == str(output.resolve())
    assert (output / "segmentation.seg.nrrd").is_file()
    assert events[-1].summary["lesion_count"] == len(
        json.loads((output / "report.json").read_text())["measurements"]["lesions"])


def test_engine_error_event_for_missing_input(tiny_weights, tmp_path):
    output = tmp_path / "out"
    command = engine_command(sys.executable, tmp_path / "absent.nii.gz", output,
                             ["--weights", str(tiny_weights), "--device", "cpu"])
    child = ChildProcess(command, env=dict(os.environ))

    status, events = _events(child)

    assert status == EXIT_INVALID_INPUT
    errors = [e for e in events if isinstance(e, ErrorEvent)]
    assert len(errors) == 1
    assert errors[0].code == "invalid_input"
    assert "absent.nii.gz" in errors[0].message
    assert errors[0].hint
    assert not output.exists()


@pytest.mark.skipif(os.name == "nt", reason="POSIX process groups and signals")
def test_cancel_kills_process_tree(tmp_path):
    # The child and the grandchild it starts both ignore SIGTERM, so only the forced kill
    # of the whole process group after the grace time stops them.
    script = textwrap.dedent("""
        import json, signal, subprocess, sys, time
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        grandchild = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
        print(json.dumps({"event": "progress", "stage": "read", "done": 0, "total": 1,
                          "message": str(grandchild.pid)}), flush=True)
        time.sleep(120)
    """)
    child = ChildProcess([sys.executable, "-c", script])
    grandchild_pid = None
    deadline = time.monotonic() + 30.0
    while grandchild_pid is None and time.monotonic() < deadline:
        for stream, line in child.read_lines():
            event = parse_event_line(line) if stream == "stdout" else None
            if isinstance(event, ProgressEvent):
                grandchild_pid = int(event.message)
        time.sleep(0.05)
    assert grandchild_pid is not None, "\n".join(child.stderr_tail)

    started = time.monotonic()
    child.cancel(grace_s=0.5)
    status, _ = child.wait(timeout_s=30.0)

    assert status is not None
    assert status < 0  # killed by a signal
    assert time.monotonic() - started < 10.0
    deadline = time.monotonic() + 5.0
    while _process_exists(grandchild_pid) and time.monotonic() < deadline:
        time.sleep(0.05)  # the grandchild is reparented to init, which reaps it
    assert not _process_exists(grandchild_pid)


def test_device_probe_reports_torch():
    child = ChildProcess(device_probe_command(sys.executable))

    status, lines = child.wait(timeout_s=RUN_TIMEOUT_S)

    assert status == 0, "\n".join(child.stderr_tail)
    probe = parse_device_probe([line for stream, line in lines if stream == "stdout"])
    assert probe is not None
    assert probe["torch"].split("+")[0] == metadata.version("torch").split("+")[0]
    assert isinstance(probe["cuda"], bool)


def test_parse_device_probe_without_json():
    assert parse_device_probe(["Traceback (most recent call last):", "ImportError"]) is None
