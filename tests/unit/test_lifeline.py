"""The flow owns what it starts: its lifeline ends what is tied when it dies; stop_all ends what runs."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil
import pytest

from flows import dvc_run, lifeline

ROOT = Path(__file__).resolve().parents[2]

# a stand-in for the flow: ties a process group (two sleeps) and a process, leaves one untied, then waits
FLOW = """
import subprocess, sys, time
from flows import lifeline
quiet = {"stdout": subprocess.DEVNULL, "stderr": subprocess.DEVNULL}  # the test reads the flow's to the end
group = subprocess.Popen(["bash", "-c", "sleep 300 & sleep 300; true"], start_new_session=True, **quiet)
tied = subprocess.Popen(["sleep", "300"], **quiet)
free = subprocess.Popen(["sleep", "300"], start_new_session=True, **quiet)
untied = subprocess.Popen(["sleep", "300"], start_new_session=True, **quiet)
for pid, is_group in ((group.pid, True), (tied.pid, False), (untied.pid, False)):
    lifeline.tie(pid, group=is_group)
lifeline.untie(untied.pid)
print(free.pid, untied.pid, flush=True)
time.sleep(300)
"""


def _alive(processes: list[psutil.Process]) -> list[psutil.Process]:
    return [p for p in processes if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]


def test_a_flow_killed_outright_takes_what_it_tied_with_it(tmp_path):
    flow = subprocess.Popen(
        [sys.executable, "-c", FLOW], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        free, untied = (psutil.Process(int(pid)) for pid in flow.stdout.readline().split())
        children = psutil.Process(flow.pid).children(recursive=True)
        tree = [p for p in children if p.pid not in (free.pid, untied.pid)]
        assert len(tree) == 5  # the lifeline, bash and its two sleeps, the tied sleep
        flow.kill()  # SIGKILL: the flow runs no cleanup of its own
        killed = time.monotonic()
        while _alive(tree) and time.monotonic() - killed < 10:
            time.sleep(0.1)
        assert _alive(tree) == [], f"left after 10 s: {[p.cmdline() for p in _alive(tree)]}"
        assert _alive([free, untied]) == [free, untied]  # what is not tied (any more) is not the flow's
        message = flow.stderr.read()
        assert f"[lifeline] the flow process {flow.pid} is gone; ended what it had started" in message
        assert "process group" in message and "sleep 300" in message
    finally:
        for pid in {p.pid for p in psutil.Process().children(recursive=True)} - {flow.pid}:
            psutil.Process(pid).kill()
        flow.kill()
        flow.wait()
        flow.stdout.close()
        flow.stderr.close()


def test_stop_all_ends_the_running_command_with_its_group_and_refuses_new_ones(tmp_path):
    logger = logging.getLogger("test-stop-all")
    done: dict[str, object] = {}

    def run() -> None:
        try:
            dvc_run.run_dvc(["bash", "-c", "sleep 300 & echo started; sleep 300; true"], tmp_path, logger)
        except dvc_run.FlowStopped as exc:
            done["stopped"] = exc

    thread = threading.Thread(target=run)
    thread.start()
    try:
        deadline = time.monotonic() + 30
        while len(dvc_run._running) == 0 and time.monotonic() < deadline:
            time.sleep(0.05)
        (process,) = dvc_run._running.values()
        time.sleep(0.5)  # the background sleep has started
        members = psutil.Process(process.pid).children(recursive=True)
        assert len(members) == 2
        started = time.monotonic()
        assert dvc_run.stop_all() == [process.pid]
        thread.join(timeout=30)
        assert time.monotonic() - started < lifeline.GRACE_S + 5
        psutil.wait_procs(members, timeout=5)  # signalled; on a busy machine they may take a moment to go
        assert _alive(members) == [] and "was stopped while" in str(done["stopped"])
        with pytest.raises(dvc_run.FlowStopped, match="the flow is stopping"):
            dvc_run.run_dvc(["true"], tmp_path, logger)
    finally:
        dvc_run.stop_all()
        dvc_run.allow_starts()
    assert dvc_run.run_dvc(["true"], tmp_path, logger).code == 0  # the next flow in this process may start


def test_a_dvc_lock_held_by_a_pid_now_reused_by_another_process_is_cleared(tmp_path):
    """DVC clears dead holders itself; a holder's PID given to a newer process is cleared by the flow."""
    subprocess.run(["dvc", "init", "--no-scm", "-q"], cwd=tmp_path, check=True)
    rwlock = tmp_path / ".dvc/tmp/rwlock"
    rwlock.parent.mkdir(parents=True, exist_ok=True)
    time.sleep(0.6)  # this process (a live holder) started well before the lock file's write
    newer = subprocess.Popen(["sleep", "60"])  # stands for the process that got the dead holder's PID
    try:
        me = {"pid": os.getpid(), "cmd": "dvc repro prepare"}  # a live holder, started before the file
        reused = {"pid": newer.pid, "cmd": "dvc repro train_teacher"}
        locks = {"write": {"artifacts/teacher": reused}, "read": {"data": [me, reused]}}
        rwlock.write_text(json.dumps(locks))
        written = psutil.Process(newer.pid).create_time() - 0.3
        os.utime(rwlock, (written, written))
        cleared = dvc_run.clear_reused_pid_locks(tmp_path)
        assert cleared == [
            f"artifacts/teacher (written by PID {newer.pid}, dvc repro train_teacher)",
            f"data (read by PID {newer.pid}, dvc repro train_teacher)",
        ]
        assert json.loads(rwlock.read_text()) == {"read": {"data": [me]}, "write": {}}
        assert dvc_run.clear_reused_pid_locks(tmp_path) == []  # the live holder stays
    finally:
        newer.kill()
        newer.wait()


def _watchers() -> list[psutil.Process]:
    """This process's live lifeline watchers; zombies left by earlier tests' children are not watchers."""
    found = []
    for child in psutil.Process().children():
        try:
            if "flows.lifeline" in " ".join(child.cmdline()):
                found.append(child)
        except psutil.Error:  # a zombie or a child gone since the listing
            pass
    return found


def test_a_killed_watcher_is_replaced_by_the_next_tie():
    """A watcher gone (killed) must not break the flow: the next tie starts another, no BrokenPipeError."""
    sleeper = subprocess.Popen(["sleep", "60"])
    try:
        lifeline.tie(sleeper.pid)
        watchers = _watchers()
        assert watchers, "tie started no watcher"
        for watcher in watchers:
            watcher.kill()
        psutil.wait_procs(watchers, timeout=10)
        lifeline.tie(sleeper.pid)
        assert {w.pid for w in _watchers()} - {w.pid for w in watchers}, "no new watcher after the kill"
        lifeline.untie(sleeper.pid)
    finally:
        sleeper.kill()
        sleeper.wait()
