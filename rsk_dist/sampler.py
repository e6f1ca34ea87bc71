"""The deterministic global sampler (spec §4, §5).

A step's global batch is a pure function of (seed, epoch, step): B/m classes, m distinct
samples each, classes laid out one after another. Worker r of W takes the r-th contiguous 1/W
of it, so the global batch, and hence training, does not depend on W; and since no state is
carried between steps, resuming at any (epoch, step) needs no sampler state but the position.
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor

from rsk_dist.grouping import LabelGroups


class ClassBalancedSampler:
    def __init__(
        self,
        labels: Sequence[int] | Tensor | np.ndarray,
        batch_size: int,
        samples_per_class: int = 4,
        seed: int = 0,
    ) -> None:
        labels = torch.as_tensor(np.asarray(labels), dtype=torch.long).reshape(-1)
        m = samples_per_class
        if m < 2:
            raise ValueError(f"samples_per_class must be >= 2 for RS@k to have positives, got {m}")
        if batch_size % m:
            raise ValueError(
                f"batch_size {batch_size} is not a multiple of samples_per_class {m}: "
                f"use {batch_size - batch_size % m} or {batch_size + m - batch_size % m}"
            )
        # Only classes with m samples can fill their slots without repeating an image.
        self.members = [idx for idx in LabelGroups(labels).members() if idx.numel() >= m]
        self.classes_per_batch = batch_size // m
        if len(self.members) < self.classes_per_batch:
            raise ValueError(
                f"batch_size {batch_size} needs {self.classes_per_batch} classes with at least "
                f"{m} samples each, but the data has {len(self.members)}: lower batch_size or "
                "samples_per_class"
            )
        self.batch_size, self.samples_per_class, self.seed = batch_size, m, seed
        self.num_samples = sum(idx.numel() for idx in self.members)

    @property
    def steps_per_epoch(self) -> int:
        """Steps in which an epoch draws about as many images as the usable data holds."""
        return max(1, self.num_samples // self.batch_size)

    def _seed(self, *keys: int) -> int:
        # SeedSequence mixes the numbers well: (seed, epoch, step) never collide the way
        # seed + epoch * C + step would.
        state = np.random.SeedSequence([self.seed, *keys]).generate_state(1, np.uint64)
        return int(state[0] >> np.uint64(1))

    def _generator(self, epoch: int, step: int, stream: int) -> torch.Generator:
        return torch.Generator().manual_seed(self._seed(epoch, step, stream))

    def augment_key(self, epoch: int, step: int) -> int:
        """The step's augmentation key (see rsk_dist.data.sources): the same on every worker."""
        return self._seed(epoch, step, 3)

    def worker_seed(self, epoch: int, step: int, rank: int) -> int:
        """Seed of a worker's global RNG for a step (dropout and the like): a resumed step
        draws what the uninterrupted one drew."""
        return self._seed(epoch, step, 2, rank)

    def mixing_generator(self, epoch: int, step: int) -> torch.Generator:
        """The step's generator for SiMix weights: the same on every worker, as spec §2 needs,
        and a stream apart from the one that picks the batch."""
        return self._generator(epoch, step, stream=1)

    def global_batch(self, epoch: int, step: int) -> Tensor:
        """Dataset indices of the global batch: B/m classes x m samples, class after class."""
        g = self._generator(epoch, step, stream=0)
        chosen = torch.randperm(len(self.members), generator=g)[: self.classes_per_batch]
        m = self.samples_per_class
        return torch.cat(
            [self.members[c][torch.randperm(self.members[c].numel(), generator=g)[:m]] for c in chosen.tolist()]
        )

    def shard(self, epoch: int, step: int, rank: int, world_size: int) -> Tensor:
        """The contiguous part of the global batch that worker ``rank`` embeds (see
        :func:`shard_bounds`)."""
        bounds = shard_bounds(self.batch_size, world_size)
        return self.global_batch(epoch, step)[bounds[rank] : bounds[rank + 1]]


def shard_bounds(batch_size: int, world_size: int) -> list[int]:
    """Offsets of the W contiguous shards of a batch of B: shard r is ``[b[r], b[r+1])``. The
    first ``B mod W`` shards hold one sample more, so every worker knows every shard's size from
    (B, W) alone, which is what the all-gather and the sharded loss need when W does not divide B."""
    if world_size < 1 or batch_size < world_size:
        raise ValueError(f"a batch of {batch_size} cannot be split into {world_size} non-empty shards")
    per, extra = divmod(batch_size, world_size)
    return [r * per + min(r, extra) for r in range(world_size + 1)]
