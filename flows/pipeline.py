"""The vitkit pipeline as a Prefect flow.

The DAG is read from dvc.yaml through DVC's own index (no second copy), and
each stage becomes a Prefect task that runs ``dvc repro --single-item <stage>``:
DVC decides whether the stage is up to date, keeps dvc.lock and its cache
true, and skips unchanged stages, whichever door started the run. Independent
stages may run at the same time (``max_parallel``, default 1: two trainings
sharing a 2-core CPU slow each other down far more than twice); a stage that fails for a
transient reason is retried, one that fails on bad input (exit code 2 from the
stage, "error: [...]" in its log) is not. Each stage's output streams into its
task log, and the stage MLflow runs nest under one parent run for the flow.

The flow owns its process tree: a flow stopped by SIGTERM (a cancel from the Prefect UI
ends a served run that way), Ctrl-C or an error ends the stages still running before it
returns, and a flow killed outright is cleaned up after by its lifeline watcher, which ends
the running stage's process group and Prefect's temporary server (flows/lifeline.py).

    python -m flows.pipeline              # run with Prefect's temporary server
    python -m flows.pipeline --serve      # serve a deployment for the Prefect UI
    python -m flows.pipeline --deploy P   # deploy to work pool P: its workers run the flow
    python -m flows.pipeline --dispatch   # each stage on the work pool of its resource class
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
from graphlib import TopologicalSorter
from pathlib import Path
from typing import Any

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("PREFECT_LOGGING_TO_API_BATCH_INTERVAL", "0.5")

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_table_artifact
from prefect.task_runners import ThreadPoolTaskRunner

from flows import lifeline
from flows.dispatch import (
    DEFAULT_POOLS,
    RESOURCE_CLASSES,
    DispatchError,
    deploy_stage_jobs,
    dispatch_stage,
    plan_dispatch,
)
from flows.dvc_run import (
    allow_starts,
    clear_reused_pid_locks,
    is_transient,
    raise_for_stage,
    run_dvc,
    stop_all,
)
from flows.report_artifact import publish_report
from vitkit import tracking
from vitkit.config import flatten, load_params
from vitkit.errors import USER_ERROR_EXIT_CODE, VitkitError

REPO_ROOT = Path(__file__).resolve().parent.parent
DESCRIPTION = "vitkit: SSL -> teacher -> DeiT / DETR -> evaluate -> report, run through DVC"


def _address(stage: Any, repo_root: Path) -> str:
    """A stage's name as `dvc repro` takes it."""
    dvcfile = Path(stage.dvcfile.path).resolve().relative_to(Path(repo_root).resolve())
    return stage.name if str(dvcfile) == "dvc.yaml" else f"{dvcfile}:{stage.name}"


def read_dag(repo_root: Path) -> dict[str, list[str]]:
    """{stage: [stages it depends on]} from DVC's pipeline graph, named as `dvc repro` takes them."""
    from dvc.repo import Repo

    with Repo(str(repo_root)) as repo:
        graph = repo.index.graph
        stages = [s for s in repo.index.stages if not s.is_data_source]
        return {
            _address(s, repo_root): sorted(
                _address(u, repo_root) for u in graph.successors(s) if not u.is_data_source
            )
            for s in stages
        }


def read_resource_classes(repo_root: Path) -> dict[str, str]:
    """{stage: resource class} from each stage's ``meta: {resources: ...}`` in dvc.yaml."""
    from dvc.repo import Repo

    with Repo(str(repo_root)) as repo:
        stages = [s for s in repo.index.stages if not s.is_data_source]
        classes = {_address(s, repo_root): (s.meta or {}).get("resources") for s in stages}
    wrong = {stage: found for stage, found in classes.items() if found not in RESOURCE_CLASSES}
    if wrong:
        raise DispatchError(
            f"dvc.yaml: stage(s) {sorted(wrong)} declare no resource class; give each one "
            f"meta: {{resources: {' | '.join(RESOURCE_CLASSES)}}}"
        )
    return classes  # type: ignore[return-value]


def stages_to_run(repo_root: Path, order: list[str], dag: dict[str, list[str]]) -> set[str]:
    """The stages of ``order`` (topological) that ``dvc status`` finds changed, and all downstream of them.

    One in-process ``dvc status`` for the whole DAG instead of one ``dvc repro`` process per
    stage: a run with nothing to do then costs seconds, not a DVC start per stage. A stage
    downstream of one that runs is run too, as its inputs are about to change.
    """
    from dvc.lock import LockError
    from dvc.repo import Repo

    with Repo(str(repo_root)) as repo:
        try:
            with repo.lock:
                stages = [s for s in repo.index.stages if _address(s, repo_root) in order]
                changed = {_address(s, repo_root) for s in stages if s.status()}
        except LockError:  # another DVC command runs here: let each `dvc repro` wait for it and decide
            return set(order)
    to_run: set[str] = set()
    for stage in order:
        if stage in changed or any(u in to_run for u in dag[stage]):
            to_run.add(stage)
    return to_run


