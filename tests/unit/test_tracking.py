"""MLflow conventions: URI, artifact location, reachability, run nesting and tags, batched metrics,
the status a run ends with (also when its process was killed); models: tests/unit/test_serving.py."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import pytest
from mlflow.tracking import MlflowClient

from tests.readonly import read_only
from vitkit import tracking
from vitkit.errors import TrackingError

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def repo(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv(tracking.PARENT_RUN_ENV, raising=False)
    return tmp_path


def test_default_uri_is_absolute_in_repo_root_whatever_the_cwd(repo, monkeypatch):
    monkeypatch.chdir("/")
    assert tracking.tracking_uri(repo) == f"sqlite:///{repo.resolve()}/mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://example.invalid:5000")
    assert tracking.tracking_uri(repo) == "http://example.invalid:5000"


def test_artifacts_stay_local_only_beside_a_local_database(repo):
    assert (
        tracking.artifact_location(tracking.tracking_uri(repo)) == (repo.resolve() / "mlartifacts").as_uri()
    )
    # a server chooses (mlflow-artifacts: through its proxy); a local path would fill the client's disk
    assert tracking.artifact_location("http://127.0.0.1:5000") is None


def test_unreachable_server_fails_fast_with_one_message():
    with socket.socket() as sock:  # a port nobody listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    start = time.perf_counter()
    with pytest.raises(TrackingError) as info:
        tracking.check_reachable(f"http://127.0.0.1:{port}")
    assert time.perf_counter() - start < 10
    assert f"http://127.0.0.1:{port} is unreachable" in str(info.value)
    assert "MLFLOW_TRACKING_URI" in str(info.value)


def test_unwritable_sqlite_folder_is_reported(tmp_path):
    with pytest.raises(TrackingError, match="does not exist or is not writable"):
        tracking.check_reachable(f"sqlite:///{tmp_path}/missing/mlflow.db")


def test_a_read_only_database_or_artifact_folder_is_reported_before_any_run(repo):
    """sqlite opens a read-only database quietly and fails at the first write, after the training."""
    uri = tracking.tracking_uri(repo)
    tracking.open_experiment(uri, "exp", repo)
    (repo / "mlartifacts").mkdir(exist_ok=True)
    cases = {repo / "mlflow.db": "MLflow database", repo / "mlartifacts": "MLflow artifact folder"}
    for path, what in cases.items():
        with read_only(path), pytest.raises(TrackingError) as info:
            tracking.check_reachable(uri)
        assert str(info.value).startswith(f"{what} {path} is not writable")
        assert "MLFLOW_TRACKING_URI" in str(info.value)
    tracking.check_reachable(uri)


def test_stage_run_is_a_tagged_child_of_the_flow_run_with_per_epoch_metrics(repo, monkeypatch):
    uri = tracking.tracking_uri(repo)
    experiment_id = tracking.open_experiment(uri, "exp", repo)
    assert (
        MlflowClient(uri).get_experiment(experiment_id).artifact_location == (repo / "mlartifacts").as_uri()
    )
    with mlflow.start_run(experiment_id=experiment_id, run_name="pipeline") as parent:
        monkeypatch.setenv(tracking.PARENT_RUN_ENV, parent.info.run_id)
        with tracking.stage_run(
            "train_x", repo, "exp", {"x.lr": 0.1}, {"vitkit.dvc_stage_hash": "abc"}
        ) as run:
            for epoch in (1, 2, 3):
                run.log_epoch({"epoch": epoch, "loss": 1.0 / epoch, "acc": 0.3 * epoch})
            child_id = run.run_id
    client = MlflowClient(uri)
    child = client.get_run(child_id)
    assert child.data.tags["mlflow.parentRunId"] == parent.info.run_id
    assert child.data.tags["vitkit.stage"] == "train_x"
    assert child.data.tags["vitkit.dvc_stage_hash"] == "abc"
    assert "mlflow.source.git.commit" in child.data.tags
    assert child.data.params == {"x.lr": "0.1"}
    history = client.get_metric_history(child_id, "loss")
    assert [(m.step, round(m.value, 3)) for m in history] == [(1, 1.0), (2, 0.5), (3, 0.333)]
    assert child.info.status == "FINISHED"


def test_failed_stage_marks_its_run_failed_and_an_interrupted_one_killed(repo):
    with pytest.raises(RuntimeError), tracking.stage_run("boom", repo, "exp", {}) as run:
        raise RuntimeError("stage crashed")
    with pytest.raises(KeyboardInterrupt), tracking.stage_run("boom", repo, "exp", {}) as interrupted:
        raise KeyboardInterrupt
    client = MlflowClient(tracking.tracking_uri(repo))
    assert client.get_run(run.run_id).info.status == "FAILED"
    assert client.get_run(interrupted.run_id).info.status == "KILLED"


KILLED_STAGE = """
import os, signal, sys
from pathlib import Path
from tests.readonly import read_only
from vitkit import tracking
with tracking.stage_run("train_x", Path(sys.argv[1]), "exp", {}) as run:
    print(run.run_id, flush=True)
    os.kill(os.getpid(), signal.SIGKILL)
