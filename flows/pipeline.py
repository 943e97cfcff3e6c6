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

Params: a run takes a profile (``profiles/<name>.yaml``) and overrides by dotted key, as
``dvc exp run -S`` takes them (``--set teacher.epochs=2``; ``{"teacher.epochs": 2}`` in the Prefect
UI), checked against the params schema before anything runs. Such a run takes place in a copy of
the checkout of its own (flows/workcopy.py), so the checkout's params.yaml and dvc.lock stay true.

Linked runs: the flow's parent MLflow run is named after the flow run and tagged with its id,
name and URL; it carries the flow's parameters and the params the stages ran with, the git commit,
each stage's status (ran or skipped by DVC) and, at the end, every stage's headline metrics
(metrics/**/*.json). The flow run shows link artifacts to the parent run and to each stage's run.

    python -m flows.pipeline              # run with Prefect's temporary server
    python -m flows.pipeline --set teacher.epochs=2 --profile smoke   # a run with other params
    python -m flows.pipeline --serve      # serve a deployment for the Prefect UI
    python -m flows.pipeline --deploy P   # deploy to work pool P: its workers run the flow
    python -m flows.pipeline --dispatch   # each stage on the work pool of its resource class
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import signal
import sys
from graphlib import TopologicalSorter
from pathlib import Path
from typing import Any

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("PREFECT_LOGGING_TO_API_BATCH_INTERVAL", "0.5")
# a served deployment picks a new run up within 2 s (Prefect's default: 10), so a run with bad
# params fails within seconds of its start in the UI
os.environ.setdefault("PREFECT_RUNNER_POLL_FREQUENCY", "2")

import prefect
from prefect import flow, get_run_logger, task
from prefect.artifacts import create_link_artifact, create_table_artifact
from prefect.exceptions import FailedRun
from prefect.runtime import flow_run as current_flow_run
from prefect.states import Failed, State
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
    USER_ERROR_MARK,
    allow_starts,
    clear_reused_pid_locks,
    is_transient,
    raise_for_stage,
    run_dvc,
    stop_all,
)
from flows.workcopy import make_copy
from vitkit.config import PROFILES_DIR, Params, flatten, parse_assignment, resolve_params
from vitkit.errors import USER_ERROR_EXIT_CODE, ConfigError, VitkitError

REPO_ROOT = Path(__file__).resolve().parent.parent


class _OneLineUserErrors(logging.Filter):
    """Drops the traceback Prefect's engine logs when a deployment run ends Failed because this flow
    refused the user's input: its one ``error: [...]`` line is already in the run's log.

    The engine of a served or worker-run flow re-raises a Failed final state and logs that as
    "unexpected exception", traceback and all, into the flow run's log (what the UI shows).
    """

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        return not (isinstance(exc, FailedRun) and str(exc).startswith(USER_ERROR_MARK))


logging.getLogger("prefect.flow_runs").addFilter(_OneLineUserErrors())
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
    if output.has("didn't change, skipping"):
        return {"stage": stage, "status": "skipped (up to date)"}
    if output.has("is cached - skipping run"):  # run before with these inputs: DVC restored its outputs
        return {"stage": stage, "status": "restored (run-cache)"}
    return {"stage": stage, "status": "ran"}


def _tie_temporary_server() -> None:
    """Have the lifeline end Prefect's temporary server, should this process die without stopping it.

    Prefect stops the server it started for a flow run at the interpreter's exit, which a SIGKILL
    skips; the server would then outlive the flow for good. A process that started none has not
    imported Prefect's server code, and is not made to (seconds of imports, e.g. in a served run).
    """
    server_code = sys.modules.get("prefect.server.api.server")
    if server_code is None:
        return
    for server in list(server_code.SubprocessASGIServer._instances.values()):
        process = server.server_process
        if process is not None and process.poll() is None:
            lifeline.tie(process.pid)


def _clean_key(key: str) -> str:
    """``ssl.ssl.knn_top1`` (evaluate.json's ssl section, its ssl backbone) -> ``ssl.knn_top1``."""
    parts = key.split(".")
    return ".".join(p for i, p in enumerate(parts) if i == 0 or p != parts[i - 1])


