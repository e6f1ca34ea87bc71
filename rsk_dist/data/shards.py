"""Streamed class-balanced data from an ingested dataset (spec §5): :class:`ShardSource`.

A source in the sense of :mod:`rsk_dist.data.sources` over the shards and index that
:func:`rsk_dist.ingest.ingest` writes, at any fsspec URL. A batch's samples are grouped by shard
object, sorted by offset, and samples whose byte ranges touch or lie within ``merge_gap`` bytes
of each other are read by one ranged read. All ranged reads of a batch are issued at once
(fsspec's ``cat_ranges``; s3fs runs them on its event loop, ``read_concurrency`` at a time, over
a connection pool of that size), and the images are then decoded and augmented by
``decoders`` processes (:mod:`rsk_dist.data.decode`; threads did not scale, see
docs/benchmarks.md). :meth:`ShardSource.prefetch` of later batches overlaps their reads and
decoding with the current step; up to ``max_pending`` prefetched batches are held.

Batches are uint8 (``N x C x H x W``, 0-255): 4x fewer bytes than float32. The consumer turns
them into floats on its device with :attr:`ShardSource.mean` and :attr:`ShardSource.std`
(ImageNet's for 3 channels unless ``normalize="unit"``; none for "unit"): see
:class:`rsk_dist.data.feeder.Feeder`.

Augmentation (``train=True``, the paper's): a random resized crop to ``image_size`` (scale
0.08-1, aspect ratio 3/4-4/3, torchvision's algorithm) and a horizontal flip with probability
1/2. Evaluation: resize the shorter side to ``round(image_size * 256 / 224)`` and take the
centre ``image_size`` square. Greyscale for ``in_channels=1``, RGB for 3.

Determinism: the augmentation of a sample is drawn from a generator seeded by
``(seed, the step's key, the sample's index)`` (see :mod:`rsk_dist.data.sources`), so a sample
gets the same crop and flip whichever worker, thread or prefetch reads it and however the batch
is split; a resumed step repeats it exactly.

Undecodable images (``on_bad_sample``): ``"skip"`` replaces one by the next decodable image of
its class in the split (a choice that depends on the sample alone, not on the batch or the
number of workers), decoded with the bad sample's augmentation; it counts them
(``bad_samples``, and the ids in ``bad_sample_ids``) and warns naming the sample. ``"fail"`` raises :class:`BadSampleError`
naming the sample, its shard and byte range. A missing shard object, a short read or any read
error raises :class:`ShardReadError`; nothing is ever filled in silently. A decoder process that
dies (killed by the OS) is replaced and its batch read and decoded again, once; a second loss
raises :class:`rsk_dist.data.decode.DecoderDied`.

``cache_dir``: shard objects read from a remote store are also downloaded whole, in the
background, verified against the manifest's sha256 and read from there once complete; see
:mod:`rsk_dist.data.cache` (keyed on the dataset's URL and fingerprint together,
``cache_max_bytes`` bounds it, a full or unwritable cache turns caching off with one warning).
"""
from __future__ import annotations

import collections
import logging
import os
import threading
import time
import warnings
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch
from torch import Tensor

from rsk_dist.data.cache import NodeCache
from rsk_dist.data.decode import DECODE_DEADLINE_S, Augment, Decoder, DecoderDied, Undecodable
from rsk_dist.preprocess import IMAGENET_MEAN, IMAGENET_STD
from rsk_dist.storage import StorageError, explain_error, filesystem, is_local, join, open_dataset, redact

log = logging.getLogger(__name__)

# Seconds all the ranged reads of one batch may take together: minutes. botocore's own
# timeouts are per attempt and per socket read, so a hung store took 16 x 60 s to fail and one
# that trickles a byte every 20 s never did.
READ_DEADLINE_S = 300.0


class BadSampleError(ValueError):
    """An image that cannot be decoded (with ``on_bad_sample="fail"``); names the sample."""


class ShardReadError(OSError):
    """A shard object that is missing, short or unreadable, or reads past their deadline."""


class _Overdue(Exception):
    """A batch's reads did not finish within ``read_deadline_s``."""


