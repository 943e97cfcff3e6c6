"""MLflow conventions: where runs go, how they are named, tagged and nested.

- Tracking URI: ``$MLFLOW_TRACKING_URI`` if set, else ``sqlite:///<repo root>/mlflow.db``
  (MLflow's own default is relative to the working directory, so runs started
  from another folder would land in another database).
- Artifacts: with a local sqlite store, beside the database (``<repo root>/mlartifacts`` for the
  default); with a tracking server, wherever the server says (``mlflow-artifacts:`` URIs proxied
  through it with ``mlflow server --artifacts-destination``), so nothing lands in the client's checkout.
- One run per stage, tagged with the stage name, the git commit and the
  stage's DVC hash; under a Prefect flow run the flow's parent run id arrives
  through ``VITKIT_MLFLOW_PARENT_RUN_ID`` and stage runs become its children, and the flow run
  (id, name, URL: ``VITKIT_FLOW_RUN``) names them ``<stage> · <flow run name>`` and is tagged on
  them, so the runs of two flow runs differ by name and each leads back to its flow run.
- The MLflow UI's page of a run: ``run_url`` (a tracking server's own address; for the local
  sqlite store, the ``make mlflow-ui`` address, ``$VITKIT_MLFLOW_UI_URL`` to choose another).
- Per-epoch metrics go in one ``log_batch`` call per epoch, not one call per number.
- A tracking server that cannot be reached is reported before any work starts, in seconds (MLflow
  itself retries for minutes).
- A server that stops answering mid-training costs one bounded wait (``HTTP_BOUNDS``: three tries
  of at most 10 s each and 3 s of backoff, ``REQUEST_BOUND_S``), said in one line; training goes
  on, the epochs it missed are logged once it answers again (tried at most every
  ``RETRY_EVERY_S``). Publishing needs it: if it still does not answer then, the stage stops with
  one ``TrackingError`` line, and its training, kept in the unfinished checkpoint, is only
  published when the stage runs again.
- A run whose process died (SIGKILL, power loss) stays RUNNING in MLflow; runs are tagged with their
  host and process, and the next start of the same stage on that host marks such runs KILLED.
  Ctrl-C ends a run KILLED, any other exception FAILED.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import psutil

from vitkit.config import load_params
from vitkit.errors import USER_ERROR_EXIT_CODE, TrackingError, VitkitError

PARENT_RUN_ENV = "VITKIT_MLFLOW_PARENT_RUN_ID"
FLOW_RUN_ENV = "VITKIT_FLOW_RUN"  # JSON {"id", "name", "url"} of the Prefect flow run a stage runs under
MLFLOW_UI_ENV = "VITKIT_MLFLOW_UI_URL"
LOCAL_UI_URL = "http://127.0.0.1:5000"  # where `make mlflow-ui` serves the local sqlite store
FLOW_RUN_TAGS = {"id": "vitkit.flow_run.id", "name": "vitkit.flow_run.name", "url": "vitkit.flow_run.url"}
TELEMETRY_ENV = {"MLFLOW_DISABLE_TELEMETRY": "true", "DO_NOT_TRACK": "true"}

# MLflow's own defaults (7 retries with exponential backoff, 120 s per request) make a server that
# stopped answering cost 4 to 16 minutes of silence per request. One request gets at most
# 3 tries x 10 s plus 0 + 2..3 s of backoff: REQUEST_BOUND_S. Set these variables to choose otherwise.
HTTP_BOUNDS = {
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "10",
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2",
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
    "MLFLOW_HTTP_REQUEST_BACKOFF_JITTER": "0.5",
}
REQUEST_BOUND_S = 33
RETRY_EVERY_S = 30.0  # while the server does not answer, how often an epoch's values try again

for _key, _value in {**TELEMETRY_ENV, **HTTP_BOUNDS}.items():
    os.environ.setdefault(_key, _value)

import mlflow  # noqa: E402  (telemetry must be off before mlflow is imported)
from mlflow.entities import Metric, Param, RunStatus  # noqa: E402
from mlflow.tracking import MlflowClient  # noqa: E402

MAX_PARAM_LENGTH = 6000
STAGE_TAG = "vitkit.stage"
HOST_TAG = "vitkit.host"
PID_TAG = "vitkit.pid"
PROCESS_START_TAG = "vitkit.process_start"  # with the pid, tells a live process from a reused pid
CHECK_TIMEOUT_S = 10


def tracking_uri(repo_root: Path) -> str:
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{Path(repo_root).resolve() / 'mlflow.db'}"


def is_remote(uri: str) -> bool:
    return uri.startswith(("http://", "https://"))


def ui_url(uri: str) -> str:
    """The MLflow UI that shows the runs of ``uri``: a tracking server itself, else ``make mlflow-ui``'s."""
    return uri.rstrip("/") if is_remote(uri) else os.environ.get(MLFLOW_UI_ENV, LOCAL_UI_URL).rstrip("/")


