"""Per-stage dispatch to Prefect work pools, on loopback: a real server, process workers in their
own directories, a local directory as the DVC remote (flows/dispatch.py)."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import make_pipeline_repo, run
from tests.loopback import prefect_server, process_worker

pytestmark = pytest.mark.integration

TRAININGS = ("pretrain_ssl", "train_teacher", "train_detr", "distill_deit")


def with_remote(repo: Path, remote: Path) -> Path:
    """The repository with a default DVC remote, committed: what a team's clone would have."""
    for cmd in (
        ["dvc", "remote", "add", "-d", "shared", str(remote)],
        ["git", "add", ".dvc/config"],
        ["git", "commit", "-qm", "DVC remote"],
    ):
        done = run(cmd, repo)
        assert done.returncode == 0, done.stderr
    return repo


def flow_cli(repo: Path, api_url: str, *args: str, timeout: int = 600):
    return run([sys.executable, "-m", "flows.pipeline", *args], repo, {"PREFECT_API_URL": api_url}, timeout)


def test_a_pool_without_worker_is_one_error_line_before_anything_runs(tmp_path, prefect_harness):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import WorkPoolCreate
    from prefect.settings import PREFECT_API_URL

    api_url = PREFECT_API_URL.value()
    with get_client(sync_client=True) as client:
        for pool in ("idle-cpu", "idle-gpu"):
            client.create_work_pool(WorkPoolCreate(name=pool, type="process"), overwrite=True)
    repo = with_remote(make_pipeline_repo(tmp_path / "repo"), tmp_path / "remote")

    result = flow_cli(repo, api_url, "--dispatch", "--pool", "cpu=idle-cpu", "--pool", "gpu=idle-gpu")
    assert result.returncode == 2, result.stdout + result.stderr
    assert result.stderr.strip().splitlines() == [
        "error: [dispatch] work pool 'idle-cpu' has no worker online; start a worker: "
        "prefect worker start --pool idle-cpu --type process"
    ]
    missing = flow_cli(repo, api_url, "--dispatch", "--pool", "cpu=nowhere", "--pool", "gpu=nowhere")
    assert missing.returncode == 2
    assert "work pool 'nowhere' does not exist" in missing.stderr
    assert not (repo / "data").exists() and not (repo / "dvc.lock").exists()  # nothing ran, nothing written


@pytest.mark.slow
def test_dispatched_stages_run_on_the_pool_of_their_class_and_come_back_through_dvc(tmp_path):
    """Two workers in two directories (pools cpu and gpu) run the smoke pipeline's stages; the
    orchestrating checkout ends with every output and a dvc.lock that `dvc status` finds clean."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowFilter, FlowFilterName
    from prefect.deployments import run_deployment
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from flows.pipeline import read_dag

    repo = with_remote(make_pipeline_repo(tmp_path / "orchestrator"), tmp_path / "dvc-remote")
    stages = list(read_dag(repo))
    with (
        prefect_server(tmp_path / "server") as api_url,
        process_worker(api_url, "cpu", tmp_path / "cpu-machine"),
        process_worker(api_url, "gpu", tmp_path / "gpu-machine"),
    ):
        start = time.perf_counter()
        result = flow_cli(repo, api_url, "--dispatch", "--pool", "cpu=cpu", "--pool", "gpu=gpu", timeout=1800)
        wall = time.perf_counter() - start
        print(f"dispatched flow: {wall:.0f} s\n{result.stdout}")
        assert result.returncode == 0, result.stdout + result.stderr[-5000:]

        with temporary_settings({PREFECT_API_URL: api_url}), get_client(sync_client=True) as client:
            jobs = client.read_flow_runs(flow_filter=FlowFilter(name=FlowFilterName(any_=["vitkit-stage"])))
        assert sorted(j.name for j in jobs) == sorted(stages)
        for job in jobs:
            assert job.state.is_completed(), (job.name, job.state)
            expected = "gpu" if job.name.partition("@")[0] in TRAININGS else "cpu"
            assert job.work_pool_name == expected, (job.name, job.work_pool_name)
        for stage in stages:
            assert f"ran on {'gpu' if stage.partition('@')[0] in TRAININGS else 'cpu'}" in result.stdout

        status = run(["dvc", "status"], repo)
        assert "Data and pipelines are up to date" in status.stdout, status.stdout
        evaluate = json.loads((repo / "metrics/evaluate.json").read_text())
        assert 0.0 <= evaluate["teacher"]["top1"] <= 1.0
        assert (repo / "plots/evaluate/teacher_confusion.png").stat().st_size > 0

        # the flow itself deployed to a pool: the cpu worker runs it in this checkout; all is done
        deployed = flow_cli(
            repo, api_url, "--deploy", "cpu", "--dispatch", "--pool", "cpu=cpu", "--pool", "gpu=gpu"
        )
        assert deployed.returncode == 0, deployed.stdout + deployed.stderr
        with temporary_settings({PREFECT_API_URL: api_url}):
            flow_run = run_deployment("vitkit-pipeline/vitkit", timeout=600, poll_interval=2)
        assert flow_run.state.is_completed(), flow_run.state
        assert flow_run.work_pool_name == "cpu"
        assert "Data and pipelines are up to date" in run(["dvc", "status"], repo).stdout
