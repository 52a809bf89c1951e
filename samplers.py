"""Distributed sampler with repeated augmentation (DeiT's ``RASampler``)."""
from __future__ import annotations

import math
from typing import Iterator, Optional, Sized

import torch
import torch.distributed as dist
from torch.utils.data import Sampler

__all__ = ['RASampler', 'ShardedEvalSampler']

# DeiT rounds the per-epoch sample count down to a multiple of this, which keeps the
# number of steps per epoch stable across world sizes on ImageNet-scale datasets.
RA_ROUNDING = 256


class RASampler(Sampler[int]):
    """Repeated-augmentation sampler (Hoffer et al., "Augment your batch").

    Every image of a shuffled permutation is repeated ``num_repeats`` times and the
    repeats are dealt round-robin to the ``num_replicas`` ranks, so each rank sees a
    different random augmentation of the same image in the same step. An epoch is cut
    to roughly ``len(dataset)`` samples overall, so repetition does not lengthen it.
    All ranks must call ``set_epoch`` with the same value to draw the same permutation.
    """

    def __init__(
            self,
            dataset: Sized,
            num_replicas: Optional[int] = None,
            rank: Optional[int] = None,
            shuffle: bool = True,
            num_repeats: int = 3,
            seed: int = 0,
    ) -> None:
        distributed = dist.is_available() and dist.is_initialized()
        if num_replicas is None:
            num_replicas = dist.get_world_size() if distributed else 1
        if rank is None:
            rank = dist.get_rank() if distributed else 0
        if num_replicas < 1 or not 0 <= rank < num_replicas:
            raise ValueError(f"invalid rank {rank} for num_replicas {num_replicas}")
        if num_repeats < 1:
            raise ValueError(f"num_repeats must be >= 1, got {num_repeats}")
        self.dataset = dataset
        self.num_replicas = num_replicas
        self.rank = rank
        self.shuffle = shuffle
        self.num_repeats = num_repeats
        self.seed = seed
        self.epoch = 0

        dataset_len = len(dataset)
        self.num_samples = math.ceil(dataset_len * num_repeats / num_replicas)
        self.total_size = self.num_samples * num_replicas
        if dataset_len >= RA_ROUNDING:
            self.num_selected_samples = int(math.floor(dataset_len // RA_ROUNDING * RA_ROUNDING / num_replicas))
        else:
            # DeiT's rounding gives 0 samples below RA_ROUNDING images, which silently
            # skips training; small datasets keep one pass over the images instead.
            self.num_selected_samples = math.ceil(dataset_len / num_replicas)

    def __iter__(self) -> Iterator[int]:
        dataset_len = len(self.dataset)
        if self.shuffle:
            generator = torch.Generator()
            generator.manual_seed(self.seed + self.epoch)
            order = torch.randperm(dataset_len, generator=generator)
        else:
            order = torch.arange(dataset_len)
        indices = torch.repeat_interleave(order, self.num_repeats).tolist()
        # Wrap around so the stream splits evenly across ranks.
        padding = self.total_size - len(indices)
        if padding > 0:
            indices += (indices * math.ceil(padding / max(len(indices), 1)))[:padding]
        rank_indices = indices[self.rank:self.total_size:self.num_replicas]
        return iter(rank_indices[:self.num_selected_samples])

    def __len__(self) -> int:
        return self.num_selected_samples

    def set_epoch(self, epoch: int) -> None:
        """Reseed the shuffle for ``epoch``; the order is a pure function of ``seed + epoch``."""
        self.epoch = epoch


class ShardedEvalSampler(Sampler[int]):
    """Evaluation shards without padding: rank ``r`` takes images ``r, r + world, r + 2 world, ...``.

    ``torch.utils.data.DistributedSampler`` pads the last shard with repeated images, which are then counted
    twice in the accuracy; here every image is evaluated exactly once, so summing the ranks' counts gives
    the same Acc@1/Acc@5 as one process.
    """

    def __init__(self, dataset: Sized, num_replicas: Optional[int] = None, rank: Optional[int] = None) -> None:
        distributed = dist.is_available() and dist.is_initialized()
        self.num_replicas = num_replicas if num_replicas is not None else (
            dist.get_world_size() if distributed else 1)
        self.rank = rank if rank is not None else (dist.get_rank() if distributed else 0)
        self.dataset = dataset

    def __iter__(self) -> Iterator[int]:
        return iter(range(self.rank, len(self.dataset), self.num_replicas))

    def __len__(self) -> int:
        return len(range(self.rank, len(self.dataset), self.num_replicas))
