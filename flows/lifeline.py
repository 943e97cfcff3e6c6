"""A flow's lifeline: a small watcher process that ends what the flow started if the flow dies first.

A flow killed with SIGKILL (or by the kernel for memory) runs no cleanup: its ``dvc repro``, the
training under it and Prefect's temporary server would live on, orphaned, holding DVC's locks
and the GPU, and the orphaned stage could finish without anyone recording it in ``dvc.lock``.
So the flow process starts one watcher, in a session of its own (a signal to the flow's process
group does not reach it), and tells it through a pipe what to end: each stage's process group
while it runs, and the temporary server. When the flow process dies, for whatever reason, the
kernel closes the pipe; the watcher reads end-of-file, sends SIGTERM to what is still tied, waits
``GRACE_S``, sends SIGKILL to what remains, says what it ended, and exits. Nothing untied is
touched, and a flow that ends normally has untied its stages and stopped its server already.

    python -m flows.lifeline PID FD   # started by ``tie()``: the flow's pid, the pipe's reading end
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil

GRACE_S = 5.0  # SIGTERM, then this long, then SIGKILL: all gone well within 10 s

_lock = threading.Lock()
_writer: int | None = None  # this process's end of the pipe to its watcher


def _send(line: str) -> None:
    global _writer
    with _lock:
        for _ in range(2):
            if _writer is None:
                read_end, _writer = os.pipe()  # both not inheritable: no other child holds the pipe open
                subprocess.Popen(
                    [sys.executable, "-m", "flows.lifeline", str(os.getpid()), str(read_end)],
                    cwd=Path(__file__).resolve().parent.parent,  # where ``flows`` imports from
                    pass_fds=(read_end,),
                    start_new_session=True,
                    stdin=subprocess.DEVNULL,
                )
                os.close(read_end)
            try:
                os.write(_writer, f"{line}\n".encode())
                return
            except BrokenPipeError:  # the watcher was killed: a new one watches from now on
                os.close(_writer)
                _writer = None


def _identity(pid: int) -> str:
    """pid and start time: a pid the system reused for another process is not the one tied."""
    return f"{pid} {psutil.Process(pid).create_time()!r}"


def tie(pid: int, group: bool = False) -> None:
    """End process ``pid`` (with ``group``: its whole process group, which it leads) if this process dies."""
    with contextlib.suppress(psutil.NoSuchProcess):  # already gone: nothing to end
        _send(f"tie {'group' if group else 'process'} {_identity(pid)}")


def untie(pid: int) -> None:
    """``pid`` ended normally: the watcher forgets it."""
    with _lock:
        if _writer is None:
            return
    _send(f"untie {pid}")


def _alive(pid: int, started: float) -> bool:
    try:
        process = psutil.Process(pid)
        return abs(process.create_time() - started) < 1e-3 and process.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return any(p.status() != psutil.STATUS_ZOMBIE for p in _members(pgid))


def _members(pgid: int) -> list[psutil.Process]:
    members = []
    for process in psutil.process_iter():
        try:
            if os.getpgid(process.pid) == pgid:
                members.append(process)
        except (OSError, psutil.Error):
            continue
    return members


def _describe(pid: int) -> str:
    try:
        return " ".join(psutil.Process(pid).cmdline())[:120] or f"pid {pid}"
    except psutil.Error:
        return f"pid {pid}"


def end(tied: dict[int, tuple[bool, float]]) -> list[str]:
    """SIGTERM to everything still tied, SIGKILL to what outlives ``GRACE_S``; what was ended, in words."""

    def alive(pid: int, group: bool, started: float) -> bool:
        return _group_alive(pid) if group else _alive(pid, started)

    def signal_all(sig: signal.Signals) -> None:
        for pid, (group, started) in tied.items():
            if alive(pid, group, started):
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(pid, sig) if group else os.kill(pid, sig)

    ended = [
        f"{'process group' if group else 'process'} {pid} ({_describe(pid)})"
        for pid, (group, started) in tied.items()
        if alive(pid, group, started)
    ]
    if not ended:
        return []
    signal_all(signal.SIGTERM)
    deadline = time.monotonic() + GRACE_S
    while time.monotonic() < deadline and any(alive(p, g, s) for p, (g, s) in tied.items()):
        time.sleep(0.1)
    signal_all(signal.SIGKILL)
    return ended


def main(argv: list[str]) -> int:
    """Read the flow's ties until the pipe closes, then end what is still tied."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # a Ctrl-C meant for the flow is the flow's to handle
    flow_pid, read_end = int(argv[0]), int(argv[1])
    tied: dict[int, tuple[bool, float]] = {}  # pid -> (a process group?, start time)
    with os.fdopen(read_end, "rb") as pipe:
        for raw in pipe:
            words = raw.decode().split()
            if words[0] == "tie":
                tied[int(words[2])] = (words[1] == "group", float(words[3]))
            elif words[0] == "untie":
                tied.pop(int(words[1]), None)
    ended = end(tied)
    if ended:
        print(
            f"[lifeline] the flow process {flow_pid} is gone; ended what it had started: {'; '.join(ended)}",
            file=sys.stderr,
            flush=True,
        )
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
