"""Counts of processes, workers and threads against this machine: refused, or lowered with a warning."""

from __future__ import annotations

import os

import pytest
import torch

from stages.common import check_machine
from tests.conftest import smoke_params
from vitkit.config import validate_params
from vitkit.engine import device
from vitkit.errors import ConfigError


@pytest.fixture
def two_cores(monkeypatch):
    monkeypatch.setattr(device, "usable_cpus", lambda: 2)
    for name in ("WORLD_SIZE", "LOCAL_WORLD_SIZE", "LOCAL_RANK", "VITKIT_NNODES", "VITKIT_RDZV_ENDPOINT"):
        monkeypatch.delenv(name, raising=False)


def test_usable_cpus_is_at_least_one_and_at_most_the_machines():
    assert 1 <= device.usable_cpus() <= (os.cpu_count() or 1)


def test_more_processes_than_cores_or_gpus_are_refused(two_cores, monkeypatch):
    cpu = torch.device("cpu")
    device.check_process_count(2, 2, 1, cpu)
    with pytest.raises(ConfigError) as info:
        device.check_process_count(64, 64, 1, cpu)
    message = str(info.value)
    assert "engine.nproc is 64: 64 processes on this machine, but it has 2 usable CPU cores" in message
    assert "set engine.nproc to at most 2" in message and "not lowered" in message
    with pytest.raises(ConfigError, match=r"over VITKIT_NNODES=2 nodes: 4 processes .* at most 4"):
        device.check_process_count(8, 4, 2, cpu)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(ConfigError, match="2 processes on this machine, but it has 1 GPUs"):
        device.check_process_count(2, 2, 1, torch.device("cuda", 0))
    with pytest.raises(ConfigError, match="MPS device"):
        device.check_process_count(2, 2, 1, torch.device("mps"))


def test_a_model_stage_checks_its_processes_and_workers_before_it_starts(two_cores):
    check_machine(validate_params(smoke_params(engine={"nproc": 2, "num_workers": 2})), "train_teacher")
    with pytest.raises(ConfigError, match=r"engine\.nproc is 64: 64 processes"):
        check_machine(validate_params(smoke_params(engine={"nproc": 64})), "train_teacher")
    with pytest.raises(ConfigError, match=r"engine\.num_workers is 1000 but this machine has 2 usable CPU"):
        check_machine(validate_params(smoke_params(engine={"num_workers": 1000})), "train_teacher")


def test_speed_only_counts_are_lowered_to_the_cores_with_one_warning(two_cores, capsys):
    saved = torch.get_num_threads()
    try:
        assert device.set_threads(100, "train_teacher") == 2
        assert torch.get_num_threads() == 2
        err = capsys.readouterr().err
        assert err == (
            "warning: [train_teacher] engine.threads is 100 but this machine has 2 usable CPU cores: "
            "using 2 per process\n"
        )
        assert device.set_threads(1) == 1 and capsys.readouterr().err == ""
        assert device.set_threads(0) == 0  # torch's default, left alone
    finally:
        torch.set_num_threads(saved)
    assert device.at_most_cores(8, "data.workers", "prepare") == 2
    assert "warning: [prepare] data.workers is 8 but this machine has 2 usable CPU cores: using 2" in (
        capsys.readouterr().err
    )
    assert device.at_most_cores(2, "data.workers", "prepare") == 2 and capsys.readouterr().err == ""


def test_threads_are_shared_by_the_processes_of_a_ddp_stage(two_cores, monkeypatch, capsys):
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "1")
    saved = torch.get_num_threads()
    try:
        assert device.set_threads(0) == 1  # two processes on two cores
        assert device.set_threads(2) == 1
        assert capsys.readouterr().err == ""  # only local rank 0 warns
    finally:
        torch.set_num_threads(saved)
