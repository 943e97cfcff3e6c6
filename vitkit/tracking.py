"""MLflow conventions: where runs go, how they are named, tagged and nested.

- Tracking URI: ``$MLFLOW_TRACKING_URI`` if set, else ``sqlite:///<repo root>/mlflow.db``
  (MLflow's own default is relative to the working directory, so runs started
  from another folder would land in another database).
- Artifacts of experiments created here live in ``<repo root>/mlartifacts``.
- One run per stage, tagged with the stage name, the git commit and the
  stage's DVC hash; under a Prefect flow run the flow's parent run id arrives
  through ``VITKIT_MLFLOW_PARENT_RUN_ID`` and stage runs become its children.
- Per-epoch metrics go in one ``log_batch`` call per epoch, not one call per number.
- A tracking server that cannot be reached is reported before any work starts.
"""

from __future__ import annotations

import contextlib
import logging
import os
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from vitkit.errors import TrackingError

PARENT_RUN_ENV = "VITKIT_MLFLOW_PARENT_RUN_ID"
TELEMETRY_ENV = {"MLFLOW_DISABLE_TELEMETRY": "true", "DO_NOT_TRACK": "true"}

for _key, _value in TELEMETRY_ENV.items():
    os.environ.setdefault(_key, _value)

import mlflow  # noqa: E402  (telemetry must be off before mlflow is imported)
from mlflow.entities import Metric, Param  # noqa: E402
from mlflow.tracking import MlflowClient  # noqa: E402

MAX_PARAM_LENGTH = 6000


def tracking_uri(repo_root: Path) -> str:
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{Path(repo_root).resolve() / 'mlflow.db'}"


def check_reachable(uri: str, timeout_s: float = 5.0) -> None:
    """Fail fast, with one message, when the tracking store cannot be used."""
    if uri.startswith(("http://", "https://")):
        health = uri.rstrip("/") + "/health"
        try:
            with urllib.request.urlopen(health, timeout=timeout_s) as response:
                if response.status != 200:
                    raise TrackingError(f"MLflow server {uri} answered {response.status} on /health")
        except (urllib.error.URLError, OSError) as exc:
            raise TrackingError(
                f"MLflow tracking server {uri} is unreachable ({getattr(exc, 'reason', exc)}). Start it "
                "(`mlflow server --host 127.0.0.1 --port 5000`), fix MLFLOW_TRACKING_URI, or unset it to "
                "log to the local sqlite database."
            ) from None
        return
    if uri.startswith("sqlite:///"):
        db = Path(uri.removeprefix("sqlite:///"))
        if not db.parent.is_dir() or not os.access(db.parent, os.W_OK):
            raise TrackingError(f"MLflow database folder {db.parent} does not exist or is not writable")
    try:
        MlflowClient(uri).search_experiments(max_results=1)
    except Exception as exc:
        raise TrackingError(f"MLflow tracking store {uri} cannot be used: {exc}") from None


def ensure_experiment(name: str, repo_root: Path) -> str:
    """The experiment's id, creating it with artifacts under ``<repo root>/mlartifacts``."""
    experiment = mlflow.get_experiment_by_name(name)
    if experiment is not None:
        return experiment.experiment_id
    try:
        return mlflow.create_experiment(
            name, artifact_location=(Path(repo_root).resolve() / "mlartifacts").as_uri()
        )
    except mlflow.exceptions.MlflowException:
        # another stage process created it at the same moment
        existing = mlflow.get_experiment_by_name(name)
        if existing is None:
            raise
        return existing.experiment_id


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


class StageRun:
    """Thin handle over the active MLflow run of one stage."""

    def __init__(self, run_id: str) -> None:
        self.run_id = run_id
        self.client = MlflowClient()

    def log_params(self, flat: Mapping[str, Any]) -> None:
        params = [Param(k, str(v)[:MAX_PARAM_LENGTH]) for k, v in flat.items()]
        for start in range(0, len(params), 100):
            self.client.log_batch(self.run_id, params=params[start : start + 100])

    def log_metrics(self, values: Mapping[str, float], step: int | None = None) -> None:
        """All numbers of one step in a single call."""
        now = int(time.time() * 1000)
        metrics = [Metric(k, float(v), now, step or 0) for k, v in values.items() if v is not None]
        if metrics:
            self.client.log_batch(self.run_id, metrics=metrics)

    def log_epoch(self, row: Mapping[str, float]) -> None:
        self.log_metrics({k: v for k, v in row.items() if k != "epoch"}, step=int(row["epoch"]))

    def log_artifact(self, path: Path, folder: str | None = None) -> None:
        self.client.log_artifact(self.run_id, str(path), folder)

    def log_model(self, model: Any, name: str, input_example: Any) -> None:
        """The model as an MLflow model that ``mlflow.pytorch.load_model`` loads back and runs.

        Pickle serialisation (torch.export cannot trace every model here) with the
        vitkit package shipped as code, and pinned requirements so MLflow does not
        spend a minute inferring them.
        """
        import torch
        import torchvision

        import vitkit

        # MLflow warns about pickle on every call; the choice is deliberate (the weights file beside it
        # is the safe, weights_only copy), so keep the stage logs free of it.
        logging.getLogger("mlflow.pytorch").setLevel(logging.ERROR)
        mlflow.pytorch.log_model(
            model,
            name=name,
            serialization_format="pickle",
            input_example=input_example,
            code_paths=[str(Path(vitkit.__file__).parent)],
            pip_requirements=[
                f"torch=={torch.__version__.split('+')[0]}",
                f"torchvision=={torchvision.__version__.split('+')[0]}",
            ],
        )


@contextlib.contextmanager
def stage_run(
    stage: str,
    repo_root: Path,
    experiment: str,
    params: Mapping[str, Any],
    extra_tags: Mapping[str, str] | None = None,
) -> Iterator[StageRun]:
    """Open the stage's run (as a child of the flow's run when there is one) and close it with its status."""
    uri = tracking_uri(repo_root)
    mlflow.set_tracking_uri(uri)
    experiment_id = ensure_experiment(experiment, repo_root)
    tags = {"vitkit.stage": stage, "mlflow.source.git.commit": git_commit(repo_root), **(extra_tags or {})}
    parent = os.environ.get(PARENT_RUN_ENV) or None
    nested = mlflow.active_run() is not None
    with mlflow.start_run(
        experiment_id=experiment_id, run_name=stage, parent_run_id=parent, nested=nested, tags=tags
    ) as run:
        handle = StageRun(run.info.run_id)
        handle.log_params(params)
        yield handle
