"""Device choice, mixed precision, thread settings, and counts checked against this machine.

Counts of processes, workers and threads are checked when a stage starts, against what this
machine has (params.yaml itself bounds them only loosely, as it is written for any machine):

- counts that shape the results (``engine.nproc``, the world size; ``engine.num_workers``, as
  each DataLoader worker draws its own augmentations) above what the machine has are a
  ``ConfigError``: lowering them would give results the params do not describe;
- counts that only change the speed (``engine.threads``; ``data.workers``, as every generated
  image has its own seed) are lowered to the machine's cores, with a warning on stderr.
"""

from __future__ import annotations

import contextlib
import math
import os
import sys
from pathlib import Path

import torch

from vitkit.errors import ConfigError


def select_device(preference: str = "auto", local_rank: int = 0) -> torch.device:
    """cuda, then mps, then cpu for ``auto``; an explicit choice that is unavailable is an error.

    Under DDP each process takes the GPU of its local rank.
    """
    if preference == "auto":
        if torch.cuda.is_available():
            preference = "cuda"
        elif torch.backends.mps.is_available():
            preference = "mps"
        else:
            preference = "cpu"
    if preference == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError("engine.device is 'cuda' but no CUDA device is visible; use 'auto' or 'cpu'")
        return torch.device("cuda", local_rank % torch.cuda.device_count())
    if preference == "mps" and not torch.backends.mps.is_available():
        raise ConfigError("engine.device is 'mps' but MPS is not available; use 'auto' or 'cpu'")
    return torch.device(preference)


AMP_MODES = ("off", "cuda", "always")


def autocast(device: torch.device, mode: str) -> contextlib.AbstractContextManager:
    """bf16 autocast (no loss scaling needed, unlike fp16) for ``mode`` ``engine.amp``.

    ``cuda``: on CUDA only; on CPU bf16 autocast is slower than fp32 on most machines without
    AMX. ``always``: on every device, for CPUs with AMX, and so that a CPU run meets the dtypes
    a GPU run does (a bf16 tensor where fp32 was assumed fails or loses precision the same way).
    """
    if mode not in AMP_MODES:
        raise ValueError(f"amp mode {mode!r}: choose from {AMP_MODES}")
    if mode == "always" or (mode == "cuda" and device.type == "cuda"):
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def set_tf32(enabled: bool) -> None:
    """TF32 (or full IEEE fp32) for CUDA float32 matmuls and cuDNN convolutions, process-wide.

    torch >= 2.9's ``fp32_precision`` settings (``allow_tf32`` is their deprecated predecessor);
    TF32 keeps fp32's range with a 10-bit mantissa and runs on the tensor cores.
    """
    precision = "tf32" if enabled else "ieee"
    torch.backends.cuda.matmul.fp32_precision = precision
    torch.backends.cudnn.conv.fp32_precision = precision


def _cgroup_cpu_limit() -> int | None:
    """The CPU quota of this process's cgroup in whole cores (a container's --cpus), or None."""
    try:
        relative = Path("/proc/self/cgroup").read_text().splitlines()[0].split(":", 2)[2].lstrip("/")
    except (OSError, IndexError):
        relative = ""
    candidates = [Path("/sys/fs/cgroup") / relative / "cpu.max", Path("/sys/fs/cgroup/cpu.max")]
    for path in candidates:  # cgroup v2: "<quota> <period>" or "max <period>"
        try:
            quota, period = path.read_text().split()[:2]
        except (OSError, ValueError):
            continue
        return None if quota == "max" else max(1, math.ceil(int(quota) / int(period)))
    try:  # cgroup v1
        quota = int(Path("/sys/fs/cgroup/cpu/cpu.cfs_quota_us").read_text())
        period = int(Path("/sys/fs/cgroup/cpu/cpu.cfs_period_us").read_text())
    except (OSError, ValueError):
        return None
    return None if quota <= 0 or period <= 0 else max(1, math.ceil(quota / period))


def usable_cpus() -> int:
    """CPU cores this process may run on: its affinity mask, lowered to a cgroup CPU quota if any."""
    try:
        count = len(os.sched_getaffinity(0))
    except AttributeError:  # macOS
        count = os.cpu_count() or 1
    limit = _cgroup_cpu_limit()
    return max(1, min(count, limit) if limit else count)


def local_processes() -> int:
    """Processes of this stage on this machine (torchrun's ``LOCAL_WORLD_SIZE``; 1 alone)."""
    return int(os.environ.get("LOCAL_WORLD_SIZE", os.environ.get("WORLD_SIZE", "1")))


def warn(message: str) -> None:
    print(f"warning: {message}", file=sys.stderr, flush=True)


def check_process_count(nproc: int, per_node: int, nnodes: int, device: torch.device) -> None:
    """``engine.nproc`` puts ``per_node`` processes on this machine: at most one per GPU (cuda), one per
    usable core (cpu), one on mps; more is a ``ConfigError`` (the world size shapes the results)."""
    if device.type == "cuda":
        slots, what = torch.cuda.device_count(), "GPUs"
    elif device.type == "mps":
        slots, what = 1, "MPS device (one process)"
    else:
        slots, what = usable_cpus(), "usable CPU cores"
    if per_node <= slots:
        return
    nodes = f" over VITKIT_NNODES={nnodes} nodes" if nnodes > 1 else ""
    raise ConfigError(
        f"engine.nproc is {nproc}{nodes}: {per_node} processes on this machine, but it has {slots} {what} "
        f"({device.type}); set engine.nproc to at most {slots * nnodes}. The world size shapes the "
        "results (global batch, data split), so it is not lowered for you."
    )


def check_num_workers(num_workers: int) -> None:
    """At most one DataLoader worker per usable core; more is a ``ConfigError`` (the count shapes the
    augmentations each worker draws, so it is not lowered)."""
    cores = usable_cpus()
    if num_workers > cores:
        raise ConfigError(
            f"engine.num_workers is {num_workers} but this machine has {cores} usable CPU cores; set it to "
            f"at most {cores} (0 loads in the training process). Each worker draws its own augmentations, "
            "so the count shapes the results and is not lowered for you."
        )


def at_most_cores(count: int, key: str, label: str) -> int:
    """``count`` processes for work whose result does not depend on it, lowered to the usable cores."""
    cores = usable_cpus()
    if count <= cores:
        return count
    warn(f"[{label}] {key} is {count} but this machine has {cores} usable CPU cores: using {cores}")
    return cores


def set_threads(threads: int, label: str = "") -> int:
    """Set torch's intra-op threads; the number set (0: torch's default, left alone).

    ``threads`` above the cores each of this machine's processes may use are lowered to them,
    with a warning (once per machine); 0 keeps torch's default alone and splits the cores
    between the processes of a DDP stage on CPU.
    """
    processes = local_processes()
    per_process = max(1, usable_cpus() // processes)
    if threads > per_process:
        if int(os.environ.get("LOCAL_RANK", "0")) == 0:
            shared = f" shared by {processes} processes" if processes > 1 else ""
            prefix = f"[{label}] " if label else ""
            warn(
                f"{prefix}engine.threads is {threads} but this machine has {usable_cpus()} usable CPU "
                f"cores{shared}: using {per_process} per process"
            )
        threads = per_process
    if threads == 0 and processes > 1:
        threads = per_process
    if threads > 0:
        torch.set_num_threads(threads)
    return threads
