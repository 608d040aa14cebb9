"""``benchmarks/gpu_check.py``, the one-command GPU check, exercised on the CPU (``--cpu-dry-run``).

GPU machines are lent rarely and briefly, so the script must work the first time it meets one: CI
runs every phase of it here, on the CPU with tiny sizes, as a user would run it.
"""

from __future__ import annotations

import json
import numbers
import pathlib
import subprocess
import sys

import pytest
import torch

ROOT = pathlib.Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "benchmarks" / "gpu_check.py"
PHASES = ("facts", "w1", "large", "shared_gpu", "nccl_pair", "checkpoint")


def numbers_in(figures: dict) -> list:
    return [v for v in figures.values() if isinstance(v, numbers.Number) and not isinstance(v, bool)]


@pytest.mark.slow
def test_the_cpu_dry_run_measures_every_phase_and_writes_the_figures(tmp_path):
    out = tmp_path / "gpu_check.json"
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--cpu-dry-run", "--out", str(out)],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    report = json.loads(out.read_text())
    assert report["meta"]["mode"] == "cpu-dry-run" and report["meta"]["failed_phases"] == []
    for phase in PHASES:
        figures = report["phases"][phase]
        assert "error" not in figures and "skipped" not in figures, (phase, figures)
        assert numbers_in(figures), f"phase {phase} has no numbers: {figures}"

    w1 = report["phases"]["w1"]
    for key in ("raw_resident_s", "raw_from_numpy_s", "dlearner_local_s", "dlearner_dask1_s", "ratio_local_vs_raw_from_numpy"):
        assert w1[key] > 0, key
    breakdown = w1["breakdown"]
    assert all(breakdown[k] > 0 for k in ("validate_s", "convert_and_copy_s", "h2d_pageable_s", "metrics_s"))
    assert breakdown["transfer_plan"] == {"pin_memory": False, "non_blocking": False}  # a CPU learner pins nothing
    assert w1["goal_met"] is None  # CPU figures say nothing about the GPU goal
    assert report["phases"]["large"]["hiddens"] == [64, 64]

    shared = report["phases"]["shared_gpu"]
    assert shared["backend"] == "gloo" and shared["identical_weights"]
    assert shared["planned_devices_at_0_5"] == ["cuda:0", "cuda:0"]  # what 0.5 GPU each would give on a GPU
    pair = report["phases"]["nccl_pair"]
    assert pair["backend"] == pair["raw_ddp_backend"] == "gloo" and pair["identical_weights"] and pair["raw_ddp_s"] > 0

    checkpoint = report["phases"]["checkpoint"]
    assert checkpoint["restored_on_device"] and checkpoint["equal_bits"]
    assert checkpoint["group_restored_on_device_equal_bits"] and checkpoint["next_update_max_abs_diff"] == 0.0

    # One table on stdout, a row per run.
    assert "dlearner GPU check, CPU dry run" in proc.stdout
    for phase in PHASES:
        assert f"\n{phase} " in proc.stdout


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
def test_without_a_gpu_the_real_check_says_how_to_get_one():
    proc = subprocess.run([sys.executable, str(SCRIPT), "--phases", "facts"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "no CUDA device" in proc.stderr and "--cpu-dry-run" in proc.stderr


def test_an_unknown_phase_is_named():
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--cpu-dry-run", "--phases", "w1,warp"], capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 2 and "warp" in proc.stderr
