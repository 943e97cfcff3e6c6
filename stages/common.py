"""What every stage entry point shares.

``stage_main`` turns a ``run(ctx) -> metrics`` function into a command-line
stage: it validates the whole params file, checks the MLflow store is
reachable, relaunches itself under torchrun when several processes are asked
for, opens the stage's MLflow run and turns any ``VitkitError`` into one line
on stderr and exit code 2 (the code the Prefect flow does not retry).

A stage that DVC runs once per item of a ``foreach`` (``distill_deit@hard``)
declares its own positional argument with ``add_arguments`` and names the item
with ``variant``: the MLflow run is then named like the DVC stage.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from vitkit import tracking
from vitkit.config import Params, flatten, load_params
from vitkit.engine.device import select_device, set_threads
from vitkit.engine.distributed import DistInfo, init_distributed, shutdown_distributed
from vitkit.errors import USER_ERROR_EXIT_CODE, VitkitError


class NullRun:
    """Stands in for the MLflow run on ranks other than 0, which never log."""

    def __getattr__(self, name: str) -> Callable[..., None]:
        return lambda *args, **kwargs: None


@dataclass
class StageContext:
    name: str
    params: Params
    repo_root: Path
    device: torch.device
    dist: DistInfo
    run: tracking.StageRun | NullRun
    args: argparse.Namespace = field(default_factory=argparse.Namespace)

    def path(self, relative: str) -> Path:
        return self.repo_root / relative


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def dvc_stage_hash(repo_root: Path) -> str:
    """The hash DVC's run cache would key this stage by (cmd + deps' hashes + params + out paths).

    Computed with DVC's own functions, also for stages with persistent outputs, which DVC
    itself leaves out of the run cache.
    """
    addressing = os.environ.get("DVC_STAGE")
    if not addressing:
        return "not-run-by-dvc"
    try:
        from dvc.repo import Repo
        from dvc.stage.cache import _get_cache_hash
        from dvc.stage.serialize import to_single_stage_lockfile

        with Repo(str(repo_root)) as repo:
            stage = repo.stage.collect(addressing)[0]
            stage.save_deps()
            return _get_cache_hash(to_single_stage_lockfile(stage), key=True)
    except Exception as exc:  # the tag is informative; never fail a stage over it
        return f"unavailable ({type(exc).__name__}: {exc})"


def fingerprint(*sections: Any) -> str:
    """A short hash of params sections, to tell whether a checkpoint belongs to this run."""
    blob = json.dumps([s.model_dump() if hasattr(s, "model_dump") else s for s in sections], sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _relaunch_under_torchrun(module: str, nproc: int, argv: list[str]) -> int:
    import subprocess

    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc-per-node={nproc}",
        "-m",
        module,
        *argv,
    ]
    print(f"[{module}] launching {nproc} processes: {' '.join(cmd)}", flush=True)
    return subprocess.call(cmd)


def stage_main(
    name: str,
    description: str,
    run: Callable[[StageContext], Mapping[str, float]],
    distributed: bool = False,
    argv: list[str] | None = None,
    add_arguments: Callable[[argparse.ArgumentParser], None] | None = None,
    variant: Callable[[argparse.Namespace], str] | None = None,
) -> int:
    """Parse args, validate params, set up device/DDP/MLflow and run the stage. Returns the exit code.

    ``add_arguments(parser)`` adds the stage's own arguments (they reach ``run`` as ``ctx.args``);
    ``variant(args)`` names the foreach item, so the stage is reported as ``name@item``.
    """
    parser = argparse.ArgumentParser(
        prog=f"python -m stages.{name}",
        description=description,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--params", default="params.yaml", help="params file (default: %(default)s)")
    if add_arguments is not None:
        add_arguments(parser)
    args = parser.parse_args(argv)
    argv = sys.argv[1:] if argv is None else argv
    module = f"stages.{name}"
    if variant is not None:
        name = f"{name}@{variant(args)}"
    repo_root = Path.cwd()
    started = time.perf_counter()
    try:
        params = load_params(args.params)
        if distributed and params.engine.nproc > 1 and "LOCAL_RANK" not in os.environ:
            return _relaunch_under_torchrun(module, params.engine.nproc, argv)
        uri = tracking.tracking_uri(repo_root)
        tracking.check_reachable(uri)
        set_threads(params.engine.threads)
        seed_everything(params.seed)
        device = select_device(params.engine.device, int(os.environ.get("LOCAL_RANK", "0")))
        dist = init_distributed(device) if distributed else DistInfo()
        try:
            if not dist.is_main:
                metrics = run(StageContext(name, params, repo_root, device, dist, NullRun(), args))
            else:
                tags = {
                    "vitkit.dvc_stage_hash": dvc_stage_hash(repo_root),
                    "vitkit.device": str(device),
                    "vitkit.world_size": str(dist.world_size),
                }
                flat = flatten(params.model_dump(mode="json"))
                with tracking.stage_run(name, repo_root, params.mlflow.experiment, flat, tags) as stage_run:
                    metrics = run(StageContext(name, params, repo_root, device, dist, stage_run, args))
                    stage_run.log_metrics({"stage_time_s": time.perf_counter() - started})
        finally:
            shutdown_distributed()
    except VitkitError as exc:
        print(f"error: [{name}] {exc}", file=sys.stderr, flush=True)
        return USER_ERROR_EXIT_CODE
    except KeyboardInterrupt:
        print(f"[{name}] interrupted; rerun the stage to resume from its last checkpoint", file=sys.stderr)
        return 130
    if dist.is_main:
        summary = ", ".join(f"{k}={v:.4g}" for k, v in metrics.items() if isinstance(v, int | float))
        print(f"[{name}] done in {time.perf_counter() - started:.1f}s: {summary}", flush=True)
    return 0
