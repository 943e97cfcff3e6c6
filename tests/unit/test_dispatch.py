"""What per-stage dispatch reads from dvc.yaml, and what the DVC run-cache needs of it (no server)."""

from __future__ import annotations

import subprocess

import pytest

from flows.dispatch import DispatchError
from flows.pipeline import read_resource_classes
from tests.dvc_deps import ROOT


def test_every_stage_declares_its_resource_class_in_dvc_yaml():
    classes = read_resource_classes(ROOT)
    trainings = {
        s
        for s in classes
        if s.partition("@")[0] in ("pretrain_ssl", "train_teacher", "train_detr", "distill_deit")
    }
    assert len(trainings) == 7 and all(classes[s] == "gpu" for s in trainings)
    assert {s: c for s, c in classes.items() if s not in trainings} == {
        "prepare": "cpu",
        "evaluate": "cpu",
        "report": "cpu",
    }


def test_a_stage_without_a_resource_class_is_named(tmp_path):
    subprocess.run(["dvc", "init", "--no-scm", "-q"], cwd=tmp_path, check=True)
    (tmp_path / "dvc.yaml").write_text(
        "stages:\n"
        "  a: {cmd: echo a > a, outs: [a], meta: {resources: cpu}}\n"
        "  b: {cmd: echo b > b, deps: [a], outs: [b]}\n"
        "  c: {cmd: echo c > c, deps: [a], outs: [c], meta: {resources: tpu}}\n"
    )
    with pytest.raises(DispatchError, match=r"stage\(s\) \['b', 'c'\] declare no resource class"):
        read_resource_classes(tmp_path)


def test_every_stage_can_be_restored_from_the_run_cache():
    """DVC saves no run-cache entry for a stage with a persistent or an uncached output (besides
    metrics and plots, whose uncached copies the run-cache cannot push): dispatch would then have no
    way to bring a stage's result back, and a second machine would re-run it."""
    from dvc.repo import Repo

    with Repo(str(ROOT)) as repo:
        for stage in repo.index.stages:
            for out in stage.outs:
                assert out.use_cache and not out.persist, (stage.addressing, out.def_path)
