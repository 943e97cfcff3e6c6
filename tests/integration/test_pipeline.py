"""The whole DAG on the smoke profile, in temporary git + DVC repositories, through each door."""

from __future__ import annotations

import json
import sys

import pytest
import yaml
from mlflow.tracking import MlflowClient

from tests.conftest import make_pipeline_repo, run, smoke_params

pytestmark = pytest.mark.integration


def dag_stages(repo) -> list[str]:
    from flows.pipeline import read_dag

    return list(read_dag(repo))


@pytest.fixture(scope="module")
def repro_repo(tmp_path_factory):
    return make_pipeline_repo(tmp_path_factory.mktemp("repro"))


def test_dvc_repro_runs_every_stage_then_nothing(repro_repo):
    first = run(["dvc", "repro"], repro_repo)
    assert first.returncode == 0, first.stdout + first.stderr
    for stage in dag_stages(repro_repo):
        assert f"Running stage '{stage}'" in first.stdout
    evaluate = json.loads((repro_repo / "metrics/evaluate.json").read_text())
    assert 0.0 <= evaluate["teacher"]["top1"] <= 1.0
    assert (repro_repo / "plots/evaluate/teacher_confusion.png").stat().st_size > 0
    assert (repro_repo / "plots/prepare/samples.png").stat().st_size > 0

    second = run(["dvc", "repro"], repro_repo)
    assert second.returncode == 0
    assert "Running stage" not in second.stdout
    status = run(["dvc", "status"], repro_repo)
    assert "Data and pipelines are up to date" in status.stdout


def test_ddp_teacher_with_two_cpu_processes_matches_one(repro_repo, tmp_path):
    """train_teacher under torchrun (2 processes, gloo) learns as well as one process."""
    results = {}
    for nproc in (1, 2):
        # a per-process batch: 2 processes x 16 = the same global batch as 1 x 32
        teacher = {"epochs": 6, "lr": 0.004, "batch_size": 32 // nproc}
        params = smoke_params(engine={"nproc": nproc, "threads": 1}, teacher=teacher)
        params_file = tmp_path / f"params-{nproc}.yaml"
        params_file.write_text(yaml.safe_dump(params))
        result = run([sys.executable, "-m", "stages.train_teacher", "--params", str(params_file)], repro_repo)
        assert result.returncode == 0, result.stdout + result.stderr
        results[nproc] = json.loads((repro_repo / "metrics/teacher.json").read_text())
    assert "launching 2 processes" in result.stdout
    chance = 1 / 6
    for metrics in results.values():
        assert metrics["val_top1"] > chance + 0.15
    assert abs(results[1]["val_top1"] - results[2]["val_top1"]) < 0.2
    run(["dvc", "checkout", "--force"], repro_repo)  # leave the pipeline outputs as DVC recorded them


def test_prefect_flow_runs_each_stage_as_a_task_and_nests_mlflow_runs(tmp_path, prefect_harness):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    from flows.pipeline import pipeline

    repo = make_pipeline_repo(tmp_path / "flow")
    state = pipeline(repo_root=str(repo), return_state=True)
    assert state.is_completed(), state.message
    stages = dag_stages(repo)
    assert [row["status"] for row in state.result()] == ["ran"] * len(stages)

    with get_client(sync_client=True) as client:
        task_runs = client.read_task_runs(
            flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[state.state_details.flow_run_id]))
        )
    assert sorted(t.name for t in task_runs) == sorted(stages)
    assert all(t.state.is_completed() for t in task_runs)

    status = run(["dvc", "status"], repo)
    assert "Data and pipelines are up to date" in status.stdout

    client = MlflowClient(f"sqlite:///{repo}/mlflow.db")
    runs = client.search_runs([client.get_experiment_by_name("vitkit").experiment_id])
    parents = [r for r in runs if r.info.run_name == "pipeline"]
    assert len(parents) == 1
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parents[0].info.run_id]
    assert sorted(r.data.tags["vitkit.stage"] for r in children) == sorted(stages)
    for child in children:
        assert child.info.status == "FINISHED"
        assert "stage_time_s" in child.data.metrics
        assert len(child.data.tags["vitkit.dvc_stage_hash"]) == 64
    teacher = next(r for r in children if r.data.tags["vitkit.stage"] == "train_teacher")
    assert "val_top1" in teacher.data.metrics
    assert len(client.get_metric_history(teacher.info.run_id, "train_loss")) == 2  # one point per epoch

    again = pipeline(repo_root=str(repo), return_state=True)
    assert [row["status"] for row in again.result()] == ["skipped (up to date)"] * len(stages)