def _metric_rows(repo_root: Path) -> list[dict[str, Any]]:
    """Every number of every metrics file (metrics/**/*.json), one row per (file, metric).

    ``file`` is the path under metrics/ without ``.json`` (``deit/hard``); a value that is null
    (the distillation head DeiT's ``none`` mode does not have) or not a number is left out.
    """
    rows = []
    folder = repo_root / "metrics"
    for path in sorted(folder.rglob("*.json")):
        flat = flatten(json.loads(path.read_text()))
        rows += [
            {"file": path.relative_to(folder).with_suffix("").as_posix(), "metric": _clean_key(k), "value": v}
            for k, v in flat.items()
            if isinstance(v, int | float) and not isinstance(v, bool) and v == v  # NaN != NaN
        ]
    return rows


def _metric_name(key: str) -> str:
    """``evaluate/detection.detr.val_AP@2`` -> ``evaluate/detection.detr.val_AP_2``: MLflow takes only
    letters, digits, ``_ - . : /`` and spaces in a metric's name."""
    return re.sub(r"[^\w.\- :/]", "_", key)


def _flow_run_info() -> dict[str, str]:
    """This flow run's id, name and UI URL (no URL with Prefect's temporary server, which has no UI)."""
    from prefect.settings import PREFECT_UI_URL

    info = {"id": str(current_flow_run.id), "name": str(current_flow_run.name)}
    if PREFECT_UI_URL.value():
        info["url"] = current_flow_run.ui_url
    return info


def _slug(text: str) -> str:
    """An artifact key: lowercase letters, digits and dashes."""
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


def _flow_params(**values: Any) -> dict[str, str]:
    """The flow's parameters as MLflow params (``flow.<name>``), JSON where not a plain string."""
    return {f"flow.{k}": v if isinstance(v, str) else json.dumps(v) for k, v in values.items()}


def _link_stage_runs(parent: Any, experiment_id: str, results: list[dict]) -> str:
    """A Prefect link artifact to each stage's MLflow run; the parent's note: what each stage did.

    A stage DVC did not run (up to date, or restored from the run-cache) has no run of this flow:
    the note says so, and the parent's ``vitkit.skipped`` tag lists those stages. ``parent``: the
    flow's ``vitkit.tracking.StageRun``.
    """
    from vitkit import tracking

    children = parent.client.search_runs(
        [experiment_id], filter_string=f"tags.`mlflow.parentRunId` = '{parent.run_id}'"
    )
    by_stage = {run.data.tags.get(tracking.STAGE_TAG): run for run in children}
    lines = ["| stage | in this flow run | MLflow run |", "|---|---|---|"]
    for row in results:
        stage, run = row["stage"], by_stage.get(row["stage"])
        link = ""
        if run is not None:
            url = tracking.run_url(parent.uri, experiment_id, run.info.run_id)
            create_link_artifact(
                link=url,
                link_text=f"{stage}: {run.info.run_name}",
                key=f"mlflow-{_slug(stage)}",
                description=f"The MLflow run of stage {stage} in this flow run",
            )
            link = f"[{run.info.run_name}]({url})"
        lines.append(f"| {stage} | {row['status']} | {link} |")
    skipped = [row["stage"] for row in results if row["status"] != "ran"]
    parent.publish(
        "the stage statuses",
        lambda: (
            parent.client.set_tag(parent.run_id, "vitkit.skipped", ", ".join(skipped) or "none"),
            parent.client.set_tag(parent.run_id, "mlflow.note.content", "\n".join(lines)),
        ),
    )
    return "\n".join(lines)


def check_choices(
    root: Path,
    stages: list[str] | None,
    profile: str | None,
    overrides: dict[str, Any] | None,
    dispatch: bool,
) -> tuple[dict[str, Any], Params, dict[str, list[str]], list[str]]:
    """What a user chose for a run, checked before anything runs (a ``ConfigError`` line if wrong):
    the params changes and the params, the DAG and the stages selected."""
    changes, params = resolve_params(root / "params.yaml", profile, overrides)
    if dispatch and changes:
        raise ConfigError(
            "a profile or overrides cannot be dispatched: workers run the committed params.yaml; "
            "commit the params change, or run without dispatch"
        )
    dag = read_dag(root)
    return changes, params, dag, _with_upstream(dag, stages) if stages else list(dag)