def runs_page_url(uri: str, experiment_id: str) -> str:
    """The experiment's runs table (MLflow 3 opens an experiment on another tab by default)."""
    return f"{ui_url(uri)}/#/experiments/{experiment_id}/runs"


def run_url(uri: str, experiment_id: str, run_id: str) -> str:
    return f"{runs_page_url(uri, experiment_id)}/{run_id}"


def flow_run_from_env() -> dict[str, str]:
    """The Prefect flow run a stage runs under (id, name, URL), or {} outside a flow."""
    try:
        found = json.loads(os.environ.get(FLOW_RUN_ENV) or "{}")
    except ValueError:
        return {}
    if not isinstance(found, dict):
        return {}
    return {k: str(v) for k, v in found.items() if k in FLOW_RUN_TAGS and v}


def artifact_location(uri: str) -> str | None:
    """Where a new experiment keeps its artifacts: beside a local sqlite database, else the server's choice.

    A tracking server picks the location itself (its ``--artifacts-destination``, proxied as
    ``mlflow-artifacts:``); giving it a local path would make every client write into its own disk.
    """
    if uri.startswith("sqlite:///"):
        return (Path(uri.removeprefix("sqlite:///")).parent / "mlartifacts").as_uri()
    return None


@contextlib.contextmanager
def _one_quick_try() -> Iterator[None]:
    """MLflow requests inside make one attempt with a short timeout (by default they retry for minutes)."""
    quick = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0", "MLFLOW_HTTP_REQUEST_TIMEOUT": str(CHECK_TIMEOUT_S)}
    saved = {key: os.environ.get(key) for key in quick}
    os.environ.update(quick)
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def check_reachable(uri: str, timeout_s: float = 5.0) -> None:
    """Fail fast, with one message, when the tracking store cannot be used."""
    if is_remote(uri):
        health = uri.rstrip("/") + "/health"
        try:
            with urllib.request.urlopen(health, timeout=timeout_s):
                pass
        except urllib.error.HTTPError as exc:
            raise TrackingError(
                f"{uri} answered {exc.code} on /health: is it an MLflow server? Fix MLFLOW_TRACKING_URI."
            ) from None
        except (urllib.error.URLError, OSError) as exc:
            raise TrackingError(
                f"MLflow tracking server {uri} is unreachable ({getattr(exc, 'reason', exc)}). Start it "
                "(`mlflow server --host 127.0.0.1 --port 5000`), fix MLFLOW_TRACKING_URI, or unset it to "
                "log to the local sqlite database."
            ) from None
    elif uri.startswith("sqlite:///"):
        db = Path(uri.removeprefix("sqlite:///"))
        if not db.parent.is_dir() or not os.access(db.parent, os.W_OK):
            raise TrackingError(f"MLflow database folder {db.parent} does not exist or is not writable")
        # sqlite opens a read-only database without complaint and fails at the first write: the
        # run's start, or its last log after the training
        artifacts = db.parent / "mlartifacts"
        for path, what in ((db, "MLflow database"), (artifacts, "MLflow artifact folder")):
            if path.exists() and not os.access(path, os.W_OK):
                raise TrackingError(
                    f"{what} {path} is not writable: make it writable (chmod u+w {path}) or set "
                    "MLFLOW_TRACKING_URI to another store"
                )
    try:
        with _one_quick_try():
            MlflowClient(uri).search_experiments(max_results=1)
    except Exception as exc:
        reason = " ".join(str(exc).split())[:300]  # one line, however long the server's answer
        raise TrackingError(f"MLflow tracking store {uri} cannot be used: {reason}") from None


