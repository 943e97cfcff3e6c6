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


def autocast(device: torch.device, enabled: bool) -> contextlib.AbstractContextManager:
    """bf16 autocast on CUDA (no loss scaling needed, unlike fp16); a no-op elsewhere.

    On CPU bf16 autocast is slower than fp32 on most machines without AMX, so it
    is not used there.
    """
    if enabled and device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def set_threads(threads: int) -> None:
    """Pin intra-op threads (0 keeps torch's default); DDP processes on CPU share the cores."""
    if threads > 0:
        torch.set_num_threads(threads)
    elif (world_size := int(os.environ.get("WORLD_SIZE", "1"))) > 1:
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // world_size))
