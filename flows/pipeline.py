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

    python -m flows.pipeline              # run with Prefect's temporary server
    python -m flows.pipeline --serve      # serve a deployment for the Prefect UI
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from graphlib import TopologicalSorter
from pathlib import Path
from typing import Any

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("PREFECT_LOGGING_TO_API_BATCH_INTERVAL", "0.5")

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_table_artifact
from prefect.task_runners import ThreadPoolTaskRunner

from vitkit import tracking
from vitkit.config import flatten, load_params

REPO_ROOT = Path(__file__).resolve().parent.parent
USER_ERROR_MARK = "error: ["


class StageInputError(RuntimeError):
    """A stage rejected its input (params or data): retrying cannot help."""


class StageFailed(RuntimeError):
    """A stage failed for another reason (killed, out of memory, a lock...): worth a retry."""


def read_dag(repo_root: Path) -> dict[str, list[str]]:
    """{stage: [stages it depends on]} from DVC's pipeline graph, named as `dvc repro` takes them."""
    from dvc.repo import Repo

    def address(stage) -> str:
        dvcfile = Path(stage.dvcfile.path).resolve().relative_to(Path(repo_root).resolve())
        return stage.name if str(dvcfile) == "dvc.yaml" else f"{dvcfile}:{stage.name}"

    with Repo(str(repo_root)) as repo:
        graph = repo.index.graph
        stages = [s for s in repo.index.stages if not s.is_data_source]
        return {
            address(s): sorted(address(u) for u in graph.successors(s) if not u.is_data_source)
            for s in stages
        }


def _is_transient(task: Any, task_run: Any, state: Any) -> bool:
    try:
        state.result()
    except StageInputError:
        return False
    except Exception:
        return True
    return False


@task(retries=1, retry_delay_seconds=5, retry_condition_fn=_is_transient, task_run_name="{stage}")
def run_stage(stage: str, repo_root: str, env: dict[str, str]) -> dict[str, str]:
    """``dvc repro --single-item <stage>``, streaming its output into this task's log."""
    logger = get_run_logger()
    cmd = ["dvc", "--wait-for-lock", "repro", "--single-item", stage]
    logger.info("$ %s", " ".join(cmd))
    process = subprocess.Popen(
        cmd,
        cwd=repo_root,
        env={**os.environ, **env},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        bufsize=1,
    )
    skipped, user_error = False, None
    assert process.stdout is not None
    for raw in process.stdout:
        line = raw.rstrip()
        if not line:
            continue
        logger.info(line)
        skipped = skipped or "didn't change, skipping" in line
        if USER_ERROR_MARK in line:
            user_error = line
    code = process.wait()
    if code != 0:
        if user_error:
            raise StageInputError(user_error)
        raise StageFailed(f"stage {stage} failed (dvc exit code {code}); see the log above")
    return {"stage": stage, "status": "skipped (up to date)" if skipped else "ran"}


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
    stages: list[str] | None = None, max_parallel: int = 1, repo_root: str | None = None
) -> list[dict]:
    """Run the DVC pipeline stage by stage (optionally only ``stages`` and what they need)."""
    logger = get_run_logger()
    root = Path(repo_root) if repo_root else REPO_ROOT
    params = load_params(root / "params.yaml")  # fail before anything runs, as every stage would
    dag = read_dag(root)
    selected = _with_upstream(dag, stages) if stages else list(dag)
    order = [s for s in TopologicalSorter({s: dag[s] for s in selected}).static_order() if s in selected]
    logger.info("DAG from dvc.yaml: %s", {s: dag[s] for s in order})

    tracking.open_experiment(tracking.tracking_uri(root), params.mlflow.experiment, root)
    with tracking.stage_run("pipeline", root, params.mlflow.experiment, {}) as parent:
        env = {tracking.PARENT_RUN_ENV: parent.run_id}
        with ThreadPoolTaskRunner(max_workers=max_parallel) as runner:
            futures: dict[str, Any] = {}
            for stage in order:
                upstream = [futures[u] for u in dag[stage] if u in futures]
                futures[stage] = runner.submit(
                    run_stage, {"stage": stage, "repo_root": str(root), "env": env}, wait_for=upstream
                )
            results = [futures[s].result() for s in order]
    create_table_artifact(table=results, key="vitkit-stages", description="What each stage did in this run")
    rows = _metric_rows(root)
    if rows:
        create_table_artifact(table=rows, key="vitkit-metrics", description="Final metrics (metrics/*.json)")
    return results


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
    args = parser.parse_args(argv)
    if args.serve:
        pipeline.serve(
            name="vitkit",
            parameters={"max_parallel": args.max_parallel},
            description="vitkit: SSL -> teacher -> DeiT / DETR -> evaluate -> report, run through DVC",
        )
        return 0
    try:
        results = pipeline(stages=args.stages, max_parallel=args.max_parallel)
    except Exception as exc:
        print(f"pipeline failed: {exc}", file=sys.stderr)
        return 1
    for row in results:
        print(f"  {row['stage']:<24} {row['status']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
