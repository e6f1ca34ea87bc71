"""The deterministic global sampler (spec §4, §5).

A step's global batch is a pure function of (seed, epoch, step): B/m groups of m distinct
samples of one class each, laid out one after another. Worker r of W takes the r-th contiguous
part of it (:func:`shard_bounds`), so the global batch, and hence training, does not depend on
W; and since no state is carried between steps, resuming at any (epoch, step) needs no sampler
state but the position.

Two modes:

- ``epoch`` (the default; the authors' epochs, spec §5): every epoch shuffles each class's
  images and cuts them into groups of m, so each image is used once per epoch and a class
  appears in proportion to its size. A class's ``n mod m`` left-over images sit the epoch out
  (different ones each epoch). The groups are dealt to the epoch's steps like cards: the classes
  in a random order, each class's groups one after another, group i of the deck to step
  ``i mod S``. So a class with at most S groups (S = steps per epoch) has each group in another
  step and never shares a batch with itself; only a class with more than S groups, i.e. more than
  m*S images, takes ``floor`` or ``ceil`` of ``groups / S`` adjacent groups of every batch
  (distinct images, so still no image twice in a batch). S is the number of whole batches of
  groups; the last ``groups mod (B/m)`` groups of the deck (fewer than B/m, from the classes that
  the random order put last) are not dealt. Which classes share a batch follows from the class
  order, drawn anew every epoch; the steps run in a random order. A step at or past S
  starts another pass over the data, shuffled anew.
- ``uniform``: every step draws B/m classes uniformly without replacement and m of each class's
  images, independently of other steps; an epoch is ``num_samples // B`` steps. Small classes
  are seen many times per epoch and images of large ones rarely.

The batches are computed vectorised (numpy over the grouping of LabelGroups) and memoised, so a
prefetch of a step and the step itself compute it once: an epoch's whole layout at its first use
in ``epoch`` mode, each step's batch in ``uniform`` mode.
"""
from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable, Sequence
from typing import Literal

import numpy as np
import torch
from torch import Tensor

from rsk_dist.grouping import LabelGroups

SamplerMode = Literal["epoch", "uniform"]


