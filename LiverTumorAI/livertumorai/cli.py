"""Command line: `livertumorai segment INPUT -o OUTPUT_DIR`.

This module alone configures logging and owns the terminal. Human messages go to stderr;
with `--progress json` stdout carries one JSON object per line and nothing else.
"""

from __future__ import annotations

import argparse
import errno
import json
import logging
import signal
import sys
import threading
from collections.abc import Sequence
from typing import NoReturn
from pathlib import Path

from . import __version__
from .constants import (DEFAULT_BATCH_SIZE, DEFAULT_MIN_LESION_VOLUME_MM3,
                        DEFAULT_TUMOR_THRESHOLD)
from .errors import (
    ConfigurationError,
    InvalidInputError,
    LiverTumorAIError,
    OutputExistsError,
    OutputWriteError,
    RunCancelledError,
    WeightsError,
)

logger = logging.getLogger("livertumorai")

EXIT_OK = 0
EXIT_UNEXPECTED = 1
EXIT_USAGE = 2
EXIT_INVALID_INPUT = 3
EXIT_WEIGHTS = 4
EXIT_OUT_OF_MEMORY = 5
EXIT_CANCELLED = 6
EXIT_OUTPUT_WRITE = 7

EXIT_CODES_HELP = f"""\
exit codes:
  {EXIT_OK}  success
  {EXIT_UNEXPECTED}  unexpected error (a bug: please report it with the --verbose log)
  {EXIT_USAGE}  bad usage: invalid option, GPU requested but absent, output folder exists
  {EXIT_INVALID_INPUT}  invalid input: missing, unreadable, not a CT in Hounsfield units,
     or a DICOM series with missing or duplicated slices
  {EXIT_WEIGHTS}  weights problem: manifest or weights file missing, corrupt or mismatched
  {EXIT_OUT_OF_MEMORY}  out of memory: lower --batch-size or use --device cpu
  {EXIT_CANCELLED}  cancelled by SIGINT or SIGTERM; no output folder was written
  {EXIT_OUTPUT_WRITE}  writing the outputs failed (disk full, read-only or no permission);
     no output folder was written
"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="livertumorai",
        description="Liver and liver-tumor analysis of abdominal CT: per-slice classification "
        "(VGG16) and liver/tumor segmentation (2-D U-Net).",
        epilog=EXIT_CODES_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)
    segment = commands.add_parser(
        "segment",
        help="classify and segment one CT",
        description="Classify every axial slice and segment liver and liver tumors of one CT. "
        "Writes segmentation.seg.nrrd, slices.csv, report.json and overview.png into "
        "OUTPUT_DIR, all on the input's grid.",
        epilog=EXIT_CODES_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )

    segment.add_argument("input", help="CT file (.nii, .nii.gz, .nrrd, .mha, .mhd) or DICOM folder")
    segment.add_argument("-o", "--output", required=True, metavar="OUTPUT_DIR",
                         help="output folder; created when the run succeeds")
    segment.add_argument("--overwrite", action="store_true",
                         help="replace OUTPUT_DIR if it exists (only after the run succeeds)")
    segment.add_argument("--device", default="auto",
                         help="auto (CUDA when present, else CPU), cpu, gpu, cuda or cuda:N "
                         "(default: %(default)s)")
    segment.add_argument("--weights", metavar="PATH",
                         help="weights manifest.json or a folder with one (default: "
                         "$LIVERTUMORAI_WEIGHTS_DIR, ~/.cache/livertumorai/weights, then the "
                         "bundled weights)")

    segment.add_argument("--tumor-threshold", type=float, default=DEFAULT_TUMOR_THRESHOLD,
                         metavar="P",
                         help="tumor probability (0-1) from which a voxel is tumor "
                         "(default: %(default)s)")
    segment.add_argument("--min-lesion-mm3", type=float, default=DEFAULT_MIN_LESION_VOLUME_MM3,
                         metavar="MM3",
                         help="lesions smaller than this volume in mm^3 are relabelled liver "
                         "(default: %(default)s)")
    segment.add_argument("--no-gating", action="store_true",
                         help="run the U-Net on every slice, not only where the classifier "
                         "finds liver and up to the liver's ends")
    segment.add_argument("--gating-threshold", type=float, default=0.05, metavar="P",
                         help="classifier liver probability (0-1) from which a slice is "
                         "segmented (default: %(default)s)")
    segment.add_argument("--gating-margin-mm", type=float, default=10.0, metavar="MM",
                         help="also segment slices within this distance in mm of a gated "
                         "slice; the U-Net also stops after a liver-free gap this long "
                         "(default: %(default)s)")

    segment.add_argument("--batch-size", type=int, default=DEFAULT_BATCH_SIZE, metavar="N",
                         help="slices per U-Net batch (the classifier takes twice as many); "
                         "lower it when memory runs out (default: %(default)s)")
    segment.add_argument("--precision", choices=("auto", "fp32", "bf16", "fp16"),
                         default="auto",
                         help="network arithmetic: auto picks bf16 on CPUs with AMX or "
                         "AVX512-BF16, fp16 on CUDA, else fp32 (default: %(default)s)")
    segment.add_argument("--plain", action="store_true",
                         help="reference path for comparisons: every slice through both "
                         "networks in fp32, no gating, default memory layout")
    segment.add_argument("--threads", type=int, metavar="N",
                         help="CPU threads (default: every core this process may use)")

    segment.add_argument("--labelmap", action="store_true",
                         help="also write labels.nii.gz (uint8: 0 background, 1 liver, 2 tumor)")
    segment.add_argument("--probability-map", action="store_true",
                         help="also write tumor_probability.nii.gz (uint8, probability x 255)")
    segment.add_argument("--no-overview", action="store_true", help="skip overview.png")
    segment.add_argument("--progress", choices=("auto", "bar", "json", "none"), default="auto",
                         help="progress on a terminal (bar), JSON lines on stdout for other "
                         "programs (json), or none; auto shows a bar on a terminal "
                         "(default: %(default)s)")
    verbosity = segment.add_mutually_exclusive_group()
    verbosity.add_argument("-q", "--quiet", action="store_true",
                           help="print errors only")
    verbosity.add_argument("-v", "--verbose", action="count", default=0,
                           help="log each stage (-v) or debugging detail (-vv) to stderr")
    return parser


class _CancelFlag:
    """Set by SIGINT or SIGTERM; the engine checks it before every batch."""

    def __init__(self) -> None:
        self.event = threading.Event()

    def __call__(self) -> bool:
        return self.event.is_set()

    def install(self) -> None:
        def handler(signum, frame):  # noqa: ARG001 (signal handler signature)
            if self.event.is_set():
                raise KeyboardInterrupt
            self.event.set()

        signal.signal(signal.SIGINT, handler)
        signal.signal(signal.SIGTERM, handler)


class _ProgressPrinter:
    """Render progress as JSON lines on stdout or a one-line bar on stderr."""

    def __init__(self, mode: str) -> None:
        self.mode = mode
        self._bar_open = False

    def __call__(self, stage: str, done: int, total: int, message: str) -> None:
        if self.mode == "json":
            emit_json({"event": "progress", "stage": stage, "done": done, "total": total,
                       "message": message})
        elif self.mode == "bar":
            width = 30
            filled = int(width * done / max(total, 1))
            bar = "#" * filled + "-" * (width - filled)
            sys.stderr.write(f"\r{stage:<11} [{bar}] {done}/{total} ")
            sys.stderr.flush()
            self._bar_open = True

    def close(self) -> None:
        if self._bar_open:
            sys.stderr.write("\n")
            self._bar_open = False


def emit_json(event: dict) -> None:
    sys.stdout.write(json.dumps(event) + "\n")
    sys.stdout.flush()


def _configure_logging(quiet: bool, verbose: int) -> None:
    level = logging.ERROR if quiet else {0: logging.WARNING, 1: logging.INFO}.get(verbose,
                                                                                logging.DEBUG)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    # -v and -vv show the engine's own log. Other libraries still report only warnings
    # and errors, because torch logs cache statistics at INFO.
    root.setLevel(max(level, logging.WARNING))
    logging.getLogger(__package__).setLevel(level)


def _progress_mode(args) -> str:
    if args.progress != "auto":
        return args.progress
    return "bar" if sys.stderr.isatty() and not args.quiet else "none"


def _exit_code_for(error: BaseException) -> tuple[int, str]:
    if isinstance(error, (ConfigurationError, OutputExistsError)):
        return EXIT_USAGE, error.code
    if isinstance(error, InvalidInputError):
        return EXIT_INVALID_INPUT, error.code
    if isinstance(error, WeightsError):
        return EXIT_WEIGHTS, error.code
    if isinstance(error, RunCancelledError):
        return EXIT_CANCELLED, error.code
    if isinstance(error, OutputWriteError):
        return EXIT_OUTPUT_WRITE, error.code
    if _is_out_of_memory(error):
        return EXIT_OUT_OF_MEMORY, "out_of_memory"
    if isinstance(error, OSError) and error.errno in _OUTPUT_WRITE_ERRNOS:
        return EXIT_OUTPUT_WRITE, "output_write"
    return EXIT_UNEXPECTED, "unexpected"


# Input files are read through the engine's reader, which turns its failures into
# InvalidInputError, so these errno values come from writing the outputs.
_OUTPUT_WRITE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM}


def _is_out_of_memory(error: BaseException) -> bool:
    if isinstance(error, MemoryError):
        return True
    return isinstance(error, RuntimeError) and "out of memory" in str(error).lower()


def _hint_for(error: BaseException, code: str) -> str:
    if isinstance(error, LiverTumorAIError):
        return error.hint
    if code == "out_of_memory":
        return "Lower --batch-size, close other programs, or use --device cpu."
    if code == "output_write":
        return "Free disk space or choose a writable output folder with -o."
    return "Rerun with -vv and report the log: this is a bug."


def _run_segment(args) -> int:
    mode = _progress_mode(args)
    cancel = _CancelFlag()
    # Installed before the engine's imports (about 1.3 s), so that a signal during them
    # also cancels the run instead of ending it with a traceback.
    cancel.install()
    try:
        from .pipeline import SegmentOptions, segment_ct
        from .runtime import prepare_process
    except KeyboardInterrupt:  # a second signal during the imports
        return _report_failure(RunCancelledError("The run was interrupted.",
                                                 "Start it again when ready."), args, mode)
    if cancel():
        return _report_failure(RunCancelledError("The run was cancelled before it started.",
                                                 "Start it again when ready."), args, mode)

    prepare_process()  # this process runs one job, so it keeps freed memory for reuse
    printer = _ProgressPrinter(mode)
    options = SegmentOptions(
        device=args.device, weights=args.weights, tumor_threshold=args.tumor_threshold,
        min_lesion_volume_mm3=args.min_lesion_mm3, classifier_gating=not args.no_gating,
        gating_threshold=args.gating_threshold, gating_margin_mm=args.gating_margin_mm,
        batch_size=args.batch_size, precision=args.precision, plain=args.plain,
        threads=args.threads, write_labelmap=args.labelmap,
        write_probability_map=args.probability_map, write_overview=not args.no_overview,
        overwrite=args.overwrite,
    )
    try:
        report = segment_ct(args.input, args.output, options, progress=printer, cancel=cancel)
    except (Exception, KeyboardInterrupt) as error:  # every failure becomes an exit code
        printer.close()
        if isinstance(error, KeyboardInterrupt):
            error = RunCancelledError("The run was interrupted.", "Start it again when ready.")
        return _report_failure(error, args, mode)
    printer.close()
    if mode == "json":
        emit_json({"event": "done", "output_dir": str(report.output_dir),
                   "summary": report.summary})
    elif not args.quiet:
        print(f"{report.summary['message']}")
        print(f"outputs: {report.output_dir}")
    return EXIT_OK


def _report_failure(error: BaseException, args, mode: str) -> int:
    """Print `error` as the command line reports failures and return its exit status."""
    status, code = _exit_code_for(error)
    message = error.message if isinstance(error, LiverTumorAIError) else str(error)
    if code == "output_write" and not isinstance(error, LiverTumorAIError):
        message = f"Writing the outputs to {Path(args.output).resolve()} failed: {message}"
    hint = _hint_for(error, code)
    if status == EXIT_UNEXPECTED:
        logger.exception("unexpected error")
    if mode == "json":
        emit_json({"event": "error", "code": code, "message": message, "hint": hint})
    if not args.quiet or mode != "json":
        sys.stderr.write(f"error: {message}\n" + (f"hint: {hint}\n" if hint else ""))
    return status


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    _configure_logging(args.quiet, args.verbose)
    if args.command == "segment":
        return _run_segment(args)
    parser.error(f"unknown command {args.command!r}")
    return EXIT_USAGE


def run(argv: Sequence[str] | None = None) -> NoReturn:
    """Run the `livertumorai` program: `main`, then exit with its status.

    Once the status is decided, SIGINT and SIGTERM are ignored. The interpreter's shutdown
    with torch loaded takes about 0.2 s, and Python restores the default action of a
    signal it handled, so a signal then would end the process with status 130 or 143
    after the outputs were complete. Python leaves ignored signals ignored.
    """
    status = main(argv)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    sys.exit(status)


if __name__ == "__main__":
    run()
