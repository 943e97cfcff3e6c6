"""train_teacher on two torchrun "nodes" over loopback: two clones, their own disks, gloo, c10d rendezvous."""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
import yaml

from tests.conftest import ROOT, make_pipeline_repo, run, smoke_params
from vitkit.engine.checkpoint import CHECKPOINT_NAME, load_weights

pytestmark = pytest.mark.integration

CHECKPOINT = f"checkpoints/teacher/{CHECKPOINT_NAME}"
RESUMING = re.compile(r"resuming from .* at epoch (\d+), step (\d+)/(\d+)")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def teacher_command(params_file: Path) -> list[str]:
    return [sys.executable, "-m", "stages.train_teacher", "--params", str(params_file)]


def node_env(endpoint: str, timeout_s: int) -> dict[str, str]:
    return {
        **os.environ,
        "VITKIT_NNODES": "2",
        "VITKIT_RDZV_ENDPOINT": endpoint,
        "VITKIT_RDZV_TIMEOUT": str(timeout_s),
    }


class Nodes:
    """Starts the stage as one node in each clone; every process group it started is killed at the end."""

    def __init__(self) -> None:
        self.started: list[subprocess.Popen] = []

    def start(
        self, repos: list[Path], params_file: Path, endpoint: str, log_name: str
    ) -> list[subprocess.Popen]:
        started = []
        for repo in repos:
            with open(repo / log_name, "w") as log:
                started.append(
                    subprocess.Popen(
                        teacher_command(params_file),
                        cwd=repo,
                        stdout=log,
                        stderr=subprocess.STDOUT,
                        env=node_env(endpoint, timeout_s=120),
                        start_new_session=True,  # the launcher and its worker: one group to kill
                    )
                )
        self.started += started
        return started

    def wait(self, processes: list[subprocess.Popen], timeout_s: float) -> list[int]:
        return [process.wait(timeout=timeout_s) for process in processes]

    def kill(self, processes: list[subprocess.Popen]) -> None:
        """SIGKILL each launcher and its workers, as a machine dying would (torch starts its workers
        in sessions of their own, so killing the launcher's group alone would leave them running)."""
        for process in processes:
            for pid in [*descendants(process.pid), process.pid]:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            process.wait()


def descendants(pid: int) -> list[int]:
    """Every process below ``pid`` (children, their children...), read from /proc."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError):
            fields = stat.read_text().rsplit(")", 1)[1].split()
            children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


@pytest.fixture
def nodes() -> Iterator[Nodes]:
    launched = Nodes()
    try:
        yield launched
    finally:
        launched.kill(launched.started)


def teacher_weights(repo: Path) -> torch.Tensor:
    state, _ = load_weights(repo / "artifacts/teacher/model.pt")
    return torch.cat([t.flatten().float() for t in state.values()])


def wait_for_mid_epoch_checkpoint(repos: list[Path], epoch: int, step: int, timeout_s: float) -> None:
    """Until a node's checkpoint is ``step`` steps (or more) into ``epoch`` (0-based), bounded."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        for repo in repos:
            try:  # memory-mapped: reads the position without the 130 MB of tensors
                state = torch.load(repo / CHECKPOINT, mmap=True, weights_only=True)
            except (OSError, RuntimeError, EOFError):  # absent, or replaced while read: look again
                state = None
            if state and state["epoch"] == epoch and state["step_in_epoch"] >= step:
                return
        time.sleep(0.05)
    raise AssertionError(f"no checkpoint reached epoch {epoch + 1}, step {step} within {timeout_s} s")


