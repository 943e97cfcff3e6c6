"""How a stage is launched: the node layout from the environment, torchrun's workers left alone."""

from __future__ import annotations

import pytest

from vitkit.engine.launch import node_layout, relaunch_if_needed
from vitkit.errors import ConfigError


def test_node_layout_comes_from_the_environment(monkeypatch):
    monkeypatch.delenv("VITKIT_NNODES", raising=False)
    monkeypatch.delenv("VITKIT_RDZV_ENDPOINT", raising=False)
    assert node_layout(2, "train_teacher").torchrun_args() == ["--standalone", "--nproc-per-node=2"]
    monkeypatch.setenv("VITKIT_NNODES", "2")
    with pytest.raises(ConfigError, match="VITKIT_NNODES=2 needs VITKIT_RDZV_ENDPOINT"):
        node_layout(4, "train_teacher")
    monkeypatch.setenv("VITKIT_RDZV_ENDPOINT", "node0.example")
    layout = node_layout(4, "distill_deit@soft")
    assert layout.torchrun_args()[:5] == [
        "--nnodes=2",
        "--nproc-per-node=2",
        "--rdzv-backend=c10d",
        "--rdzv-endpoint=node0.example",
        "--rdzv-id=vitkit-distill_deit-soft",
    ]
    with pytest.raises(ConfigError, match=r"engine.nproc is 3, the processes in all"):
        node_layout(3, "train_teacher")
    monkeypatch.setenv("VITKIT_RDZV_TIMEOUT", "soon")
    with pytest.raises(ConfigError, match="VITKIT_RDZV_TIMEOUT='soon'"):
        node_layout(4, "train_teacher")


def test_a_torchrun_worker_runs_the_stage_only_in_the_world_the_params_describe(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "4")
    assert relaunch_if_needed("stages.train_teacher", [], 4, "train_teacher") is None
    with pytest.raises(ConfigError, match=r"torchrun started 4 processes .* engine.nproc is 2"):
        relaunch_if_needed("stages.train_teacher", [], 2, "train_teacher")
