"""Speed and memory benchmark of the LiverTumorAI engine against its plain path and a 3-D peer.

For each input CT, one command runs, each in its own child process (the "spawn" start
method, so each child's peak resident memory is its own):

1. the default engine path (`SegmentOptions()`: gating, autocast, channels-last, batching);
2. the plain path (`SegmentOptions(plain=True)`: every slice through both networks, fp32,
   default memory layout, no gating);
3. unless `--skip-3d`, a 3-D sliding-window segmentation of the kind other Slicer liver
   tools run: a MONAI 3-D U-Net with random weights over 160^3 windows after resampling the
   CT to 1.5 x 1.5 x 2 mm, in the default path's precision.

A further child measures the machine's matrix-multiply throughput in float32 and in the
default path's precision. Each engine child first runs the engine once on a small phantom
(the warm-up), so the measured run does not pay for imports and first-call kernel set-up.
Those costs are reported separately. Global forward hooks time each network's forward
calls and count its batch items, and `torch.utils.flop_counter.FlopCounterMode` counts the
floating-point operations per item on the meta device, so FLOP totals cover exactly the
slices (or windows) each network processed.

Run `python benchmarks/benchmark.py --help`; benchmarks/README.md explains each number.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import logging
import multiprocessing
import os
import platform
import resource
import shlex
import shutil
import sys
import tempfile
import time
import traceback
from pathlib import Path

import numpy as np

logger = logging.getLogger("benchmark")

REPOSITORY_ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA_DIR = Path(
    os.environ.get("LIVERTUMORAI_SHARED_DATA", REPOSITORY_ROOT.parent / "shared" / "data")
)
DEFAULT_INPUTS = (
    SHARED_DATA_DIR / "ct_unlabelled" / "ircadb1.1_dicom",
    SHARED_DATA_DIR / "train" / "ircadb1.7" / "ct.nii.gz",
)

# Architectures and preprocessing of the bundled models, used by --random-weights when no
# bundled manifest exists yet. With a bundled manifest its blocks are used instead.
RANDOM_CLASSIFIER = {"name": "vgg16_bn", "in_channels": 3, "num_classes": 3, "width_divisor": 4}
RANDOM_CLASSIFIER_PREP = (40.0, 400.0, 3.0, (128, 128), 1, 3.0)
RANDOM_SEGMENTER = {"name": "unet2d", "in_channels": 5, "num_classes": 3,
                    "features": [16, 32, 64, 128, 256]}
RANDOM_SEGMENTER_PREP = (40.0, 400.0, 2.0, (192, 192), 2, 3.0)
RANDOM_WEIGHTS_NOTE = "random initialisation by benchmarks/benchmark.py (timing only)"

# The 3-D peer: a MONAI U-Net with channels 16 to 256, as other Slicer liver tools run.
PEER_CHANNELS = (16, 32, 64, 128, 256)
PEER_STRIDES = (2, 2, 2, 2)
PEER_RESIDUAL_UNITS = 2
# Soft-tissue HU window mapped to [0, 1] before the 3-D network; speed does not depend on it.
PEER_WINDOW_HU = (-175.0, 250.0)

# Targets. Each is checked on numbers taken in one run.
TARGET_SPEEDUP = 3.0  # plain total time / default total time
TARGET_LIVER_DICE = 0.98
TARGET_TUMOR_DICE = 0.95
TARGET_PEER_RATIO = 1.0  # 3-D total time / default total time must exceed this
TARGET_MATMUL_FRACTION = 0.5  # network GFLOP/s over matmul GFLOP/s, same precision
TARGET_OUTSIDE_NETWORKS = 0.25  # fraction of total time outside network forward calls
TARGET_PEAK_RSS_BYTES = 2.5e9

STAGES = ("read", "preprocess", "classify", "segment", "postprocess", "write")
NON_NETWORK_STAGES = ("read", "preprocess", "postprocess", "write")
SEGMENTATION_FILE = "segmentation.seg.nrrd"
_MB = 1e6
_GB = 1e9


# --------------------------------------------------------------------------------------------
# Child processes


def _run_in_child(job: dict, prepare: bool = True) -> dict:
    """Run `job` in a fresh spawned process and return its result dictionary.

    With `prepare` the child applies `livertumorai.runtime.prepare_process` as the command
    line does (freed memory kept for reuse, imported objects frozen for the garbage
    collector); otherwise it runs with the C library's and Python's defaults.

    A child that ends without sending a result (killed for memory, say) gives a result
    with `error` set, so one failed measurement does not end the benchmark.
    """
    job = {**job, "prepare_process": prepare}
    context = multiprocessing.get_context("spawn")
    receiver, sender = context.Pipe(duplex=False)
    process = context.Process(target=_child_main, args=(job, sender), name=job["kind"])
    process.start()
    sender.close()
    try:
        result = receiver.recv()
    except EOFError:
        process.join()
        return {"error": f"the {job['kind']} child process ended without a result (exit code "
                         f"{process.exitcode}; -9 usually means it was killed for memory)"}
    process.join()
    return result


def _apply_process_settings(job: dict) -> None:
    """Apply the command line's process settings unless the job requests the defaults.

    Each job calls this after its imports, as the command line does, so that the imported
    objects are frozen and the import time is measured as before.
    """
    if job.get("prepare_process", True):
        from livertumorai.runtime import prepare_process

        prepare_process()


def _child_main(job: dict, sender) -> None:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        result = _JOBS[job["kind"]](job)
    except Exception:  # reported to the parent, which prints it and carries on
        result = {"error": traceback.format_exc()}
    result["peak_rss_bytes"] = _peak_rss_bytes()
    sender.send(result)
    sender.close()


def _peak_rss_bytes() -> int:
    """Return this process's peak resident set size in bytes (VmHWM on Linux)."""
    peak = _proc_status_bytes("VmHWM")
    if peak is not None:
        return peak
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)  # bytes on macOS, KiB else