@task(retries=1, retry_delay_seconds=5, retry_condition_fn=is_transient, task_run_name="{stage}")
def run_stage(stage: str, repo_root: str, env: dict[str, str], up_to_date: bool = False) -> dict[str, str]:
    """``dvc repro --single-item <stage>``, streaming its output into this task's log; nothing to
    run when ``dvc status`` found the stage and its upstream up to date at the start of the flow."""
    logger = get_run_logger()
    if up_to_date:
        logger.info("Stage '%s' is up to date (dvc status): not run", stage)
        return {"stage": stage, "status": "skipped (up to date)"}
    for entry in clear_reused_pid_locks(repo_root):
        logger.warning("cleared a stale DVC lock on %s: that PID is now another process", entry)
    output = run_dvc(["dvc", "--wait-for-lock", "repro", "--single-item", stage], repo_root, logger, env)
    raise_for_stage(stage, output)
    skipped = output.has("didn't change, skipping")
    return {"stage": stage, "status": "skipped (up to date)" if skipped else "ran"}


def _tie_temporary_server() -> None:
    """Have the lifeline end Prefect's temporary server, should this process die without stopping it.

    Prefect stops the server it started for a flow run at the interpreter's exit, which a SIGKILL
    skips; the server would then outlive the flow for good.
    """
    from prefect.server.api.server import SubprocessASGIServer

    for server in list(SubprocessASGIServer._instances.values()):
        process = server.server_process
        if process is not None and process.poll() is None:
            lifeline.tie(process.pid)


def _metric_rows(repo_root: Path) -> list[dict[str, Any]]:
    """Every number in metrics/*.json, one row per (file, metric)."""
    rows = []
    for path in sorted((repo_root / "metrics").glob("*.json")):
        flat = flatten(json.loads(path.read_text()))
        rows += [
            {"file": path.name, "metric": k, "value": round(v, 4)}
            for k, v in flat.items()
            if isinstance(v, int | float)
        ]
    return rows


@flow(name="vitkit-pipeline", log_prints=True)
def pipeline(
    stages: list[str] | None = None,
    max_parallel: int = 1,
    repo_root: str | None = None,
    dispatch: bool = False,
    pools: dict[str, str] | None = None,
    repo_url: str | None = None,
    pickup_timeout_s: float = 60.0,
) -> list[dict]:
    """Run the DVC pipeline stage by stage (optionally only ``stages`` and what they need).

    With ``dispatch``, each stage runs on the work pool of its resource class (``pools``:
    class -> pool, default vitkit-cpu / vitkit-gpu) in a worker's clone of ``repo_url`` (default:
    this checkout's origin, else its path), and comes back through the DVC remote: see
    flows/dispatch.py.
    """
    logger = get_run_logger()
    _tie_temporary_server()
    root = Path(repo_root) if repo_root else REPO_ROOT
    params = load_params(root / "params.yaml")  # fail before anything runs, as every stage would
    dag = read_dag(root)
    selected = _with_upstream(dag, stages) if stages else list(dag)
    order = [s for s in TopologicalSorter({s: dag[s] for s in selected}).static_order() if s in selected]
    logger.info("DAG from dvc.yaml: %s", {s: dag[s] for s in order})
    plan, resources = None, {}
    if dispatch:
        resources = {s: c for s, c in read_resource_classes(root).items() if s in order}
        plan = plan_dispatch(root, resources, pools or DEFAULT_POOLS, repo_url)
        deploy_stage_jobs(plan)
        logger.info("dispatch at %s: %s", plan.commit[:12], {s: plan.pools[resources[s]] for s in order})

    to_run = set() if plan else stages_to_run(root, order, dag)  # dispatch checks each stage itself
    tracking_uri = tracking.tracking_uri(root)
    tracking.open_experiment(tracking_uri, params.mlflow.experiment, root)
    with tracking.stage_run("pipeline", root, params.mlflow.experiment, {}) as parent:
        env = {tracking.PARENT_RUN_ENV: parent.run_id}
        if plan and not tracking_uri.startswith(("http://", "https://")):
            env = {}  # a worker's stage runs cannot nest under a run in this checkout's own store
        elif plan:
            env["MLFLOW_TRACKING_URI"] = tracking_uri
        jobs = {stage: {"stage": stage, "repo_root": str(root), "env": env} for stage in order}
        for stage, job in jobs.items():
            if plan:
                job |= {"resource": resources[stage], "plan": plan, "pickup_timeout_s": pickup_timeout_s}
            else:
                job["up_to_date"] = stage not in to_run
        results = _run_all(order, dag, jobs, dispatch_stage if plan else run_stage, max_parallel)
    create_table_artifact(table=results, key="vitkit-stages", description="What each stage did in this run")
    rows = _metric_rows(root)
    if rows:
        create_table_artifact(table=rows, key="vitkit-metrics", description="Final metrics (metrics/*.json)")
    publish_report(root)  # the report stage's Markdown, as an artifact of this flow run
    return results