# --------------------------------------------------------------------------- the source


@dataclass
class _Run:
    shard: int
    start: int
    end: int
    members: list[tuple[int, int]]  # (position in the call, sample index)


@dataclass
class _Pending:
    key: int
    started: float  # perf_counter when the batch was asked for
    tasks: Future  # -> futures of decoded chunks (rsk_dist.data.decode.Decoded)
    done: list[float]  # perf_counter when each chunk arrived


class ShardSource:
    """The samples of one ``split`` (all splits for None) of the dataset at ``url``.

    ``labels``: LongTensor, the split's classes renumbered 0..C-1 in the order of the index's
    labels; ``class_names[c]`` names class c. ``sample_ids`` and ``describe(i)`` identify a
    sample. Call with indices for ``(images N x C x H x W uint8, labels)``;
    ``prefetch(indices, key)`` starts reading and decoding a later call's samples.
    ``exclude_classes``: class names (or their first path component) to leave out.
    ``merge_gap``: bytes between two samples of a shard below which they are read by one
    request. ``read_concurrency``: ranged reads in flight at once. ``decoders``: decoder
    processes (default: one per CPU this process may use; shared by the process's sources of
    that many, see :class:`rsk_dist.data.decode.Decoder`). ``draft``: decode JPEGs at reduced size
    where the crop allows (see :func:`rsk_dist.data.decode.load_image`; off by default: it changes pixels).
    ``max_pending``: prefetched batches held
    (a caller that prefetches P steps ahead needs P + 1: the current step's and P more).
    ``last_fetch_s``: after a call, seconds from when its batch was asked for (prefetch or
    call) to when its last image was decoded. ``pin_memory``: batches are assembled in pinned
    memory, for a fast copy to a GPU (the feeder sets it for one).
    """

    def __init__(
        self,
        url: str,
        split: str | None,
        image_size: int,
        train: bool,
        in_channels: int = 3,
        on_bad_sample: Literal["skip", "fail"] = "skip",
        cache_dir: str | None = None,
        seed: int = 0,
        *,
        normalize: Literal["unit", "imagenet"] | None = None,
        exclude_classes: tuple[str, ...] = (),
        merge_gap: int = 1 << 20,
        read_concurrency: int = 64,
        decoders: int | None = None,
        max_pending: int = 3,
        cache_max_bytes: int | None = None,
        draft: bool = False,
        read_deadline_s: float = READ_DEADLINE_S,
        decode_deadline_s: float = DECODE_DEADLINE_S,
    ) -> None:
        if in_channels not in (1, 3):
            raise ValueError(f"in_channels must be 1 (greyscale) or 3 (RGB), got {in_channels}")
        if on_bad_sample not in ("skip", "fail"):
            raise ValueError(f"on_bad_sample must be 'skip' or 'fail', got {on_bad_sample!r}")
        decoders = decoders or len(os.sched_getaffinity(0))
        if image_size < 1 or read_concurrency < 1 or decoders < 1 or max_pending < 1:
            raise ValueError("image_size, read_concurrency, decoders and max_pending must be positive")
        if seed < 0 or merge_gap < 0 or (cache_max_bytes is not None and cache_max_bytes < 0):
            raise ValueError("seed, merge_gap and cache_max_bytes must be >= 0")
        if not read_deadline_s > 0 or not decode_deadline_s > 0:
            raise ValueError("read_deadline_s and decode_deadline_s must be positive")
        normalize = normalize or ("imagenet" if in_channels == 3 else "unit")
        if normalize not in ("unit", "imagenet") or (normalize == "imagenet" and in_channels != 3):
            raise ValueError(f"normalize must be 'unit', or 'imagenet' with 3 channels, got {normalize!r}")
        self.url, self.split, self.image_size, self.train = str(url), split, image_size, train
        self.in_channels, self.on_bad_sample, self.seed = in_channels, on_bad_sample, seed
        self.cache_dir, self.cache_max_bytes, self.normalize = cache_dir, cache_max_bytes, normalize
        self.merge_gap, self.read_concurrency, self.decoders = merge_gap, read_concurrency, decoders
        self.max_pending, self.draft = max_pending, draft
        self.read_deadline_s, self.decode_deadline_s = read_deadline_s, decode_deadline_s
        self.pin_memory = False
        # The float conversion the consumer applies on its device: (x / 255 - mean) / std.
        self.mean = IMAGENET_MEAN if normalize == "imagenet" else None
        self.std = IMAGENET_STD if normalize == "imagenet" else None

        import pyarrow.compute as pc

        dataset = open_dataset(self.url, fs_root=filesystem(self.url, pool=read_concurrency))
        table = dataset.index
        if split is not None:
            splits = sorted(set(table.column("split").to_pylist()))
            if split not in splits:
                raise StorageError(
                    f"split {split!r} is not in the dataset at {redact(self.url)} (it has: {', '.join(splits)})"
                )
            table = table.filter(pc.equal(table.column("split"), split))
        if exclude_classes:
            names = table.column("class_name").to_pylist()
            drop = set(exclude_classes)
            keep = [n not in drop and n.split("/")[0] not in drop for n in names]
            table = table.filter(keep)
        if table.num_rows == 0:
            raise StorageError(f"no samples left in split {split!r} of {redact(self.url)}")
        self.manifest = dataset.manifest
        self.fingerprint = str(dataset.manifest.get("fingerprint", "unknown"))
        self.sample_ids: list[str] = table.column("sample_id").to_pylist()
        shard_col = table.column("shard").to_pylist()
        self.shard_names: list[str] = sorted(set(shard_col))
        shard_number = {n: i for i, n in enumerate(self.shard_names)}
        self._shard = np.fromiter((shard_number[s] for s in shard_col), dtype=np.int32, count=len(shard_col))
        self._offset = table.column("offset").to_numpy().astype(np.int64)
        self._length = table.column("length").to_numpy().astype(np.int64)
        global_labels = table.column("label").to_numpy().astype(np.int64)
        classes, remapped = np.unique(global_labels, return_inverse=True)
        name_of = dict(zip(global_labels.tolist(), table.column("class_name").to_pylist()))
        self.class_names: list[str] = [name_of[int(c)] for c in classes]
        self.global_labels = torch.from_numpy(global_labels)
        self.labels = torch.from_numpy(remapped.reshape(-1).astype(np.int64))
        self.bad_samples = 0
        self.bad_sample_ids: list[str] = []
        self.last_fetch_s = 0.0
        self.stats = {
            "requests": 0, "bytes_read": 0, "cache_reads": 0, "downloads": 0, "cache_failures": 0,
            "prefetch_hits": 0, "prefetch_misses": 0,
        }
        self._fs, self._root = dataset.fs, dataset.root
        self._init_runtime()

    # ---------------------------------------------------------------- plumbing

    def _init_runtime(self) -> None:
        self._lock = threading.Lock()
        self._read_pool: ThreadPoolExecutor | None = None
        self._pending: collections.OrderedDict[tuple[int, ...], _Pending] = collections.OrderedDict()
        self._bad_known: set[int] = set()
        # The cache serves remote stores only: a local dataset is read in place.
        self._cache = (
            NodeCache(self.cache_dir, self.url, self.manifest, self.cache_max_bytes, self._get_shard, self.stats, self._lock)
            if self.cache_dir and not is_local(self.fs) else None
        )

    _RUNTIME = ("_fs", "_lock", "_read_pool", "_pending", "_bad_known", "_cache")

    def __getstate__(self) -> dict[str, Any]:
        # Filesystems, pools and locks stay behind; a worker reopens the store from the URL
        # with its own environment's credentials.
        state = self.__dict__.copy()
        for key in self._RUNTIME:
            state.pop(key, None)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._fs = None
        self._init_runtime()

    @property
    def fs(self) -> Any:
        if self._fs is None:
            self._fs, self._root = filesystem(self.url, pool=self.read_concurrency)
        return self._fs

    def _readers(self) -> ThreadPoolExecutor:
        with self._lock:
            if self._read_pool is None:
                # Two readers: one batch's reads may wait on the store while the next one's start.
                self._read_pool = ThreadPoolExecutor(2, thread_name_prefix="shard-read")
            return self._read_pool

    def close(self) -> None:
        """Stops this source's reading threads; the decoder processes are shared and stay."""
        if self._read_pool is not None:
            self._read_pool.shutdown(wait=True, cancel_futures=True)
        if self._cache is not None:
            self._cache.close()
        self._read_pool = None
        self._pending.clear()

    def __enter__(self) -> ShardSource:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __len__(self) -> int:
        return self.labels.numel()

    def __repr__(self) -> str:
        return (
            f"ShardSource(url={redact(self.url)!r}, split={self.split!r}, samples={len(self)}, "
            f"classes={len(self.class_names)}, train={self.train})"
        )

    def describe(self, i: int) -> dict[str, Any]:
        """Where sample ``i`` lives: id, class, shard, byte offset and length."""
        return {
            "sample_id": self.sample_ids[i],
            "class_name": self.class_names[int(self.labels[i])],
            "shard": self.shard_names[self._shard[i]],
            "offset": int(self._offset[i]),
            "length": int(self._length[i]),
        }

    # ---------------------------------------------------------------- the local cache

    def _get_shard(self, name: str, local_path: str) -> None:
        self.fs.get_file(join(self._root, name), local_path)

    def _read_cached(self, run: _Run) -> bytes | None:
        """The run's bytes from the node cache, or None where its shard is not there (yet)."""
        if self._cache is None:
            return None
        return self._cache.read(self.shard_names[run.shard], run.start, run.end)

    # ---------------------------------------------------------------- reading

    def _read_error(self, err: BaseException, run: _Run) -> ShardReadError:
        name = self.shard_names[run.shard]
        if isinstance(err, FileNotFoundError):
            if self._replaced():
                return ShardReadError(
                    f"shard object {redact(self.url)}/{name} is missing: the dataset was overwritten "
                    "since this job opened it and gc-dataset removed the version the job reads; restart "
                    "the job (it reads the current version), and run gc-dataset only once the jobs "
                    "started before an overwrite have ended"
                )
            return ShardReadError(
                f"shard object {redact(self.url)}/{name} is missing: the dataset is damaged; "
                "re-run the ingest with overwrite=True"
            )
        return ShardReadError(
            f"cannot read bytes {run.start}-{run.end} of {redact(self.url)}/{name}: "
            f"{explain_error(err, self.url, 'read from')}"
        )

    def _replaced(self) -> bool:
        """Whether the dataset's marker now names another version than the one this source read."""
        try:
            return open_dataset(self.url).manifest.get("fingerprint") != self.fingerprint
        except StorageError:
            return False

    def _cat_ranges(self, runs: list[_Run]) -> list[bytes | BaseException]:
        """The runs' bytes (or each one's error), issued at once; on an async store (s3fs,
        gcsfs) under the batch's overall deadline, past which they are cancelled (:class:`_Overdue`)."""
        import fsspec.asyn

        fs = self.fs
        paths = [join(self._root, self.shard_names[run.shard]) for run in runs]
        starts, ends = [run.start for run in runs], [run.end for run in runs]
        if not getattr(fs, "async_impl", False):  # local and in-memory stores: no network to hang
            return fs.cat_ranges(paths, starts, ends, on_error="return")
        try:
            return fsspec.asyn.sync(
                fs.loop, fs._cat_ranges, paths, starts, ends, on_error="return", batch_size=self.read_concurrency,
                timeout=self.read_deadline_s,
            )
        except fsspec.asyn.FSTimeoutError:
            raise _Overdue from None

    def _read_runs(self, runs: list[_Run]) -> list[bytes]:
        """The bytes of every run: from the local cache where its shard is there, all others
        by ranged reads issued at once (s3fs: ``read_concurrency`` in flight on its event loop)."""
        out: list[bytes | None] = [self._read_cached(run) for run in runs]
        remote = [i for i, data in enumerate(out) if data is None]
        if remote:
            try:
                results = self._cat_ranges([runs[i] for i in remote])
            except _Overdue:
                raise ShardReadError(
                    f"reading {len(remote)} byte ranges of {redact(self.url)} for a batch took longer than "
                    f"its deadline, data.read_deadline_s = {self.read_deadline_s:g} s: the store is hung or "
                    "sends too slowly. Check the store and the network to it, or raise data.read_deadline_s"
                ) from None
            except Exception as err:  # noqa: BLE001 - every backend error becomes a ShardReadError
                results = [err] * len(remote)
            for i, data in zip(remote, results):
                if isinstance(data, BaseException):
                    raise self._read_error(data, runs[i]) from None
                out[i] = data
            with self._lock:
                self.stats["requests"] += len(remote)
                self.stats["bytes_read"] += sum(len(out[i]) for i in remote)  # type: ignore[arg-type]
            if self._cache is not None:
                for name in {self.shard_names[runs[i].shard] for i in remote}:
                    self._cache.schedule(name)
        for run, data in zip(runs, out):
            if len(data) != run.end - run.start:  # type: ignore[arg-type]
                raise ShardReadError(
                    f"shard {redact(self.url)}/{self.shard_names[run.shard]} ended early: asked for bytes "
                    f"{run.start}-{run.end}, got {len(data)}; the dataset is damaged, re-run the "  # type: ignore[arg-type]
                    "ingest with overwrite=True"
                )
        return out  # type: ignore[return-value]

    def _read_sample(self, s: int) -> bytes:
        start = int(self._offset[s])
        return self._read_runs([_Run(int(self._shard[s]), start, start + int(self._length[s]), [])])[0]

    def _runs(self, idx: np.ndarray) -> list[_Run]:
        order = np.lexsort((self._offset[idx], self._shard[idx]))
        runs: list[_Run] = []
        for pos in order.tolist():
            s = int(idx[pos])
            shard, off, end = int(self._shard[s]), int(self._offset[s]), int(self._offset[s] + self._length[s])
            last = runs[-1] if runs else None
            if last is not None and last.shard == shard and off <= last.end + self.merge_gap:
                last.end = max(last.end, end)
                last.members.append((pos, s))
            else:
                runs.append(_Run(shard, off, end, [(pos, s)]))
        return runs

    @property
    def augment(self) -> Augment:
        return Augment(self.in_channels, self.image_size, self.train, self.seed, self.draft)

    def _read_samples(self, idx: np.ndarray) -> Iterator[tuple[int, int, memoryview]]:
        """``(position in idx, sample, its encoded bytes)`` for every sample, read run by run."""
        runs = self._runs(idx)
        for run, data in zip(runs, self._read_runs(runs)):
            view = memoryview(data)
            for pos, s in run.members:
                a = int(self._offset[s]) - run.start
                yield pos, s, view[a : a + int(self._length[s])]

    def _fetch(self, idx: np.ndarray, key: int, done: list[float]) -> list[Future]:
        """Reads the batch, then hands its images to the decoder processes."""
        items = [(pos, s, bytes(raw)) for pos, s, raw in self._read_samples(idx)]
        futures = Decoder.shared(self.decoders).submit(self.augment, key, items, self.decode_deadline_s)
        for future in futures:
            future.add_done_callback(lambda _: done.append(time.perf_counter()))
        return futures

    def _indices(self, indices: Tensor | np.ndarray | list[int]) -> np.ndarray:
        if isinstance(indices, Tensor):
            indices = indices.detach().cpu().numpy()
        idx = np.asarray(indices, dtype=np.int64).reshape(-1)
        if idx.size and (idx.min() < 0 or idx.max() >= len(self)):
            raise IndexError(f"sample indices must lie in 0..{len(self) - 1}, got {idx.min()}..{idx.max()}")
        return idx

    def _submit(self, idx: np.ndarray, key: int) -> _Pending:
        done: list[float] = []
        return _Pending(key, time.perf_counter(), self._readers().submit(self._fetch, idx, key, done), done)

    def prefetch(self, indices: Tensor | np.ndarray | list[int], key: int = 0) -> None:
        """Starts reading and decoding these samples in the background, for a later call with
        the same indices and key. Beyond ``max_pending`` batches the oldest is dropped."""
        idx = self._indices(indices)
        t = (key, *idx.tolist())
        if t in self._pending:
            return
        self._pending[t] = self._submit(idx, key)
        while len(self._pending) > self.max_pending:
            _, stale = self._pending.popitem(last=False)
            stale.tasks.cancel()

    def read_bytes(self, indices: Tensor | np.ndarray | list[int]) -> list[bytes]:
        """The samples' encoded bytes as stored (what the ingest copied from the source)."""
        idx = self._indices(indices)
        out: list[bytes] = [b""] * idx.size
        for pos, _, raw in self._read_samples(idx):
            out[pos] = bytes(raw)
        return out

    def __call__(self, indices: Tensor | np.ndarray | list[int], key: int = 0) -> tuple[Tensor, Tensor]:
        idx = self._indices(indices)
        pending = self._pending.pop((key, *idx.tolist()), None)
        with self._lock:
            self.stats["prefetch_hits" if pending is not None else "prefetch_misses"] += 1
        pending = pending or self._submit(idx, key)
        try:
            images = self._assemble(idx, pending)
        except DecoderDied:
            # A decoder process was lost while it held part of this batch (it is started again
            # for the next chunk): the batch is read and decoded again, once.
            pending = self._submit(idx, key)
            images = self._assemble(idx, pending)
        self.last_fetch_s = max(pending.done, default=pending.started) - pending.started
        return images, self.labels[torch.from_numpy(idx)]

    def _assemble(self, idx: np.ndarray, pending: _Pending) -> Tensor:
        # numpy copies on this thread alone: torch's intra-op threads would take (and spin on)
        # the cores that the decoder processes need.
        # Every chunk first: a lost decoder raises before any bad sample is counted, so a batch
        # decoded again counts its bad samples once.
        decoded = [item for future in pending.tasks.result() for item in future.result()]
        shape = (idx.size, self.in_channels, self.image_size, self.image_size)
        images = torch.empty(shape, dtype=torch.uint8, pin_memory=self.pin_memory)
        out = images.numpy()
        for pos, item in decoded:
            if isinstance(item, Undecodable):
                item = self._replace(int(idx[pos]), item, pending.key)
            out[pos] = item.transpose(2, 0, 1)
        return images

    # ---------------------------------------------------------------- bad samples

    def _where(self, s: int) -> str:
        d = self.describe(s)
        return (
            f"{d['sample_id']!r} (class {d['class_name']!r}, {redact(self.url)}/{d['shard']} "
            f"offset {d['offset']} length {d['length']})"
        )

    def _record_bad(self, s: int, error: str) -> None:
        if self.on_bad_sample == "fail":
            raise BadSampleError(
                f"cannot decode image {self._where(s)}: {error}. Remove or fix it in the source and "
                "re-ingest, or set data.on_bad_sample: skip"
            )
        with self._lock:
            self.bad_samples += 1
            first = s not in self._bad_known
            self._bad_known.add(s)
            if first:
                self.bad_sample_ids.append(self.sample_ids[s])
        if first:
            msg = f"skipping undecodable image {self._where(s)}: {error}"
            log.warning(msg)
            warnings.warn(msg, RuntimeWarning, stacklevel=3)

    def _replace(self, s: int, bad: Undecodable, key: int) -> np.ndarray:
        self._record_bad(s, bad.error)
        label = int(self.labels[s])
        members = torch.nonzero(self.labels == label).squeeze(1).tolist()
        start = members.index(s)
        for step in range(1, len(members)):  # the next decodable image of its class in the split
            c = members[(start + step) % len(members)]
            if c in self._bad_known:
                continue
            item = self.augment(self._read_sample(c), s, key)
            if not isinstance(item, Undecodable):
                return item
            self._record_bad(c, item.error)
        raise BadSampleError(
            f"no decodable image left in class {self.class_names[label]!r} of {redact(self.url)} "
            f"to replace {self.sample_ids[s]!r}"
        )