@flow(name="vitkit-pipeline", log_prints=True)
def pipeline(
    stages: list[str] | None = None,
    profile: str | None = None,
    overrides: dict[str, Any] | None = None,
    max_parallel: int = 1,
    repo_root: str | None = None,
    dispatch: bool = False,
    pools: dict[str, str] | None = None,
    repo_url: str | None = None,
    pickup_timeout_s: float = 60.0,
) -> list[dict] | State:
    """Run the DVC pipeline stage by stage (optionally only ``stages`` and what they need).

    The profile and overrides are checked against the params schema before anything runs; a
    stage name, against dvc.yaml. What is wrong ends the run Failed, without retry, with one
    line naming the key or stage. With ``dispatch``, each stage runs on the work pool of its
    resource class in a worker's clone and comes back through the DVC remote (flows/dispatch.py).

    Args:
        stages: Run only these stages and the stages they depend on; empty: every stage. A stage
            with variants is named as `dvc repro` names it, e.g. distill_deit@hard.
        profile: A params profile (profiles/<name>.yaml: smoke, seconds per stage; gpu, one GPU)
            applied over params.yaml; empty: params.yaml as it is.
        overrides: Params to change, by dotted key as `dvc exp run -S` takes them, e.g.
            {"teacher.epochs": 2}; applied after the profile, checked against the schema
            (docs/params.md). With a profile or overrides the run takes place in a copy of the
            checkout (.vitkit/runs/<flow run name>): only the stages they change run, and the
            checkout's params.yaml and dvc.lock stay as they are.
        max_parallel: How many stages may run at the same time (1 on a small CPU; on a CPU,
            give each engine.threads 1 when more).
        repo_root: The checkout to run; empty: the one this flow's code is in.
        dispatch: Run each stage on the work pool of its resource class (dvc.yaml
            meta.resources), in a worker's clone; needs a DVC remote and committed code.
        pools: With dispatch: resource class to work pool; empty: cpu to vitkit-cpu and gpu to
            vitkit-gpu.
        repo_url: With dispatch: the repository workers clone; empty: this checkout's origin,
            else its path.
        pickup_timeout_s: With dispatch: seconds a stage may wait for a worker to take it.
    """
    logger = get_run_logger()
    _tie_temporary_server()
    root = Path(repo_root) if repo_root else REPO_ROOT
    try:
        changes, params, dag, selected = check_choices(root, stages, profile, overrides, dispatch)
    except VitkitError as exc:
        message = f"error: [pipeline] {exc}"
        logger.error(message)
        return Failed(message=message)
    # imported once the parameters are known good: MLflow's import is most of this flow's start-up
    from vitkit import tracking

    order = [s for s in TopologicalSorter({s: dag[s] for s in selected}).static_order() if s in selected]
    logger.info("DAG from dvc.yaml: %s", {s: dag[s] for s in order})
    flow_run = _flow_run_info()
    run_root = make_copy(root, flow_run["name"], changes, logger) if changes else root
    plan, resources = None, {}
    if dispatch:
        resources = {s: c for s, c in read_resource_classes(root).items() if s in order}
        plan = plan_dispatch(root, resources, pools or DEFAULT_POOLS, repo_url)
        deploy_stage_jobs(plan)
        logger.info("dispatch at %s: %s", plan.commit[:12], {s: plan.pools[resources[s]] for s in order})

    to_run = set() if plan else stages_to_run(run_root, order, dag)  # dispatch checks each stage itself
    tracking_uri = tracking.tracking_uri(root)
    experiment_id = tracking.open_experiment(tracking_uri, params.mlflow.experiment, root)
    parent_params = _flow_params(
        stages=stages or [], profile=profile or "", overrides=overrides or {}, max_parallel=max_parallel
    )
    parent_params |= flatten(params.model_dump(mode="json"))  # what the stages run with
    parent_tags = {tracking.FLOW_RUN_TAGS[k]: v for k, v in flow_run.items()}
    parent_tags["vitkit.run_root"] = str(run_root)
    name = f"pipeline · {flow_run['name']}"
    with tracking.stage_run(
        "pipeline", root, params.mlflow.experiment, parent_params, parent_tags, name
    ) as parent:
        create_link_artifact(
            link=tracking.run_url(tracking_uri, experiment_id, parent.run_id),
            link_text=f"MLflow: {name}",
            key="mlflow-pipeline",
            description="This flow run's parent run in MLflow (the stage runs nest under it)",
        )
        env = {tracking.PARENT_RUN_ENV: parent.run_id, tracking.FLOW_RUN_ENV: json.dumps(flow_run)}
        if plan and not tracking_uri.startswith(("http://", "https://")):
            env = {}  # a worker's stage runs cannot nest under a run in this checkout's own store
        elif plan or run_root != root:  # a worker's clone or this run's copy: log to this checkout's store
            env["MLFLOW_TRACKING_URI"] = tracking_uri
        jobs = {stage: {"stage": stage, "repo_root": str(run_root), "env": env} for stage in order}
        for stage, job in jobs.items():
            if plan:
                job |= {"resource": resources[stage], "plan": plan, "pickup_timeout_s": pickup_timeout_s}
            else:
                job["up_to_date"] = stage not in to_run
        results = _run_all(order, dag, jobs, dispatch_stage if plan else run_stage, max_parallel)
        rows = _metric_rows(run_root)
        summary = {_metric_name(f"{row['file']}/{row['metric']}"): row["value"] for row in rows}
        parent.log_metrics(summary)
        stages_table = _link_stage_runs(parent, experiment_id, results)
    create_table_artifact(table=results, key="vitkit-stages", description="What each stage did in this run")
    if rows:
        table = [{**row, "value": round(row["value"], 4)} for row in rows]
        create_table_artifact(
            table=table, key="vitkit-metrics", description="Final metrics (metrics/**/*.json)"
        )
    from flows.report_artifact import publish_report  # pandas, matplotlib: only once stages have run

    publish_report(run_root)  # the report stage's Markdown, as an artifact of this flow run
    logger.info("stages and their MLflow runs:\n%s", stages_table)
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
        raise ConfigError(f"unknown stage(s) {', '.join(unknown)}; dvc.yaml has {', '.join(dag)}")
    needed: set[str] = set()
    todo = list(targets)
    while todo:
        stage = todo.pop()
        if stage not in needed:
            needed.add(stage)
            todo += dag[stage]
    return [s for s in dag if s in needed]


