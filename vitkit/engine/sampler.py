"""A shuffling sampler that splits data across processes and resumes mid-epoch.

Each epoch's order is a permutation drawn from (seed, epoch) alone, so a run
killed in the middle of an epoch and restarted sees the same order and can
skip exactly the batches it already trained on. Under DDP every rank takes
``order[rank::world_size]`` of the permutation padded to a multiple of the
world size (as ``DistributedSampler`` does), so ranks see disjoint data.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import torch
from torch.utils.data import Sampler


class EpochSampler(Sampler[int]):
    def __init__(
        self, num_samples: int, seed: int = 0, shuffle: bool = True, rank: int = 0, world_size: int = 1
    ) -> None:
        if num_samples <= 0:
            raise ValueError("EpochSampler needs at least one sample")
        self.num_samples = num_samples
        self.seed = seed
        self.shuffle = shuffle
        self.rank = rank
        self.world_size = world_size
        self.epoch = 0
        self.start = 0
        self.per_rank = math.ceil(num_samples / world_size)

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        """Select the epoch's order; ``start`` skips that many of this rank's samples (resume)."""
        self.epoch = epoch
        self.start = start

    def epoch_order(self) -> list[int]:
        """This rank's full order for the current epoch, before skipping."""
        if self.shuffle:
            generator = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
            order = torch.randperm(self.num_samples, generator=generator).tolist()
        else:
            order = list(range(self.num_samples))
        padded = order + order[: self.per_rank * self.world_size - self.num_samples]
        return padded[self.rank :: self.world_size]

    def __iter__(self) -> Iterator[int]:
        return iter(self.epoch_order()[self.start :])

    def __len__(self) -> int:
        return self.per_rank - self.start
