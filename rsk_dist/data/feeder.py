"""Batches from a source onto the model's device: :class:`Feeder`.

Sources hand out compact batches (streamed images as uint8, see :mod:`rsk_dist.data.shards`);
the feeder turns them into the float tensors the model takes, on the device: on a GPU from
pinned memory, so the copy can overlap compute, and then the conversion and normalisation run
there instead of on the worker's CPUs. It also keeps the source's prefetch ``depth`` steps
ahead of training, across epoch boundaries, so the next epoch's first batches are read and
decoded while the current epoch ends and while evaluation runs. Needs torch only.
"""
from __future__ import annotations

import time
from typing import Any

import torch
from torch import Tensor

from rsk_dist.preprocess import to_float


class Feeder:
    """``feeder(indices, key)`` is ``source(indices, key)`` with the images as ``dtype`` floats on
    ``device``; ``labels``, ``source`` and ``prefetch`` as the source's. ``fetch_s``: seconds
    the last call's fetching took, wherever and whenever it ran (the source's ``last_fetch_s``;
    for a source without one, the call's own time)."""

    def __init__(self, source: Any, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32) -> None:
        self.source, self.device, self.dtype = source, torch.device(device), dtype
        self.labels: Tensor = source.labels
        self.fetch_s = 0.0
        self._ahead = -1  # the last global step prefetched

    def __len__(self) -> int:
        return self.labels.numel()

    def prefetch(self, indices: Tensor, key: int = 0) -> None:
        prefetch = getattr(self.source, "prefetch", None)
        if prefetch is not None:
            prefetch(indices, key)

    def prefetch_ahead(self, sampler: Any, epoch: int, step: int, steps_per_epoch: int, total_steps: int, depth: int, rank: int, world: int) -> None:
        """Prefetches this worker's shards of the ``depth`` steps after (epoch, step), counting
        on into later epochs, up to ``total_steps``; each step is asked for once."""
        if not hasattr(self.source, "prefetch"):
            return
        here = epoch * steps_per_epoch + step
        for g in range(max(here, self._ahead) + 1, min(here + depth, total_steps - 1) + 1):
            e, s = divmod(g, steps_per_epoch)
            self.source.prefetch(sampler.shard(e, s, rank, world), sampler.augment_key(e, s))
            self._ahead = g

    def __call__(self, indices: Tensor, key: int = 0) -> tuple[Tensor, Tensor]:
        t0 = time.perf_counter()
        images, labels = self.source(indices, key)
        if self.device.type == "cuda":
            images = images.pin_memory()  # unverified here: no GPU was lent to the session that wrote it
        images = to_float(images.to(self.device, non_blocking=True), getattr(self.source, "mean", None), getattr(self.source, "std", None))
        images = images.to(self.dtype)
        self.fetch_s = getattr(self.source, "last_fetch_s", time.perf_counter() - t0)
        return images, labels
