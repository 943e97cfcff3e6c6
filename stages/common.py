"""What every stage entry point shares.

``stage_main`` turns a ``run(ctx) -> metrics`` function into a command-line
stage: it validates the whole params file, checks the MLflow store is
reachable, relaunches itself under torchrun when several processes are asked
for, opens the stage's MLflow run and turns any ``VitkitError`` into one line
on stderr and exit code 2 (the code the Prefect flow does not retry).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from vitkit import tracking
from vitkit.config import OptimParams, Params, flatten, load_params
from vitkit.engine.device import select_device, set_threads
from vitkit.engine.distributed import DistInfo, init_distributed, shutdown_distributed
from vitkit.engine.trainer import TrainerConfig
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
    variant: str | None = None  # the foreach item of a stage with variants (``train_detr@deformable``)

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


def file_digest(path: Path | None) -> str:
    """sha256 of a file (e.g. the weights a model starts from); empty for None."""
    if path is None:
        return ""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def trainer_config(
    ctx: StageContext, optim: OptimParams, desc: str, fingerprint: str, **overrides: Any
) -> TrainerConfig:
    """The engine's config for a stage: its optimiser params, the shared ``engine`` params and the seed.

    ``overrides`` replace derived fields (e.g. DeiT's batch-scaled ``lr``).
    """
    engine = ctx.params.engine
    fields: dict[str, Any] = {
        "epochs": optim.epochs,
        "batch_size": optim.batch_size,
        "lr": optim.lr,
        "weight_decay": optim.weight_decay,
        "warmup_epochs": optim.warmup_epochs,
        "grad_clip": optim.grad_clip,
        "seed": ctx.params.seed,
        "amp": engine.amp,
        "channels_last": engine.channels_last,
        "num_workers": engine.num_workers,
        "checkpoint_every_steps": engine.checkpoint_every_steps,
        "progress": engine.progress,
        "desc": desc,
        "fingerprint": fingerprint,
    }
    return TrainerConfig(**{**fields, **overrides})


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
    variants: Sequence[str] | None = None,
) -> int:
    """Parse args, validate params, set up device/DDP/MLflow and run the stage. Returns the exit code.

    ``variants``: a stage DVC runs once per item (``foreach``) takes the item as a positional
    argument, gets it as ``ctx.variant`` and is tracked in MLflow under DVC's name for it,
    ``<name>@<variant>``.
    """
    parser = argparse.ArgumentParser(
        prog=f"python -m stages.{name}",
        description=description,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    if variants:
        parser.add_argument("variant", choices=list(variants), help="which variant of the stage to run")
    parser.add_argument("--params", default="params.yaml", help="params file (default: %(default)s)")
    args = parser.parse_args(argv)
    variant: str | None = getattr(args, "variant", None)
    label = f"{name}@{variant}" if variant else name
    argv = sys.argv[1:] if argv is None else argv
    repo_root = Path.cwd()
    started = time.perf_counter()
    try:
        params = load_params(args.params)
        if distributed and params.engine.nproc > 1 and "LOCAL_RANK" not in os.environ:
            return _relaunch_under_torchrun(f"stages.{name}", params.engine.nproc, argv)
        uri = tracking.tracking_uri(repo_root)
        tracking.check_reachable(uri)
        set_threads(params.engine.threads)
        seed_everything(params.seed)
        device = select_device(params.engine.device, int(os.environ.get("LOCAL_RANK", "0")))
        dist = init_distributed(device) if distributed else DistInfo()
        try:
            if not dist.is_main:
                metrics = run(StageContext(label, params, repo_root, device, dist, NullRun(), variant))
            else:
                tags = {
                    "vitkit.dvc_stage_hash": dvc_stage_hash(repo_root),
                    "vitkit.device": str(device),
                    "vitkit.world_size": str(dist.world_size),
                }
                flat = flatten(params.model_dump(mode="json"))
                with tracking.stage_run(label, repo_root, params.mlflow.experiment, flat, tags) as stage_run:
                    metrics = run(StageContext(label, params, repo_root, device, dist, stage_run, variant))
                    stage_run.log_metrics({"stage_time_s": time.perf_counter() - started})
        finally:
            shutdown_distributed()
    except VitkitError as exc:
        print(f"error: [{label}] {exc}", file=sys.stderr, flush=True)
        return USER_ERROR_EXIT_CODE
    except KeyboardInterrupt:
        print(f"[{label}] interrupted; rerun the stage to resume from its last checkpoint", file=sys.stderr)
        return 130
    if dist.is_main:
        summary = ", ".join(f"{k}={v:.4g}" for k, v in metrics.items() if isinstance(v, int | float))
        print(f"[{label}] done in {time.perf_counter() - started:.1f}s: {summary}", flush=True)
    return 0