def _proc_status_bytes(field: str) -> int | None:
    """Return a memory field of /proc/self/status (VmRSS, VmHWM) in bytes, None off Linux."""
    try:
        with open("/proc/self/status", encoding="ascii") as stream:
            for line in stream:
                if line.startswith(f"{field}:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


class _NetworkTimer:
    """Time the outermost `nn.Module` forward calls, by module class, with global hooks.

    Only calls made while no other module is running count, so a network's own layers are
    not counted separately. On CUDA each timed call is bracketed by a synchronisation.
    """

    def __init__(self, device) -> None:
        import torch

        self._torch = torch
        self._cuda = device.type == "cuda"
        self._depth = 0
        self._start_s = 0.0
        self._current: tuple | None = None
        self.enabled = True
        self.stats: dict[str, dict] = {}
        self.modules: dict[str, object] = {}
        hooks = torch.nn.modules.module
        self._handles = [hooks.register_module_forward_pre_hook(self._before),
                         hooks.register_module_forward_hook(self._after)]

    def reset(self) -> None:
        self.stats.clear()

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()

    def _before(self, module, args) -> None:
        if self._depth == 0 and self.enabled and args and hasattr(args[0], "shape"):
            if self._cuda:
                self._torch.cuda.synchronize()
            name = getattr(module, "network_name", type(module).__name__)  # fused copies
            self._current = (name, module, tuple(args[0].shape))
            self._start_s = time.perf_counter()
        self._depth += 1

    def _after(self, module, args, output) -> None:
        self._depth -= 1
        if self._depth != 0 or self._current is None:
            return
        if self._cuda:
            self._torch.cuda.synchronize()
        elapsed = time.perf_counter() - self._start_s
        name, network, shape = self._current
        self._current = None
        entry = self.stats.setdefault(name, {"calls": 0, "items": 0, "seconds": 0.0,
                                             "items_by_shape": {}})
        entry["calls"] += 1
        entry["items"] += shape[0]
        entry["seconds"] += elapsed
        item_shape = shape[1:]
        entry["items_by_shape"][item_shape] = entry["items_by_shape"].get(item_shape, 0) + shape[0]
        self.modules[name] = network

    def summary(self) -> dict:
        """Return per-network calls, items, seconds and GFLOP (counted on the meta device)."""
        self.enabled = False
        networks = {}
        for name, entry in self.stats.items():
            flop = sum(count * _flop_per_item(self.modules[name], shape)
                       for shape, count in entry["items_by_shape"].items())
            networks[name] = {
                "calls": entry["calls"],
                "items": entry["items"],
                "item_shapes": [list(shape) for shape in entry["items_by_shape"]],
                "seconds": round(entry["seconds"], 4),
                "gflop": round(flop / 1e9, 3),
            }
        return networks


def _flop_per_item(module, item_shape: tuple) -> int:
    """Count the floating-point operations of `module` on one item of `item_shape`.

    The count runs on a copy on the meta device, so it costs no arithmetic. A multiply-add
    counts as two operations (FlopCounterMode's convention).
    """
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    # The counter does not count a fused copy's oneDNN calls. Its source network performs
    # the same multiply-adds.
    module = getattr(module, "flop_reference", module)
    meta_copy = copy.deepcopy(module).to("meta").eval()
    with FlopCounterMode(display=False) as counter, torch.inference_mode():
        meta_copy(torch.zeros((1, *item_shape), device="meta"))
    return int(counter.get_total_flops())


def _job_machine(job: dict) -> dict:
    """Measure matmul throughput in float32 and in the default path's precision."""
    import torch

    from livertumorai.inference import select_autocast_dtype, select_device

    _apply_process_settings(job)
    device = select_device(job["device"])
    if device.type == "cpu":
        torch.set_num_threads(job["threads"])
    low_precision = select_autocast_dtype(device, "auto")
    dtypes = [torch.float32] + ([low_precision] if low_precision is not None else [])
    size = job["matmul_size"] or (8192 if device.type == "cuda" else 2048)
    throughput = {_dtype_name(dtype): round(_matmul_gflops(torch, dtype, device, size,
                                                           job["matmul_seconds"]), 1)
                  for dtype in dtypes}
    result = {
        "torch_version": torch.__version__,
        "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "torch_threads": torch.get_num_threads(),
        "device": str(device),
        "default_precision": _dtype_name(low_precision),
        "matmul_size": size,
        "matmul_gflops": throughput,
    }
    if device.type == "cuda":
        result["gpu_name"] = torch.cuda.get_device_name(device)
    return result


def _matmul_gflops(torch, dtype, device, size: int, seconds: float) -> float:
    """Return the best GFLOP/s of `size` x `size` matmuls in `dtype` over about `seconds`."""
    generator = torch.Generator().manual_seed(0)
    a = torch.randn(size, size, generator=generator).to(device=device, dtype=dtype)
    b = torch.randn(size, size, generator=generator).to(device=device, dtype=dtype)
    c = torch.empty_like(a)
    flop_per_matmul = 2.0 * size ** 3
    for _ in range(2):  # kernel selection and page faults
        torch.matmul(a, b, out=c)
    _synchronize(torch, device)
    best = 0.0
    repeats = 1
    deadline = time.perf_counter() + seconds
    while time.perf_counter() < deadline:
        start = time.perf_counter()
        for _ in range(repeats):
            torch.matmul(a, b, out=c)
        _synchronize(torch, device)
        elapsed = time.perf_counter() - start
        best = max(best, repeats * flop_per_matmul / elapsed / 1e9)
        if elapsed < seconds / 8:  # lengthen rounds so the timer's overhead does not count
            repeats *= 2
    return best


def _synchronize(torch, device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _dtype_name(dtype) -> str:
    return "float32" if dtype is None else str(dtype).replace("torch.", "")


def _job_engine(job: dict) -> dict:
    """Run `segment_ct` once on the warm-up phantom, then `repeats` times on the input.

    The fastest of the timed runs is reported, stage times and network times together, so
    one run slowed by other work on the machine does not decide a ratio.
    """
    import_start = time.perf_counter()
    import torch

    from livertumorai.inference import select_device
    from livertumorai.pipeline import SegmentOptions, segment_ct

    import_s = time.perf_counter() - import_start
    import_rss_bytes = _proc_status_bytes("VmRSS")
    _apply_process_settings(job)
    options = SegmentOptions(**job["options"])
    timer = _NetworkTimer(select_device(options.device))

    warmup_s = None
    if job["warmup_input"]:
        start = time.perf_counter()
        segment_ct(job["warmup_input"], job["warmup_output"], options)
        warmup_s = time.perf_counter() - start
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()

    fastest = None
    for _ in range(job.get("repeats", 1)):
        timer.reset()
        report = segment_ct(job["input"], job["output"],
                            dataclasses.replace(options, overwrite=True))
        total_s = report.data["timings_s"]["total"]
        if fastest is None or total_s < fastest[0]:
            fastest = (total_s, report, copy.deepcopy(timer.stats))
    _, report, timer.stats = fastest
    networks = timer.summary()
    timer.remove()
    data = report.data
    return {
        "import_s": round(import_s, 3),
        "import_rss_bytes": import_rss_bytes,
        "warmup_s": None if warmup_s is None else round(warmup_s, 3),
        "timings_s": data["timings_s"],
        "slices": data["slices"],
        "precision": "float32" if data["precision"] == "fp32" else data["precision"],
        "threads": data["threads"],
        "torch_threads": torch.get_num_threads(),
        "device": data["device"],
        "input_size_xyz": data["input"]["size_xyz"],
        "input_spacing_mm_xyz": data["input"]["spacing_mm_xyz"],
        "summary": data["summary"]["message"],
        "networks": networks,
        "peak_gpu_bytes": (torch.cuda.max_memory_allocated() if torch.cuda.is_available()
                           else None),
        "output_dir": str(report.output_dir),
    }


def _job_peer_3d(job: dict) -> dict:
    """Segment the input with a random-weight MONAI 3-D U-Net by sliding windows."""
    import_start = time.perf_counter()
    import monai
    import SimpleITK as sitk
    import torch
    from monai.inferers import sliding_window_inference
    from monai.networks.nets import UNet

    from livertumorai.inference import select_device
    from livertumorai.io_ct import read_ct

    import_s = time.perf_counter() - import_start
    import_rss_bytes = _proc_status_bytes("VmRSS")
    _apply_process_settings(job)
    device = select_device(job["device"])
    if device.type == "cpu":
        torch.set_num_threads(job["threads"])
    autocast_dtype = {"float32": None, "bfloat16": torch.bfloat16,
                      "float16": torch.float16}[job["precision"]]
    window = (job["window"],) * 3
    timings: dict[str, float] = {}

    torch.manual_seed(0)
    model = UNet(spatial_dims=3, in_channels=1, out_channels=3, channels=PEER_CHANNELS,
                 strides=PEER_STRIDES, num_res_units=PEER_RESIDUAL_UNITS).to(device).eval()

    def run_network(volume):
        with torch.inference_mode(), _autocast(torch, device, autocast_dtype):
            return sliding_window_inference(volume, window, sw_batch_size=1, predictor=model,
                                            overlap=job["overlap"], mode="constant")

    # Warm-up: one window, so kernel set-up is not part of the timed run.
    warmup_start = time.perf_counter()
    run_network(torch.zeros((1, 1, *window), device=device))
    warmup_s = time.perf_counter() - warmup_start
    timer = _NetworkTimer(device)
    total_start = time.perf_counter()

    start = time.perf_counter()
    ct = read_ct(job["input"])
    timings["read"] = time.perf_counter() - start

    start = time.perf_counter()
    resampled = _resample_to_spacing(sitk, ct.image, job["spacing_mm_xyz"])
    low, high = PEER_WINDOW_HU
    array = sitk.GetArrayViewFromImage(resampled)
    volume = torch.from_numpy(np.clip((array - low) / (high - low), 0.0, 1.0,
                                      dtype=np.float32))[None, None].to(device)
    timings["preprocess"] = time.perf_counter() - start

    start = time.perf_counter()
    logits = run_network(volume)
    _synchronize(torch, device)
    timings["network"] = time.perf_counter() - start

    start = time.perf_counter()
    labels = logits[0].argmax(dim=0).to(torch.uint8).cpu().numpy()
    labels_image = sitk.GetImageFromArray(labels)
    labels_image.CopyInformation(resampled)
    labels_on_input = sitk.Resample(labels_image, ct.image, sitk.Transform(),
                                    sitk.sitkNearestNeighbor, 0, sitk.sitkUInt8)
    timings["postprocess"] = time.perf_counter() - start

    start = time.perf_counter()
    output = Path(job["output"])
    output.mkdir(parents=True, exist_ok=True)
    sitk.WriteImage(labels_on_input, str(output / "labels.nii.gz"), useCompression=True)
    timings["write"] = time.perf_counter() - start
    timings["total"] = time.perf_counter() - total_start

    networks = timer.summary()
    timer.remove()
    return {
        "monai_version": monai.__version__,
        "import_s": round(import_s, 3),
        "import_rss_bytes": import_rss_bytes,
        "warmup_s": round(warmup_s, 3),
        "timings_s": {key: round(value, 3) for key, value in timings.items()},
        "precision": job["precision"],
        "resampled_size_xyz": list(resampled.GetSize()),
        "spacing_mm_xyz": list(job["spacing_mm_xyz"]),
        "window": job["window"],
        "overlap": job["overlap"],
        "networks": networks,
        "peak_gpu_bytes": (torch.cuda.max_memory_allocated() if torch.cuda.is_available()
                           else None),
    }


def _autocast(torch, device, dtype):
    from contextlib import nullcontext

    if dtype is None:
        return nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def _resample_to_spacing(sitk, image, spacing_mm_xyz):
    """Resample `image` linearly to `spacing_mm_xyz`, keeping its origin and direction."""
    size = [max(1, int(round(n * s / t)))
            for n, s, t in zip(image.GetSize(), image.GetSpacing(), spacing_mm_xyz)]
    return sitk.Resample(image, size, sitk.Transform(), sitk.sitkLinear, image.GetOrigin(),
                         tuple(spacing_mm_xyz), image.GetDirection(), -1024.0, sitk.sitkFloat32)


_JOBS = {"machine": _job_machine, "engine": _job_engine, "peer_3d": _job_peer_3d}


# --------------------------------------------------------------------------------------------
# Weights, warm-up phantom, agreement


def describe_weights(manifest_path: Path) -> dict:
    """Return the manifest path and, per model, its name, version and whether it is trained.

    A model counts as trained when its entry records `training_data` (as training/export.py
    writes) and carries no random-initialisation note.
    """
    data = json.loads(Path(manifest_path).read_text(encoding="utf-8"))
    models = []
    for entry in data.get("models", []):
        note = str(entry.get("training", ""))
        trained = "training_data" in entry and "random" not in note.lower()
        models.append({"name": entry.get("name"), "task": entry.get("task"),
                       "version": entry.get("version"), "trained": trained})
    return {"manifest": str(manifest_path), "models": models,
            "trained": bool(models) and all(model["trained"] for model in models)}


def write_random_weights(folder: Path) -> Path:
    """Write full-size randomly initialised weights with the bundled models' structure.

    The architecture and preprocessing blocks come from the bundled manifest when there is
    one, else from RANDOM_CLASSIFIER and RANDOM_SEGMENTER. Returns the manifest path.
    """
    import torch

    from livertumorai.constants import SLICE_CLASS_NAMES
    from livertumorai.errors import WeightsError
    from livertumorai.models import build_model
    from livertumorai.weights import Preprocessing, load_manifest, save_model, write_manifest

    blocks = {
        "classification": (RANDOM_CLASSIFIER, Preprocessing(*RANDOM_CLASSIFIER_PREP),
                           SLICE_CLASS_NAMES),
        "segmentation": (RANDOM_SEGMENTER, Preprocessing(*RANDOM_SEGMENTER_PREP),
                         ("background", "liver", "tumor")),
    }
    try:
        bundled = load_manifest(None)
    except WeightsError:
        logger.info("No bundled manifest: random weights use the built-in architectures.")
    else:
        for task in blocks:
            entry = bundled.model_for(task)
            blocks[task] = (entry.architecture, entry.preprocessing, entry.classes)
    torch.manual_seed(0)
    entries = []
    for task, (architecture, preprocessing, classes) in blocks.items():
        entries.append(save_model(
            build_model(architecture), folder, name=f"random-{task}", task=task,
            version="0.0.0-random", architecture=architecture, preprocessing=preprocessing,
            classes=classes, extra={"training": RANDOM_WEIGHTS_NOTE},
        ))
    return write_manifest(folder, entries)


def write_warmup_phantom(path: Path) -> Path:
    """Write a small synthetic abdomen (48 slices of 128 x 128, 2.5 mm) for warm-up runs.

    Air at -1000 HU, an elliptic body at 40 HU, a liver-like region at 60 HU with a 20 HU
    lesion, and a 400 HU spine, so every engine stage has work to do.
    """
    import SimpleITK as sitk

    z, y, x = np.mgrid[0:48, 0:128, 0:128].astype(np.float32)
    volume = np.full(z.shape, -1000.0, dtype=np.float32)
    volume[((y - 64) / 50) ** 2 + ((x - 64) / 58) ** 2 <= 1] = 40.0
    volume[((y - 60) / 25) ** 2 + ((x - 45) / 25) ** 2 + ((z - 24) / 18) ** 2 <= 1] = 60.0
    volume[((y - 60) / 6) ** 2 + ((x - 45) / 6) ** 2 + ((z - 24) / 5) ** 2 <= 1] = 20.0
    volume[((y - 95) / 8) ** 2 + ((x - 64) / 8) ** 2 <= 1] = 400.0
    image = sitk.GetImageFromArray(volume.astype(np.int16))
    image.SetSpacing((2.5, 2.5, 2.5))
    sitk.WriteImage(image, str(path), useCompression=True)
    return path


def _read_into_page_cache(path: Path) -> None:
    """Read every byte of a file, or of every file in a folder, and discard it."""
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    for file in files:
        with open(file, "rb") as stream:
            while stream.read(1 << 24):
                pass


def dice(first: np.ndarray, second: np.ndarray) -> float:
    """Return the Dice coefficient of two boolean masks, or 1.0 when both are empty."""
    first = np.asarray(first, dtype=bool)
    second = np.asarray(second, dtype=bool)
    total = int(first.sum()) + int(second.sum())
    if total == 0:
        return 1.0
    return 2.0 * int(np.logical_and(first, second).sum()) / total


def mask_agreement(default_dir: Path, plain_dir: Path) -> dict:
    """Compare the label maps of two output folders: Dice and voxel counts per mask.

    The liver mask is the whole liver (labels 1 and 2), the tumor mask label 2.
    """
    import SimpleITK as sitk

    default_labels = sitk.GetArrayFromImage(sitk.ReadImage(str(default_dir / SEGMENTATION_FILE)))
    plain_labels = sitk.GetArrayFromImage(sitk.ReadImage(str(plain_dir / SEGMENTATION_FILE)))
    if default_labels.shape != plain_labels.shape:
        raise ValueError(f"label maps differ in shape: {default_labels.shape} in {default_dir}, "
                         f"{plain_labels.shape} in {plain_dir}")
    agreement = {}
    for name, default_mask, plain_mask in (
        ("liver", default_labels >= 1, plain_labels >= 1),
        ("tumor", default_labels == 2, plain_labels == 2),
    ):
        agreement[name] = {"dice": round(dice(default_mask, plain_mask), 4),
                           "voxels_default": int(default_mask.sum()),
                           "voxels_plain": int(plain_mask.sum())}
    return agreement


# --------------------------------------------------------------------------------------------
# Derived numbers and targets


def derive_engine_numbers(result: dict, matmul_gflops: dict) -> dict:
    """Add slices per second, network throughput and time outside networks to `result`."""
    timings = result["timings_s"]
    total = timings["total"]
    network_s = sum(entry["seconds"] for entry in result["networks"].values())
    network_gflop = sum(entry["gflop"] for entry in result["networks"].values())
    peak = matmul_gflops.get(result["precision"])
    achieved = network_gflop / network_s if network_s > 0 else None
    derived = {
        "other_s": round(total - sum(timings.get(stage, 0.0) for stage in STAGES), 3),
        "slices_per_s": round(result["slices"]["count"] / total, 2),
        "network_s": round(network_s, 3),
        "network_gflop": round(network_gflop, 1),
        "network_gflops": None if achieved is None else round(achieved, 1),
        "matmul_gflops": peak,
        "matmul_fraction": (None if achieved is None or not peak else round(achieved / peak, 3)),
        "outside_networks_fraction": round(1.0 - network_s / total, 3),
        "non_network_stages_fraction": round(
            sum(timings.get(stage, 0.0) for stage in NON_NETWORK_STAGES) / total, 3),
    }
    result.update(derived)
    return result


def evaluate_targets(case: dict) -> list[dict]:
    """Return the pass/fail rows of one input's targets (skipped measurements are left out)."""
    default, plain = case["default"], case["plain"]
    rows = []

    def add(key: str, name: str, measured, passed: bool | None) -> None:
        rows.append({"key": key, "target": name, "measured": measured, "passed": passed})

    if "error" not in default and "error" not in plain:
        speedup = plain["timings_s"]["total"] / default["timings_s"]["total"]
        add("speedup", f"default >= {TARGET_SPEEDUP:g}x faster than plain", f"{speedup:.2f}x",
            speedup >= TARGET_SPEEDUP)
        agreement = case.get("agreement")
        if agreement:
            liver, tumor = agreement["liver"]["dice"], agreement["tumor"]["dice"]
            add("liver_dice", f"liver Dice default vs plain >= {TARGET_LIVER_DICE}", f"{liver:.4f}",
                liver >= TARGET_LIVER_DICE)
            add("tumor_dice", f"tumor Dice default vs plain >= {TARGET_TUMOR_DICE}", f"{tumor:.4f}",
                tumor >= TARGET_TUMOR_DICE)
    peer = case.get("peer_3d")
    if peer and "error" not in peer and "error" not in default:
        ratio = peer["timings_s"]["total"] / default["timings_s"]["total"]
        add("peer_ratio", f"3-D path time / default time > {TARGET_PEER_RATIO:g}",
            f"{ratio:.2f}", ratio > TARGET_PEER_RATIO)
    if "error" not in default:
        fraction = default["matmul_fraction"]
        if fraction is None:
            add("matmul_fraction", "default networks reach the matmul GFLOP/s", "n/a", None)
        else:
            add("matmul_fraction",
                f"default networks >= {TARGET_MATMUL_FRACTION:.0%} of matmul GFLOP/s",
                f"{fraction:.1%}", fraction >= TARGET_MATMUL_FRACTION)
        outside = default["outside_networks_fraction"]
        add("outside_networks",
            f"default time outside networks <= {TARGET_OUTSIDE_NETWORKS:.0%}",
            f"{outside:.1%}", outside <= TARGET_OUTSIDE_NETWORKS)
        peak = default["peak_rss_bytes"]
        add("peak_rss", f"default peak RSS <= {TARGET_PEAK_RSS_BYTES / _GB:g} GB",
            f"{peak / _GB:.2f} GB", peak <= TARGET_PEAK_RSS_BYTES)
    return rows


# --------------------------------------------------------------------------------------------
# Machine description and report tables


def cpu_description() -> dict:
    """Return the CPU model, logical and physical core counts and bfloat16 support."""
    model, flags, cores = None, "", set()
    physical_id = None
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as stream:
            for line in stream:
                key, _, value = line.partition(":")
                key, value = key.strip(), value.strip()
                if key == "model name" and model is None:
                    model = value
                elif key == "flags" and not flags:
                    flags = value
                elif key == "physical id":
                    physical_id = value
                elif key == "core id":
                    cores.add((physical_id, value))
    except OSError:
        pass
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        usable = os.cpu_count()
    return {
        "model": model or platform.processor() or "unknown",
        "logical_cpus": os.cpu_count(),
        "usable_cpus": usable,
        "physical_cores": len(cores) or None,
        "amx_bf16": "amx_bf16" in flags.split(),
        "avx512_bf16": "avx512_bf16" in flags.split(),
    }


def _seconds(value) -> str:
    return "n/a" if value is None else f"{value:.2f}"


def _ratio(numerator, denominator) -> str:
    if numerator is None or not denominator:
        return ""
    return f"{numerator / denominator:.2f}"


def case_rows(case: dict) -> list[tuple[str, str, str, str]]:
    """Return (quantity, default, plain, plain/default) rows of one input's results."""
    default, plain = case["default"], case["plain"]
    rows = []
    for stage in (*STAGES, "total"):
        a, b = default["timings_s"].get(stage), plain["timings_s"].get(stage)
        rows.append((f"{stage} (s)", _seconds(a), _seconds(b), _ratio(b, a)))

    rows.append(("model loading and other (s)", _seconds(default["other_s"]),
                 _seconds(plain["other_s"]), ""))
    rows.append(("slices classified / segmented",
                 f"{default['slices']['count']} / {default['slices']['segmented']}",
                 f"{plain['slices']['count']} / {plain['slices']['segmented']}", ""))
    rows.append(("slices per second", f"{default['slices_per_s']:.1f}",
                 f"{plain['slices_per_s']:.1f}", ""))
    rows.append(("precision", default["precision"], plain["precision"], ""))

    for name in sorted(set(default["networks"]) | set(plain["networks"])):
        a = default["networks"].get(name, {})
        b = plain["networks"].get(name, {})
        rows.append((f"{name} forward (s)", _seconds(a.get("seconds")),
                     _seconds(b.get("seconds")), _ratio(b.get("seconds"), a.get("seconds"))))
        rows.append((f"{name} GFLOP", f"{a.get('gflop', 0):.1f}", f"{b.get('gflop', 0):.1f}",
                     ""))

    rows.append(("network GFLOP/s", _gflops_text(default), _gflops_text(plain), ""))
    rows.append(("time outside networks", f"{default['outside_networks_fraction']:.1%}",
                 f"{plain['outside_networks_fraction']:.1%}", ""))
    rows.append(("read+preprocess+postprocess+write",
                 f"{default['non_network_stages_fraction']:.1%}",
                 f"{plain['non_network_stages_fraction']:.1%}", ""))

    rows.append(("peak RSS (MB)", f"{default['peak_rss_bytes'] / _MB:.0f}",
                 f"{plain['peak_rss_bytes'] / _MB:.0f}",
                 _ratio(plain["peak_rss_bytes"], default["peak_rss_bytes"])))
    rows.append(("RSS after imports (MB)", _megabytes(default["import_rss_bytes"]),
                 _megabytes(plain["import_rss_bytes"]), ""))
    if default.get("peak_gpu_bytes"):
        rows.append(("peak GPU memory (MB)", f"{default['peak_gpu_bytes'] / _MB:.0f}",
                     f"{plain['peak_gpu_bytes'] / _MB:.0f}", ""))
    rows.append(("cold start: import / warm-up run (s)",
                 f"{default['import_s']:.2f} / {_seconds(default['warmup_s'])}",
                 f"{plain['import_s']:.2f} / {_seconds(plain['warmup_s'])}", ""))
    return rows


def _megabytes(value) -> str:
    return "n/a" if value is None else f"{value / _MB:.0f}"


def _gflops_text(result: dict) -> str:
    if result["network_gflops"] is None:
        return "n/a"
    if result["matmul_fraction"] is None:
        return f"{result['network_gflops']:.0f}"
    return f"{result['network_gflops']:.0f} ({result['matmul_fraction']:.0%} of matmul)"


def peer_rows(case: dict) -> list[tuple[str, str, str]]:
    """Return (quantity, 3-D path, 3-D / default) rows."""
    peer, default = case["peer_3d"], case["default"]
    rows = []
    for stage in ("read", "preprocess", "network", "postprocess", "write", "total"):
        value = peer["timings_s"].get(stage)
        ours = (default["network_s"] if stage == "network" else default["timings_s"].get(stage))
        rows.append((f"{stage} (s)", _seconds(value), _ratio(value, ours)))
    unet = peer["networks"].get("UNet", {})
    rows.append(("resampled size (x, y, z) / windows",
                 f"{'x'.join(str(v) for v in peer['resampled_size_xyz'])} / "
                 f"{unet.get('items', 0)}", ""))
    seconds = unet.get("seconds") or 0.0
    rows.append(("network GFLOP (GFLOP/s)",
                 f"{unet.get('gflop', 0):.0f} ({unet.get('gflop', 0) / seconds:.0f})"
                 if seconds else "n/a", _ratio(unet.get("gflop"), default["network_gflop"])))
    rows.append(("peak RSS (MB)", f"{peer['peak_rss_bytes'] / _MB:.0f}",
                 _ratio(peer["peak_rss_bytes"], default["peak_rss_bytes"])))
    rows.append(("cold start: import / warm-up window (s)",
                 f"{peer['import_s']:.2f} / {peer['warmup_s']:.2f}", ""))
    return rows


def _case_title(case: dict) -> str:
    default = case["default"]
    if "error" in default:
        return Path(case["input"]).name
    size = "x".join(str(v) for v in default["input_size_xyz"])
    spacing = " x ".join(f"{v:.2f}" for v in default["input_spacing_mm_xyz"])
    return f"{Path(case['input']).name}: {size} voxels, {spacing} mm"


def format_text(results: dict) -> str:
    """Return the human-readable report printed at the end of a run."""
    lines = []
    machine = results["machine"]
    lines.append(_machine_line(results))
    lines.append(f"weights: {results['weights']['manifest']} "
                 f"({'trained' if results['weights']['trained'] else 'NOT TRAINED'})")
    for warning in results["warnings"]:
        lines.append(f"WARNING: {warning}")
    if "error" in machine:
        lines.append(f"matmul measurement failed:\n{machine['error']}")
    for case in results["cases"]:
        lines.append("")
        lines.append(f"== {_case_title(case)}")
        failed = [(name, case[name]["error"]) for name in ("default", "plain", "peer_3d")
                  if case.get(name) and "error" in case[name]]
        for name, error in failed:
            lines.append(f"{name} run failed:\n{error}")
        if "error" in case["default"] or "error" in case["plain"]:
            continue
        lines.append(_text_table(("quantity", "default", "plain", "plain/default"),
                                 case_rows(case)))
        if case.get("agreement"):
            liver, tumor = case["agreement"]["liver"], case["agreement"]["tumor"]
            lines.append(f"agreement default vs plain: liver Dice {liver['dice']:.4f} "
                         f"({liver['voxels_default']} / {liver['voxels_plain']} voxels), "
                         f"tumor Dice {tumor['dice']:.4f} ({tumor['voxels_default']} / "
                         f"{tumor['voxels_plain']} voxels)")
        if case.get("peer_3d") and "error" not in case["peer_3d"]:
            lines.append("3-D sliding-window path (MONAI UNet, random weights):")
            lines.append(_text_table(("quantity", "3-D", "3-D/default"), peer_rows(case)))
        lines.append(_text_table(("target", "measured", "result"),
                                 [(row["target"], row["measured"], _verdict(row["passed"]))
                                  for row in case["targets"]]))
    return "\n".join(lines)


def _machine_line(results: dict) -> str:
    cpu, machine = results["cpu"], results["machine"]
    bf16 = "no bf16"
    if cpu["amx_bf16"]:
        bf16 = "AMX-BF16"
    elif cpu["avx512_bf16"]:
        bf16 = "AVX512-BF16"
    text = (f"CPU: {cpu['model']}, {cpu['usable_cpus']} usable of {cpu['logical_cpus']} logical "
            f"CPUs ({cpu['physical_cores'] or '?'} physical cores), {bf16}; threads "
            f"{results['threads']}; process {results.get('process_settings', 'system defaults')}")
    if "error" not in machine:
        matmul = ", ".join(f"{name} {value:.0f}" for name, value in
                           machine["matmul_gflops"].items())
        device = machine["device"]
        if "gpu_name" in machine:
            device += f" ({machine['gpu_name']})"
        text += (f"\ntorch {machine['torch_version']} ({machine['torch_cpu_capability']}), "
                 f"device {device}, matmul {machine['matmul_size']}^2 GFLOP/s: {matmul}")
    load = results["load_average"]
    text += f"\nload average (1 min) before / after: {load['before']:.2f} / {load['after']:.2f}"
    return text


def _verdict(passed: bool | None) -> str:
    if passed is None:
        return "n/a"
    return "pass" if passed else "FAIL"


def _text_table(header: tuple, rows: list[tuple]) -> str:
    widths = [max(len(str(row[i])) for row in (header, *rows)) for i in range(len(header))]
    lines = []
    for row in (header, *rows):
        cells = [str(row[0]).ljust(widths[0])]
        cells += [str(cell).rjust(width) for cell, width in zip(row[1:], widths[1:])]
        lines.append("  ".join(cells))
    return "\n".join(lines)


def _markdown_table(header: tuple, rows: list[tuple]) -> str:
    lines = ["| " + " | ".join(header) + " |",
             "|" + "|".join(["---"] + ["---:"] * (len(header) - 1)) + "|"]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def format_markdown(results: dict) -> str:
    """Return the report as Markdown, ready for benchmarks/BENCHMARKS.md."""
    parts = [f"Command: `{results['command']}`", "",
             f"Date: {results['date']}", ""]
    parts += [f"{line}  " for line in _machine_line(results).splitlines()]
    weights = results["weights"]
    parts += ["", f"Weights: `{weights['manifest']}` "
              f"({'trained' if weights['trained'] else '**not trained**: random initialisation'})"]
    for warning in results["warnings"]:
        parts += ["", f"> Warning: {warning}"]
    for case in results["cases"]:
        parts += ["", f"### {_case_title(case)}", ""]
        if "error" in case["default"] or "error" in case["plain"]:
            parts.append("A run failed; see the JSON output.")
            continue
        parts.append(_markdown_table(("quantity", "default", "plain", "plain / default"),
                                     case_rows(case)))
        if case.get("agreement"):
            liver, tumor = case["agreement"]["liver"], case["agreement"]["tumor"]
            parts += ["", f"Agreement of default and plain outputs: liver Dice "
                          f"{liver['dice']:.4f}, tumor Dice {tumor['dice']:.4f}."]
        peer = case.get("peer_3d")
        if peer and "error" not in peer:
            parts += ["", f"3-D sliding-window path: MONAI {peer['monai_version']} UNet, "
                          f"channels {PEER_CHANNELS}, {peer['window']}^3 windows, overlap "
                          f"{peer['overlap']}, resampled to "
                          f"{' x '.join(f'{v:g}' for v in peer['spacing_mm_xyz'])} mm, "
                          f"{peer['precision']}, random weights.", ""]
            parts.append(_markdown_table(("quantity", "3-D", "3-D / default"), peer_rows(case)))
        parts += ["", _markdown_table(("target", "measured", "result"),
                                      [(row["target"], row["measured"], _verdict(row["passed"]))
                                       for row in case["targets"]])]
    return "\n".join(parts) + "\n"


# --------------------------------------------------------------------------------------------
# Command line


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="Time the LiverTumorAI default path against its plain path and a MONAI "
        "3-D sliding-window U-Net on the same CT, and report memory, FLOP throughput and "
        "output agreement. See benchmarks/README.md.",
    )
    parser.add_argument("--input", action="append", metavar="PATH",
                        help="CT file or DICOM folder; repeat for several (default: "
                        + ", ".join(str(path) for path in DEFAULT_INPUTS) + ")")
    parser.add_argument("--device", default="auto",
                        help="auto, cpu, gpu, cuda or cuda:N (default: %(default)s)")
    parser.add_argument("--threads", type=int, metavar="N",
                        help="CPU threads for every run (default: every core this process "
                        "may use)")
    parser.add_argument("--weights", metavar="PATH",
                        help="weights manifest or folder (default: the engine's look-up: "
                        "$LIVERTUMORAI_WEIGHTS_DIR, user cache, bundled weights)")
    parser.add_argument("--random-weights", action="store_true",
                        help="build full-size random weights with the bundled models' "
                        "structure and use them (timing only: gating and Dice are meaningless)")

    parser.add_argument("--skip-3d", action="store_true", help="skip the MONAI 3-D path")
    parser.add_argument("--window-3d", type=int, default=160, metavar="VOXELS",
                        help="edge of the 3-D path's cubic window in voxels, a multiple of 16 "
                        "(default: %(default)s)")
    parser.add_argument("--spacing-3d-mm", type=float, nargs=3, default=(1.5, 1.5, 2.0),
                        metavar=("X", "Y", "Z"),
                        help="spacing in mm the 3-D path resamples to (default: 1.5 1.5 2.0)")
    parser.add_argument("--overlap-3d", type=float, default=0.25, metavar="FRACTION",
                        help="overlap of neighbouring 3-D windows, 0 to <1 (default: "
                        "%(default)s, MONAI's default)")
    parser.add_argument("--matmul-size", type=int, metavar="N",
                        help="edge of the square matrices of the throughput measurement "
                        "(default: 2048 on a CPU, 8192 on CUDA)")

    parser.add_argument("--matmul-seconds", type=float, default=2.0, metavar="S",
                        help="seconds spent per precision on the matmul measurement "
                        "(default: %(default)s)")
    parser.add_argument("--repeats", type=int, default=3, metavar="N",
                        help="timed runs per path; the fastest is reported (default: "
                        "%(default)s)")
    parser.add_argument("--no-warmup", action="store_true",
                        help="skip the warm-up run, so the measured run includes first-call costs")

    parser.add_argument("--system-defaults", action="store_true",
                        help="run every path with the C library's malloc and Python's "
                        "garbage collector as they come, instead of the command line's "
                        "settings (shows what livertumorai.runtime.prepare_process gains)")

    parser.add_argument("--json", metavar="FILE", help="write every number as JSON")
    parser.add_argument("--markdown", metavar="FILE",
                        help="write the tables as Markdown for benchmarks/BENCHMARKS.md")
    parser.add_argument("--work-dir", metavar="DIR",
                        help="folder for outputs and warm-up files (default: a temporary "
                        "folder, removed at the end)")
    parser.add_argument("--keep-outputs", action="store_true",
                        help="keep the work folder with every run's outputs")
    return parser


def _check_arguments(parser: argparse.ArgumentParser, args) -> list[Path]:
    inputs = [Path(path) for path in (args.input or DEFAULT_INPUTS)]
    for path in inputs:
        if not path.exists():
            parser.error(f"input {path} does not exist; pass --input with a CT file or "
                         "DICOM folder")
    if args.repeats < 1:
        parser.error(f"--repeats {args.repeats} must be at least 1")
    if args.threads is not None and args.threads < 1:
        parser.error(f"--threads {args.threads} must be at least 1")
    if args.window_3d < 16 or args.window_3d % 16:
        parser.error(f"--window-3d {args.window_3d} must be a positive multiple of 16 "
                     "(the 3-D U-Net halves the size four times)")
    if not 0.0 <= args.overlap_3d < 1.0:
        parser.error(f"--overlap-3d {args.overlap_3d} must be in [0, 1)")
    if min(args.spacing_3d_mm) <= 0:
        parser.error(f"--spacing-3d-mm {args.spacing_3d_mm} must be positive")
    if args.weights and args.random_weights:
        parser.error("use either --weights or --random-weights, not both")
    return inputs


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    inputs = _check_arguments(parser, args)
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)

    work_dir = Path(args.work_dir) if args.work_dir else Path(
        tempfile.mkdtemp(prefix="livertumorai-benchmark-"))
    work_dir.mkdir(parents=True, exist_ok=True)
    try:
        results = run_benchmark(args, inputs, work_dir)
    finally:
        if not args.keep_outputs:
            shutil.rmtree(work_dir, ignore_errors=True)

    print(format_text(results))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
        logger.info("Wrote %s", args.json)
    if args.markdown:
        Path(args.markdown).write_text(format_markdown(results), encoding="utf-8")
        logger.info("Wrote %s", args.markdown)
    failed_runs = any("error" in case[name] for case in results["cases"]
                      for name in ("default", "plain", "peer_3d") if case.get(name))
    return 1 if failed_runs or "error" in results["machine"] else 0


