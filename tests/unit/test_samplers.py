"""Repeated-augmentation and epoch samplers: counts, coverage, repeats, seeding, resuming."""

from __future__ import annotations

import math
from collections import Counter

import pytest

from vitkit.data.samplers import EpochSampler, RASampler
from vitkit.errors import ConfigError


class Sized:
    def __init__(self, n: int) -> None:
        self.n = n

    def __len__(self) -> int:
        return self.n


@pytest.mark.parametrize("n", [10, 255, 10_000])
@pytest.mark.parametrize("world", [1, 2])
def test_ra_sampler_yields_ceil_n_over_world_per_rank(n, world):
    ranks = [list(RASampler(Sized(n), num_replicas=world, rank=r, seed=7)) for r in range(world)]
    per_rank = math.ceil(n / world)
    assert [len(r) for r in ranks] == [per_rank] * world
    assert all(len(RASampler(Sized(n), num_replicas=world, rank=r)) == per_rank for r in range(world))
    counts = Counter(i for r in ranks for i in r)
    assert set(counts) <= set(range(n))
    # the ranks together take the first world*per_rank entries of "a a a b b b ...": every drawn
    # image appears num_repeats times, except possibly the last one, cut by the epoch's end
    full = [c for c in counts.values() if c == 3]
    assert len(full) == (world * per_rank) // 3
    assert sum(counts.values()) == world * per_rank


def test_ra_repeats_land_on_different_ranks():
    r0 = list(RASampler(Sized(100), num_replicas=2, rank=0, seed=1))
    r1 = list(RASampler(Sized(100), num_replicas=2, rank=1, seed=1))
    shared = set(r0) & set(r1)
    assert len(shared) >= 30  # nearly every drawn image has copies on both ranks


def test_ra_num_repeats_one_is_a_plain_shuffle():
    assert sorted(RASampler(Sized(50), num_replicas=1, rank=0, num_repeats=1)) == list(range(50))
    assert Counter(RASampler(Sized(30), num_replicas=1, rank=0, num_repeats=5)).most_common(1)[0][1] == 5


@pytest.mark.parametrize("n", [10, 255, 10_000])
def test_epoch_sampler_covers_every_index_across_ranks(n):
    one = list(EpochSampler(Sized(n), num_replicas=1, rank=0, seed=3))
    assert sorted(one) == list(range(n))
    ranks = [list(EpochSampler(Sized(n), num_replicas=2, rank=r, seed=3)) for r in range(2)]
    assert [len(r) for r in ranks] == [math.ceil(n / 2)] * 2
    assert set(ranks[0]) | set(ranks[1]) == set(range(n))
    assert len(set(ranks[0]) & set(ranks[1])) == (n % 2)  # only the wrap-around padding repeats


def test_epoch_sampler_without_shuffle_is_strided():
    assert list(EpochSampler(Sized(5), num_replicas=2, rank=1, shuffle=False)) == [1, 3, 0]


@pytest.mark.parametrize("cls", [EpochSampler, RASampler])
def test_seed_and_epoch_drive_the_order(cls):
    a = cls(Sized(200), num_replicas=1, rank=0, seed=0)
    first = list(a)
    assert list(cls(Sized(200), num_replicas=1, rank=0, seed=0)) == first
    assert list(cls(Sized(200), num_replicas=1, rank=0, seed=1)) != first
    a.set_epoch(1)
    assert list(a) != first
    a.set_epoch(0)
    assert list(a) == first


@pytest.mark.parametrize("cls", [EpochSampler, RASampler])
def test_resume_mid_epoch_continues_where_it_stopped(cls):
    sampler = cls(Sized(101), num_replicas=2, rank=1, seed=4)
    sampler.set_epoch(5)
    full = list(sampler)
    sampler.set_epoch(5, start_index=20)
    assert len(sampler) == len(full) - 20
    assert list(sampler) == full[20:]
    sampler.set_epoch(6)
    assert len(sampler) == len(full)
    with pytest.raises(ValueError, match="start_index"):
        sampler.set_epoch(6, start_index=len(full) + 1)


def test_bad_arguments():
    with pytest.raises(ConfigError, match="empty dataset"):
        EpochSampler(Sized(0))
    with pytest.raises(ConfigError, match="num_repeats"):
        RASampler(Sized(10), num_repeats=0)
    with pytest.raises(ConfigError, match="rank 2"):
        RASampler(Sized(10), num_replicas=2, rank=2)