@pytest.mark.slow
def test_two_nodes_resume_after_kill_and_match_an_uninterrupted_run(tmp_path, nodes):
    """Two clones stand for two machines without a shared disk (2 nodes x 1 process, gloo).

    Both are killed mid-epoch; node B also loses its checkpoints (a replaced machine). Relaunched,
    both resume from the same step and end with the weights of an uninterrupted 2-node run; one
    node with 2 processes (the same world size, params unchanged) learns the same.
    """
    data = {"classification": {"shapes": {"train_per_class": 100, "val_per_class": 20}}}
    teacher = {"epochs": 2, "batch_size": 10, "init": "scratch"}
    params = smoke_params(
        data=data, engine={"nproc": 2, "threads": 1, "checkpoint_every_steps": 5}, teacher=teacher
    )
    params_file = tmp_path / "params.yaml"
    params_file.write_text(yaml.safe_dump(params))
    node_a = make_pipeline_repo(tmp_path / "node_a")
    prepared = run([sys.executable, "-m", "stages.prepare", "--params", str(params_file)], node_a)
    assert prepared.returncode == 0, prepared.stdout + prepared.stderr
    node_b = make_pipeline_repo(tmp_path / "node_b")
    shutil.copytree(node_a / "data", node_b / "data")  # what `dvc pull` brings to a second machine
    repos = [node_a, node_b]
    endpoint = f"127.0.0.1:{free_port()}"

    uninterrupted = nodes.start(repos, params_file, endpoint, "uninterrupted.log")
    assert nodes.wait(uninterrupted, timeout_s=900) == [0, 0], [
        (r / "uninterrupted.log").read_text() for r in repos
    ]
    reference = teacher_weights(node_a)
    assert torch.equal(teacher_weights(node_b), reference)  # each node wrote the same model on its disk

    # 600 images, 300 a rank, 30 steps an epoch: kill both 12 steps into the second epoch
    killed = nodes.start(repos, params_file, endpoint, "killed.log")
    wait_for_mid_epoch_checkpoint(repos, epoch=1, step=12, timeout_s=900)
    nodes.kill(killed)
    assert [p.returncode for p in killed] == [-signal.SIGKILL] * 2
    shutil.rmtree(node_b / "checkpoints/teacher")
    for repo in repos:  # the resumed run must write them anew
        (repo / "artifacts/teacher/model.pt").unlink()

    resumed = nodes.start(repos, params_file, endpoint, "resumed.log")
    exit_codes = nodes.wait(resumed, timeout_s=900)
    logs = [(r / "resumed.log").read_text() for r in repos]
    assert exit_codes == [0, 0], logs
    positions = [RESUMING.search(log) for log in logs]
    assert all(positions), logs
    epoch, step, steps = positions[0].groups()
    assert positions[1].groups() == (epoch, step, steps)  # both nodes go on from the same step
    assert epoch == "2" and 12 <= int(step) < int(steps) == 30, logs
    for repo in repos:
        assert torch.allclose(teacher_weights(repo), reference, atol=1e-5)

    # one machine, two processes: the same world size, so the same params and the same run
    one_machine = {k: v for k, v in os.environ.items() if not k.startswith("VITKIT_")}
    two_nodes_metrics = (node_a / "metrics/teacher.json").read_text()
    shutil.rmtree(node_a / "checkpoints/teacher")
    one_node = subprocess.run(
        teacher_command(params_file), cwd=node_a, capture_output=True, text=True, timeout=900, env=one_machine
    )
    assert one_node.returncode == 0, one_node.stdout + one_node.stderr
    assert "launching 2 processes" in one_node.stdout
    difference = (teacher_weights(node_a) - reference).abs().max().item()
    print(f"1 node x 2 processes vs 2 nodes x 1: max |weight difference| {difference:.3g}")
    print("2 nodes:", two_nodes_metrics, "1 node:", (node_a / "metrics/teacher.json").read_text())
    assert difference < 1e-4


def test_a_rendezvous_nobody_completes_is_one_error_line(tmp_path):
    """The other node never comes (this machine hosts the rendezvous and waits), or the endpoint is
    on a machine nobody answers from (192.0.2.1 is reserved for documentation, never routed)."""
    endpoints = {"alone": f"127.0.0.1:{free_port()}", "unreachable": "192.0.2.1:29400"}
    for case in endpoints:  # two machines: each its own checkout (and MLflow store)
        (tmp_path / case).mkdir()
        (tmp_path / case / "params.yaml").write_text(yaml.safe_dump(smoke_params(engine={"nproc": 2})))
    processes = {
        case: subprocess.Popen(
            teacher_command(tmp_path / case / "params.yaml"),
            cwd=tmp_path / case,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env={**node_env(endpoint, timeout_s=5), "PYTHONPATH": str(ROOT)},
            start_new_session=True,
        )
        for case, endpoint in endpoints.items()
    }
    try:  # with VITKIT_RDZV_TIMEOUT=5 each gives up in seconds; torchrun's own default waits 600 s
        results = {case: process.communicate(timeout=120) for case, process in processes.items()}
    finally:
        for process in processes.values():
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGKILL)
    needles = {"alone": "did not gather 2 nodes within 5 s", "unreachable": "nobody answers"}
    for case, (stdout, stderr) in results.items():
        assert processes[case].returncode == 2, stdout + stderr
        errors = [line for line in stderr.splitlines() if line.startswith("error: [train_teacher]")]
        assert len(errors) == 1 and "Traceback" not in stderr, stderr
        assert endpoints[case] in errors[0] and needles[case] in errors[0], errors
        assert "VITKIT_RDZV_ENDPOINT" in errors[0]
        with pytest.raises(ProcessLookupError):  # nothing of its process group is left running
            os.killpg(processes[case].pid, 0)
        # nothing written but the MLflow store, which the launcher creates before any rank starts
        written = {p.name for p in (tmp_path / case).iterdir()} - {"params.yaml", "mlflow.db", "mlartifacts"}
        assert not written, written
