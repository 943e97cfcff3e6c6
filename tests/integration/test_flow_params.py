"""A run started the way the Prefect UI starts one: the served deployment, with params overrides.

On loopback: a real ``prefect server`` (tests/loopback.py) and ``python -m flows.pipeline --serve``
in a smoke project; ``run_deployment`` is the API call the UI's "Custom run" makes.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from mlflow.tracking import MlflowClient

from tests.conftest import make_pipeline_repo, run
from tests.loopback import _start, _stop, wait_for

pytestmark = pytest.mark.integration

BAD_OVERRIDE_LINE = (
    "error: [pipeline] overrides: teacher.epoch: unknown key; did you mean teacher.epochs? "
    "(docs/params.md lists every key)"
)


def test_a_bad_override_fails_the_flow_run_in_seconds_with_one_line_and_no_retry(tmp_path, prefect_harness):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    from flows.pipeline import pipeline

    repo = make_pipeline_repo(tmp_path / "repo")
    start = time.perf_counter()
    state = pipeline(repo_root=str(repo), overrides={"teacher.epoch": 2}, return_state=True)
    elapsed = time.perf_counter() - start
    assert state.is_failed()
    assert state.message == BAD_OVERRIDE_LINE
    assert elapsed < 10, elapsed
    with get_client(sync_client=True) as client:
        flow_run = client.read_flow_run(state.state_details.flow_run_id)
        tasks = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run.id])))
    assert flow_run.run_count == 1 and tasks == []  # not retried, no stage started
    assert not (repo / "mlflow.db").exists() and not (repo / ".vitkit").exists()

    unknown = pipeline(repo_root=str(repo), stages=["train_teachr"], return_state=True)
    assert unknown.is_failed()
    assert unknown.message.startswith("error: [pipeline] unknown stage(s) train_teachr; dvc.yaml has ")


def served(repo: Path, api_url: str, log: Path) -> subprocess.Popen:
    env = {**os.environ, "PREFECT_API_URL": api_url}
    return _start([sys.executable, "-m", "flows.pipeline", "--serve"], repo, env, log)


@pytest.mark.slow  # a smoke prepare + SSL + teacher, then the teacher again, and two servers: ~3 min
def test_a_deployment_run_with_an_override_runs_what_it_changes_and_links_mlflow(tmp_path):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId, LogFilter, LogFilterFlowRunId
    from prefect.deployments import run_deployment
    from prefect.exceptions import PrefectHTTPStatusError
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from tests.loopback import prefect_server

    repo = make_pipeline_repo(tmp_path / "checkout")
    first = run([sys.executable, "-m", "flows.pipeline", "--stages", "train_teacher"], repo, timeout=2400)
    assert first.returncode == 0, first.stdout + first.stderr[-3000:]
    params_before, lock_before = (repo / "params.yaml").read_text(), (repo / "dvc.lock").read_text()
    teacher_epochs = yaml.safe_load(params_before)["teacher"]["epochs"]
    changed = teacher_epochs + 1

    with prefect_server(tmp_path / "server") as api_url, temporary_settings({PREFECT_API_URL: api_url}):
        server = served(repo, api_url, tmp_path / "serve.log")
        try:

            def deployed() -> bool:
                with get_client(sync_client=True) as client:
                    try:
                        client.read_deployment_by_name("vitkit-pipeline/vitkit")
                        return True
                    except Exception:
                        return False

            wait_for(deployed, 120, "served deployment", tmp_path / "serve.log")

            # a mistyped key: Failed within seconds of the click, one line, no retry
            start = time.perf_counter()
            bad = run_deployment(
                "vitkit-pipeline/vitkit",
                parameters={"stages": ["train_teacher"], "overrides": {"teacher.epoch": 2}},
                timeout=120,
                poll_interval=0.5,
            )
            bad_s = time.perf_counter() - start
            print(f"bad override: Failed {bad_s:.1f} s after run_deployment")
            assert bad.state.is_failed() and bad.state.message == BAD_OVERRIDE_LINE
            assert bad_s < 20, bad_s  # ~5 s on an idle 2-core machine: a 2 s poll, a process start, imports
            with get_client(sync_client=True) as client:
                bad_run = client.read_flow_run(bad.id)
                of_bad_run = LogFilter(flow_run_id=LogFilterFlowRunId(any_=[bad.id]))
                # logs reach the server in batches, after the state: wait for the run's last line
                wait_for(
                    lambda: any("Finished in state" in log.message for log in client.read_logs(of_bad_run)),
                    30,
                    "logs",
                )
                time.sleep(3)  # what the engine logs after that line (a traceback, unfiltered) too
                logs = client.read_logs(of_bad_run)
            assert bad_run.run_count == 1
            errors = [log.message for log in logs if log.level >= logging.ERROR]
            assert errors == [BAD_OVERRIDE_LINE]  # what the UI's log shows: one line, no traceback
            assert not any("Traceback" in log.message for log in logs)

            # a stage name dvc.yaml does not have: the server refuses the run before it exists
            with pytest.raises(PrefectHTTPStatusError) as refused:
                run_deployment("vitkit-pipeline/vitkit", parameters={"stages": ["train_teachr"]}, timeout=0)
            assert "train_teachr" in str(refused.value) and "is not one of" in str(refused.value)

            good = run_deployment(
                "vitkit-pipeline/vitkit",
                parameters={"stages": ["train_teacher"], "overrides": {"teacher.epochs": changed}},
                timeout=1200,
                poll_interval=2,
            )
            assert good.state.is_completed(), good.state.message
            with get_client(sync_client=True) as client:
                this_run = FlowRunFilter(id=FlowRunFilterId(any_=[good.id]))
                tasks = client.read_task_runs(flow_run_filter=this_run)
                artifacts = client.read_artifacts()
        finally:
            _stop(server)

    statuses = {t.name: t.state.name for t in tasks}
    assert statuses == {"prepare": "Completed", "pretrain_ssl": "Completed", "train_teacher": "Completed"}
    assert (repo / "params.yaml").read_text() == params_before  # the checkout stays true
    assert (repo / "dvc.lock").read_text() == lock_before
    assert "Data and pipelines are up to date" in run(["dvc", "status", "train_teacher"], repo).stdout
    copy = repo / ".vitkit" / "runs" / good.name
    assert yaml.safe_load((copy / "params.yaml").read_text())["teacher"]["epochs"] == changed

    client = MlflowClient(f"sqlite:///{repo}/mlflow.db")
    experiment = client.get_experiment_by_name("vitkit")
    of_this_run = f"tags.`vitkit.flow_run.id` = '{good.id}' and tags.`vitkit.stage` = 'pipeline'"
    (parent,) = client.search_runs([experiment.experiment_id], filter_string=of_this_run)
    assert parent.info.run_name == f"pipeline · {good.name}"
    assert parent.data.params["teacher.epochs"] == str(changed)
    assert parent.data.params["flow.overrides"] == f'{{"teacher.epochs": {changed}}}'
    assert parent.data.tags["vitkit.skipped"] == "prepare, pretrain_ssl"  # only what the override changes ran
    assert parent.data.tags["vitkit.flow_run.url"].endswith(f"/flow-runs/flow-run/{good.id}")
    assert len(parent.data.tags["mlflow.source.git.commit"]) == 40
    assert "teacher/val_top1" in parent.data.metrics and "ssl/knn_top1" in parent.data.metrics
    children = client.search_runs(
        [experiment.experiment_id], filter_string=f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'"
    )
    assert [c.info.run_name for c in children] == [f"train_teacher · {good.name}"]
    assert children[0].data.params["teacher.epochs"] == str(changed)
    # Prefect keeps a link artifact as markdown: [text](url)
    links = {a.key: a.data for a in artifacts if a.flow_run_id == good.id and a.key.startswith("mlflow-")}
    parent_url = f"http://127.0.0.1:5000/#/experiments/{experiment.experiment_id}/runs/{parent.info.run_id}"
    assert links["mlflow-pipeline"] == f"[MLflow: pipeline · {good.name}]({parent_url})"
    assert links["mlflow-train-teacher"].endswith(f"/runs/{children[0].info.run_id})")
    assert set(links) == {"mlflow-pipeline", "mlflow-train-teacher"}  # no run, no link, for skipped stages
