"""Per-stage dispatch: each stage runs on the Prefect work pool of its resource class.

Each stage declares its resource class once, in dvc.yaml (``meta: {resources: cpu | gpu}``).
With dispatch on, the pipeline flow sends every stage that is not up to date to the pool of its
class as a run of the small ``vitkit-stage`` flow (``stage_job`` below), in DAG order, and waits
for it. The worker's only contract:

1. its deployment's pull step clones the repository; ``stage_job`` checks out the flow's commit;
2. ``dvc repro --pull <stage>`` restores what the stage needs from the DVC remote (upstream
   stages come back from the remote's run-cache, they are not run again) and runs the stage;
3. ``dvc push --run-cache`` sends its outputs and its run-cache entry back to the remote.

The orchestrating checkout then runs ``dvc repro --pull --single-item <stage>``: DVC finds the
worker's run in the run-cache, checks the outputs out instead of running the stage, and writes
dvc.lock, so the checkout ends as if it had run the stage itself. Were the run-cache to miss,
the orchestrator stops DVC at "Running stage" rather than train locally.

DVC is the data plane (nothing else moves between machines), Prefect the control plane.
"""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_table_artifact

from flows.dvc_run import StageFailed, StageInputError, is_transient, raise_for_stage, run_dvc
from vitkit.errors import VitkitError

RESOURCE_CLASSES = ("cpu", "gpu")
DEFAULT_POOLS = {"cpu": "vitkit-cpu", "gpu": "vitkit-gpu"}
STAGE_FLOW = "vitkit-stage"
STAGE_ENTRYPOINT = "flows/dispatch.py:stage_job"
JOB_ARTIFACT = "vitkit-stage-job"
RUNNING_STAGE = re.compile(r"Running stage '([^']+)'")


class DispatchError(VitkitError):
    """Dispatch cannot start: no pool, no worker, no DVC remote, uncommitted code..."""


# -- the worker side ---------------------------------------------------------------------------


def _git(checkout: Path, *args: str) -> str:
    done = subprocess.run(["git", *args], cwd=checkout, capture_output=True, text=True, timeout=300)
    if done.returncode != 0:
        raise StageFailed(f"git {' '.join(args)} failed in {checkout}: {done.stderr.strip()}")
    return done.stdout.strip()


def _checkout_commit(checkout: Path, commit: str) -> None:
    """Move the deployment's fresh clone to ``commit`` (fetched when the clone is shallow)."""
    changed = _git(checkout, "status", "--porcelain", "--untracked-files=no")
    if changed:
        raise StageFailed(
            f"{checkout} has local changes; a stage job needs the clean clone its pull step made"
        )
    if subprocess.run(["git", "cat-file", "-e", f"{commit}^{{commit}}"], cwd=checkout).returncode != 0:
        _git(checkout, "fetch", "--depth", "1", "origin", commit)
    _git(checkout, "checkout", "--quiet", "--detach", commit)


@flow(name=STAGE_FLOW, flow_run_name="{stage}", log_prints=True)
def stage_job(stage: str, commit: str, env: dict[str, str] | None = None) -> dict[str, Any]:
    """Run one stage at ``commit`` in this worker's clone, inputs from and outputs to the DVC remote."""
    logger = get_run_logger()
    checkout = Path(__file__).resolve().parent.parent
    worker = os.environ.get("PREFECT__WORKER_NAME") or socket.gethostname()
    logger.info("stage %s at %s on worker %s, in %s", stage, commit[:12], worker, checkout)
    start = time.monotonic()
    _checkout_commit(checkout, commit)
    checked_out = time.monotonic()
    repro = run_dvc(["dvc", "repro", "--pull", stage], checkout, logger, env)
    raise_for_stage(stage, repro)
    reran = [s for s in RUNNING_STAGE.findall("\n".join(repro.lines)) if s != stage]
    if reran:  # their results were not in the remote: correct, but the work was done twice
        logger.warning("upstream stages %s were not in the DVC remote's run-cache and ran here again", reran)
    ran = time.monotonic()
    began = repro.time_of(f"Running stage '{stage}'") or ran  # inputs restored, the stage starts
    push = run_dvc(["dvc", "push", "--run-cache", stage], checkout, logger)
    if push.code != 0:
        raise StageFailed(f"dvc push of {stage}'s outputs failed (exit code {push.code}); see the log above")
    job = {
        "stage": stage,
        "worker": worker,
        "status": "ran" if repro.has(f"Running stage '{stage}'") else "restored",
        "reran_upstream": ", ".join(reran),
        "checkout_s": round(checked_out - start, 2),
        "pull_s": round(began - checked_out, 2),
        "run_s": round(ran - began, 2),
        "push_s": round(time.monotonic() - ran, 2),
    }
    create_table_artifact(table=[job], key=JOB_ARTIFACT, description=f"{stage} on {worker}")
    return job


