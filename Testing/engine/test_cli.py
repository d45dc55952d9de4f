"""Command line end to end: outputs on the input grid, errors, exit codes, JSON progress."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from livertumorai import cli
from livertumorai.cli import (
    EXIT_CANCELLED,
    EXIT_INVALID_INPUT,
    EXIT_OK,
    EXIT_USAGE,
    EXIT_WEIGHTS,
    main,
)

SMALL_FIXTURES = (
    "ircadb1.17_small_axial_lps.nii.gz",
    "ircadb1.17_small_axial_flipped_xy.nii.gz",
    "ircadb1.17_small_feet_first.nrrd",
    "ircadb1.17_small_coronal_stack.mha",
    "ircadb1.17_small_oblique15.nii.gz",
    "siemens_pelvis_abdomen_3mm.nii.gz",
)


def _assert_same_grid(image: sitk.Image, reference: sitk.Image) -> None:
    assert image.GetSize() == reference.GetSize()
    np.testing.assert_allclose(image.GetSpacing(), reference.GetSpacing(), rtol=1e-6)
    np.testing.assert_allclose(image.GetOrigin(), reference.GetOrigin(), atol=1e-4)
    np.testing.assert_allclose(image.GetDirection(), reference.GetDirection(), atol=1e-6)


def _no_partial_folders(parent: Path) -> None:
    leftovers = [p.name for p in parent.iterdir() if ".partial" in p.name]
    assert leftovers == []


@pytest.mark.parametrize("name", SMALL_FIXTURES)
def test_outputs_on_input_grid(shared_data_dir, tiny_weights, tmp_path, name):
    source = shared_data_dir / "fixtures" / name
    output = tmp_path / "out"

    status = main(["segment", str(source), "-o", str(output), "--weights", str(tiny_weights),
                   "--labelmap", "--probability-map", "--no-gating", "-q"])

    assert status == EXIT_OK
    reference = sitk.ReadImage(str(source))
    for file_name in ("segmentation.seg.nrrd", "labels.nii.gz", "tumor_probability.nii.gz"):
        _assert_same_grid(sitk.ReadImage(str(output / file_name)), reference)
    report = json.loads((output / "report.json").read_text())
    slice_axis = report["input"]["axial_slice_axis_zyx"]
    num_slices = sitk.GetArrayViewFromImage(reference).shape[slice_axis]
    rows = (output / "slices.csv").read_text().strip().splitlines()
    assert len(rows) == num_slices + 1
    assert (output / "overview.png").stat().st_size > 10_000
    assert set(report["timings_s"]) >= {"read", "preprocess", "classify", "segment",
                                        "postprocess", "write", "total"}


def test_slices_csv_in_input_order(shared_data_dir, tiny_weights, tmp_path):
    """Feet-first storage: slice index 0 is the most superior, so RAS z decreases."""
    output = tmp_path / "out"

    main(["segment", str(shared_data_dir / "fixtures" / "ircadb1.17_small_feet_first.nrrd"),
          "-o", str(output), "--weights", str(tiny_weights), "-q"])

    lines = (output / "slices.csv").read_text().strip().splitlines()
    header = lines[0].split(",")
    rows = [dict(zip(header, line.split(","))) for line in lines[1:]]
    assert [int(r["slice_index"]) for r in rows] == list(range(len(rows)))
    positions = [float(r["position_ras_z_mm"]) for r in rows]
    assert positions[0] > positions[-1]
    probabilities = np.array([[float(r[k]) for k in ("p_background", "p_tumor", "p_no_tumor")]
                              for r in rows])
    np.testing.assert_allclose(probabilities.sum(axis=1), 1.0, atol=2e-4)


def test_single_slice_volume_classified(shared_data_dir, tiny_weights, tmp_path):
    ct = sitk.ReadImage(str(shared_data_dir / "fixtures" / "ircadb1.17_small_axial_lps.nii.gz"))
    one_slice = ct[:, :, 30:31]
    source = tmp_path / "one_slice.nrrd"
    sitk.WriteImage(one_slice, str(source))

    status = main(["segment", str(source), "-o", str(tmp_path / "out"), "--weights",
                   str(tiny_weights), "-q", "--labelmap"])

    assert status == EXIT_OK
    rows = (tmp_path / "out" / "slices.csv").read_text().strip().splitlines()
    assert len(rows) == 2
    _assert_same_grid(sitk.ReadImage(str(tmp_path / "out" / "labels.nii.gz")), one_slice)


def test_no_liver_found_reported(shared_data_dir, tiny_weights, tmp_path):
    output = tmp_path / "out"

    status = main(["segment", str(shared_data_dir / "fixtures" / "ircadb1.17_small_axial_lps.nii.gz"),
                   "-o", str(output), "--weights", str(tiny_weights), "-q",
                   "--gating-threshold", "0.9999", "--gating-margin-mm", "0"])

    assert status == EXIT_OK
    report = json.loads((output / "report.json").read_text())
    assert report["summary"]["message"] == "no liver found"
    assert report["summary"]["liver_found"] is False
    assert report["liver"]["centroid_ras"] is None
    assert any("No liver found" in w for w in report["warnings"])


@pytest.mark.parametrize(
    "make_input, expected_text",
    [
        (lambda d: d / "missing.nii.gz", "missing.nii.gz"),
        (lambda d: _write_bytes(d / "empty.nii.gz", b""), "empty"),
        (lambda d: _write_bytes(d / "text.nrrd", b"hello, not an image\n"), "text.nrrd"),
        (lambda d: _mkdir(d / "no_dicom"), "no_dicom"),
        (lambda d: _write_image(d / "mask.nrrd", np.random.default_rng(0).integers(
            0, 255, (8, 32, 32)).astype(np.uint8)), "mask.nrrd"),
        (lambda d: _write_image(d / "nan.nrrd", _with_nan()), "nan.nrrd"),
    ],
    ids=["missing", "empty", "text", "folder_without_dicom", "uint8_0_255", "nan"],
)
def test_bad_input_exit_code(tiny_weights, tmp_path, capsys, make_input, expected_text):
    source = make_input(tmp_path)
    output = tmp_path / "out"

    status = main(["segment", str(source), "-o", str(output), "--weights", str(tiny_weights)])

    assert status == EXIT_INVALID_INPUT
    assert expected_text in capsys.readouterr().err
    assert not output.exists()
    _no_partial_folders(tmp_path)


def test_existing_output_needs_overwrite(shared_data_dir, tiny_weights, tmp_path, capsys):
    source = shared_data_dir / "fixtures" / "ircadb1.17_small_axial_lps.nii.gz"
    output = tmp_path / "out"
    output.mkdir()
    (output / "keep.txt").write_text("earlier results")

    status = main(["segment", str(source), "-o", str(output), "--weights", str(tiny_weights)])

    assert status == EXIT_USAGE
    assert "--overwrite" in capsys.readouterr().err
    assert (output / "keep.txt").read_text() == "earlier results"
    assert main(["segment", str(source), "-o", str(output), "--weights", str(tiny_weights),
                 "--overwrite", "-q"]) == EXIT_OK
    assert not (output / "keep.txt").exists()
    assert (output / "report.json").exists()


def test_failed_overwrite_keeps_old_output(tiny_weights, tmp_path):
    output = tmp_path / "out"
    output.mkdir()
    (output / "keep.txt").write_text("earlier results")

    status = main(["segment", str(tmp_path / "missing.nii"), "-o", str(output), "--weights",
                   str(tiny_weights), "--overwrite"])

    assert status == EXIT_INVALID_INPUT
    assert (output / "keep.txt").read_text() == "earlier results"


def test_corrupt_weights_exit_code(shared_data_dir, tiny_weights, tmp_path, capsys):
    broken = tmp_path / "weights"
    broken.mkdir()
    for path in tiny_weights.parent.iterdir():
        (broken / path.name).write_bytes(path.read_bytes())
    segmenter = next(broken.glob("tiny-segmenter*.safetensors"))
    segmenter.write_bytes(segmenter.read_bytes()[:-10])

    status = main(["segment", str(shared_data_dir / "fixtures" / "ircadb1.17_small_axial_lps.nii.gz"),
                   "-o", str(tmp_path / "out"), "--weights", str(broken)])

    assert status == EXIT_WEIGHTS
    error = capsys.readouterr().err
    assert segmenter.name in error
    assert "sha256" in error
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    "extra, expected_text",
    [
        (["--tumor-threshold", "1.5"], "tumor threshold is 1.5"),
        (["--gating-margin-mm", "inf"], "not a finite number"),
        (["--min-lesion-mm3", "nan"], "not a finite number"),
        (["--min-lesion-mm3", "-1"], "minimum lesion volume"),
        (["--batch-size", "0"], "batch size is 0 slices"),
        (["--threads", "100000"], "from 1 to"),
        (["--device", "quantum"], "unknown device"),
    ],
)
def test_bad_option_exit_code(shared_data_dir, tiny_weights, tmp_path, capsys, extra,
                              expected_text):
    status = main(["segment", str(shared_data_dir / "fixtures" / "ircadb1.17_small_axial_lps.nii.gz"),
                   "-o", str(tmp_path / "out"), "--weights", str(tiny_weights), *extra])

    assert status == EXIT_USAGE
    assert expected_text in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_help_lists_exit_codes_and_units(capsys):
    with pytest.raises(SystemExit):
        main(["segment", "--help"])

    text = capsys.readouterr().out
    assert "exit codes" in text
    assert "mm^3" in text
    assert "(0-1)" in text


def test_json_progress_protocol(shared_data_dir, tiny_weights, tmp_path, capsys):
    status = main(["segment", str(shared_data_dir / "fixtures" / "ircadb1.17_small_axial_lps.nii.gz"),
                   "-o", str(tmp_path / "out"), "--weights", str(tiny_weights),
                   "--progress", "json"])

    assert status == EXIT_OK
    events = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert all(e["event"] == "progress" for e in events[:-1])
    assert {e["stage"] for e in events[:-1]} == set(cli_stages())
    assert events[-1]["event"] == "done"
    assert events[-1]["output_dir"] == str((tmp_path / "out").resolve())
    assert "liver_volume_ml" in events[-1]["summary"]


def test_json_error_event(tiny_weights, tmp_path, capsys):
    status = main(["segment", str(tmp_path / "nothing_here"), "-o", str(tmp_path / "out"),
                   "--weights", str(tiny_weights), "--progress", "json"])

    assert status == EXIT_INVALID_INPUT
    lines = capsys.readouterr().out.splitlines()
    event = json.loads(lines[-1])
    assert event["event"] == "error"
    assert event["code"] == "invalid_input"
    assert "nothing_here" in event["message"]
    assert event["hint"]


def test_sigterm_cancels_without_output(shared_data_dir, tiny_weights, tmp_path):
    """SIGTERM after the first progress line: exit code 6 and no output folder."""
    source = shared_data_dir / "train" / "ircadb1.7" / "ct.nii.gz"
    output = tmp_path / "out"
    process = subprocess.Popen(
        [sys.executable, "-m", "livertumorai", "segment", str(source), "-o", str(output),
         "--weights", str(tiny_weights), "--progress", "json", "--batch-size", "1",
         "--no-gating"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    first = json.loads(process.stdout.readline())
    process.send_signal(signal.SIGTERM)
    remaining, _ = process.communicate(timeout=120)

    assert first["event"] == "progress"
    assert process.returncode == EXIT_CANCELLED
    assert json.loads(remaining.splitlines()[-1])["code"] == "cancelled"
    assert not output.exists()
    _no_partial_folders(tmp_path)


def test_console_script_runs(shared_data_dir, tiny_weights, tmp_path):
    result = subprocess.run(
        ["livertumorai", "segment", str(shared_data_dir / "fixtures" / "ircadb1.17_small_axial_lps.nii.gz"),
         "-o", str(tmp_path / "out"), "--weights", str(tiny_weights)],
        capture_output=True, text=True, timeout=120,
    )

    assert result.returncode == EXIT_OK, result.stderr
    assert "outputs:" in result.stdout


def cli_stages():
    from livertumorai.pipeline import STAGES

    return STAGES


def _write_bytes(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def _mkdir(path: Path) -> Path:
    path.mkdir()
    (path / "notes.txt").write_text("no images here")
    return path


def _write_image(path: Path, array: np.ndarray) -> Path:
    sitk.WriteImage(sitk.GetImageFromArray(array), str(path))
    return path


def _with_nan() -> np.ndarray:
    array = np.full((8, 32, 32), -1000.0, dtype=np.float32)
    array[:, 8:24, 8:24] = 40.0
    array[4, 16, 16] = np.nan
    return array


_ = cli


def test_overwrite_never_replaces_input_folder(shared_data_dir, tiny_weights, tmp_path, capsys):
    folder = tmp_path / "case"
    folder.mkdir()
    source = folder / "ct.nii.gz"
    source.write_bytes((shared_data_dir / "fixtures" / "ircadb1.17_small_axial_lps.nii.gz").read_bytes())

    status = main(["segment", str(source), "-o", str(folder), "--weights", str(tiny_weights),
                   "--overwrite"])

    assert status == EXIT_USAGE
    assert "contains the input" in capsys.readouterr().err
    assert source.exists()


def test_overwrite_never_replaces_current_folder(shared_data_dir, tiny_weights, tmp_path,
                                                 monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "notes.txt").write_text("keep me")

    status = main(["segment", str(shared_data_dir / "fixtures" / "ircadb1.17_small_axial_lps.nii.gz"),
                   "-o", ".", "--weights", str(tiny_weights), "--overwrite"])

    assert status == EXIT_USAGE
    assert "current folder" in capsys.readouterr().err
    assert (tmp_path / "notes.txt").read_text() == "keep me"


def test_cancel_during_write_discards_folder(shared_data_dir, tiny_weights, tmp_path):
    from livertumorai.errors import RunCancelledError
    from livertumorai.pipeline import SegmentOptions, segment_ct

    stages = []

    def progress(stage, done, total, message):
        stages.append(stage)

    output = tmp_path / "out"
    with pytest.raises(RunCancelledError):
        segment_ct(shared_data_dir / "fixtures" / "ircadb1.17_small_axial_lps.nii.gz", output,
                   SegmentOptions(weights=str(tiny_weights)), progress=progress,
                   cancel=lambda: "write" in stages)

    assert "write" in stages
    assert not output.exists()
    _no_partial_folders(tmp_path)


def test_done_event_carries_warnings(shared_data_dir, tiny_weights, tmp_path, capsys):
    status = main(["segment", str(shared_data_dir / "fixtures" / "ircadb1.17_small_axial_lps.nii.gz"),
                   "-o", str(tmp_path / "out"), "--weights", str(tiny_weights),
                   "--progress", "json", "--gating-threshold", "0.9999", "--gating-margin-mm", "0"])

    assert status == EXIT_OK
    done = json.loads(capsys.readouterr().out.splitlines()[-1])
    assert any("No liver found" in w for w in done["summary"]["warnings"])


def test_disk_full_has_own_exit_code():
    from livertumorai.cli import EXIT_OUTPUT_WRITE, _exit_code_for

    status, code = _exit_code_for(OSError(28, "No space left on device"))

    assert status == EXIT_OUTPUT_WRITE
    assert code == "output_write"


def test_output_inside_input_folder_rejected(tiny_weights, tmp_path, capsys):
    series = tmp_path / "series"
    series.mkdir()
    (series / "IM0001.dcm").write_bytes(b"not read: the output check comes first")

    status = main(["segment", str(series), "-o", str(series / "out"), "--weights",
                   str(tiny_weights)])

    assert status == EXIT_USAGE
    assert "inside the input folder" in capsys.readouterr().err
    assert sorted(path.name for path in series.iterdir()) == ["IM0001.dcm"]


@pytest.mark.skipif(os.geteuid() == 0, reason="root may write into read-only folders")
def test_unwritable_parent_exit_code(shared_data_dir, tiny_weights,
                                                        tmp_path, capsys):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        status = main(["segment", str(shared_data_dir / "fixtures" / "ircadb1.17_small_axial_lps.nii.gz"),
                       "-o", str(locked / "out"), "--weights", str(tiny_weights)])
    finally:
        locked.chmod(0o700)

    assert status == cli.EXIT_OUTPUT_WRITE
    assert "not writable" in capsys.readouterr().err


def test_output_write_error_exit_code():
    from livertumorai.errors import OutputWriteError

    error = OutputWriteError("The output folder /x cannot be created.", "Choose another.")

    assert cli._exit_code_for(error) == (cli.EXIT_OUTPUT_WRITE, "output_write")


def test_write_thread_error_exit_code(shared_data_dir, tiny_weights, tmp_path, capsys,
                                      monkeypatch):
    """A disk-full error on the label-writing thread ends the run like any write error."""
    from livertumorai import pipeline

    def fail_like_a_full_disk(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(pipeline, "write_segmentation_nrrd", fail_like_a_full_disk)
    output = tmp_path / "out"

    status = main(["segment", str(shared_data_dir / "fixtures" / "ircadb1.17_small_axial_lps.nii.gz"),
                   "-o", str(output), "--weights", str(tiny_weights)])

    assert status == cli.EXIT_OUTPUT_WRITE
    assert "No space left on device" in capsys.readouterr().err
    assert not output.exists()
    _no_partial_folders(tmp_path)


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_signal_during_imports_cancels(shared_data_dir, tiny_weights, tmp_path, signum):
    """A signal while the engine's libraries import: exit code 6, no traceback."""
    source = shared_data_dir / "fixtures" / "ircadb1.17_small_axial_lps.nii.gz"
    output = tmp_path / "out"
    # The command line imports torch and the engine after parsing its arguments. Those
    # imports take about 1 s or more, so a signal 0.3 s after start arrives during them.
    process = subprocess.Popen(
        [sys.executable, "-m", "livertumorai", "segment", str(source), "-o", str(output),
         "--weights", str(tiny_weights)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    try:
        process.communicate(timeout=0.3)
    except subprocess.TimeoutExpired:
        pass
    process.send_signal(signum)
    _, stderr = process.communicate(timeout=120)

    assert process.returncode == EXIT_CANCELLED, stderr
    assert "Traceback" not in stderr
    assert "cancelled" in stderr
    assert not output.exists()
    _no_partial_folders(tmp_path)


def test_program_ignores_signals_after_status(tmp_path):
    """After `run` has its status, SIGINT and SIGTERM no longer end the process."""
    script = (
        "import atexit, signal, sys\n"
        "from livertumorai import cli\n"
        "atexit.register(lambda: print(signal.getsignal(signal.SIGINT) is signal.SIG_IGN,"
        " signal.getsignal(signal.SIGTERM) is signal.SIG_IGN))\n"
        f"cli.run(['segment', {str(tmp_path / 'missing.nii')!r}, '-o',"
        f" {str(tmp_path / 'out')!r}])\n"
    )
    completed = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                               timeout=120)

    assert completed.returncode == EXIT_INVALID_INPUT, completed.stderr
    assert completed.stdout.split() == ["True", "True"]


@pytest.mark.parametrize("overwrite", [False, True])
def test_symlinked_output_rejected(tiny_weights, tmp_path, capsys, overwrite):
    target = tmp_path / "target"
    target.mkdir()
    (target / "keep.txt").write_text("earlier results")
    link = tmp_path / "link"
    link.symlink_to(target)

    status = main(["segment", str(tmp_path / "missing.nii"), "-o", str(link), "--weights",
                   str(tiny_weights)] + (["--overwrite"] if overwrite else []))

    assert status == EXIT_USAGE
    assert "symbolic link" in capsys.readouterr().err
    assert link.is_symlink()
    assert sorted(path.name for path in target.iterdir()) == ["keep.txt"]
    assert sorted(path.name for path in tmp_path.iterdir()) == ["link", "target"]
