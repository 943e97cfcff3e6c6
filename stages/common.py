"""What every stage entry point shares.

``stage_main`` turns a ``run(ctx) -> metrics`` function into a command-line
stage: it validates the whole params file, checks the MLflow store is
reachable (creating it and the experiment once per machine, before any rank
starts), relaunches itself under torchrun when several processes are asked for
(on this machine or as one node of several: ``vitkit.engine.launch``), opens the
stage's MLflow run on rank 0 and turns any ``VitkitError`` (or an output it may not
write) into one line on stderr and exit code 2 (the code the Prefect flow does not retry).

A stage's checkpoint is marked finished only once every output is written and its MLflow
run has ended: a stage that dies after its last epoch (killed while logging, an output
folder it may not write, an MLflow server gone) resumes at the end of training when run
again and only publishes, in seconds. A stage DVC or torchrun started dies with its parent.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from stages.paths import StagePaths, stage_paths
from vitkit import tracking
from vitkit.config import Params, flatten, load_params
from vitkit.engine.checkpoint import mark_finished, seed_everything
from vitkit.engine.device import (
    check_num_workers,
    check_process_count,
    local_processes,
    select_device,
    set_threads,
)
from vitkit.engine.distributed import DistInfo, dist_info_from_env, init_distributed, shutdown_distributed
from vitkit.engine.launch import (
    die_with_parent,
    launched_by_torchrun,
    launcher_pid,
    node_layout,
    relaunch_if_needed,
)
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

    def path(self, relative: str | Path) -> Path:
        return self.repo_root / relative

    @property
    def out(self) -> StagePaths:
        """This stage's output paths."""
        return stage_paths(self.name.split("@")[0], self.variant)


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


def check_machine(params: Params, label: str) -> None:
    """What a model stage asks of this machine, checked before anything starts (``ConfigError``):
    its processes on this node against the GPUs or cores, its DataLoader workers against the cores.

    Only where the stage runs: params.yaml is written for any machine (a stage may be dispatched
    to a GPU pool while ``prepare`` runs on a CPU one), so ``vitkit.config check`` cannot do it.
    """
    engine = params.engine
    device = select_device(engine.device)
    if launched_by_torchrun():
        per_node = local_processes()
        nnodes = max(1, engine.nproc // per_node)
    else:
        layout = node_layout(engine.nproc, label)
        per_node, nnodes = layout.nproc_per_node, layout.nnodes
    check_process_count(engine.nproc, per_node, nnodes, device)
    check_num_workers(engine.num_workers)


def stage_main(
    name: str,
    description: str,
    run: Callable[[StageContext], Mapping[str, float]],
    distributed: bool = False,
    argv: list[str] | None = None,
    variants: Sequence[str] | None = None,
) -> int:
    """Parse args, validate params, set up device/DDP/MLflow and run the stage. Returns the exit code.

    ``distributed``: a training stage, which may run under torchrun and whose checkpoint is marked
    finished once it has published. ``variants``: a stage DVC runs once per item (``foreach``)
    takes the item as a positional argument, gets it as ``ctx.variant`` and is tracked in MLflow
    under DVC's name for it, ``<name>@<variant>``.
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
    if launched_by_torchrun() or os.environ.get("DVC_STAGE"):
        # an orphaned stage would train on unseen and publish what nobody records
        die_with_parent(launcher_pid() if launched_by_torchrun() else None)
    try:
        params = load_params(args.params)
        if distributed:  # the model stages: their processes and DataLoader workers against this machine
            check_machine(params, label)
        if not launched_by_torchrun() or dist_info_from_env().is_main:
            # one process per machine talks to MLflow: before a relaunch it creates the store and
            # the experiment, so the ranks never race to migrate a new database
            tracking.open_experiment(tracking.tracking_uri(repo_root), params.mlflow.experiment, repo_root)
        module = f"stages.{name}"
        launched = relaunch_if_needed(module, argv, params.engine.nproc, label) if distributed else None
        if launched is not None:  # this process was torchrun's launcher: the workers ran the stage
            return launched
        set_threads(params.engine.threads, label)
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
                if variant:  # DeiT mode, detector arch: what tells the runs of one stage apart
                    flat["variant"] = variant
                with tracking.stage_run(label, repo_root, params.mlflow.experiment, flat, tags) as stage_run:
                    metrics = run(StageContext(label, params, repo_root, device, dist, stage_run, variant))
                    stage_run.log_metrics({"stage_time_s": time.perf_counter() - started})
        finally:
            shutdown_distributed()
        if distributed and dist.writes_files:  # all written and logged: no later run resumes this training
            mark_finished(repo_root / stage_paths(name, variant).checkpoints)
    except VitkitError as exc:
        print(f"error: [{label}] {exc}", file=sys.stderr, flush=True)
        return USER_ERROR_EXIT_CODE
    except PermissionError as exc:  # an output (or its folder) this user may not write
        where = exc.filename or "a file"
        print(
            f"error: [{label}] may not write {where} ({exc.strerror}); give this user write access to "
            "it and its folder, then run the stage again (a finished training is kept in its "
            "checkpoint and only published again)",
            file=sys.stderr,
            flush=True,
        )
        return USER_ERROR_EXIT_CODE
    except KeyboardInterrupt:
        print(f"[{label}] interrupted; rerun the stage to resume from its last checkpoint", file=sys.stderr)
        return 130
    if dist.is_main:
        summary = ", ".join(f"{k}={v:.4g}" for k, v in metrics.items() if isinstance(v, int | float))
        print(f"[{label}] done in {time.perf_counter() - started:.1f}s: {summary}", flush=True)
    return 0