def _run_all(
    order: list[str], dag: dict[str, list[str]], jobs: dict[str, dict], stage_task: Any, max_parallel: int
) -> list[dict]:
    """Run each stage's task after those it depends on; the flow stopped, no stage outlives it.

    On SIGTERM (which Prefect raises here as ``TerminationSignal``: a cancelled served run, a
    worker stopping a run) or Ctrl-C, the stages still running are ended with their process
    groups before the exception goes on, so the flow neither waits for a training to finish nor
    leaves one behind.
    """
    try:
        with ThreadPoolTaskRunner(max_workers=max_parallel) as runner:
            futures: dict[str, Any] = {}
            for stage in order:
                upstream = [futures[u] for u in dag[stage] if u in futures]
                futures[stage] = runner.submit(stage_task, jobs[stage], wait_for=upstream)
            try:
                return [futures[s].result() for s in order]
            except Exception:
                raise  # a stage failed: any running beside it finishes its work
            except BaseException as exc:  # terminated, cancelled, interrupted
                ended = stop_all(signal.SIGINT if isinstance(exc, KeyboardInterrupt) else signal.SIGTERM)
                if ended:
                    get_run_logger().warning(
                        "flow stopped (%r): ended the stage process groups %s", exc, ended
                    )
                raise
    finally:
        allow_starts()  # the runner has waited for its tasks: none is left to start


def _with_upstream(dag: dict[str, list[str]], targets: list[str]) -> list[str]:
    unknown = [t for t in targets if t not in dag]
    if unknown:
        raise ValueError(f"unknown stage(s) {unknown}; dvc.yaml has {list(dag)}")
    needed: set[str] = set()
    todo = list(targets)
    while todo:
        stage = todo.pop()
        if stage not in needed:
            needed.add(stage)
            todo += dag[stage]
    return [s for s in dag if s in needed]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m flows.pipeline", description=__doc__.split("\n\n")[0])
    parser.add_argument("--stages", nargs="*", help="run only these stages and what they depend on")
    parser.add_argument(
        "--max-parallel",
        type=int,
        default=1,
        help="stages run at once (default: %(default)s; on a CPU, give each engine.threads: 1 when > 1)",
    )
    parser.add_argument(
        "--serve",
        action="store_true",
        help="serve the flow as a deployment (start runs from the Prefect UI); needs PREFECT_API_URL",
    )
    parser.add_argument(
        "--deploy",
        metavar="POOL",
        help="deploy the flow to work pool POOL (its workers run it); needs PREFECT_API_URL",
    )
    parser.add_argument(
        "--source",
        help="with --deploy: where workers get the code, a git URL or a path (default: this checkout)",
    )
    parser.add_argument(
        "--dispatch",
        action="store_true",
        help="run each stage on the work pool of its resource class (dvc.yaml meta.resources); "
        "needs PREFECT_API_URL, a DVC remote and committed code",
    )
    parser.add_argument(
        "--pool",
        action="append",
        default=[],
        metavar="CLASS=POOL",
        help=f"with --dispatch: the pool of a resource class (default: {DEFAULT_POOLS})",
    )
    parser.add_argument("--repo-url", help="with --dispatch: the repository workers clone (default: origin)")
    parser.add_argument(
        "--pickup-timeout",
        type=float,
        default=60.0,
        help="with --dispatch: seconds a stage may wait for a worker (default: %(default)s)",
    )
    args = parser.parse_args(argv)
    pools = {**DEFAULT_POOLS, **dict(p.split("=", 1) for p in args.pool)}
    flow_params = {"max_parallel": args.max_parallel}
    if args.dispatch:
        flow_params |= {"dispatch": True, "pools": pools, "repo_url": args.repo_url}
        flow_params["pickup_timeout_s"] = args.pickup_timeout
    try:
        if args.dispatch and not (args.serve or args.deploy):  # fail before a flow run starts
            classes = read_resource_classes(REPO_ROOT)
            if args.stages:
                classes = {s: classes[s] for s in _with_upstream(read_dag(REPO_ROOT), args.stages)}
            plan_dispatch(REPO_ROOT, classes, pools, args.repo_url)
        if args.serve:
            pipeline.serve(name="vitkit", parameters=flow_params, description=DESCRIPTION)
            return 0
        if args.deploy:
            pipeline.from_source(
                source=args.source or str(REPO_ROOT), entrypoint="flows/pipeline.py:pipeline"
            ).deploy(
                name="vitkit",
                work_pool_name=args.deploy,
                parameters=flow_params,
                build=False,
                push=False,
                description=DESCRIPTION,
            )
            return 0
        results = pipeline(stages=args.stages, **flow_params)
    except VitkitError as exc:
        print(f"error: [{'dispatch' if args.dispatch else 'pipeline'}] {exc}", file=sys.stderr)
        return USER_ERROR_EXIT_CODE
    except Exception as exc:
        print(f"pipeline failed: {exc}", file=sys.stderr)
        return 1
    for row in results:  # with dispatch, also where it ran and what each step took
        details = "  ".join(f"{k}={v}" for k, v in row.items() if k == "worker" or k.endswith("_s"))
        print(f"  {row['stage']:<24} {row['status']:<24} {details}".rstrip())
    return 0


if __name__ == "__main__":
    sys.exit(main())
