"""A DVC command run from a Prefect flow: its output streamed into the run's log, its failure classified.

Shared by the single-machine flow (flows/pipeline.py) and the per-stage flow that work-pool
workers run (flows/dispatch.py); kept apart from both so a worker does not import MLflow or the
orchestrator's code just to run one stage.

The flow owns what it starts. Each command runs in a process group (a session) of its own, with
everything under it (the stage, torchrun's launcher; torchrun's workers, in their own sessions,
die with their launcher); that group is ended (SIGTERM, then SIGKILL after
``flows.lifeline.GRACE_S``) when the flow is stopped (SIGTERM, which Prefect raises as
``TerminationSignal``, as when a run is cancelled from the UI; Ctrl-C; ``stop_all``), and by the
flow's lifeline watcher if the flow process dies without a word (SIGKILL).
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import threading
import time
from dataclasses import dataclass, field
from logging import Logger, LoggerAdapter
from pathlib import Path
from typing import Any

import psutil

from flows import lifeline

USER_ERROR_MARK = "error: ["


class StageInputError(RuntimeError):
    """A stage rejected its input (params or data): retrying cannot help."""


class StageFailed(RuntimeError):
    """A stage failed for another reason (killed, out of memory, a lock...): worth a retry."""


class FlowStopped(RuntimeError):
    """The flow is being stopped (cancelled, terminated, interrupted): no stage may start or retry."""


_running: dict[int, subprocess.Popen[str]] = {}  # pid (= process group id) -> command, while it runs
_running_lock = threading.Lock()
_stopping = threading.Event()


def end_group(process: subprocess.Popen[str], sig: signal.Signals = signal.SIGTERM) -> None:
    """Send ``sig`` to the process group ``process`` leads; SIGKILL what is left after the grace time."""
    try:
        os.killpg(process.pid, sig)
    except ProcessLookupError:
        return
    with contextlib.suppress(subprocess.TimeoutExpired):
        process.wait(timeout=lifeline.GRACE_S)
    with contextlib.suppress(ProcessLookupError):  # the leader may be gone and a member still there
        os.killpg(process.pid, signal.SIGKILL)


def stop_all(sig: signal.Signals = signal.SIGTERM) -> list[int]:
    """End every command still running, and refuse new ones until ``allow_starts``; the groups ended."""
    _stopping.set()
    with _running_lock:
        running = list(_running.values())
    threads = [threading.Thread(target=end_group, args=(process, sig)) for process in running]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return [process.pid for process in running]


def allow_starts() -> None:
    """Commands may start again: the flow that stopped them has ended (another may run in this process)."""
    _stopping.clear()


@dataclass
class DvcOutput:
    code: int
    lines: list[str] = field(default_factory=list)
    times: list[float] = field(default_factory=list)  # time.monotonic() when each line came
    aborted_on: str | None = None  # the line that made us stop the command

    def has(self, text: str) -> bool:
        return any(text in line for line in self.lines)

    def time_of(self, text: str) -> float | None:
        """When the first line containing ``text`` came (time.monotonic()), None if none did."""
        return next((t for line, t in zip(self.lines, self.times, strict=True) if text in line), None)

    @property
    def user_error(self) -> str | None:
        return next((line for line in self.lines if USER_ERROR_MARK in line), None)


def run_dvc(
    cmd: list[str],
    cwd: str | Path,
    logger: Logger | LoggerAdapter[Any],
    env: dict[str, str] | None = None,
    abort_on: str | None = None,
) -> DvcOutput:
    """Run ``cmd``, logging each line; stop it (and what it started) at a line containing ``abort_on``.

    Aborting lets a caller forbid one outcome, e.g. DVC deciding to run a stage that should only
    be restored; DVC's locks record their owner's pid and are freed when it is gone.
    """
    if _stopping.is_set():
        raise FlowStopped(f"the flow is stopping: not starting {' '.join(cmd)}")
    logger.info("$ %s", " ".join(cmd))
    process = subprocess.Popen(
        cmd,
        cwd=cwd,
        env={**os.environ, **(env or {})},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        bufsize=1,
        start_new_session=True,  # its own process group: ended as one, and no Ctrl-C meant for the flow
    )
    with _running_lock:
        _running[process.pid] = process
    lifeline.tie(process.pid, group=True)
    output = DvcOutput(code=0)
    assert process.stdout is not None
    try:
        for raw in process.stdout:
            line = raw.rstrip()
            if not line:
                continue
            logger.info(line)
            output.lines.append(line)
            output.times.append(time.monotonic())
            if abort_on is not None and abort_on in line:
                output.aborted_on = line
                end_group(process)
                break
        output.code = process.wait()
    except BaseException:  # stopped while it ran (TerminationSignal, KeyboardInterrupt): it goes too
        end_group(process)
        raise
    finally:
        with _running_lock:
            _running.pop(process.pid, None)
        lifeline.untie(process.pid)
    if _stopping.is_set():
        raise FlowStopped(f"the flow was stopped while {' '.join(cmd)} ran (exit code {output.code})")
    return output


def _started_after(pid: int, moment: float) -> bool:
    try:
        return psutil.Process(pid).create_time() > moment
    except psutil.Error:
        return False  # gone: DVC removes it itself, naming it


def clear_reused_pid_locks(repo_root: str | Path) -> list[str]:
    """Drop DVC lock entries whose PID now belongs to a process started after they were written.

    DVC records each lock holder's PID in ``.dvc/tmp/rwlock`` and removes the entries of dead
    PIDs itself, with a warning naming them. A PID the system has since given to another process
    (in a container after a restart, PIDs are small and soon reused) would keep the outputs "busy"
    for good. A holder wrote its entry after it started and no later than the file's last write,
    so a process started after that write cannot be the holder. Returns what was cleared, in words.
    """
    from dvc.fs import localfs
    from dvc.repo import Repo
    from dvc.rwlock import RWLOCK_FILE, _edit_rwlock

    tmp_dir = Path(repo_root) / ".dvc" / "tmp"
    path = tmp_dir / RWLOCK_FILE
    try:
        written = path.stat().st_mtime
        entries = json.loads(path.read_text())
    except (OSError, ValueError):
        return []  # no lock file, or one DVC itself will report
    holders = [i for infos in entries.get("read", {}).values() for i in infos] + list(
        entries.get("write", {}).values()
    )
    if not any(_started_after(int(info["pid"]), written) for info in holders):
        return []  # the usual case: the file is not even rewritten
    with Repo(str(repo_root)) as repo:
        hardlink = bool(repo.config["core"].get("hardlink_lock", False))
    cleared: list[str] = []
    with _edit_rwlock(str(tmp_dir), localfs, hardlink) as lock:
        for out, info in list(lock["write"].items()):
            if _started_after(int(info["pid"]), written):
                cleared.append(f"{out} (written by PID {info['pid']}, {info['cmd']})")
                del lock["write"][out]
        for out, infos in list(lock["read"].items()):
            stale = [i for i in infos if _started_after(int(i["pid"]), written)]
            cleared += [f"{out} (read by PID {i['pid']}, {i['cmd']})" for i in stale]
            lock["read"][out] = [i for i in infos if i not in stale]
            if not lock["read"][out]:
                del lock["read"][out]
    return cleared


def is_transient(task: Any, task_run: Any, state: Any) -> bool:
    """Prefect's retry condition: retry a failed stage unless its input (or set-up) was at fault."""
    from vitkit.errors import VitkitError

    try:
        state.result()
    except (StageInputError, FlowStopped, VitkitError):
        return False
    except Exception:
        return True
    return False


def raise_for_stage(stage: str, output: DvcOutput) -> None:
    """A failed stage as the exception the flow's retry policy tells apart (bad input: no retry)."""
    if output.code == 0 and output.aborted_on is None:
        return
    if output.user_error:
        raise StageInputError(output.user_error)
    raise StageFailed(f"stage {stage} failed (dvc exit code {output.code}); see the log above")
