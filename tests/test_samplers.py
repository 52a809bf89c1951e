"""Tests for samplers.RASampler."""
import math
from collections import Counter

import pytest

from samplers import RASampler

NUM_REPEATS = 3


def make_samplers(dataset_len: int, num_replicas: int, epoch: int = 0, **kwargs) -> list:
    dataset = list(range(dataset_len))
    samplers = [RASampler(dataset, num_replicas=num_replicas, rank=r, num_repeats=NUM_REPEATS, **kwargs)
                for r in range(num_replicas)]
    for sampler in samplers:
        sampler.set_epoch(epoch)
    return samplers


def interleave(per_rank: list) -> list:
    """Rebuild the global index stream that the ranks were dealt round-robin."""
    return [indices[i] for i in range(len(per_rank[0])) for indices in per_rank]


def test_ranks_share_one_permutation_and_split_positions():
    dataset_len, num_replicas = 600, 2
    per_rank = [list(s) for s in make_samplers(dataset_len, num_replicas, epoch=4)]
    assert len(per_rank[0]) == len(per_rank[1])
    stream = interleave(per_rank)

    # Position i of the global stream is permutation[i // 3]: consecutive triples hold one image.
    full_groups = len(stream) // NUM_REPEATS
    heads = [stream[g * NUM_REPEATS] for g in range(full_groups)]
    for g in range(full_groups):
        assert stream[g * NUM_REPEATS:(g + 1) * NUM_REPEATS] == [heads[g]] * NUM_REPEATS
    assert len(set(heads)) == len(heads), "images come from one shared permutation"
    assert heads != sorted(heads), "shuffled"

    counts = Counter(stream)
    assert max(counts.values()) <= NUM_REPEATS
    assert all(0 <= i < dataset_len for i in counts)
    # The same image lands on several ranks, each doing its own augmentation.
    assert set(per_rank[0]) & set(per_rank[1])


def test_set_epoch_is_deterministic():
    first = list(make_samplers(500, 2, epoch=1)[0])
    again = list(make_samplers(500, 2, epoch=1)[0])
    other = list(make_samplers(500, 2, epoch=2)[0])
    assert first == again
    assert first != other

    sampler = make_samplers(500, 2, epoch=1)[0]
    sampler.set_epoch(2)
    assert list(sampler) == other
    assert list(make_samplers(500, 2, epoch=1, seed=7)[0]) != first


@pytest.mark.parametrize('dataset_len', [1, 10, 100, 255, 256, 1000, 1001])
@pytest.mark.parametrize('num_replicas', [1, 2, 3, 8])
def test_len_matches_yield(dataset_len, num_replicas):
    for sampler in make_samplers(dataset_len, num_replicas):
        assert len(list(sampler)) == len(sampler) > 0
    if dataset_len >= 256:
        assert len(sampler) == math.floor(dataset_len // 256 * 256 / num_replicas)


def test_tiny_dataset_covers_every_image():
    per_rank = [list(s) for s in make_samplers(20, 2)]
    assert sum(len(p) for p in per_rank) == 20
    assert len(set(per_rank[0]) | set(per_rank[1])) >= 20 // NUM_REPEATS


def test_no_shuffle_is_repeated_arange():
    (sampler,) = make_samplers(300, 1, shuffle=False)
    assert list(sampler)[:7] == [0, 0, 0, 1, 1, 1, 2]


def test_defaults_without_distributed():
    sampler = RASampler(list(range(10)))
    assert (sampler.num_replicas, sampler.rank) == (1, 0)


def test_rejects_bad_rank():
    with pytest.raises(ValueError):
        RASampler(list(range(10)), num_replicas=2, rank=2)
