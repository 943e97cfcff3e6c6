"""Start a stage's processes under torchrun: on this machine alone, or as one node of several.

``engine.nproc`` (params) is the number of processes in all, the world size: it shapes the
results (global batch, data split, DeiT's lr), so DVC tracks it. How those processes are
spread over machines does not change the results and is each machine's business, so it
comes from the environment, which DVC does not track:

- ``VITKIT_NNODES``: machines taking part (default 1: ``torchrun --standalone`` here);
- ``VITKIT_RDZV_ENDPOINT``: ``host:port`` of torchrun's c10d rendezvous, an address of one
  of the nodes that the others reach (needed with more than one node);
- ``VITKIT_RDZV_ID``: names the job, the same on every node (default ``vitkit-<stage>``;
  a scheduler's job id is a good one);
- ``VITKIT_RDZV_TIMEOUT``: seconds a node waits for the others (default 40).

A process torchrun (or a scheduler) already started, which sees ``WORLD_SIZE``, runs the stage
itself and never launches again.

torchrun starts each worker in a session of its own, so a signal to the launcher's process group
does not reach them, and a launcher killed with SIGKILL cannot stop them: each worker asks the
kernel to end it when its parent dies (``die_with_parent``), so no worker outlives its launcher.
"""

from __future__ import annotations

import ctypes
import os
import signal
import socket
import sys
import time
from dataclasses import dataclass

from vitkit.errors import ConfigError

DEFAULT_RDZV_TIMEOUT_S = 40
DEFAULT_RDZV_PORT = 29400  # torchrun's
_PR_SET_PDEATHSIG = 1  # <linux/prctl.h>
LAUNCHER_PID_ENV = "VITKIT_LAUNCHER_PID"  # set by ``launch``: the pid of its workers' parent


@dataclass(frozen=True)
class NodeLayout:
    """How the ``world_size`` processes of a stage are spread over machines."""

    world_size: int
    nnodes: int
    endpoint: str | None  # None: one machine, torchrun's standalone rendezvous
    rdzv_id: str
    timeout_s: int

    @property
    def nproc_per_node(self) -> int:
        return self.world_size // self.nnodes

    def torchrun_args(self) -> list[str]:
        if self.nnodes == 1:
            return ["--standalone", f"--nproc-per-node={self.nproc_per_node}"]
        return [
            f"--nnodes={self.nnodes}",
            f"--nproc-per-node={self.nproc_per_node}",
            "--rdzv-backend=c10d",
            f"--rdzv-endpoint={self.endpoint}",
            f"--rdzv-id={self.rdzv_id}",
            # join_timeout: waiting for the other nodes; read_timeout: reaching the endpoint's store
            f"--rdzv-conf=join_timeout={self.timeout_s},read_timeout={self.timeout_s}",
        ]

    def describe(self) -> str:
        if self.nnodes == 1:
            return f"{self.world_size} processes"
        return (
            f"{self.world_size} processes, {self.nproc_per_node} on each of {self.nnodes} nodes, "
            f"rendezvous {self.rdzv_id} at {self.endpoint}"
        )


def _positive_int(name: str, default: int) -> int:
    raw = os.environ.get(name, "").strip()
    if not raw:
        return default
    if not raw.isdigit() or int(raw) < 1:
        raise ConfigError(f"{name}={raw!r} is not a positive whole number; set it to one or unset it")
    return int(raw)


def node_layout(world_size: int, job: str) -> NodeLayout:
    """The layout the environment asks for; ``job`` names the default rendezvous id."""
    nnodes = _positive_int("VITKIT_NNODES", 1)
    timeout_s = _positive_int("VITKIT_RDZV_TIMEOUT", DEFAULT_RDZV_TIMEOUT_S)
    if world_size % nnodes:
        raise ConfigError(
            f"engine.nproc is {world_size}, the processes in all, which VITKIT_NNODES={nnodes} nodes "
            f"cannot share evenly; set engine.nproc to a multiple of {nnodes}"
        )
    endpoint = os.environ.get("VITKIT_RDZV_ENDPOINT", "").strip() or None
    if nnodes > 1 and endpoint is None:
        raise ConfigError(
            f"VITKIT_NNODES={nnodes} needs VITKIT_RDZV_ENDPOINT=host:port, an address of one of the "
            "nodes that all of them reach, the same on every node"
        )
    rdzv_id = os.environ.get("VITKIT_RDZV_ID", "").strip() or f"vitkit-{job.replace('@', '-')}"
    return NodeLayout(world_size, nnodes, endpoint if nnodes > 1 else None, rdzv_id, timeout_s)


def launched_by_torchrun() -> bool:
    return "WORLD_SIZE" in os.environ


