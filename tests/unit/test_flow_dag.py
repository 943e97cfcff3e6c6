"""The Prefect flow's view of dvc.yaml and its retry policy (no server needed)."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
from prefect.states import Failed

from flows.dvc_run import StageFailed, StageInputError, is_transient
from flows.pipeline import _with_upstream, read_dag, stages_to_run
from vitkit.errors import ConfigError

ROOT = Path(__file__).resolve().parents[2]


def test_dag_comes_from_dvc_yaml():
    dag = read_dag(ROOT)
    assert dag["prepare"] == []
    assert dag["pretrain_ssl"] == ["prepare"]
    assert sorted(dag["train_teacher"]) == ["prepare", "pretrain_ssl"]
    for mode in ("none", "soft", "hard"):  # foreach items are stages of their own
        assert sorted(dag[f"distill_deit@{mode}"]) == ["prepare", "train_teacher"]
    for arch in ("detr", "deformable"):
        assert sorted(dag[f"train_detr@{arch}"]) == ["prepare", "pretrain_ssl", "train_teacher"]
    assert set(dag["evaluate"]) >= {
        "pretrain_ssl",
        "train_teacher",
        "distill_deit@hard",
        "train_detr@deformable",
    }


def test_selecting_a_stage_brings_what_it_needs_in_order():
    dag = {"a": [], "b": ["a"], "c": ["a"], "d": ["b"]}
    assert _with_upstream(dag, ["d"]) == ["a", "b", "d"]
    with pytest.raises(ConfigError, match="unknown stage"):
        _with_upstream(dag, ["x"])


def test_bad_input_is_not_retried_but_other_failures_are():
    """Prefect calls the retry condition with the failed state of a task."""
    assert not is_transient(None, None, Failed(data=StageInputError("error: [prepare] bad params")))
    assert is_transient(None, None, Failed(data=StageFailed("killed")))


def test_only_changed_stages_and_what_is_downstream_of_them_are_run(tmp_path):
    """One ``dvc status`` decides; a stage downstream of a changed one runs though its own inputs
    have not changed yet."""
    (tmp_path / "a.txt").write_text("a\n")
    (tmp_path / "c.txt").write_text("c\n")
    for cmd in (
        ["git", "init", "-q"],
        ["dvc", "init", "-q"],
        ["dvc", "config", "core.analytics", "false"],
        ["dvc", "stage", "add", "-q", "-n", "first", "-d", "a.txt", "-o", "b.txt", "cp a.txt b.txt"],
        ["dvc", "stage", "add", "-q", "-n", "second", "-d", "b.txt", "-o", "d.txt", "cp b.txt d.txt"],
        ["dvc", "stage", "add", "-q", "-n", "apart", "-d", "c.txt", "-o", "e.txt", "cp c.txt e.txt"],
        ["dvc", "repro", "-q"],
    ):
        subprocess.run(cmd, cwd=tmp_path, check=True, capture_output=True)
    dag = read_dag(tmp_path)
    order = ["first", "second", "apart"]
    assert stages_to_run(tmp_path, order, dag) == set()
    (tmp_path / "a.txt").write_text("changed\n")
    assert stages_to_run(tmp_path, order, dag) == {"first", "second"}
    (tmp_path / "e.txt").unlink()  # a missing output is a change too (DVC restores it)
    assert stages_to_run(tmp_path, order, dag) == {"first", "second", "apart"}
