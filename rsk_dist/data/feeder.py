"""Batches from a source onto the model's device: :class:`Feeder`.

Sources hand out compact batches (streamed images as uint8, see :mod:`rsk_dist.data.shards`).
The feeder moves them to the device as they are: uint8 stays uint8, a quarter of float32's bytes,
and its consumer converts and normalises each chunk there as it uses it (:meth:`Feeder.normalize`;
the two-pass step and evaluation do), so the device holds float input for one chunk, not the
batch. With prefetching, the next step's batch is fetched on the feeder's thread while the
current step runs: assembled (into pinned memory when the device is a GPU) and copied to the GPU
on a side stream, so that the copy overlaps the step. It also keeps the source's prefetch
``depth`` steps ahead of training, across epoch boundaries, so the next epoch's first batches
are read and decoded while the current epoch ends and while evaluation runs. Needs torch only.
"""
from __future__ import annotations

import time
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import torch
from torch import Tensor

from rsk_dist.preprocess import to_float


Loaded = tuple[Tensor, Tensor, float, "torch.cuda.Event | None"]


class Feeder:
    """``feeder(indices, key)`` is ``source(indices, key)`` with the images on ``device``, in
    the source's dtype; :meth:`normalize` makes model input of them (``dtype`` floats).
    ``labels``, ``source``, ``prefetch``, ``mean`` and ``std`` as the source's. ``fetch_s``:
    seconds the last call's fetching took, wherever and whenever it ran (the source's
    ``last_fetch_s``; for a source without one, the time its fetching took)."""

    def __init__(self, source: Any, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32) -> None:
        self.source, self.device, self.dtype = source, torch.device(device), dtype
        self.labels: Tensor = source.labels
        self.mean: tuple[float, ...] | None = getattr(source, "mean", None)
        self.std: tuple[float, ...] | None = getattr(source, "std", None)
        self.fetch_s = 0.0
        self._ahead = -1  # the last global step prefetched
        self._loads: dict[tuple[int, ...], Future[Loaded]] = {}  # batches fetched on the thread
        self._thread: ThreadPoolExecutor | None = None
        self._copy_stream = None
        if self.device.type == "cuda" and hasattr(source, "pin_memory"):
            source.pin_memory = True  # assembled straight into pinned memory: no second copy

    def __len__(self) -> int:
        return self.labels.numel()

    def normalize(self, images: Tensor) -> Tensor:
        """Model input from images of this source: uint8 to floats with its normalisation, as ``dtype``."""
        return to_float(images, self.mean, self.std).to(self.dtype)

    def prefetch(self, indices: Tensor, key: int = 0) -> None:
        prefetch = getattr(self.source, "prefetch", None)
        if prefetch is not None:
            prefetch(indices, key)

    def prefetch_ahead(self, sampler: Any, epoch: int, step: int, steps_per_epoch: int, total_steps: int, depth: int, rank: int, world: int) -> None:
        """Prefetches this worker's shards of the ``depth`` steps after (epoch, step), counting
        on into later epochs, up to ``total_steps``; each step is asked for once. With
        ``depth`` >= 1 the next step's batch is also fetched onto the device on the feeder's thread."""
        if depth < 1:
            return
        here = epoch * steps_per_epoch + step
        if hasattr(self.source, "prefetch"):
            for g in range(max(here, self._ahead) + 1, min(here + depth, total_steps - 1) + 1):
                e, s = divmod(g, steps_per_epoch)
                self.source.prefetch(sampler.shard(e, s, rank, world), sampler.augment_key(e, s))
                self._ahead = g
        if here + 1 < total_steps:
            e, s = divmod(here + 1, steps_per_epoch)
            indices, key = sampler.shard(e, s, rank, world), sampler.augment_key(e, s)
            name = (key, *indices.tolist())
            if name not in self._loads:
                if self._thread is None:
                    self._thread = ThreadPoolExecutor(1, thread_name_prefix="feeder")
                self._loads[name] = self._thread.submit(self._load, indices, key)
                while len(self._loads) > 2:  # this step's, the next one's: older ones went unused
                    del self._loads[next(iter(self._loads))]

    def _load(self, indices: Tensor, key: int) -> Loaded:
        t0 = time.perf_counter()
        images, labels = self.source(indices, key)
        fetch_s = getattr(self.source, "last_fetch_s", time.perf_counter() - t0)
        if self.device.type != "cuda":
            return images.to(self.device), labels, fetch_s, None
        if not images.is_pinned():
            images = images.pin_memory()
        if self._copy_stream is None:
            self._copy_stream = torch.cuda.Stream(self.device)
        with torch.cuda.stream(self._copy_stream):
            images = images.to(self.device, non_blocking=True)
        return images, labels, fetch_s, self._copy_stream.record_event()

    def __call__(self, indices: Tensor, key: int = 0) -> tuple[Tensor, Tensor]:
        name = (key, *torch.as_tensor(indices).tolist())
        loading = self._loads.pop(name, None)
        images, labels, self.fetch_s, copied = loading.result() if loading is not None else self._load(indices, key)
        if copied is not None:
            # The side stream's copy must finish before the step's kernels read the images,
            # and their memory must not be reused before those kernels are done.
            current = torch.cuda.current_stream(self.device)
            current.wait_event(copied)
            images.record_stream(current)
        return images, labels
