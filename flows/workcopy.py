"""The copy of the checkout a flow run with a params profile or overrides runs in.

Why a copy, and not ``dvc exp run -S`` in the checkout: the flow runs every stage as a Prefect
task of its own (``dvc repro --single-item``), while ``dvc exp run`` runs the whole pipeline in one
DVC process, either in the workspace, which it leaves holding the experiment's params.yaml and
dvc.lock instead of the committed ones, or in a temporary directory, where no task could follow a
stage. The copy keeps both: the checkout's params.yaml and dvc.lock stay as they are (true for the
checkout's own outputs), and the copy's params.yaml and dvc.lock record what the run used.

A copy is:

- a ``git clone --shared`` of the checkout at its HEAD (the stage runs' git commit), with the
  checkout's uncommitted changes (staged or not, and files git does not track and does not
  ignore) laid over it: the code, params and dvc.lock the checkout itself would run with;
- given the checkout's DVC cache, run-cache included: ``dvc checkout`` brings the outputs the
  checkout has (linked, not copied, where the file system allows), so a stage the overrides do not
  change is up to date and skipped, and a stage already run once with the same params is restored
  from the run-cache instead of run again;
- the overrides written into its params.yaml, comments kept (DVC's own YAML editing).

Its stage runs log to the checkout's MLflow store (the flow passes ``MLFLOW_TRACKING_URI``). It is
kept under ``.vitkit/runs/<flow run name>`` (ignored by git and DVC) for a look at its outputs or
``dvc params diff``; delete it at will.
"""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Mapping
from logging import Logger, LoggerAdapter
from pathlib import Path
from typing import Any

from vitkit.errors import ConfigError

RUNS_DIR = Path(".vitkit") / "runs"
LINK_TYPES = "reflink,hardlink,copy"  # DVC tries them in this order; outputs are never edited in place


def _git(cwd: Path, *args: str) -> str:
    done = subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True, timeout=120)
    if done.returncode != 0:
        raise ConfigError(
            f"git {' '.join(args)} failed in {cwd}: {done.stderr.strip() or done.stdout.strip()}"
        )
    return done.stdout


def _set(tree: Any, key: str, value: Any) -> None:
    *path, last = key.split(".")
    for part in path:
        tree = tree[part]
    tree[last] = value


def make_copy(
    checkout: Path, name: str, overrides: Mapping[str, Any], logger: Logger | LoggerAdapter[Any]
) -> Path:
    """A copy of ``checkout`` under ``.vitkit/runs/<name>`` with ``overrides`` (validated dotted keys
    and values) written into its params.yaml; a copy left by an earlier try of the same run is
    replaced."""
    from dvc.repo import Repo
    from dvc.utils.serialize import modify_yaml

    checkout = checkout.resolve()
    where = checkout / RUNS_DIR / name
    if where.exists():
        shutil.rmtree(where)
    where.parent.mkdir(parents=True, exist_ok=True)
    try:
        commit = _git(checkout, "rev-parse", "HEAD").strip()
    except ConfigError:
        raise ConfigError(
            f"{checkout} has no commit: a run with a profile or overrides starts from the checkout's "
            "HEAD; commit the project first"
        ) from None
    _git(checkout, "clone", "--quiet", "--shared", "--no-checkout", str(checkout), str(where))
    _git(where, "checkout", "--quiet", "--detach", commit)
    # what differs from HEAD (staged or not, deleted too) and what git does not track yet
    changed = _git(checkout, "diff", "-z", "--name-only", "HEAD").split("\0")
    changed += _git(checkout, "ls-files", "-z", "--others", "--exclude-standard").split("\0")
    for rel in filter(None, changed):
        if Path(rel).is_relative_to(RUNS_DIR):
            continue
        source, target = checkout / rel, where / rel
        if source.is_file():
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, target)
        else:
            target.unlink(missing_ok=True)
    local_config = checkout / ".dvc" / "config.local"
    if local_config.is_file():
        shutil.copy2(local_config, where / ".dvc" / "config.local")
    with Repo(str(checkout)) as repo:
        cache_dir = repo.cache.local_cache_dir
    with Repo(str(where)) as repo, repo.config.edit("local") as config:
        config.setdefault("cache", {}).update({"dir": cache_dir, "type": LINK_TYPES})
    with modify_yaml(str(where / "params.yaml")) as params:
        for key, value in overrides.items():
            _set(params, key, value)
    restored = subprocess.run(
        ["dvc", "checkout", "--quiet"], cwd=where, capture_output=True, text=True, timeout=1800
    )
    if restored.returncode != 0:  # outputs the checkout never made, or that its cache lost
        logger.info("the copy lacks outputs the cache does not hold: the stages that make them run")
    logger.info("running in %s: %s at %s with %s", where, checkout.name, commit[:12], dict(overrides))
    return where