# -- the orchestrator side ---------------------------------------------------------------------


@dataclass(frozen=True)
class DispatchPlan:
    """What every stage job of one flow run shares."""

    commit: str
    repo_url: str
    pools: dict[str, str]  # resource class -> work pool


def _run(cmd: list[str], cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=120)


def plan_dispatch(
    repo_root: Path, resources: dict[str, str], pools: dict[str, str], repo_url: str | None
) -> DispatchPlan:
    """Check, before anything runs, that every stage can reach a worker and the worker our work.

    Raises DispatchError naming what is missing and what to do. Needs a Prefect server
    (PREFECT_API_URL): a temporary one has no workers.
    """
    from prefect.settings import PREFECT_API_URL

    if not PREFECT_API_URL.value():
        raise DispatchError(
            "dispatch needs a Prefect server that workers poll: start one (prefect server start) "
            "and set PREFECT_API_URL (e.g. http://127.0.0.1:4200/api)"
        )
    unknown = sorted({c for c in resources.values() if c not in pools})
    if unknown:
        raise DispatchError(f"no work pool for resource class(es) {unknown}: give one with --pool CLASS=POOL")
    # dvc.lock and the .gitignore files DVC writes change as stages run; all else must be committed
    changed = _run(
        ["git", "status", "--porcelain", "--untracked-files=no", "--", ".", ":!dvc.lock", ":!*.gitignore"],
        repo_root,
    )
    if changed.returncode != 0:
        raise DispatchError(f"{repo_root} is not a git checkout; workers check out the flow's commit")
    if changed.stdout.strip():
        files = ", ".join(line[3:] for line in changed.stdout.splitlines())
        raise DispatchError(
            f"uncommitted changes in {files}: workers run the committed code; commit them first"
        )
    remote = _run(["dvc", "remote", "default"], repo_root)
    if remote.returncode != 0 or not remote.stdout.strip():
        raise DispatchError(
            "no default DVC remote: workers exchange every input and output through it; "
            "add one (dvc remote add -d NAME URL) and commit .dvc/config"
        )
    commit = _run(["git", "rev-parse", "HEAD"], repo_root).stdout.strip()
    if repo_url is None:
        origin = _run(["git", "remote", "get-url", "origin"], repo_root)
        repo_url = origin.stdout.strip() if origin.returncode == 0 else str(repo_root.resolve())
    check_pools_have_workers(sorted({pools[c] for c in resources.values()}))
    return DispatchPlan(commit=commit, repo_url=repo_url, pools=dict(pools))


