"""Results travel through a DVC remote: two clones on loopback stand in for two machines.

Machine A runs the pipeline and pushes (outputs and run cache) to a local directory remote;
machine B, a fresh clone of A's commit, pulls and has nothing left to run. And every way the
remote can fail is one ``error:`` line and exit code 2.
"""

from __future__ import annotations

import hashlib
import json
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from flows import dvc_remote
from tests.conftest import ROOT, make_pipeline_repo, run
from vitkit.errors import RemoteError

pytestmark = pytest.mark.integration


def md5(path: Path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


def lock_outs(repo: Path) -> dict[str, dict[str, str]]:
    """{stage: {out path: md5}} from dvc.lock."""
    lock = yaml.safe_load((repo / "dvc.lock").read_text())
    return {
        stage: {o["path"]: o["md5"] for o in entry.get("outs", [])} for stage, entry in lock["stages"].items()
    }


def timed(cmd: list[str], repo: Path) -> tuple[subprocess.CompletedProcess[str], float]:
    started = time.perf_counter()
    result = run(cmd, repo, timeout=3600)  # the whole smoke DAG: over 10 min on a busy 2-core CPU
    assert result.returncode == 0, result.stdout + result.stderr
    return result, time.perf_counter() - started


@pytest.mark.slow
def test_a_fresh_clone_pulls_the_results_and_has_nothing_to_run(tmp_path):
    """The smoke pipeline on A (minutes), then pull and a no-op repro on B."""
    remote = tmp_path / "remote"
    machine_a = make_pipeline_repo(tmp_path / "a")
    timed(["dvc", "remote", "add", "-d", "storage", str(remote)], machine_a)
    _, repro_a = timed(["dvc", "repro"], machine_a)
    timed(["git", "add", "-A"], machine_a)
    timed(["git", "commit", "-qm", "pipeline results"], machine_a)
    # every output travels through the remote (the run cache restores only fully cached stages)
    committed = run(["git", "ls-files"], machine_a).stdout.split()
    outputs = ("metrics/", "plots/", "reports/", "artifacts/", "data/", "checkpoints/")
    assert not any(path.startswith(outputs) and not path.endswith(".gitignore") for path in committed)
    pushed = dvc_remote.push(machine_a)
    assert "pushed" in pushed and (remote / "runs").is_dir()  # the run cache went too

    machine_b = tmp_path / "b"
    timed(["git", "clone", "-q", str(machine_a), str(machine_b)], tmp_path)
    dvc_remote.pull(machine_b)
    noop, repro_b = timed(["dvc", "repro"], machine_b)
    assert "Running stage" not in noop.stdout, noop.stdout
    for path in (
        "artifacts/teacher/model.pt",
        "artifacts/detr/deformable/model.pt",
        "plots/evaluate/detr_detections.png",
    ):
        assert md5(machine_b / path) == md5(machine_a / path), path
    assert "Data and pipelines are up to date" in run(["dvc", "status"], machine_b).stdout

    # a forced re-run of the teacher gives the same bytes: nothing downstream is invalidated
    before = lock_outs(machine_a)
    forced, teacher_s = timed(["dvc", "repro", "-f", "-s", "train_teacher"], machine_a)
    assert "Running stage 'train_teacher'" in forced.stdout
    after = lock_outs(machine_a)
    changed = {p for p, h in after["train_teacher"].items() if before["train_teacher"][p] != h}
    assert changed <= {"metrics/teacher_timing.json"}, changed  # wall-clock only
    assert "Data and pipelines are up to date" in run(["dvc", "status"], machine_a).stdout
    # the metrics and plots compare across commits (both in A's cache): only the timing differs
    timed(["git", "commit", "-qam", "teacher again"], machine_a)
    diff, _ = timed(["dvc", "metrics", "diff", "HEAD~1", "--json"], machine_a)
    assert set(json.loads(diff.stdout)) == {"metrics/teacher_timing.json"}, diff.stdout
    timed(["dvc", "plots", "diff", "HEAD~1", "-o", str(tmp_path / "plots")], machine_a)
    assert (tmp_path / "plots/index.html").stat().st_size > 0
    print(f"repro on A {repro_a:.1f} s, no-op repro on B {repro_b:.1f} s, forced teacher {teacher_s:.1f} s")


@pytest.fixture
def tiny_repo(tmp_path) -> Path:
    """A git + DVC repository with one DVC-tracked file, committed."""
    repo = tmp_path / "repo"
    repo.mkdir()
    (repo / "data.txt").write_text("some result\n")
    for cmd in (
        ["git", "init", "-q"],
        ["git", "config", "user.email", "tests@vitkit"],
        ["git", "config", "user.name", "vitkit tests"],
        ["dvc", "init", "-q"],
        ["dvc", "config", "core.analytics", "false"],
        ["dvc", "add", "-q", "data.txt"],
        ["git", "add", "-A"],
        ["git", "commit", "-qm", "one tracked file"],
    ):
        subprocess.run(cmd, cwd=repo, check=True, capture_output=True)
    return repo


def remote_cli(repo: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return run([sys.executable, "-m", "flows.dvc_remote", "--repo", str(repo), *args], ROOT, timeout=60)


def assert_one_error_line(result: subprocess.CompletedProcess[str], *words: str) -> None:
    assert result.returncode == 2, result.stdout + result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: [dvc remote] "), result.stderr
    assert all(word in lines[0] for word in words), lines[0]


def closed_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]  # nothing listens on it once the socket is closed


def test_no_remote_or_an_unknown_one_is_named_with_how_to_add_it(tiny_repo):
    assert_one_error_line(remote_cli(tiny_repo, "push"), "no default DVC remote", "dvc remote add -d")
    run(["dvc", "remote", "add", "-d", "storage", str(tiny_repo.parent / "store")], tiny_repo)
    assert_one_error_line(remote_cli(tiny_repo, "--remote", "backup", "pull"), "'backup'", "storage")


def test_a_refused_connection_is_one_line_naming_the_remote(tiny_repo):
    url = f"http://127.0.0.1:{closed_port()}/store"
    run(["dvc", "remote", "add", "-d", "storage", url], tiny_repo)
    assert_one_error_line(remote_cli(tiny_repo, "push", "--no-run-cache"), url, "Connect call failed")
    # the probe alone says so too: a pull with nothing to fetch, or a push of many files, does
    # not get as far as DVC's transfer to find out
    assert_one_error_line(remote_cli(tiny_repo, "check"), url, "Connect call failed")


def test_a_remote_that_never_answers_is_reported_after_the_probe_time_limit(tiny_repo):
    with socket.socket() as silent:  # accepts connections (the kernel's backlog) and never replies
        silent.bind(("127.0.0.1", 0))
        silent.listen()
        url = f"http://127.0.0.1:{silent.getsockname()[1]}/store"
        run(["dvc", "remote", "add", "-d", "storage", url], tiny_repo)
        started = time.perf_counter()
        with pytest.raises(RemoteError, match="did not answer within 3 s"):
            dvc_remote.check(tiny_repo, timeout_s=3)
        assert time.perf_counter() - started < 30


def test_pulling_from_a_remote_without_the_files_says_what_to_push(tiny_repo):
    run(["dvc", "remote", "add", "-d", "storage", str(tiny_repo.parent / "empty")], tiny_repo)
    subprocess.run(["rm", "-rf", ".dvc/cache", "data.txt"], cwd=tiny_repo, check=True)
    assert_one_error_line(remote_cli(tiny_repo, "pull"), "lacks files", "data.txt", "push")
    assert not (tiny_repo / "data.txt").exists()


def test_push_then_pull_moves_the_files_and_the_run_cache(tiny_repo, tmp_path):
    store = tmp_path / "store"
    run(["dvc", "remote", "add", "-d", "storage", str(store)], tiny_repo)
    run(
        [
            "dvc",
            "stage",
            "add",
            "-q",
            "-n",
            "copy",
            "-d",
            "data.txt",
            "-o",
            "copy.txt",
            "cp data.txt copy.txt",
        ],
        tiny_repo,
    )
    assert run(["dvc", "repro"], tiny_repo).returncode == 0
    dvc_remote.push(tiny_repo)
    assert (store / "runs").is_dir()
    subprocess.run(["rm", "-rf", ".dvc/cache", "data.txt", "copy.txt"], cwd=tiny_repo, check=True)
    dvc_remote.pull(tiny_repo)
    assert (tiny_repo / "copy.txt").read_text() == "some result\n"
    assert "Data and pipelines are up to date" in run(["dvc", "status"], tiny_repo).stdout