def run_benchmark(args, inputs: list[Path], work_dir: Path) -> dict:
    """Run every measurement and return the results dictionary (also written as JSON)."""
    from livertumorai.errors import WeightsError
    from livertumorai.inference import default_thread_count
    from livertumorai.weights import find_manifest

    threads = args.threads or default_thread_count()
    prepare = not args.system_defaults
    cpu = cpu_description()
    load_before = os.getloadavg()[0]
    warnings = []
    if load_before > 0.5 * (cpu["usable_cpus"] or 1):
        warnings.append(f"the 1-minute load average was {load_before:.2f} on "
                        f"{cpu['usable_cpus']} usable CPUs before the benchmark started: other "
                        "work competes for the cores, so absolute times are inflated")

    if args.random_weights:
        manifest = write_random_weights(work_dir / "random_weights")
    else:
        try:
            manifest = find_manifest(args.weights)
        except WeightsError as err:
            raise SystemExit(f"error: {err.message}\nhint: {err.hint} For timing alone, "
                             "--random-weights builds full-size random weights.") from err
    weights = describe_weights(manifest)
    if not weights["trained"]:
        warnings.append("the weights are not trained: the classifier's gating selects "
                        "arbitrary slices, so the default path's segmented slice count, its "
                        "time and the Dice agreement do not show what trained weights give")
    for warning in warnings:
        logger.warning("WARNING: %s", warning)

    logger.info("Measuring matmul throughput ...")
    machine = _run_in_child({"kind": "machine", "device": args.device, "threads": threads,
                             "matmul_size": args.matmul_size,
                             "matmul_seconds": args.matmul_seconds},
                           prepare=prepare)
    matmul_gflops = machine.get("matmul_gflops", {})
    warmup_input = None if args.no_warmup else write_warmup_phantom(work_dir / "warmup.nii.gz")

    cases = []
    for number, path in enumerate(inputs):
        case = {"input": str(path)}
        case_dir = work_dir / f"case{number}"
        # Otherwise the first run alone would pay for reading the files from disk.
        _read_into_page_cache(path)
        for name, plain in (("default", False), ("plain", True)):
            logger.info("Running the %s path on %s ...", name, path)
            options = {"device": args.device, "weights": str(manifest), "threads": threads,
                       "plain": plain}
            result = _run_in_child({
                "kind": "engine", "options": options, "input": str(path),
                "repeats": args.repeats,
                "output": str(case_dir / name),
                "warmup_input": None if warmup_input is None else str(warmup_input),
                "warmup_output": str(case_dir / f"{name}_warmup"),
            }, prepare=prepare)
            if "error" not in result:
                derive_engine_numbers(result, matmul_gflops)
            case[name] = result
        if "error" not in case["default"] and "error" not in case["plain"]:
            case["agreement"] = mask_agreement(case_dir / "default", case_dir / "plain")
        if not args.skip_3d:
            logger.info("Running the 3-D sliding-window path on %s ...", path)
            precision = case["default"].get("precision", "float32")
            case["peer_3d"] = _run_in_child({
                "kind": "peer_3d", "input": str(path), "output": str(case_dir / "peer_3d"),
                "device": args.device, "threads": threads, "precision": precision,
                "window": args.window_3d, "spacing_mm_xyz": list(args.spacing_3d_mm),
                "overlap": args.overlap_3d,
            }, prepare=prepare)
        case["targets"] = evaluate_targets(case)
        cases.append(case)

    return {
        "command": " ".join(shlex.quote(arg) for arg in ["python", *sys.argv]),
        "date": time.strftime("%Y-%m-%d %H:%M:%S %z"),
        "cpu": cpu,
        "threads": threads,
        "process_settings": ("freed memory kept, imports frozen" if prepare
                             else "system defaults"),
        "machine": machine,
        "load_average": {"before": load_before, "after": os.getloadavg()[0]},
        "weights": weights,
        "warnings": warnings,
        "cases": cases,
    }


if __name__ == "__main__":
    sys.exit(main())
