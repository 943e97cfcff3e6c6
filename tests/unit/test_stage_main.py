"""stage_main: a stage's own arguments reach it, and a foreach item names the stage."""

from __future__ import annotations

import json
from pathlib import Path

import mlflow
import pytest
import yaml
from mlflow.tracking import MlflowClient

from stages.common import StageContext, stage_main
from tests.conftest import smoke_params
from vitkit import tracking


def test_stage_arguments_and_variant_name(tmp_path: Path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the MLflow store goes to the repository root, here tmp_path
    # this test runs a stage in-process: nothing an earlier in-process test left may redirect its run
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv(tracking.PARENT_RUN_ENV, raising=False)
    while mlflow.active_run() is not None:
        mlflow.end_run()
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump(smoke_params()))
    seen: list[StageContext] = []

    def run(ctx: StageContext) -> dict[str, float]:
        seen.append(ctx)
        return {"x": 1.0}

    argv = ["hard", "--params", str(params)]
    code = stage_main("demo", "A demo stage.", run, variants=["none", "hard"], argv=argv)
    assert code == 0
    assert seen[0].variant == "hard"
    assert seen[0].name == "demo@hard"
    client = MlflowClient(tracking.tracking_uri(tmp_path))
    (logged,) = client.search_runs([client.get_experiment_by_name("vitkit").experiment_id])
    assert logged.info.run_name == "demo@hard" and logged.data.tags["vitkit.stage"] == "demo@hard"
    assert logged.data.params["variant"] == "hard"  # what tells the runs of demo apart in a comparison

    # under a flow run: named after it, tagged with it, so two flow runs' runs differ
    flow_run = {"id": "0b7c", "name": "brave-owl", "url": "http://127.0.0.1:4200/flow-runs/flow-run/0b7c"}
    monkeypatch.setenv(tracking.FLOW_RUN_ENV, json.dumps(flow_run))
    assert stage_main("demo", "A demo stage.", run, variants=["none", "hard"], argv=argv) == 0
    (named,) = client.search_runs(
        [client.get_experiment_by_name("vitkit").experiment_id], "tags.`vitkit.flow_run.id` = '0b7c'"
    )
    assert named.info.run_name == "demo@hard · brave-owl"
    assert named.data.tags["vitkit.flow_run.url"] == flow_run["url"]


def test_help_lists_the_stage_arguments(capsys):
    with pytest.raises(SystemExit) as info:
        stage_main("demo", "A demo stage.", lambda ctx: {}, variants=["none", "hard"], argv=["--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    assert "{none,hard}" in out and "which variant of the stage" in out and "--params" in out
    with pytest.raises(SystemExit) as info:
        stage_main("demo", "A demo stage.", lambda ctx: {}, variants=["none", "hard"], argv=["soft"])
    assert info.value.code == 2
