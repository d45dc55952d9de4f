"""Smoke test of benchmarks/benchmark.py: its helpers, and one run on a small CT.

The end-to-end run uses the 128 x 128 x 59 fixture, tiny random weights, one thread, a
64^3 window for the 3-D path and a short matmul measurement. It checks the machinery (child
processes, timers, FLOP counts, agreement, reports), not the speed.
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

REPOSITORY_ROOT = Path(__file__).resolve().parents[2]
SCRIPT = REPOSITORY_ROOT / "benchmarks" / "benchmark.py"
FIXTURE = "fixtures/ircadb1.17_small_axial_lps.nii.gz"  # 128 x 128 x 59, 2.97 x 2.97 x 3.2 mm


def _load_benchmark_module():
    spec = importlib.util.spec_from_file_location("livertumorai_benchmark", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


benchmark = _load_benchmark_module()


def test_dice_hand_values():
    first = np.zeros((2, 3), dtype=bool)
    second = np.zeros((2, 3), dtype=bool)
    assert benchmark.dice(first, second) == 1.0  # both empty: full agreement
    first[0, :2] = True
    first[1, :2] = True  # 4 voxels
    assert benchmark.dice(first, second) == 0.0
    second[0, :2] = True  # 2 voxels, both inside `first`
    assert benchmark.dice(first, second) == pytest.approx(2 * 2 / (4 + 2))


def test_flop_count_of_convolution():
    conv = nn.Conv2d(2, 4, kernel_size=3, padding=1, bias=False)
    # 8 x 8 outputs x 4 output channels x (2 x 3 x 3) multiply-adds x 2 operations each.
    assert benchmark._flop_per_item(conv, (2, 8, 8)) == 8 * 8 * 4 * 2 * 9 * 2


def test_network_timer_counts_outer_calls():
    network = nn.Sequential(nn.Conv2d(1, 2, 3, padding=1), nn.ReLU(), nn.Conv2d(2, 1, 1))
    timer = benchmark._NetworkTimer(torch.device("cpu"))
    try:
        with torch.inference_mode():
            network(torch.zeros(3, 1, 4, 4))
            network(torch.zeros(2, 1, 4, 4))
        summary = timer.summary()
    finally:
        timer.remove()
    assert list(summary) == ["Sequential"]  # the inner layers are not counted on their own
    assert summary["Sequential"]["calls"] == 2
    assert summary["Sequential"]["items"] == 5
    # Per item: conv 4x4x2x(1x9) + conv 4x4x1x2 multiply-adds, times 2.
    assert summary["Sequential"]["gflop"] == pytest.approx(5 * (288 + 32) * 2 / 1e9, abs=1e-3)


def test_targets_at_thresholds():
    def engine(total_s, network_s, peak_bytes, fraction):
        return {"timings_s": {"total": total_s},
                "outside_networks_fraction": 1 - network_s / total_s,
                "matmul_fraction": fraction, "peak_rss_bytes": peak_bytes}

    case = {
        "default": engine(10.0, 7.5, 2.5e9, 0.5),
        "plain": engine(30.0, 25.0, 3.0e9, 0.2),
        "agreement": {"liver": {"dice": 0.98}, "tumor": {"dice": 0.9499}},
        "peer_3d": {"timings_s": {"total": 10.0}},
    }
    verdicts = {row["key"]: row["passed"] for row in benchmark.evaluate_targets(case)}
    assert verdicts["speedup"] is True  # exactly 3x faster
    assert verdicts["liver_dice"] is True
    assert verdicts["tumor_dice"] is False
    assert verdicts["peer_ratio"] is False  # equal time is not faster
    assert verdicts["matmul_fraction"] is True
    assert verdicts["outside_networks"] is True  # exactly 25 % outside the networks
    assert verdicts["peak_rss"] is True


@pytest.fixture(scope="module")
def smoke_run(shared_data_dir, tiny_weights, tmp_path_factory):
    folder = tmp_path_factory.mktemp("benchmark")
    command = [
        sys.executable, str(SCRIPT), "--input", str(shared_data_dir / FIXTURE),
        "--weights", str(tiny_weights), "--threads", "1", "--window-3d", "64",
        "--spacing-3d-mm", "6", "6", "8", "--matmul-size", "256", "--matmul-seconds", "0.2",
        "--json", str(folder / "results.json"), "--markdown", str(folder / "results.md"),
    ]
    if importlib.util.find_spec("monai") is None:
        command.append("--skip-3d")  # monai comes with the `bench` extra
    completed = subprocess.run(command, cwd=REPOSITORY_ROOT, capture_output=True, text=True,
                               timeout=600)
    assert completed.returncode == 0, completed.stdout + completed.stderr
    results = json.loads((folder / "results.json").read_text(encoding="utf-8"))
    return results, (folder / "results.md").read_text(encoding="utf-8"), completed.stdout


def test_smoke_run_times_every_stage(smoke_run):
    results, _, _ = smoke_run
    case = results["cases"][0]
    for path in ("default", "plain"):
        timings = case[path]["timings_s"]
        for stage in ("read", "preprocess", "classify", "segment", "postprocess", "write"):
            assert timings[stage] >= 0.0
        assert timings["total"] > 0.0
        assert case[path]["slices"]["count"] == 59
        assert case[path]["peak_rss_bytes"] > case[path]["import_rss_bytes"] > 0
    assert case["plain"]["slices"]["segmented"] == 59
    assert case["plain"]["precision"] == "float32"


def test_smoke_run_counts_network_work(smoke_run):
    results, _, _ = smoke_run
    case = results["cases"][0]
    for path in ("default", "plain"):
        networks = case[path]["networks"]
        assert networks["SliceClassifier"]["items"] == 59
        assert networks["UNet2D"]["items"] == case[path]["slices"]["segmented"]
        assert networks["UNet2D"]["item_shapes"] == [[3, 96, 96]]
        assert case[path]["network_gflop"] > 0.0
    per_slice = [case[path]["networks"]["SliceClassifier"]["gflop"] / 59
                 for path in ("default", "plain")]
    assert per_slice[0] == pytest.approx(per_slice[1], rel=1e-3)
    assert set(results["machine"]["matmul_gflops"]) >= {"float32"}
    assert all(value > 0 for value in results["machine"]["matmul_gflops"].values())


def test_smoke_run_compares_outputs(smoke_run):
    results, _, _ = smoke_run
    agreement = results["cases"][0]["agreement"]
    for mask in ("liver", "tumor"):
        assert 0.0 <= agreement[mask]["dice"] <= 1.0
        assert agreement[mask]["voxels_default"] >= 0


def test_smoke_run_times_3d_path(smoke_run):
    results, _, _ = smoke_run
    peer = results["cases"][0].get("peer_3d")
    if peer is None:
        pytest.skip("monai is not installed (pip install -e '.[bench]')")
    assert "error" not in peer, peer.get("error")
    # 128 x 2.97 mm / 6 mm = 63.4 rounds to 63, and 59 x 3.2 mm / 8 mm = 23.6 to 24.
    assert peer["resampled_size_xyz"] == [63, 63, 24]
    assert peer["networks"]["UNet"]["items"] == 1  # one 64^3 window covers the volume
    assert peer["timings_s"]["total"] > peer["timings_s"]["network"] > 0.0


def test_smoke_run_flags_random_weights(smoke_run):
    results, markdown, stdout = smoke_run
    assert results["weights"]["trained"] is False
    assert any("not trained" in warning for warning in results["warnings"])
    assert "NOT TRAINED" in stdout
    assert "| total (s) |" in markdown
    assert "| target | measured | result |" in markdown