"""


def test_run_of_a_killed_stage_is_marked_killed_when_the_stage_starts_again(repo):
    killed = subprocess.run(
        [sys.executable, "-c", KILLED_STAGE, str(repo)], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    killed_id = killed.stdout.strip()
    uri = tracking.tracking_uri(repo)
    client = MlflowClient(uri)
    assert client.get_run(killed_id).info.status == "RUNNING"  # nothing could end it

    # runs that must survive: this live process's, another host's, another stage's
    experiment_id = client.get_experiment_by_name("exp").experiment_id
    alive = client.create_run(experiment_id, tags={tracking.STAGE_TAG: "train_x", **tracking.process_tags()})
    elsewhere_tags = {**tracking.process_tags(), tracking.HOST_TAG: "another-machine", tracking.PID_TAG: "1"}
    elsewhere = client.create_run(experiment_id, tags={tracking.STAGE_TAG: "train_x", **elsewhere_tags})
    killed_tags = client.get_run(killed_id).data.tags
    dead_process = {
        k: killed_tags[k] for k in (tracking.HOST_TAG, tracking.PID_TAG, tracking.PROCESS_START_TAG)
    }
    other_stage = client.create_run(experiment_id, tags={tracking.STAGE_TAG: "train_y", **dead_process})

    with tracking.stage_run("train_x", repo, "exp", {}) as rerun:
        pass
    assert client.get_run(killed_id).info.status == "KILLED"
    assert "was gone" in client.get_run(killed_id).data.tags["vitkit.killed_because"]
    assert client.get_run(rerun.run_id).info.status == "FINISHED"
    for survivor in (alive, elsewhere, other_stage):
        assert client.get_run(survivor.info.run_id).info.status == "RUNNING"


class FlakyClient:
    """Stands in for MlflowClient against a server that is down while ``down`` is set."""

    def __init__(self) -> None:
        self.down = False
        self.logged: list[tuple[str, int]] = []

    def log_batch(self, run_id: str, metrics=(), params=()) -> None:
        if self.down:
            raise ConnectionError("Connection refused")
        self.logged += [(m.key, m.step) for m in metrics]

    def log_artifact(self, run_id: str, path: str, folder: str | None = None) -> None:
        self.log_batch(run_id)


def test_a_server_that_stops_answering_costs_one_bounded_wait_and_gets_the_missed_epochs_later(capsys):
    handle = tracking.StageRun("run-id", "train_teacher", "http://127.0.0.1:5000")
    handle.client = client = FlakyClient()
    handle.log_epoch({"epoch": 1, "train_loss": 1.0})
    client.down = True
    handle.log_epoch({"epoch": 2, "train_loss": 0.9})  # one try, then training goes on
    out = capsys.readouterr().out
    assert "MLflow server http://127.0.0.1:5000 does not answer (Connection refused); training goes on" in out
    handle.log_epoch({"epoch": 3, "train_loss": 0.8})  # within RETRY_EVERY_S: kept without a try
    assert capsys.readouterr().out == "" and client.logged == [("train_loss", 1)]
    client.down = False
    handle._last_try -= tracking.RETRY_EVERY_S  # as if the next epoch ended RETRY_EVERY_S later
    handle.log_epoch({"epoch": 4, "train_loss": 0.7})
    assert client.logged == [("train_loss", step) for step in (1, 2, 3, 4)]
    assert "answers again" in capsys.readouterr().out and handle.down_since is None

    client.down = True  # down again when the training is over: publishing cannot be done without it
    handle.log_epoch({"epoch": 5, "train_loss": 0.6})
    with pytest.raises(TrackingError, match=r"did not take model.pt .*run the stage again once the server"):
        handle.log_artifact(Path("model.pt"), "weights")
    # the environment bounds MLflow's own retries: three tries of at most 10 s, 2-3 s of backoff
    assert {k: os.environ[k] for k in tracking.HTTP_BOUNDS} == tracking.HTTP_BOUNDS


def test_a_real_refused_connection_is_one_short_wait(repo):
    """Against a port nobody listens on, MLflow's bounded retries give up in seconds, not minutes."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    handle = tracking.StageRun("run-id", "train_teacher", f"http://127.0.0.1:{port}")
    start = time.monotonic()
    handle.log_epoch({"epoch": 1, "train_loss": 1.0})
    assert time.monotonic() - start < tracking.REQUEST_BOUND_S
    assert handle.down_since is not None and len(handle.missed) == 1
