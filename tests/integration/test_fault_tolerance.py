"""Failures never cost finished work, from the command line, the way they happen in real use.

- ``kill -9`` of the flow mid-stage: within 10 s nothing it started is left (the dvc command,
  the stage, torchrun's workers, Prefect's temporary server, the lifeline itself); the next flow
  run resumes the stage from its checkpoint, DVC clears the dead run's lock saying its PID, and
  ``dvc status`` of what it ran is clean.
- ``kill -9`` of a stage while it publishes, and an output folder it may not write: the rerun
  trains no epoch and takes seconds.
- An MLflow server killed mid-training: one bounded wait, training goes on, then one ``error:``
  line when publishing needs the server; run again with the server back, the stage only publishes.
- A served run cancelled as the Prefect UI cancels it: the training stops within seconds, the run
  ends Cancelled, and the deployment's next run resumes the stage from its checkpoint.

Each test prints what it measured (run with ``-s`` to see it).
"""

from __future__ import annotations

import os
import resource
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import yaml
from mlflow.tracking import MlflowClient

from tests.conftest import make_pipeline_repo, run, smoke_params
from tests.integration.test_mlflow_server import free_port, wait_until_healthy
from vitkit import tracking
from vitkit.engine.checkpoint import load_checkpoint

pytestmark = [pytest.mark.integration, pytest.mark.slow]