ENTRYPOINT = "flows/pipeline.py:pipeline"


def _deployment(flow_obj: Any, repo_root: Path, parameters: dict[str, Any], **options: Any) -> Any:
    """The flow as deployment ``vitkit``, its UI form offering the stage names of dvc.yaml and the
    profiles in profiles/ as choices (read now: restart ``--serve`` after changing either); the
    Prefect server refuses a run with another name before it starts."""
    deployment = flow_obj.to_deployment(
        name="vitkit", parameters=parameters, description=DESCRIPTION, **options
    )
    schema = deployment._parameter_openapi_schema.properties  # the form Prefect builds from the signature
    names = list(read_dag(repo_root))
    profiles = sorted(p.stem for p in PROFILES_DIR.glob("*.yaml"))
    schema["stages"]["anyOf"] = [
        {"type": "array", "items": {"type": "string", "enum": names}},
        {"type": "null"},
    ]
    schema["profile"]["anyOf"] = [{"type": "string", "enum": profiles}, {"type": "null"}]
    return deployment


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m flows.pipeline", description=__doc__.split("\n\n")[0])
    parser.add_argument("--stages", nargs="*", help="run only these stages and what they depend on")
    parser.add_argument(
        "--profile", help="apply profiles/PROFILE.yaml over params.yaml (the run takes place in a copy)"
    )
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="change a param by dotted key, as `dvc exp run -S` takes it (e.g. teacher.epochs=2); "
        "repeatable; the run takes place in a copy of the checkout (.vitkit/runs/)",
    )
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
    flow_params: dict[str, Any] = {"max_parallel": args.max_parallel}
    if args.dispatch:
        flow_params |= {"dispatch": True, "pools": pools, "repo_url": args.repo_url}
        flow_params["pickup_timeout_s"] = args.pickup_timeout
    try:
        overrides = dict(parse_assignment(text) for text in args.set)
        if args.profile or overrides:
            flow_params |= {"profile": args.profile, "overrides": overrides}
        if not (args.serve or args.deploy):  # fail before a flow run starts
            *_, selected = check_choices(REPO_ROOT, args.stages, args.profile, overrides, args.dispatch)
            if args.dispatch:
                classes = read_resource_classes(REPO_ROOT)
                plan_dispatch(REPO_ROOT, {s: classes[s] for s in selected}, pools, args.repo_url)
        if args.serve:
            prefect.serve(_deployment(pipeline, REPO_ROOT, flow_params))
            return 0
        if args.deploy:
            source = pipeline.from_source(source=args.source or str(REPO_ROOT), entrypoint=ENTRYPOINT)
            deployment = _deployment(source, REPO_ROOT, flow_params, work_pool_name=args.deploy)
            prefect.deploy(deployment, work_pool_name=args.deploy, build=False, push=False)
            return 0
        state = pipeline(stages=args.stages, **flow_params, return_state=True)
        if state.is_failed() and (state.message or "").startswith("error: ["):
            print(state.message, file=sys.stderr)  # a problem the run found itself, said in the log
            return USER_ERROR_EXIT_CODE
        results = state.result()
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
