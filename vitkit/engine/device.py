"""Device choice, mixed precision and thread settings."""

from __future__ import annotations

import contextlib
import os

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


def set_threads(threads: int) -> None:
    """Pin intra-op threads (0 keeps torch's default); DDP processes on CPU share the cores."""
    if threads > 0:
        torch.set_num_threads(threads)
    elif (world_size := int(os.environ.get("WORLD_SIZE", "1"))) > 1:
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // world_size))
