"""benchmarks/gpu_check.py (``make gpu-check``), its CPU side: model stages built from a profile,
stepped as the Trainer steps them, FLOPs counted, the table printed."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "gpu_check.py"
spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
gpu_check = importlib.util.module_from_spec(spec)
sys.modules["gpu_check"] = gpu_check  # its dataclass looks its module up there
spec.loader.exec_module(gpu_check)


def test_models_step_on_the_smoke_profile_under_cpu_bf16_and_the_table_lists_them(capsys):
    """Two of the five models (a classifier and a detector: the two kinds of batch) to keep it short;
    every model's step under CPU bf16 is tested in test_tasks.py."""
    models = ["deit", "detr"]
    argv = ["--device", "cpu", "--profile", "smoke", "--amp", "always", "--no-compile", "--warmup", "0"]
    rows = gpu_check.main([*argv, "--steps", "1", "--models", *models])
    assert [row.model for row in rows] == models
    params = gpu_check.load_profile("smoke")
    assert [row.batch for row in rows] == [params.deit.batch_size, params.detr_training.batch_size]
    for row in rows:
        assert row.steps_per_s > 0 and row.gflop_per_step > 0, row
        assert row.peak_mib is None and row.mfu is None  # CPU: no device memory, no known peak
    table = capsys.readouterr().out.split("profile smoke, amp always, compile False")[1].splitlines()
    assert table[1].split() == [
        "model",
        "batch",
        "warmup",
        "s",
        "steps/s",
        "img/s",
        "peak",
        "MiB",
        "GFLOP",
        "MFU",
    ]
    assert [line.split()[0] for line in table[3:]] == models


def test_mfu_is_the_achieved_share_of_the_peak_and_shown_in_the_table():
    assert gpu_check.utilisation(49.45e9, 10.0, 989.0) == pytest.approx(49.45e10 / 989e12)
    assert gpu_check.utilisation(49.45e9, 10.0, None) is None
    mfu = gpu_check.utilisation(49.45e9, 1000, 989)
    row = gpu_check.Row("deit", 512, 80.0, 10.0, 5120.0, 2048.0, 49.45, mfu)
    line = gpu_check.format_table([row]).splitlines()[2]
    assert line.split() == ["deit", "512", "80.0", "10.00", "5120", "2048", "49.5", "5.0%"]
