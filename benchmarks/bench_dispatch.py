"""What per-stage dispatch to Prefect work pools costs, next to the single-machine flow.

On the smoke profile, in temporary git + DVC repositories (tests/conftest.py):

1. single machine: ``python -m flows.pipeline`` (Prefect's temporary server, one process) runs
   every stage, then runs again with everything up to date, ``--repeats`` times (the no-op
   time a user waits for "nothing to do");
2. dispatch: a loopback ``prefect server``, process workers for pools ``cpu`` and ``gpu`` in
   their own directories and a local directory as DVC remote; ``python -m flows.pipeline
   --dispatch`` runs every stage on a worker. Per stage it reports the worker's pick-up latency,
   the flow run's start (process, git clone, flow load), checkout of the commit, pull of the
   inputs, the stage itself, push, the rest of the flow run (Prefect's engine), and the
   orchestrator's restore from the run-cache.

    python benchmarks/bench_dispatch.py --repeats 5 [--stages train_teacher]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.conftest import make_pipeline_repo  # sets a private PREFECT_HOME and DVC site cache
from tests.loopback import prefect_server, process_worker

STEPS = ("pickup_s", "start_s", "checkout_s", "pull_s", "run_s", "push_s", "engine_s", "restore_s")


def flow(repo: Path, *args: str, env: dict[str, str] | None = None) -> float:
    start = time.perf_counter()
    done = subprocess.run(
        [sys.executable, "-m", "flows.pipeline", *args],
        cwd=repo,
        env={**os.environ, **(env or {})},
        capture_output=True,
        text=True,
        timeout=3600,
    )
    if done.returncode != 0:
        raise SystemExit(f"flows.pipeline {' '.join(args)} failed:\n{done.stdout}\n{done.stderr[-5000:]}")
    return time.perf_counter() - start


def stage_rows(api_url: str) -> list[dict]:
    """The dispatched flow's per-stage table (its ``vitkit-stages`` artifact)."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings({PREFECT_API_URL: api_url}), get_client(sync_client=True) as client:
        (artifact,) = client.read_artifacts(
            artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=["vitkit-stages"]))
        )
    rows = json.loads(artifact.data) if isinstance(artifact.data, str) else artifact.data
    for row in rows:  # what the running job took beyond its own steps: Prefect's engine, flow load
        row["engine_s"] = round(
            row["job_s"] - sum(row[k] for k in ("checkout_s", "pull_s", "run_s", "push_s")), 2
        )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=5, help="no-op single-machine runs (median)")
    parser.add_argument("--stages", nargs="*", default=[], help="only these stages and what they need")
    args = parser.parse_args()
    only = ["--stages", *args.stages] if args.stages else []
    what = f"{' '.join(args.stages)} and upstream" if args.stages else "every stage"
    os.environ.pop("PREFECT_API_URL", None)  # single-machine mode: Prefect's temporary server
    with tempfile.TemporaryDirectory(prefix="bench-dispatch-") as tmp:
        root = Path(tmp)
        single = make_pipeline_repo(root / "single")
        full = flow(single, *only)
        noop = [flow(single, *only) for _ in range(args.repeats)]
        print(f"single machine, {what}: {full:7.1f} s")
        print(
            f"single machine, no-op (median of {args.repeats}): {statistics.median(noop):5.1f} s"
            f"  (min {min(noop):.1f}, max {max(noop):.1f})"
        )

        repo = make_pipeline_repo(root / "orchestrator")
        for cmd in (
            ["dvc", "remote", "add", "-d", "shared", str(root / "dvc-remote")],
            ["git", "commit", "-qam", "DVC remote"],
        ):
            subprocess.run(cmd, cwd=repo, check=True, capture_output=True)
        with (
            prefect_server(root / "server") as api_url,
            process_worker(api_url, "cpu", root / "cpu-machine"),
            process_worker(api_url, "gpu", root / "gpu-machine"),
        ):
            pools = ["--pool", "cpu=cpu", "--pool", "gpu=gpu"]
            dispatched = flow(repo, "--dispatch", *pools, *only, env={"PREFECT_API_URL": api_url})
            rows = stage_rows(api_url)
            noop_dispatch = flow(repo, "--dispatch", *pools, *only, env={"PREFECT_API_URL": api_url})
        print(f"dispatch, {what}: {dispatched:7.1f} s")
        print(f"dispatch, no-op:                    {noop_dispatch:7.1f} s\n")
        print(f"{'stage':<24} {'pool':<5} " + " ".join(f"{k[:-2]:>8}" for k in STEPS))
        for row in rows:
            pool = row["status"].rpartition(" ")[2]
            print(f"{row['stage']:<24} {pool:<5} " + " ".join(f"{row[k]:8.1f}" for k in STEPS))
        overhead = [sum(row[k] for k in STEPS if k != "run_s") for row in rows]
        print(
            f"\ndispatch overhead per stage (all but run): median {statistics.median(overhead):.1f} s, "
            f"total {sum(overhead):.0f} s over {len(rows)} stages"
        )


if __name__ == "__main__":
    main()
