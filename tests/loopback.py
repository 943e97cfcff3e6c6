"""A team's Prefect set-up on one machine: a real ``prefect server`` and process workers.

Everything listens on 127.0.0.1 on a free port; each worker stands for another machine (its own
directory and Prefect home). Every wait is bounded, and whatever is started is stopped (with the
processes it started) when the ``with`` block ends. Used by tests/integration/test_dispatch.py and
benchmarks/bench_dispatch.py.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(check: Callable[[], bool], timeout_s: float, what: str, log: Path | None = None) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(0.5)
    tail = log.read_text()[-3000:] if log and log.exists() else ""
    raise TimeoutError(f"{what} not ready within {timeout_s:.0f} s\n{tail}")


def _stop(process: subprocess.Popen) -> None:
    """Stop a process started in its own session, and everything it started."""
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(timeout=20)


def _start(cmd: list[str], cwd: Path, env: dict[str, str], log: Path) -> subprocess.Popen:
    with log.open("w") as out:
        return subprocess.Popen(
            cmd, cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )


def _healthy(url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/health", timeout=2) as response:
            return response.status == 200
    except OSError:
        return False


@contextmanager
def prefect_server(home: Path) -> Iterator[str]:
    """``prefect server start`` on 127.0.0.1:<free port>; yields its API URL."""
    home.mkdir(parents=True, exist_ok=True)
    port = free_port()
    env = {**os.environ, "PREFECT_HOME": str(home), "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
    env.pop("PREFECT_API_URL", None)
    log = home / "server.log"
    cmd = [str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(port), "--no-ui"]
    process = _start(cmd, home, env, log)
    url = f"http://127.0.0.1:{port}/api"
    try:
        wait_for(lambda: process.poll() is None and _healthy(url), 180, "prefect server", log)
        yield url
    finally:
        _stop(process)


def worker_online(api_url: str, pool: str) -> bool:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.objects import WorkerStatus
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings({PREFECT_API_URL: api_url}), get_client(sync_client=True) as client:
        try:
            return any(w.status == WorkerStatus.ONLINE for w in client.read_workers_for_work_pool(pool))
        except Exception:  # the pool is created by the worker itself; not there yet
            return False


@contextmanager
def process_worker(
    api_url: str, pool: str, machine: Path, env: dict[str, str] | None = None
) -> Iterator[Path]:
    """``prefect worker start --pool <pool> --type process`` in ``machine``, polling every second.

    Yields its log file; waits until the server lists it online.
    """
    machine.mkdir(parents=True, exist_ok=True)
    worker_env = {
        **os.environ,
        "PREFECT_API_URL": api_url,
        "PREFECT_HOME": str(machine / ".prefect"),
        "PREFECT_WORKER_QUERY_SECONDS": "1",
        "PREFECT_WORKER_PREFETCH_SECONDS": "1",
        **(env or {}),
    }
    log = machine / "worker.log"
    prefect = shutil.which("prefect", path=str(BIN)) or "prefect"
    cmd = [prefect, "worker", "start", "--pool", pool, "--type", "process", "--name", f"{pool}-worker"]
    process = _start(cmd, machine, worker_env, log)
    try:
        wait_for(lambda: process.poll() is None and worker_online(api_url, pool), 120, f"worker {pool}", log)
        yield log
    finally:
        _stop(process)