def ensure_experiment(name: str, uri: str) -> str:
    """The experiment's id, creating it with the artifact location ``artifact_location`` gives."""
    experiment = mlflow.get_experiment_by_name(name)
    if experiment is not None:
        return experiment.experiment_id
    try:
        return mlflow.create_experiment(name, artifact_location=artifact_location(uri))
    except mlflow.exceptions.MlflowException:
        # another stage process created it at the same moment
        existing = mlflow.get_experiment_by_name(name)
        if existing is None:
            raise
        return existing.experiment_id


def open_experiment(uri: str, name: str, repo_root: Path) -> str:
    """Check the store, create it and the experiment if new; the experiment's id.

    Run once before DDP workers start, so they never race to create the database. With a
    tracking server, an experiment whose artifacts live in this checkout (made by a vitkit
    that gave servers a local location) is refused: its runs would write here, not to the server.
    """
    check_reachable(uri)
    mlflow.set_tracking_uri(uri)
    experiment_id = ensure_experiment(name, uri)
    if is_remote(uri):
        location = mlflow.get_experiment(experiment_id).artifact_location
        checkout = Path(repo_root).resolve()
        local = Path(location.removeprefix("file://")) if location.startswith(("file:", "/")) else None
        if local is not None and local.resolve().is_relative_to(checkout):
            raise TrackingError(
                f"experiment '{name}' on {uri} keeps its artifacts in {location}, inside this checkout, "
                "not on the server. Rename it on the server (`mlflow experiments rename`) or set "
                "mlflow.experiment to a new name, so a new one is created with the server's artifact store."
            )
    return experiment_id


def process_tags() -> dict[str, str]:
    """Which process owns a run: read back by ``end_stale_runs``."""
    me = psutil.Process()
    return {HOST_TAG: socket.gethostname(), PID_TAG: str(me.pid), PROCESS_START_TAG: str(me.create_time())}


def _process_alive(pid: int, started: float) -> bool:
    try:
        process = psutil.Process(pid)
        return abs(process.create_time() - started) < 1.0 and process.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def end_stale_runs(client: MlflowClient, experiment_id: str, stage: str) -> list[str]:
    """Mark KILLED the RUNNING runs of ``stage`` whose process on this host is gone; their ids.

    Runs of other hosts are left alone: whether their process lives cannot be told from here.
    """
    host = socket.gethostname()
    running = client.search_runs(
        [experiment_id],
        filter_string=f"attributes.status = 'RUNNING' and tags.`{STAGE_TAG}` = '{stage}'",
    )
    stale = []
    for run in running:
        tags = run.data.tags
        if tags.get(HOST_TAG) != host:
            continue
        try:
            pid, started = int(tags[PID_TAG]), float(tags[PROCESS_START_TAG])
        except (KeyError, ValueError):
            continue
        if not _process_alive(pid, started):
            client.set_terminated(run.info.run_id, RunStatus.to_string(RunStatus.KILLED))
            client.set_tag(run.info.run_id, "vitkit.killed_because", f"process {pid} on {host} was gone")
            stale.append(run.info.run_id)
    return stale


