"""Samplers: infinite shuffled training streams (plain or class-balanced repeats), sharded over
processes and resumable; a contiguous inference sharding that visits each sample once.

A training sampler defines one global stream of dataset indices (epoch after epoch, each epoch a
permutation seeded by ``(seed, epoch)``); process ``rank`` of ``world_size`` takes stream positions
``rank, rank + world_size, ...``. ``set_start(n)`` makes the next iteration continue as if this
process had already drawn ``n`` indices, so a resumed run sees the same order as an uninterrupted one.
"""

from __future__ import annotations

import itertools
import math
from collections import defaultdict
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import torch
from torch.utils.data import Sampler

from surgdino import comm


def mix_seed(*values: int) -> int:
    """A well-spread 63-bit seed from integers (seed, epoch, rank, position...)."""
    return int(np.random.SeedSequence([int(v) % (2**63) for v in values]).generate_state(2, np.uint64)[0] >> 1)


def _check_shard(rank: int | None, world_size: int | None) -> tuple[int, int]:
    rank = comm.get_rank() if rank is None else int(rank)
    world_size = comm.get_world_size() if world_size is None else int(world_size)
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"need 0 <= rank < world_size, got rank={rank}, world_size={world_size}")
    return rank, world_size


class _ShardedStream(Sampler[int]):
    """Base of the infinite training samplers: subclasses give the indices of each epoch."""

    def __init__(self, seed: int, rank: int | None, world_size: int | None):
        self.seed = int(seed)
        self.rank, self.world_size = _check_shard(rank, world_size)
        self._start = 0

    def epoch_indices(self, epoch: int) -> torch.Tensor:
        raise NotImplementedError

    def set_start(self, num_drawn: int) -> None:
        """Continue as if this process had already drawn ``num_drawn`` indices (resume)."""
        if num_drawn < 0:
            raise ValueError(f"set_start needs a count >= 0, got {num_drawn}")
        self._start = int(num_drawn)

    def __iter__(self) -> Iterator[int]:
        pos = self._start * self.world_size + self.rank  # global stream position of our next index
        epoch_begin = 0
        for epoch in itertools.count():
            indices = self.epoch_indices(epoch)
            epoch_end = epoch_begin + len(indices)
            if pos < epoch_end:
                local = indices[pos - epoch_begin:: self.world_size].tolist()
                yield from local
                pos += len(local) * self.world_size
            epoch_begin = epoch_end


class TrainingSampler(_ShardedStream):
    """Infinite stream of shuffled epochs over ``range(size)``, sharded across ranks."""

    def __init__(self, size: int, shuffle: bool = True, seed: int = 0, rank: int | None = None,
                 world_size: int | None = None):
        if size <= 0:
            raise ValueError(f"TrainingSampler needs a non-empty dataset, got size={size}")
        super().__init__(seed, rank, world_size)
        self.size = int(size)
        self.shuffle = shuffle

    def epoch_indices(self, epoch: int) -> torch.Tensor:
        if not self.shuffle:
            return torch.arange(self.size)
        g = torch.Generator().manual_seed(mix_seed(self.seed, epoch))
        return torch.randperm(self.size, generator=g)  # [size]

    def __iter__(self) -> Iterator[int]:
        # Fast path: equal-length epochs let us jump straight to the starting epoch.
        pos = self._start * self.world_size + self.rank
        epoch = pos // self.size
        pos -= epoch * self.size  # position inside `epoch`
        while True:
            local = self.epoch_indices(epoch)[pos:: self.world_size].tolist()
            yield from local
            pos += len(local) * self.world_size - self.size
            epoch += 1


def repeat_factors_from_records(records: Sequence[dict[str, Any]], repeat_threshold: float) -> torch.Tensor:
    """LVIS repeat factors: ``f_c`` = fraction of images containing class c, ``r_c = max(1, sqrt(t / f_c))``,
    an image's factor = max ``r_c`` over its (non-crowd) classes, 1 for images without instances."""
    image_classes = [{int(a["category_id"]) for a in r.get("annotations", []) if not a.get("iscrowd", 0)}
                     for r in records]
    counts: dict[int, int] = defaultdict(int)
    for cats in image_classes:
        for c in cats:
            counts[c] += 1
    n = max(1, len(records))
    class_rep = {c: max(1.0, math.sqrt(repeat_threshold / (k / n))) for c, k in counts.items()}
    return torch.tensor([max((class_rep[c] for c in cats), default=1.0) for cats in image_classes],
                        dtype=torch.float64)


class RepeatFactorTrainingSampler(_ShardedStream):
    """Class-balanced infinite stream (LVIS): each epoch image i appears ``floor(r_i)`` times, plus once
    more with probability ``frac(r_i)`` (stochastic rounding), shuffled; sharded across ranks."""

    def __init__(self, repeat_factors: torch.Tensor | Sequence[float], shuffle: bool = True, seed: int = 0,
                 rank: int | None = None, world_size: int | None = None):
        factors = torch.as_tensor(repeat_factors, dtype=torch.float64)
        if factors.numel() == 0:
            raise ValueError("RepeatFactorTrainingSampler needs a non-empty dataset")
        if bool((factors < 0).any()):
            raise ValueError("repeat factors must be >= 0")
        super().__init__(seed, rank, world_size)
        self.shuffle = shuffle
        self._int_part = torch.floor(factors)
        self._frac_part = factors - self._int_part
        if bool((self._int_part + self._frac_part.ceil()).sum() == 0):
            raise ValueError("all repeat factors are 0: the sampler would draw nothing")

    @classmethod
    def from_records(cls, records: Sequence[dict[str, Any]], repeat_threshold: float, **kwargs: Any
                     ) -> RepeatFactorTrainingSampler:
        return cls(repeat_factors_from_records(records, repeat_threshold), **kwargs)

    def epoch_indices(self, epoch: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(mix_seed(self.seed, epoch))
        reps = self._int_part + (torch.rand(self._frac_part.shape, generator=g, dtype=torch.float64)
                                 < self._frac_part).to(torch.float64)
        # np.repeat: torch.repeat_interleave costs ~15 ms per call on CPU here
        indices = torch.from_numpy(np.repeat(np.arange(len(reps)), reps.to(torch.int64).numpy()))
        while indices.numel() == 0:  # all factors < 1 and none drawn this epoch: draw again
            reps = (torch.rand(self._frac_part.shape, generator=g, dtype=torch.float64) < self._frac_part)
            indices = torch.nonzero(reps).flatten()
        if self.shuffle:
            indices = indices[torch.randperm(len(indices), generator=g)]
        return indices


class InferenceSampler(Sampler[int]):
    """Each index exactly once; rank r gets a contiguous shard (the first ``size % world_size`` ranks
    one more), so gathered results keep dataset order."""

    def __init__(self, size: int, rank: int | None = None, world_size: int | None = None):
        self.size = int(size)
        self.rank, self.world_size = _check_shard(rank, world_size)
        per, extra = divmod(self.size, self.world_size)
        begin = self.rank * per + min(self.rank, extra)
        self.indices = range(begin, begin + per + (1 if self.rank < extra else 0))

    def __iter__(self) -> Iterator[int]:
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)