class ClassBalancedSampler:
    def __init__(
        self,
        labels: Sequence[int] | Tensor | np.ndarray,
        batch_size: int,
        samples_per_class: int = 4,
        seed: int = 0,
        mode: SamplerMode = "epoch",
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
        if mode not in ("epoch", "uniform"):
            raise ValueError(f"sampler mode {mode!r} is not one of 'epoch', 'uniform'")
        groups = LabelGroups(labels)
        # Only classes with m samples can fill a group without repeating an image.
        usable = (groups.counts >= m).numpy()
        self.counts = groups.counts.numpy()[usable]
        self.classes_per_batch = batch_size // m
        if len(self.counts) < self.classes_per_batch:
            raise ValueError(
                f"batch_size {batch_size} needs {self.classes_per_batch} classes with at least "
                f"{m} samples each, but the data has {len(self.counts)}: lower batch_size or "
                "samples_per_class"
            )
        # The usable classes' members, class after class (ascending index within a class).
        self.members = groups.order.numpy()[np.repeat(usable, groups.counts.numpy())]
        self.member_starts = np.cumsum(self.counts) - self.counts
        # An epoch shuffles each class's members by sorting 64-bit keys (class, random, position
        # in the class): sorting values is several times faster than an argsort, and the
        # position bits say where each sorted key came from.
        self._pos_bits = int(self.counts.max() - 1).bit_length()
        self._random_bits = 64 - (len(self.counts) - 1).bit_length() - self._pos_bits
        if self._random_bits < 16:
            raise ValueError(
                f"{len(self.counts)} classes of up to {self.counts.max()} samples leave the epoch "
                "shuffle fewer than 16 random bits: split the data set"
            )
        self._class_first = np.repeat(self.member_starts, self.counts)
        self._shuffle_base = np.repeat(np.arange(len(self.counts), dtype=np.uint64), self.counts) << np.uint64(
            self._random_bits + self._pos_bits
        ) | (np.arange(self.members.size) - self._class_first).astype(np.uint64)
        self.groups_per_class = self.counts // m
        self.batch_size, self.samples_per_class, self.seed, self.mode = batch_size, m, seed, mode
        self.num_samples = int(self.counts.sum())
        # epoch mode: the whole batches that the epoch's groups fill; uniform: the steps in which
        # as many images are drawn as the usable data holds.
        self.steps_per_epoch = (
            int(self.groups_per_class.sum()) // self.classes_per_batch
            if mode == "epoch"
            else max(1, self.num_samples // batch_size)
        )
        # epoch mode keeps the running pass and the next one that a prefetch reaches into;
        # uniform mode keeps steps as far ahead as any prefetch depth.
        self._keep = 2 if mode == "epoch" else 32
        self._memo: OrderedDict[tuple[int, int], Tensor] = OrderedDict()
        self._lock = threading.Lock()

    def __getstate__(self) -> dict:
        # Sent to another process (a spawned data loader, a Ray task) without the lock and memo.
        return {k: v for k, v in self.__dict__.items() if k not in ("_memo", "_lock")}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state, _memo=OrderedDict(), _lock=threading.Lock())

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
        """Dataset indices of the global batch: B/m groups of m samples of one class, group
        after group. Shared with the memo: read it, do not write to it."""
        if self.mode == "epoch":
            data_pass, row = divmod(step, self.steps_per_epoch)
            return self._memoised((epoch, data_pass), self._pass_layout)[row]
        return self._memoised((epoch, step), self._uniform_batch)

    def shard(self, epoch: int, step: int, rank: int, world_size: int) -> Tensor:
        """The contiguous part of the global batch that worker ``rank`` embeds (see
        :func:`shard_bounds`)."""
        bounds = shard_bounds(self.batch_size, world_size)
        return self.global_batch(epoch, step)[bounds[rank] : bounds[rank + 1]]

    def _memoised(self, key: tuple[int, int], compute: Callable[[int, int], Tensor]) -> Tensor:
        # The lock makes a prefetch thread and the training thread that ask for the same key
        # compute it once.
        with self._lock:
            if key not in self._memo:
                self._memo[key] = compute(*key)
                while len(self._memo) > self._keep:
                    self._memo.popitem(last=False)
            self._memo.move_to_end(key)
            return self._memo[key]

    def _pass_layout(self, epoch: int, data_pass: int) -> Tensor:
        """One pass over the data as (steps_per_epoch, B) indices (see the module's docstring)."""
        rng = np.random.default_rng(self._seed(epoch, data_pass, 0))
        m, per_batch, steps = self.samples_per_class, self.classes_per_batch, self.steps_per_epoch
        random = rng.integers(0, 1 << self._random_bits, self.members.size, dtype=np.uint64)
        keys = np.sort(self._shuffle_base | random << np.uint64(self._pos_bits))
        pos_in_class = (keys & np.uint64((1 << self._pos_bits) - 1)).astype(np.int64)
        shuffled = self.members[self._class_first + pos_in_class]
        class_order = rng.permutation(len(self.counts))
        groups = self.groups_per_class[class_order]
        deck_class = np.repeat(class_order, groups)
        ends = np.cumsum(groups)
        deck_group = np.arange(ends[-1]) - np.repeat(ends - groups, groups)
        first = (self.member_starts[deck_class] + deck_group * m)[: steps * per_batch]
        first = first.reshape(per_batch, steps).T[rng.permutation(steps)]  # deck[i] -> step i mod S
        return torch.from_numpy(shuffled[first[..., None] + np.arange(m)].reshape(steps, self.batch_size))

    def _uniform_batch(self, epoch: int, step: int) -> Tensor:
        rng = np.random.default_rng(self._seed(epoch, step, 0))
        m = self.samples_per_class
        chosen = rng.choice(len(self.counts), self.classes_per_batch, replace=False)
        size = self.counts[chosen]
        # Floyd's algorithm, all classes at once: m distinct positions in each chosen class.
        picks = np.empty((len(chosen), m), dtype=np.int64)
        for i in range(m):
            top = size - m + i
            t = (rng.random(len(chosen)) * (top + 1)).astype(np.int64)
            picks[:, i] = np.where((picks[:, :i] == t[:, None]).any(1), top, t)
        return torch.from_numpy(self.members[self.member_starts[chosen][:, None] + picks].reshape(-1))


def shard_bounds(batch_size: int, world_size: int) -> list[int]:
    """Offsets of the W contiguous shards of a batch of B: shard r is ``[b[r], b[r+1])``. The
    first ``B mod W`` shards hold one sample more, so every worker knows every shard's size from
    (B, W) alone, which is what the all-gather and the sharded loss need when W does not divide B."""
    if world_size < 1 or batch_size < world_size:
        raise ValueError(f"a batch of {batch_size} cannot be split into {world_size} non-empty shards")
    per, extra = divmod(batch_size, world_size)
    return [r * per + min(r, extra) for r in range(world_size + 1)]