def die_with_parent(parent: int | None = None, sig: signal.Signals = signal.SIGTERM) -> bool:
    """Have the kernel send ``sig`` to this process when its parent dies; False where it cannot (not Linux).

    For a process whose parent owns it (a torchrun worker, a stage DVC runs): were the parent
    killed with SIGKILL, it could not stop this one, which would train on unseen, holding its
    locks and files. The kernel only tells of deaths after the request, and a worker makes it
    only after its imports (seconds on a loaded machine): given the pid its ``parent`` had,
    a parent that died before is caught too (this process is now someone else's child).
    """
    if not sys.platform.startswith("linux"):
        return False
    expected = os.getppid() if parent is None else parent
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(_PR_SET_PDEATHSIG, int(sig), 0, 0, 0) != 0:
        errno = ctypes.get_errno()
        raise OSError(errno, f"prctl(PR_SET_PDEATHSIG): {os.strerror(errno)}")
    if os.getppid() != expected:  # the parent is already gone: the kernel will not tell us
        os.kill(os.getpid(), sig)
    return True


def launcher_pid() -> int | None:
    """The pid of the process that relaunched this stage under torchrun (``LAUNCHER_PID_ENV``), if any."""
    raw = os.environ.get(LAUNCHER_PID_ENV, "")
    return int(raw) if raw.isdigit() else None


def relaunch_if_needed(module: str, argv: list[str], world_size: int, job: str) -> int | None:
    """Launch ``python -m module argv`` under torchrun when the params ask for several processes.

    Returns the launch's exit code, or None when this process runs the stage itself: it is alone
    (``world_size`` 1 on one machine) or it is one of torchrun's workers, whose world must then be
    the one the params describe.
    """
    if launched_by_torchrun():
        started = int(os.environ["WORLD_SIZE"])
        if started != world_size:
            raise ConfigError(
                f"torchrun started {started} processes (WORLD_SIZE) but engine.nproc is {world_size}; "
                f"set engine.nproc: {started}, the processes in all, so DVC tracks the world size "
                "that shapes the results"
            )
        return None
    layout = node_layout(world_size, job)
    if layout.world_size == 1:
        return None
    return launch(module, argv, layout, job)


def launch(module: str, argv: list[str], layout: NodeLayout, job: str) -> int:
    """Run torchrun's launcher in this process; a rendezvous nobody completes is a ``ConfigError``.

    In this process rather than as a ``torchrun`` subprocess, so a failed rendezvous arrives as
    its exception (turned into one line naming the endpoint) instead of a traceback, and a worker's
    exit code (2 for a user error) becomes the stage's.
    """
    from torch.distributed import run as torchrun
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.elastic.rendezvous.api import RendezvousConnectionError, RendezvousTimeoutError

    args = [*layout.torchrun_args(), "-m", module, *argv]
    print(f"[{job}] launching {layout.describe()}: torchrun {' '.join(args)}", flush=True)
    os.environ[LAUNCHER_PID_ENV] = str(os.getpid())  # the workers' parent, whose death they follow
    advice = _advice(layout)
    try:
        if layout.endpoint is not None:
            _wait_for_remote_endpoint(layout.endpoint, layout.timeout_s, advice)
        torchrun.run(torchrun.parse_args(args))
    except RendezvousConnectionError:
        raise ConfigError(_nobody_answers(layout.endpoint, advice)) from None
    except RendezvousTimeoutError:
        raise ConfigError(
            f"the rendezvous at {layout.endpoint} (VITKIT_RDZV_ENDPOINT) did not gather "
            f"{layout.nnodes} nodes within {layout.timeout_s} s; {advice}"
        ) from None
    except ChildFailedError as exc:
        _, failure = exc.get_first_failure()
        return failure.exitcode if failure.exitcode > 0 else 1
    except SignalException as exc:  # torchrun stopped its workers first
        return 128 + int(exc.sigval)
    return 0


def _advice(layout: NodeLayout) -> str:
    return (
        f"start the stage on all {layout.nnodes} nodes (VITKIT_NNODES) within {layout.timeout_s} s "
        "(VITKIT_RDZV_TIMEOUT) of each other, each with VITKIT_RDZV_ENDPOINT set to the same "
        "host:port of one of them, reachable from the others"
    )


def _nobody_answers(endpoint: str | None, advice: str) -> str:
    return f"nobody answers at the rendezvous endpoint {endpoint} (VITKIT_RDZV_ENDPOINT); {advice}"


def _wait_for_remote_endpoint(endpoint: str, timeout_s: int, advice: str) -> None:
    """On a node that does not host the rendezvous, wait (bounded) until its endpoint accepts.

    Checked here, in Python, so an endpoint nobody answers is one line: torch's store client
    would first print a C++ stack trace for every retry. The node whose address the endpoint
    names hosts the store itself (torch decides so the same way) and is not checked.
    """
    from torch.distributed.elastic.rendezvous.utils import (
        _matches_machine_hostname,
        parse_rendezvous_endpoint,
    )

    host, port = parse_rendezvous_endpoint(endpoint, default_port=DEFAULT_RDZV_PORT)
    if _matches_machine_hostname(host):
        return
    deadline = time.monotonic() + timeout_s
    while (left := deadline - time.monotonic()) > 0:
        try:
            with socket.create_connection((host, port), timeout=min(5.0, left)):
                return
        except OSError:
            time.sleep(min(1.0, max(0.0, deadline - time.monotonic())))
    raise ConfigError(_nobody_answers(endpoint, advice))
