"""DDP detected from the environment, as torchrun sets it (nanoGPT style).

A process started by ``torchrun --nproc-per-node N`` sees ``WORLD_SIZE``,
``RANK`` and ``LOCAL_RANK``; a plain ``python`` process sees none and runs
alone. Only rank 0 logs (MLflow); the first process of every node writes that
node's checkpoints and stage outputs, so nodes need not share a disk.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def writes_files(self) -> bool:
        """The first process of each node writes its checkpoints and outputs: no shared disk needed."""
        return self.local_rank == 0

    def augmentation_seed(self, seed: int) -> int:
        """This process's seed for the random draws of augmentation: its own stream on every rank.

        DeiT's ``seed + rank``: with one seed all ranks would draw the same crops and flips, and
        with repeated augmentation the copies of an image on two ranks would be identical.
        """
        return seed + self.rank


def dist_info_from_env() -> DistInfo:
    return DistInfo(
        rank=int(os.environ.get("RANK", "0")),
        world_size=int(os.environ.get("WORLD_SIZE", "1")),
        local_rank=int(os.environ.get("LOCAL_RANK", "0")),
    )


def init_distributed(device: torch.device) -> DistInfo:
    """Join the process group when launched by torchrun: nccl on GPU, gloo on CPU."""
    info = dist_info_from_env()
    if info.enabled and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
        if device.type == "cuda":
            torch.cuda.set_device(device)
    return info


def shutdown_distributed() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def all_reduce_mean(value: torch.Tensor) -> torch.Tensor:
    """Average a tensor across processes (identity when running alone)."""
    if dist.is_initialized():
        value = value.clone()
        dist.all_reduce(value, op=dist.ReduceOp.SUM)
        value /= dist.get_world_size()
    return value


def all_gather_object(value: Any) -> list[Any]:
    """Every process's ``value``, indexed by rank (``[value]`` when running alone)."""
    if not dist.is_initialized():
        return [value]
    gathered: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, value)
    return gathered


def broadcast_object(value: Any, src: int) -> Any:
    """Rank ``src``'s ``value`` on every process (``value`` itself when running alone)."""
    if not dist.is_initialized():
        return value
    box = [value if dist.get_rank() == src else None]
    dist.broadcast_object_list(box, src=src)
    return box[0]