def check_pools_have_workers(pool_names: list[str]) -> None:
    """Every pool exists and has a worker online (its heartbeat is recent)."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.objects import WorkerStatus
    from prefect.exceptions import ObjectNotFound

    with get_client(sync_client=True) as client:
        for name in pool_names:
            start = f"prefect worker start --pool {name} --type process"
            try:
                client.read_work_pool(name)
            except ObjectNotFound:
                raise DispatchError(
                    f"work pool '{name}' does not exist; create it and start a worker: {start}"
                ) from None
            workers = client.read_workers_for_work_pool(name)
            if not any(w.status == WorkerStatus.ONLINE for w in workers):
                raise DispatchError(f"work pool '{name}' has no worker online; start a worker: {start}")


def deploy_stage_jobs(plan: DispatchPlan) -> None:
    """(Re)create the deployment ``vitkit-stage/<pool>`` on each pool, pulling ``plan.repo_url``."""
    from prefect.runner.storage import GitRepository

    source = stage_job.from_source(source=GitRepository(url=plan.repo_url), entrypoint=STAGE_ENTRYPOINT)
    for pool in sorted(set(plan.pools.values())):
        source.deploy(
            name=pool,
            work_pool_name=pool,
            build=False,
            push=False,
            print_next_steps=False,
            description="one vitkit stage at a commit, through DVC and its remote (flows/dispatch.py)",
        )


def _job_row(client: Any, flow_run_id: Any) -> dict[str, Any]:
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId, ArtifactFilterKey

    artifacts = client.read_artifacts(
        artifact_filter=ArtifactFilter(
            flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run_id]),
            key=ArtifactFilterKey(any_=[JOB_ARTIFACT]),
        )
    )
    if not artifacts:
        return {}
    data = artifacts[0].data
    rows = json.loads(data) if isinstance(data, str) else data
    return rows[0] if rows else {}


@task(retries=1, retry_delay_seconds=5, retry_condition_fn=is_transient, task_run_name="{stage}")
def dispatch_stage(
    stage: str,
    resource: str,
    plan: DispatchPlan,
    repo_root: str,
    env: dict[str, str],
    pickup_timeout_s: float,
) -> dict[str, Any]:
    """Run ``stage`` on its pool unless it is up to date here, then restore its result here."""
    from prefect.client.orchestration import get_client
    from prefect.deployments import run_deployment
    from prefect.states import Cancelled

    logger = get_run_logger()
    root = Path(repo_root)
    status = _run(["dvc", "status", "--json", stage], root)
    if status.returncode == 0 and status.stdout.strip() in ("{}", ""):
        # a stage done here before dispatch was on: give the remote its outputs and a run-cache
        # entry (commit --force writes one; the lock is unchanged), so workers restore, not redo, it
        for cmd in (["dvc", "commit", "--force", stage], ["dvc", "push", "--run-cache", stage]):
            done = run_dvc(cmd, root, logger)
            if done.code != 0:
                raise StageFailed(f"{' '.join(cmd)} failed (exit code {done.code}); see the log above")
        return {"stage": stage, "status": "skipped (up to date)"}

    pool = plan.pools[resource]
    created = time.monotonic()
    flow_run = run_deployment(
        name=f"{STAGE_FLOW}/{pool}",
        parameters={"stage": stage, "commit": plan.commit, "env": env},
        timeout=0,
    )
    logger.info("%s (%s) sent to work pool %s as flow run %s", stage, resource, pool, flow_run.name)
    claimed = running = None  # when a worker took the run; when its flow started
    with get_client(sync_client=True) as client:
        while True:
            flow_run = client.read_flow_run(flow_run.id)
            state, now = flow_run.state, time.monotonic()
            if claimed is None and state is not None and not state.is_scheduled():
                claimed = now
            if running is None and state is not None and (state.is_running() or state.is_final()):
                running = now
            if state is not None and state.is_final():
                break
            if claimed is None and now - created > pickup_timeout_s:
                client.set_flow_run_state(flow_run.id, Cancelled(message="no worker took it"), force=True)
                raise DispatchError(
                    f"no worker of work pool '{pool}' took {stage} within {pickup_timeout_s:.0f} s; "
                    f"start a worker: prefect worker start --pool {pool} --type process"
                )
            time.sleep(0.5)
        finished = time.monotonic()
        job = _job_row(client, flow_run.id)
    if not state.is_completed():
        message = state.message or ""
        if "error: [" in message:
            raise StageInputError(message[message.index("error: [") :])
        raise StageFailed(f"{stage} failed on work pool {pool}: {state.name}: {message}")

    restore = run_dvc(
        ["dvc", "--wait-for-lock", "repro", "--pull", "--single-item", stage],
        root,
        logger,
        env,
        abort_on="Running stage",
    )
    if restore.aborted_on:
        raise StageFailed(
            f"{stage} ran on work pool {pool} but its result is not in the DVC remote's run-cache, so this "
            "checkout would have to run it again; check that every output of the stage is cached"
        )
    raise_for_stage(stage, restore)
    return {
        "stage": stage,
        "status": f"{job.get('status', 'ran')} on {pool}",
        "worker": job.get("worker", ""),
        "pickup_s": round((claimed or finished) - created, 2),  # the worker's polling latency
        "start_s": round((running or finished) - (claimed or finished), 2),  # process, git clone, flow load
        "job_s": round(finished - (running or finished), 2),
        **{k: job[k] for k in ("checkout_s", "pull_s", "run_s", "push_s") if k in job},
        "restore_s": round(time.monotonic() - finished, 2),
    }
