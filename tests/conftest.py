"""Test-session environment: tool state in a temporary folder, tools quiet and offline.

Set before anything imports prefect, mlflow or dvc, so nothing is written to
~/.prefect, /var/tmp or the project's own mlflow.db.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
_STATE = Path(tempfile.mkdtemp(prefix="vitkit-tests-"))
os.environ.update(
    {
        "PREFECT_HOME": str(_STATE / "prefect"),
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "MLFLOW_DISABLE_TELEMETRY": "true",
        "DO_NOT_TRACK": "true",
        "DVC_SITE_CACHE_DIR": str(_STATE / "dvc-site-cache"),
        "DVC_NO_ANALYTICS": "1",
        # stage commands in dvc.yaml call `python` and the flow calls `dvc`: use this environment's
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
    }
)
os.environ.pop("MLFLOW_TRACKING_URI", None)

PROJECT_FILES = ("dvc.yaml", "stages", "vitkit", "flows", "profiles", "pyproject.toml", ".dvcignore")


def smoke_params(**overrides: dict) -> dict:
    """params.yaml with the smoke profile applied, plus ``overrides``."""
    from vitkit.config import deep_merge, profile_overrides

    params = deep_merge(yaml.safe_load((ROOT / "params.yaml").read_text()), profile_overrides("smoke"))
    return deep_merge(params, overrides)


def make_pipeline_repo(path: Path, params: dict | None = None) -> Path:
    """A fresh git + DVC repository holding a copy of the project with the smoke params."""
    path.mkdir(parents=True, exist_ok=True)
    for name in PROJECT_FILES:
        source = ROOT / name
        if source.is_dir():
            shutil.copytree(source, path / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(source, path / name)
    shutil.copy2(ROOT / ".gitignore", path / ".gitignore")
    (path / "params.yaml").write_text(yaml.safe_dump(params or smoke_params(), sort_keys=False))
    for cmd in (
        ["git", "init", "-q"],
        ["git", "config", "user.email", "tests@vitkit"],
        ["git", "config", "user.name", "vitkit tests"],
        ["dvc", "init", "-q"],
        ["dvc", "config", "core.analytics", "false"],
        ["dvc", "config", "core.autostage", "true"],
        ["git", "add", "-A"],
        ["git", "commit", "-qm", "smoke project"],
    ):
        subprocess.run(cmd, cwd=path, check=True, capture_output=True)
    return path


def run(cmd: list[str], cwd: Path, env: dict[str, str] | None = None, timeout: int = 600):
    return subprocess.run(
        cmd, cwd=cwd, capture_output=True, text=True, timeout=timeout, env={**os.environ, **(env or {})}
    )


@pytest.fixture(scope="session")
def prefect_harness() -> Iterator[None]:
    """One temporary Prefect server for the whole session (it takes ~10 s to start)."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield
