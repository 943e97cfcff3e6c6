"""A team's MLflow set-up on loopback: `mlflow server` with a SQL backend and a proxied artifact store.

Stages in a clone log to it; their artifacts must reach the server's store and none may land in
the clone; a second client elsewhere downloads figures and loads a model through the server; a
stage killed with SIGKILL has its run marked KILLED when it starts again.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import mlflow
import pytest
import yaml
from mlflow.tracking import MlflowClient

from tests.conftest import make_pipeline_repo, run, smoke_params
from vitkit.data.shapes import SHAPE_CLASSES

pytestmark = pytest.mark.integration

SERVER_START_TIMEOUT_S = 120
TRACKING_FILES = {"mlartifacts", "mlruns", "mlflow.db", "MLmodel"}


@dataclass
class Server:
    uri: str
    store: Path  # its --artifacts-destination


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_until_healthy(uri: str, process: subprocess.Popen, log: Path) -> None:
    deadline = time.monotonic() + SERVER_START_TIMEOUT_S
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"mlflow server exited with {process.returncode}:\n{log.read_text()}")
        try:
            with urllib.request.urlopen(f"{uri}/health", timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            time.sleep(0.5)
    raise RuntimeError(f"mlflow server not healthy after {SERVER_START_TIMEOUT_S} s:\n{log.read_text()}")


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory) -> Iterator[Server]:
    """`mlflow server` on 127.0.0.1 (sqlite backend, artifacts proxied to a folder), stopped afterwards."""
    root = tmp_path_factory.mktemp("mlflow-server")
    port = free_port()
    cmd = [
        str(Path(sys.executable).parent / "mlflow"),
        "server",
        "--backend-store-uri",
        f"sqlite:///{root / 'server.db'}",
        "--artifacts-destination",
        str(root / "store"),
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--workers",
        "1",
    ]
    log = root / "server.log"
    # its background job runner (7 processes, for GenAI evaluation jobs) is of no use here
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    with log.open("w") as out:
        # its own session: the server's workers are stopped with it
        process = subprocess.Popen(
            cmd, cwd=root, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
    try:
        uri = f"http://127.0.0.1:{port}"
        wait_until_healthy(uri, process, log)
        yield Server(uri, root / "store")
    finally:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(timeout=20)


def tracking_files(clone: Path) -> list[Path]:
    """What MLflow could have left in a clone: a local store, its artifact folders, any logged model."""
    return [p for p in clone.rglob("*") if p.name in TRACKING_FILES]


def stored_files(server: Server, run) -> dict[str, Path]:
    """{file name: path} of a run's files in the server's artifact store."""
    folder = server.store / run.info.artifact_uri.removeprefix("mlflow-artifacts:/")
    return {p.name: p for p in folder.rglob("*") if p.is_file()}


def stage_command(name: str, params_file: Path) -> list[str]:
    return [sys.executable, "-m", f"stages.{name}", "--params", str(params_file)]


def md5(path: Path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


def runs_of(client: MlflowClient, stage: str, experiment: str = "vitkit"):
    experiment_id = client.get_experiment_by_name(experiment).experiment_id
    return client.search_runs([experiment_id], filter_string=f"tags.`vitkit.stage` = '{stage}'")


def kill_once_it_trains(clone: Path, params_file: Path, env: dict, client: MlflowClient, log: Path) -> str:
    """Start train_teacher, SIGKILL it once its run on the server has an epoch logged; the run's id."""
    with log.open("w") as out:
        process = subprocess.Popen(
            stage_command("train_teacher", params_file),
            cwd=clone,
            env={**os.environ, **env},
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    try:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and process.poll() is None:
            running = [r for r in runs_of(client, "train_teacher", "killed") if r.info.status == "RUNNING"]
            if running and client.get_metric_history(running[0].info.run_id, "train_loss"):
                process.send_signal(signal.SIGKILL)
                process.wait(timeout=30)
                return running[0].info.run_id
            time.sleep(0.5)
        raise AssertionError(f"train_teacher never logged an epoch to the server:\n{log.read_text()}")
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(timeout=30)


LOAD_ELSEWHERE = """
import json, sys
from pathlib import Path
import mlflow, pandas, torch
from torchvision.io import encode_png
run_id, image_size = sys.argv[1], int(sys.argv[2])
figures = mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path="figures", dst_path="downloaded")
model = mlflow.pyfunc.load_model(f"runs:/{run_id}/model")
png = encode_png(torch.zeros(3, image_size, image_size, dtype=torch.uint8)).numpy().tobytes()
out = model.predict(pandas.DataFrame({"image": [png, png]}))
print(json.dumps({"figures": sorted(p.name for p in Path(figures).iterdir()), "columns": list(out.columns)}))
"""


def test_a_stage_logs_through_the_server_and_leaves_nothing_in_the_clone(mlflow_server, tmp_path):
    clone = make_pipeline_repo(tmp_path / "clone")
    env = {"MLFLOW_TRACKING_URI": mlflow_server.uri}
    client = MlflowClient(mlflow_server.uri)

    # an experiment made by a vitkit that gave the server a local location: its runs would write here
    client.create_experiment("old", artifact_location=(clone / "mlartifacts").as_uri())
    old_params = tmp_path / "old.yaml"
    old_params.write_text(yaml.safe_dump(smoke_params(mlflow={"experiment": "old"})))
    refused = run(stage_command("prepare", old_params), clone, env)
    assert refused.returncode == 2, refused.stdout + refused.stderr
    (error,) = [line for line in refused.stderr.splitlines() if line.startswith("error: [prepare]")]
    assert "experiment 'old'" in error and "inside this checkout" in error and "mlflow.experiment" in error
    assert not (clone / "data").exists()

    params_file = tmp_path / "params.yaml"
    params_file.write_text(yaml.safe_dump(smoke_params()))
    prepared = run(stage_command("prepare", params_file), clone, env)
    assert prepared.returncode == 0, prepared.stdout + prepared.stderr
    (logged,) = runs_of(client, "prepare")
    assert logged.info.status == "FINISHED" and logged.info.artifact_uri.startswith("mlflow-artifacts:")
    assert tracking_files(clone) == []
    stored = stored_files(mlflow_server, logged)
    assert md5(stored["dataset_card.json"]) == md5(clone / "reports/dataset_card.json")
    elsewhere = tmp_path / "elsewhere"  # what another machine gets, through the server alone
    downloaded = mlflow.artifacts.download_artifacts(
        run_id=logged.info.run_id,
        artifact_path="figures",
        dst_path=str(elsewhere),
        tracking_uri=mlflow_server.uri,
    )
    assert md5(Path(downloaded) / "samples.png") == md5(clone / "plots/prepare/samples.png")


@pytest.mark.slow
def test_a_killed_teacher_ends_killed_and_its_model_loads_elsewhere(mlflow_server, tmp_path):
    clone = make_pipeline_repo(tmp_path / "clone")
    env = {"MLFLOW_TRACKING_URI": mlflow_server.uri}
    client = MlflowClient(mlflow_server.uri)
    params = smoke_params(teacher={"init": "scratch"}, mlflow={"experiment": "killed"})
    params_file = tmp_path / "params.yaml"
    params_file.write_text(yaml.safe_dump(params))
    prepared = run(stage_command("prepare", params_file), clone, env)
    assert prepared.returncode == 0, prepared.stdout + prepared.stderr

    # a long teacher killed after its first epoch: its run cannot end itself
    long_params = tmp_path / "long.yaml"
    long = smoke_params(teacher={"init": "scratch", "epochs": 500}, mlflow={"experiment": "killed"})
    long_params.write_text(yaml.safe_dump(long))
    killed_id = kill_once_it_trains(clone, long_params, env, client, tmp_path / "killed.log")
    assert client.get_run(killed_id).info.status == "RUNNING"

    teacher = run(stage_command("train_teacher", params_file), clone, env)
    assert teacher.returncode == 0, teacher.stdout + teacher.stderr
    assert f"run {killed_id} was left RUNNING by a process that died: marked KILLED" in teacher.stdout
    assert client.get_run(killed_id).info.status == "KILLED"
    (finished,) = [r for r in runs_of(client, "train_teacher", "killed") if r.info.status == "FINISHED"]
    assert tracking_files(clone) == []
    assert md5(stored_files(mlflow_server, finished)["model.pt"]) == md5(clone / "artifacts/teacher/model.pt")
    assert list(mlflow_server.store.rglob("MLmodel"))  # the logged model, on the server too

    # a second client, in another directory, through the server alone
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    image_size = params["data"]["classification"]["image_size"]
    load = [sys.executable, "-c", LOAD_ELSEWHERE, finished.info.run_id, str(image_size)]
    loaded = run(load, elsewhere, env)
    assert loaded.returncode == 0, loaded.stderr
    result = json.loads(loaded.stdout.strip().splitlines()[-1])
    assert result["figures"] == ["curves.png"]
    classes = sorted(SHAPE_CLASSES)  # data.classes is null: the shapes data's six, in label order
    assert result["columns"] == ["label", "score", *(f"prob_{c}" for c in classes)]
    assert (elsewhere / "downloaded/figures/curves.png").stat().st_size > 0