FLOW = [sys.executable, "-m", "flows.pipeline", "--stages", "train_teacher"]
# Prefect's temporary server gets 20 s to start by default, which a loaded 2-core machine can miss
FLOW_ENV = {"PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "600"}


def stage(name: str) -> list[str]:
    return [sys.executable, "-m", f"stages.{name}"]


def wait_until(
    check, timeout_s: float, what: str, log: Path | None = None, process: subprocess.Popen | None = None
) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and (process is None or process.poll() is None):
        if check():
            return
        time.sleep(0.05)
    tail = log.read_text()[-4000:] if log else ""
    raise AssertionError(f"{what} not within {timeout_s:.0f} s\n{tail}")


def alive(processes: list[psutil.Process]) -> list[psutil.Process]:
    def running(process: psutil.Process) -> bool:
        try:
            return process.is_running() and process.status() != psutil.STATUS_ZOMBIE
        except psutil.Error:
            return False

    return [p for p in processes if running(p)]


def cmdline(process: psutil.Process) -> str:
    try:
        return " ".join(process.cmdline())
    except psutil.Error:
        return ""


def kill_all(processes: list[psutil.Process]) -> None:
    for process in alive(processes):
        process.kill()


def stop_flow_mid_stage(repo: Path, sig: signal.Signals, epoch: int, log: Path) -> dict[str, float]:
    """Start the flow, send it ``sig`` once the teacher has finished ``epoch`` epochs; what it measured.

    Every process of the flow's tree (dvc, torchrun's launcher and two workers, Prefect's temporary
    server, the lifeline) must be gone within 10 s.
    """
    checkpoint = repo / "checkpoints/teacher"
    with log.open("w") as out:
        flow = subprocess.Popen(
            FLOW,
            cwd=repo,
            env={**os.environ, **FLOW_ENV},
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    tree: list[psutil.Process] = []
    try:

        def trained() -> bool:
            state = load_checkpoint(checkpoint) if (checkpoint / "last.pt").exists() else None
            return state is not None and state["epoch"] >= epoch

        wait_until(trained, 1200, f"train_teacher's epoch {epoch}", log, flow)
        tree = psutil.Process(flow.pid).children(recursive=True)
        kinds = {
            "dvc": [p for p in tree if "repro" in cmdline(p) and "dvc" in cmdline(p)],
            "stage": [p for p in tree if "stages.train_teacher" in cmdline(p)],
            "server": [p for p in tree if "prefect.server.api.server:create_app" in cmdline(p)],
            "lifeline": [p for p in tree if "flows.lifeline" in cmdline(p)],
        }
        assert len(kinds["stage"]) == 3, [cmdline(p) for p in tree]  # torchrun's launcher and 2 workers
        assert all(kinds.values()), {k: len(v) for k, v in kinds.items()}
        flow.send_signal(sig)
        stopped = time.monotonic()
        wait_until(lambda: not alive([*tree, psutil.Process(flow.pid)]), 10, f"the end of {tree}", log)
        return {
            "processes": len(tree),
            "gone_s": time.monotonic() - stopped,
            "epoch": load_checkpoint(checkpoint)["epoch"],
        }
    finally:
        kill_all(tree)
        flow.kill()
        flow.wait()


def test_a_flow_stopped_or_killed_mid_stage_takes_its_tree_and_the_next_run_resumes(tmp_path):
    params = smoke_params(engine={"nproc": 2}, teacher={"init": "scratch", "epochs": 6})
    repo = make_pipeline_repo(tmp_path / "repo", params)
    checkpoint = repo / "checkpoints/teacher"

    # SIGTERM, as Prefect's runner sends on a cancel from the UI: the flow ends the stage's group
    terminated = stop_flow_mid_stage(repo, signal.SIGTERM, 1, tmp_path / "terminated.log")
    assert "flow stopped (TerminationSignal" in (tmp_path / "terminated.log").read_text()
    # SIGKILL: the flow can do nothing; its lifeline ends the tree
    killed = stop_flow_mid_stage(repo, signal.SIGKILL, terminated["epoch"] + 1, tmp_path / "killed.log")
    assert "[lifeline] the flow process" in (tmp_path / "killed.log").read_text()
    assert (
        f"resuming from {checkpoint} at epoch {terminated['epoch'] + 1}"
        in (tmp_path / "killed.log").read_text()
    )

    started = time.monotonic()
    rerun = run(FLOW, repo, FLOW_ENV, timeout=1800)
    rerun_s = time.monotonic() - started
    output = rerun.stdout + rerun.stderr
    assert rerun.returncode == 0, output[-4000:]
    assert f"resuming from {checkpoint} at epoch {killed['epoch'] + 1}" in output, output[-4000:]
    assert "had been killed. Auto removed it from the lock file" in output  # DVC, naming the dead PID
    status = run(["dvc", "status", "train_teacher"], repo)  # the stages this flow ran
    assert "Data and pipelines are up to date." in status.stdout, status.stdout + status.stderr
    print(
        f"\nSIGTERM: {terminated['processes']} processes gone in {terminated['gone_s']:.1f} s (epoch "
        f"{terminated['epoch']}); SIGKILL: {killed['processes']} gone in {killed['gone_s']:.1f} s (epoch "
        f"{killed['epoch']}); the rerun resumed and took {rerun_s:.0f} s"
    )


def publishing_started(repo: Path) -> bool:
    """The timing file is the last output written before the MLflow logging of publish."""
    return (repo / "metrics/teacher_timing.json").exists()


def timed(
    cmd: list[str], repo: Path, env: dict[str, str] | None = None
) -> tuple[subprocess.CompletedProcess, float, float]:
    """Run ``cmd``; with its wall-clock and CPU seconds (user + system, its children included).

    The CPU time says what the run cost whatever else loads the machine: a rerun that trained
    would spend the training's, one that only publishes a few seconds.
    """
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.monotonic()
    result = run(cmd, repo)
    wall = time.monotonic() - started
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return result, wall, (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def without_write_override(cmd: list[str]) -> list[str]:
    """``cmd`` subject to file modes: root ignores them unless the capability is dropped."""
    if os.geteuid() != 0:
        return cmd
    setpriv = shutil.which("setpriv")
    if setpriv is None:
        pytest.skip("running as root without setpriv: a read-only folder cannot be made")
    return [setpriv, "--bounding-set=-dac_override,-dac_read_search", "--", *cmd]


def test_a_stage_dying_after_its_last_epoch_only_publishes_when_run_again(tmp_path):
    repo = make_pipeline_repo(tmp_path / "repo", smoke_params(teacher={"init": "scratch", "epochs": 3}))
    prepared = run(stage("prepare"), repo)
    assert prepared.returncode == 0, prepared.stderr
    checkpoint = repo / "checkpoints/teacher"

    # torchrun's launcher killed with SIGKILL: its workers (in sessions of their own) go with it
    two = tmp_path / "two.yaml"
    two_procs = smoke_params(engine={"nproc": 2}, teacher={"init": "scratch", "epochs": 50})
    two.write_text(yaml.safe_dump(two_procs))
    log = tmp_path / "launcher.log"
    with log.open("w") as out:
        command = [*stage("train_teacher"), "--params", str(two)]
        launcher = subprocess.Popen(command, cwd=repo, stdout=out, stderr=subprocess.STDOUT)
    try:

        def workers() -> list[psutil.Process]:
            return [
                p for p in psutil.Process(launcher.pid).children() if "stages.train_teacher" in cmdline(p)
            ]

        wait_until(lambda: len(workers()) == 2, 300, "torchrun's two workers", log, launcher)
        started_workers = workers()
        launcher.kill()
        killed = time.monotonic()
        wait_until(lambda: not alive(started_workers), 10, "the end of torchrun's workers", log)
        workers_gone_s = time.monotonic() - killed
    finally:
        launcher.kill()
        launcher.wait()
    shutil.rmtree(checkpoint, ignore_errors=True)  # whatever the two processes saved is not this test's

    # kill -9 while it logs its outputs to MLflow
    log = tmp_path / "killed.log"
    with log.open("w") as out:
        teacher = subprocess.Popen(stage("train_teacher"), cwd=repo, stdout=out, stderr=subprocess.STDOUT)
    try:
        wait_until(lambda: publishing_started(repo), 600, "publishing", log, teacher)
        teacher.kill()
    finally:
        teacher.kill()
        teacher.wait()
    state = load_checkpoint(checkpoint)
    assert state["epoch"] == 3 and not state["finished"]
    rerun, killed_wall, killed_cpu = timed(stage("train_teacher"), repo)
    assert rerun.returncode == 0, rerun.stdout + rerun.stderr
    assert "training already ended in" in rerun.stdout and "no epoch to train" in rerun.stdout
    assert killed_cpu < 60
    assert load_checkpoint(checkpoint)["global_step"] == state["global_step"]
    assert load_checkpoint(checkpoint)["finished"]

    # an output folder it may not write: one line, exit 2, then a rerun only publishes
    (repo / "artifacts/teacher").chmod(0o555)
    try:
        refused, trained_wall, trained_cpu = timed(without_write_override(stage("train_teacher")), repo)
    finally:
        (repo / "artifacts/teacher").chmod(0o755)
    assert refused.returncode == 2, refused.stdout + refused.stderr
    (line,) = refused.stderr.strip().splitlines()
    folder = repo / "artifacts/teacher"
    assert line.startswith(f"error: [train_teacher] cannot write to {folder} (Permission denied)"), line
    assert not load_checkpoint(checkpoint)["finished"]
    rerun, readonly_wall, readonly_cpu = timed(stage("train_teacher"), repo)
    assert rerun.returncode == 0, rerun.stdout + rerun.stderr
    assert "no epoch to train" in rerun.stdout and readonly_cpu < 60
    print(
        f"\ntorchrun workers gone {workers_gone_s:.1f} s after the launcher's SIGKILL; rerun after kill -9 "
        f"while publishing: {killed_wall:.1f} s ({killed_cpu:.1f} s CPU); after a read-only folder: "
        f"{readonly_wall:.1f} s ({readonly_cpu:.1f} s CPU), the run that trained and was refused: "
        f"{trained_wall:.1f} s ({trained_cpu:.1f} s CPU)"
    )


def start_mlflow_server(root: Path, port: int) -> subprocess.Popen:
    cmd = [
        str(Path(sys.executable).parent / "mlflow"), "server",
        "--backend-store-uri", f"sqlite:///{root / 'server.db'}",
        "--artifacts-destination", str(root / "store"),
        "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
    ]  # fmt: skip
    log = root / "server.log"
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    with log.open("a") as out:
        process = subprocess.Popen(
            cmd, cwd=root, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
    wait_until_healthy(f"http://127.0.0.1:{port}", process, log)
    return process


def stop(process: subprocess.Popen, sig: signal.Signals = signal.SIGTERM) -> None:
    if process.poll() is None:
        os.killpg(process.pid, sig)
        process.wait(timeout=30)


def test_an_mlflow_server_killed_mid_training_costs_a_bounded_wait_and_no_training(tmp_path):
    server_root = tmp_path / "server"
    server_root.mkdir()
    port = free_port()
    uri = f"http://127.0.0.1:{port}"
    env = {"MLFLOW_TRACKING_URI": uri, "VITKIT_PROGRESS": "0"}
    repo = make_pipeline_repo(tmp_path / "repo", smoke_params(teacher={"init": "scratch", "epochs": 8}))
    server = start_mlflow_server(server_root, port)
    try:
        prepared = run(stage("prepare"), repo, env)
        assert prepared.returncode == 0, prepared.stderr
        client = MlflowClient(uri)
        log = tmp_path / "teacher.log"
        with log.open("w") as out:
            teacher = subprocess.Popen(
                stage("train_teacher"),
                cwd=repo,
                env={**os.environ, **env},
                stdout=out,
                stderr=subprocess.STDOUT,
            )
        try:

            def logged_an_epoch() -> bool:
                experiment = client.get_experiment_by_name("vitkit")
                runs = client.search_runs([experiment.experiment_id], "tags.`vitkit.stage` = 'train_teacher'")
                return bool(runs) and bool(client.get_metric_history(runs[0].info.run_id, "train_loss"))

            wait_until(logged_an_epoch, 600, "train_teacher's first epoch on the server", log, teacher)
            stop(server, signal.SIGKILL)
            killed = time.monotonic()
            lines: list[tuple[float, str]] = []
            seen = 0
            while teacher.poll() is None and time.monotonic() - killed < 600:
                text = log.read_text()
                lines += [(time.monotonic() - killed, line) for line in text[seen:].splitlines() if line]
                seen = len(text)
                time.sleep(0.1)
            code = teacher.wait(timeout=10)
            ended_s = time.monotonic() - killed
        finally:
            teacher.kill()
            teacher.wait()
        output = log.read_text()
        assert code == 2, output[-4000:]
        assert "Traceback" not in output
        (warning,) = [(t, line) for t, line in lines if "does not answer" in line]
        errors = [line for line in output.splitlines() if line.startswith("error: [train_teacher]")]
        assert len(errors) == 1 and "did not take" in errors[0] and "only publishes" in errors[0], output
        state = load_checkpoint(repo / "checkpoints/teacher")
        assert state["epoch"] == 8 and not state["finished"]  # it trained to the end, kept for publishing
        assert warning[0] < tracking.REQUEST_BOUND_S + 30  # the next epoch's try, bounded

        server = start_mlflow_server(server_root, port)
        started = time.monotonic()
        rerun = run(stage("train_teacher"), repo, env)
        rerun_s = time.monotonic() - started
        assert rerun.returncode == 0, rerun.stdout + rerun.stderr
        assert "no epoch to train" in rerun.stdout and "marked KILLED" in rerun.stdout
        experiment = client.get_experiment_by_name("vitkit")
        (finished,) = client.search_runs(
            [experiment.experiment_id],
            "tags.`vitkit.stage` = 'train_teacher' and attributes.status = 'FINISHED'",
        )
        assert len(client.get_metric_history(finished.info.run_id, "train_loss")) == 8  # every epoch
    finally:
        stop(server)
    print(
        f"\nMLflow server killed: first word {warning[0]:.1f} s after, the stage ended {ended_s:.1f} s after "
        f"(exit {code}); the rerun with the server back published in {rerun_s:.1f} s"
    )


def test_a_run_cancelled_from_the_ui_stops_its_training_and_the_next_run_resumes(tmp_path):
    """Cancel as the Prefect UI does (state Cancelling through the API) a served run mid-training.

    The runner ends the flow-run process with SIGTERM; the flow ends its stage's process group:
    the training stops within seconds, the run ends Cancelled, and the next run of the deployment
    resumes the stage from its checkpoint.
    """
    from prefect.client.orchestration import get_client
    from prefect.deployments import run_deployment
    from prefect.settings import PREFECT_API_URL, temporary_settings
    from prefect.states import Cancelling

    from tests.loopback import _start, _stop, prefect_server, wait_for

    params = smoke_params(teacher={"init": "scratch", "epochs": 6})
    repo = make_pipeline_repo(tmp_path / "repo", params)
    checkpoint = repo / "checkpoints/teacher"
    log = tmp_path / "serve.log"

    def epochs_done() -> int:
        return load_checkpoint(checkpoint)["epoch"] if (checkpoint / "last.pt").exists() else 0

    with prefect_server(tmp_path / "server") as api_url, temporary_settings({PREFECT_API_URL: api_url}):
        env = {**os.environ, **FLOW_ENV, "PREFECT_API_URL": api_url, "PREFECT_RUNNER_POLL_FREQUENCY": "2"}
        served = _start([sys.executable, "-m", "flows.pipeline", "--serve"], repo, env, log)
        try:
            wait_for(lambda: "vitkit-pipeline/vitkit" in log.read_text(), 120, "the served deployment", log)
            first = run_deployment(
                "vitkit-pipeline/vitkit", parameters={"stages": ["train_teacher"]}, timeout=0
            )
            wait_until(lambda: epochs_done() >= 1, 1200, "train_teacher's first epoch", log, served)
            training = [
                p
                for p in psutil.Process(served.pid).children(recursive=True)
                if "stages.train_teacher" in cmdline(p)
            ]
            assert alive(training), log.read_text()[-4000:]
            with get_client(sync_client=True) as client:
                client.set_flow_run_state(first.id, Cancelling(message="cancelled from the UI"))
                cancelled = time.monotonic()
                wait_until(lambda: not alive(training), 60, "the end of the training", log)
                stopped_s = time.monotonic() - cancelled
                stopped_at = epochs_done()
                wait_until(
                    lambda: client.read_flow_run(first.id).state.is_cancelled(), 60, "state Cancelled", log
                )
            assert stopped_at < 6, "the training finished before the cancel reached it"
            second = run_deployment(
                "vitkit-pipeline/vitkit",
                parameters={"stages": ["train_teacher"]},
                timeout=1800,
                poll_interval=2,
            )
            assert second.state.is_completed(), (second.state, log.read_text()[-4000:])
            assert f"resuming from {checkpoint} at epoch {stopped_at + 1}" in log.read_text()
        finally:
            _stop(served)
    assert load_checkpoint(checkpoint)["finished"]
    print(f"\ncancelled at epoch {stopped_at}: the training ended {stopped_s:.1f} s after the cancel")
