"""Epoch samplers that are deterministic, DDP-aware and resumable mid-epoch.

Both samplers draw one permutation per ``(seed, epoch)``, identical on every
rank, and give each rank a disjoint share of it, so a run is reproducible and
``torchrun`` processes never see the same sample twice in an epoch (bar the
padding that makes the shares equal). ``set_epoch(epoch, start_index)`` both
reshuffles and lets a resumed run skip what the interrupted run already
consumed: ``start_index`` counts this rank's samples, i.e. batches done x
per-rank batch size.

* ``EpochSampler``: a plain shuffled pass over the dataset (DistributedSampler
  semantics: ``indices[rank::world]``, padded by wrapping around).
* ``RASampler``: DeiT's repeated augmentation (Hoffer et al. 2019; Berman et al.
  2019): each drawn image appears ``num_repeats`` times in a row *before* the
  split across ranks, so its copies land on different ranks (or side by side in
  one process's batch) and get different augmentations. An epoch still yields
  ``ceil(len(dataset) / world)`` samples per rank, about ``len(dataset)`` in all,
  hence covers roughly ``1 / num_repeats`` of the distinct images.

  DeiT's sampler keeps ``floor(len // 256 * 256 / world)`` samples per rank,
  which is *zero* below 256 images and drops up to 255 otherwise; here the
  count is ``ceil(len / world)`` for any size.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sized

import numpy as np
import torch.distributed as dist
from torch.utils.data import Sampler

from vitkit.errors import ConfigError


def _world() -> tuple[int, int]:
    """(num_replicas, rank) of the default process group, or (1, 0) outside DDP."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size(), dist.get_rank()
    return 1, 0


def _take(indices: np.ndarray, total: int) -> np.ndarray:
    """The first ``total`` entries, wrapping around when there are fewer (padding, as DistributedSampler)."""
    reps = math.ceil(total / len(indices))
    return np.tile(indices, reps)[:total]


class _EpochSeededSampler(Sampler[int]):
    """Shared bookkeeping: dataset size, DDP split, (seed, epoch) permutation, resume offset."""

    def __init__(
        self, dataset: Sized, num_replicas: int | None, rank: int | None, seed: int, shuffle: bool
    ) -> None:
        world, own_rank = _world()
        self.num_replicas = world if num_replicas is None else num_replicas
        self.rank = own_rank if rank is None else rank
        if not 0 <= self.rank < self.num_replicas:
            raise ConfigError(f"sampler rank {self.rank} is outside [0, {self.num_replicas})")
        self.dataset_size = len(dataset)
        if self.dataset_size == 0:
            raise ConfigError("cannot sample from an empty dataset; check the dataset path and split")
        self.seed = seed
        self.shuffle = shuffle
        self.epoch = 0
        self.start_index = 0
        self.num_samples = math.ceil(self.dataset_size / self.num_replicas)  # per rank, per epoch

    def set_epoch(self, epoch: int, start_index: int = 0) -> None:
        """Reshuffle for ``epoch``; skip this rank's first ``start_index`` samples (resuming mid-epoch)."""
        if not 0 <= start_index <= self.num_samples:
            raise ValueError(f"start_index {start_index} is outside [0, {self.num_samples}]")
        self.epoch = epoch
        self.start_index = start_index

    def _permutation(self) -> np.ndarray:
        if not self.shuffle:
            return np.arange(self.dataset_size)
        return np.random.default_rng((self.seed, self.epoch)).permutation(self.dataset_size)

    def _rank_indices(self, stream: np.ndarray) -> list[int]:
        """This rank's share of ``stream`` (already ``num_samples * num_replicas`` long), from the offset."""
        own = stream[self.rank :: self.num_replicas]
        return own[self.start_index :].tolist()

    def __len__(self) -> int:
        return self.num_samples - self.start_index


class EpochSampler(_EpochSeededSampler):
    """A shuffled (or ordered) pass over the dataset per epoch, split across ranks."""

    def __init__(
        self,
        dataset: Sized,
        num_replicas: int | None = None,
        rank: int | None = None,
        seed: int = 0,
        shuffle: bool = True,
    ) -> None:
        super().__init__(dataset, num_replicas, rank, seed, shuffle)

    def __iter__(self) -> Iterator[int]:
        stream = _take(self._permutation(), self.num_samples * self.num_replicas)
        return iter(self._rank_indices(stream))


class RASampler(_EpochSeededSampler):
    """Repeated-augmentation sampler (DeiT), for one process or DDP, for any dataset size."""

    def __init__(
        self,
        dataset: Sized,
        num_replicas: int | None = None,
        rank: int | None = None,
        seed: int = 0,
        num_repeats: int = 3,
        shuffle: bool = True,
    ) -> None:
        if num_repeats < 1:
            raise ConfigError(f"RASampler num_repeats must be >= 1, got {num_repeats}")
        super().__init__(dataset, num_replicas, rank, seed, shuffle)
        self.num_repeats = num_repeats

    def __iter__(self) -> Iterator[int]:
        repeated = np.repeat(self._permutation(), self.num_repeats)  # a a a b b b c c c ...
        stream = _take(repeated, self.num_samples * self.num_replicas)
        return iter(self._rank_indices(stream))