def git_commit(repo_root: Path) -> str:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            cwd=repo_root,
            capture_output=True,
            text=True,
            check=True,
            timeout=10,
        )
        return out.stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def _reason(exc: BaseException) -> str:
    return " ".join(str(exc).split())[:200] or type(exc).__name__


class StageRun:
    """Thin handle over the active MLflow run of one stage.

    With a tracking server, an epoch's values the server did not take are kept and sent with a
    later epoch's, once it answers again; training never waits on the server for more than
    ``REQUEST_BOUND_S``. Everything else (params, artifacts, the model, the final metrics) is
    part of publishing: a server that does not take it is a ``TrackingError``.
    """

    MAX_BATCH = 1000  # metrics per log_batch call, MLflow's limit

    def __init__(self, run_id: str, stage: str, uri: str) -> None:
        self.run_id = run_id
        self.stage = stage
        self.uri = uri
        self.client = MlflowClient(uri)
        self.missed: list[Metric] = []  # epoch values the server has not taken yet
        self.down_since: float | None = None  # when the server stopped answering, while it does not
        self._last_try = 0.0

    def _send(self, metrics: list[Metric]) -> None:
        for start in range(0, len(metrics), self.MAX_BATCH):
            self.client.log_batch(self.run_id, metrics=metrics[start : start + self.MAX_BATCH])

    def _catch_up(self, new: list[Metric], final: bool) -> bool:
        """Send what the server missed with ``new``: one quick try while it is down; whether it took them."""
        self._last_try = time.monotonic()
        try:
            with _one_quick_try() if self.down_since is not None else contextlib.nullcontext():
                self._send(self.missed + new)
        except Exception as exc:
            if not is_remote(self.uri) or final:
                raise
            if self.down_since is None:
                self.down_since = time.monotonic()
                print(
                    f"[{self.stage}] MLflow server {self.uri} does not answer ({_reason(exc)}); training "
                    "goes on and the values it misses are sent when it answers (tried every "
                    f"{RETRY_EVERY_S:.0f} s)",
                    flush=True,
                )
            self.missed += new
            return False
        if self.down_since is not None:
            print(
                f"[{self.stage}] MLflow server {self.uri} answers again after "
                f"{time.monotonic() - self.down_since:.0f} s: sent the {len(self.missed)} values it missed",
                flush=True,
            )
        self.missed, self.down_since = [], None
        return True

    def publish(self, what: str, call: Callable[[], Any]) -> Any:
        """A call publishing needs: a server that does not take it stops the stage with one line."""
        try:
            if self.down_since is not None:
                self._catch_up([], final=True)
            return call()
        except Exception as exc:
            if not is_remote(self.uri):
                raise
            self.down_since = self.down_since or time.monotonic()
            raise TrackingError(
                f"MLflow server {self.uri} did not take {what} ({_reason(exc)}); the finished training is "
                "kept in the stage's checkpoint: run the stage again once the server answers, and it "
                "only publishes (no epoch is trained again)"
            ) from None

    def log_params(self, flat: Mapping[str, Any]) -> None:
        params = [Param(k, str(v)[:MAX_PARAM_LENGTH]) for k, v in flat.items()]
        for start in range(0, len(params), 100):
            batch = params[start : start + 100]
            self.publish("the params", lambda batch=batch: self.client.log_batch(self.run_id, params=batch))

    @staticmethod
    def _metrics(values: Mapping[str, float], step: int | None) -> list[Metric]:
        now = int(time.time() * 1000)
        return [Metric(k, float(v), now, step or 0) for k, v in values.items() if v is not None]

    def log_metrics(self, values: Mapping[str, float], step: int | None = None) -> None:
        """All numbers of one step in a single call (with any epoch values the server missed)."""
        metrics = self._metrics(values, step)
        if metrics:
            self.publish("the metrics", lambda: self._catch_up(metrics, final=True))

    def log_epoch(self, row: Mapping[str, float]) -> None:
        """One epoch's values; kept for later while the server does not answer, training goes on."""
        metrics = self._metrics({k: v for k, v in row.items() if k != "epoch"}, int(row["epoch"]))
        if self.down_since is not None and time.monotonic() - self._last_try < RETRY_EVERY_S:
            self.missed += metrics
            return
        self._catch_up(metrics, final=False)

    def log_artifact(self, path: Path, folder: str | None = None) -> None:
        self.publish(path.name, lambda: self.client.log_artifact(self.run_id, str(path), folder))

    def end(self, status: str) -> None:
        """End the run with ``status``: a ``TrackingError`` if the server does not take FINISHED.

        Ending after a failure tries once, quickly, and lets it go: the run then stays RUNNING, and
        the next start of the stage marks it KILLED.
        """
        if status == RunStatus.to_string(RunStatus.FINISHED):
            self.publish("the end of the run", lambda: mlflow.end_run(status))
            return
        with _one_quick_try(), contextlib.suppress(Exception):
            mlflow.end_run(status)


@contextlib.contextmanager
def stage_run(
    stage: str,
    repo_root: Path,
    experiment: str,
    params: Mapping[str, Any],
    extra_tags: Mapping[str, str] | None = None,
    run_name: str | None = None,
) -> Iterator[StageRun]:
    """Open the stage's run (as a child of the flow's run when there is one) and close it with its status.

    Named ``run_name``, else ``<stage> · <flow run name>`` under a flow run, else ``<stage>``. Earlier
    runs of the stage whose process died are marked KILLED first. The run ends FINISHED, KILLED on
    Ctrl-C, FAILED on any other exception.
    """
    uri = tracking_uri(repo_root)
    mlflow.set_tracking_uri(uri)
    experiment_id = ensure_experiment(experiment, uri)
    for run_id in end_stale_runs(MlflowClient(uri), experiment_id, stage):
        print(f"[{stage}] run {run_id} was left RUNNING by a process that died: marked KILLED", flush=True)
    flow_run = flow_run_from_env()
    tags = {
        STAGE_TAG: stage,
        "mlflow.source.git.commit": git_commit(repo_root),
        **process_tags(),
        **{FLOW_RUN_TAGS[k]: v for k, v in flow_run.items()},
        **(extra_tags or {}),
    }
    if run_name is None:
        run_name = f"{stage} · {flow_run['name']}" if "name" in flow_run else stage
    parent = os.environ.get(PARENT_RUN_ENV) or None
    nested = mlflow.active_run() is not None
    run = mlflow.start_run(
        experiment_id=experiment_id, run_name=run_name, parent_run_id=parent, nested=nested, tags=tags
    )
    handle = StageRun(run.info.run_id, stage, uri)
    status = RunStatus.FINISHED
    try:
        handle.log_params(params)
        yield handle
    except KeyboardInterrupt:
        status = RunStatus.KILLED
        raise
    except BaseException:
        status = RunStatus.FAILED
        raise
    finally:
        handle.end(RunStatus.to_string(status))


def _main(argv: list[str] | None = None) -> int:
    """``python -m vitkit.tracking url``: the MLflow UI page of the experiment's runs."""
    parser = argparse.ArgumentParser(prog="python -m vitkit.tracking", description=_main.__doc__)
    parser.add_argument("command", choices=["url"], help="print the runs page of the experiment")
    parser.add_argument("--params", default="params.yaml", help="params file naming the experiment")
    args = parser.parse_args(argv)
    try:
        name = load_params(args.params).mlflow.experiment
        uri = tracking_uri(Path.cwd())
        with _one_quick_try():
            experiment = MlflowClient(uri).get_experiment_by_name(name)
    except VitkitError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return USER_ERROR_EXIT_CODE
    if experiment is None:
        print(f"MLflow UI: {ui_url(uri)} (no run of experiment '{name}' yet)")
    else:
        print(f"MLflow runs of '{name}': {runs_page_url(uri, experiment.experiment_id)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(_main())
