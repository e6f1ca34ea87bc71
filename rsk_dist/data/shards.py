"""Streamed class-balanced data from an ingested dataset (spec §5): :class:`ShardSource`.

A source in the sense of :mod:`rsk_dist.data.sources` over the shards and index that
:func:`rsk_dist.ingest.ingest` writes, at any fsspec URL. A batch's samples are grouped by shard
object, sorted by offset, and samples whose byte ranges touch or lie within ``merge_gap`` bytes
of each other are read by one ranged read; the ranged reads run on a thread pool, which also
decodes and augments, so :meth:`ShardSource.prefetch` of the next batch overlaps its I/O and
decoding with the current step.

Augmentation (``train=True``, the paper's): a random resized crop to ``image_size`` (scale
0.08-1, aspect ratio 3/4-4/3, torchvision's algorithm) and a horizontal flip with probability
1/2. Evaluation: resize the shorter side to ``round(image_size * 256 / 224)`` and take the
centre ``image_size`` square. Greyscale for ``in_channels=1``, RGB for 3; values in [0, 1], and
for 3 channels normalised with the ImageNet mean and std unless ``normalize="unit"``.

Determinism: the augmentation of a sample is drawn from a generator seeded by
``(seed, the step's key, the sample's index)`` (see :mod:`rsk_dist.data.sources`), so a sample
gets the same crop and flip whichever worker reads it and however the batch is split, with or
without prefetching, in whatever order the threads finish; a resumed step repeats it exactly.

Undecodable images (``on_bad_sample``): ``"skip"`` replaces one by the next decodable image of
its class in the split (a choice that depends on the sample alone, not on the batch or the
number of workers), decoded with the bad sample's augmentation; it counts them
(``bad_samples``, and the ids in ``bad_sample_ids``) and warns naming the sample. ``"fail"`` raises :class:`BadSampleError`
naming the sample, its shard and byte range. A missing shard object, a short read or any read
error raises :class:`ShardReadError`; nothing is ever filled in silently.

``cache_dir``: shard objects read from a remote store are also downloaded whole, in the
background, to ``cache_dir/<dataset fingerprint>/shards/``, and read from there once complete
(a download is renamed into place only when whole and of the manifest's size).
"""
from __future__ import annotations

import collections
import io
import logging
import math
import os
import threading
import uuid
import warnings
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch
from torch import Tensor

from rsk_dist.storage import StorageError, explain_error, filesystem, is_local, join, open_dataset, redact

log = logging.getLogger(__name__)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class BadSampleError(ValueError):
    """An image that cannot be decoded (with ``on_bad_sample="fail"``); names the sample."""


class ShardReadError(OSError):
    """A shard object that is missing, short or unreadable."""


# --------------------------------------------------------------------------- image functions


def decode(data: bytes, in_channels: int) -> Any:
    """A fully decoded Pillow image, greyscale (``in_channels=1``) or RGB (3)."""
    from PIL import Image

    img = Image.open(io.BytesIO(data))
    img.load()
    return img.convert("L" if in_channels == 1 else "RGB")


def crop_box(
    width: int,
    height: int,
    rng: np.random.Generator,
    scale: tuple[float, float] = (0.08, 1.0),
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
) -> tuple[int, int, int, int]:
    """``(left, top, w, h)`` of a random resized crop, torchvision's algorithm."""
    area = width * height
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target = area * rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(log_ratio[0], log_ratio[1]))
        w = int(round(math.sqrt(target * aspect)))
        h = int(round(math.sqrt(target / aspect)))
        if 0 < w <= width and 0 < h <= height:
            top = int(rng.integers(0, height - h + 1))
            left = int(rng.integers(0, width - w + 1))
            return left, top, w, h
    in_ratio = width / height
    if in_ratio < ratio[0]:
        w, h = width, int(round(width / ratio[0]))
    elif in_ratio > ratio[1]:
        h, w = height, int(round(height * ratio[1]))
    else:
        w, h = width, height
    return (width - w) // 2, (height - h) // 2, w, h


def transform(img: Any, image_size: int, train: bool, rng: np.random.Generator | None) -> Any:
    """Training: random resized crop + horizontal flip (needs ``rng``). Evaluation: shorter
    side to ``round(image_size * 256 / 224)``, centre crop ``image_size``."""
    from PIL import Image

    if train:
        assert rng is not None
        left, top, w, h = crop_box(img.width, img.height, rng)
        out = img.resize((image_size, image_size), Image.Resampling.BILINEAR, box=(left, top, left + w, top + h))
        if rng.random() < 0.5:
            out = out.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        return out
    short = int(round(image_size * 256 / 224))
    w, h = img.size
    if w <= h:
        size = (short, int(short * h / w))
    else:
        size = (int(short * w / h), short)
    if size != (w, h):
        img = img.resize(size, Image.Resampling.BILINEAR)
    w, h = img.size
    top, left = int(round((h - image_size) / 2.0)), int(round((w - image_size) / 2.0))
    return img.crop((left, top, left + image_size, top + image_size))


def to_tensor(img: Any, mean: Tensor | None = None, std: Tensor | None = None) -> Tensor:
    arr = np.array(img, dtype=np.uint8)  # a writable copy
    if arr.ndim == 2:
        arr = arr[:, :, None]
    t = torch.from_numpy(arr.transpose(2, 0, 1).copy()).float().div_(255.0)
    if mean is not None and std is not None:
        t = (t - mean) / std
    return t


# --------------------------------------------------------------------------- the source


@dataclass
class _Bad:
    error: str


@dataclass
class _Run:
    shard: int
    start: int
    end: int
    members: list[tuple[int, int]]  # (position in the call, sample index)


@dataclass
class _Pending:
    key: int
    futures: list[Future]


class ShardSource:
    """The samples of one ``split`` (all splits for None) of the dataset at ``url``.

    ``labels``: LongTensor, the split's classes renumbered 0..C-1 in the order of the index's
    labels; ``class_names[c]`` names class c. ``sample_ids`` and ``describe(i)`` identify a
    sample. Call with indices for ``(images N x C x H x W float, labels)``; ``prefetch(indices)``
    starts reading a later call's samples. ``exclude_classes``: class names (or their first
    path component) to leave out. ``merge_gap``: bytes between two samples of a shard below
    which they are read by one request.
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
        prefetch_threads: int = 8,
        seed: int = 0,
        *,
        normalize: Literal["unit", "imagenet"] | None = None,
        exclude_classes: tuple[str, ...] = (),
        merge_gap: int = 16 * 1024,
        max_pending: int = 4,
    ) -> None:
        if in_channels not in (1, 3):
            raise ValueError(f"in_channels must be 1 (greyscale) or 3 (RGB), got {in_channels}")
        if on_bad_sample not in ("skip", "fail"):
            raise ValueError(f"on_bad_sample must be 'skip' or 'fail', got {on_bad_sample!r}")
        if image_size < 1 or prefetch_threads < 1 or seed < 0 or merge_gap < 0:
            raise ValueError("image_size and prefetch_threads must be positive, seed and merge_gap >= 0")
        normalize = normalize or ("imagenet" if in_channels == 3 else "unit")
        if normalize not in ("unit", "imagenet") or (normalize == "imagenet" and in_channels != 3):
            raise ValueError(f"normalize must be 'unit', or 'imagenet' with 3 channels, got {normalize!r}")
        self.url, self.split, self.image_size, self.train = str(url), split, image_size, train
        self.in_channels, self.on_bad_sample, self.seed = in_channels, on_bad_sample, seed
        self.cache_dir, self.prefetch_threads, self.normalize = cache_dir, prefetch_threads, normalize
        self.merge_gap, self.max_pending = merge_gap, max(1, max_pending)

        import pyarrow.compute as pc

        dataset = open_dataset(self.url)
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
        self.stats = {"requests": 0, "bytes_read": 0, "cache_reads": 0}
        self._fs, self._root = dataset.fs, dataset.root
        self._init_runtime()

    # ---------------------------------------------------------------- plumbing

    def _init_runtime(self) -> None:
        self._lock = threading.Lock()
        self._pool: ThreadPoolExecutor | None = None
        self._cache_pool: ThreadPoolExecutor | None = None
        self._pending: collections.OrderedDict[tuple[int, ...], _Pending] = collections.OrderedDict()
        self._cache_started: set[str] = set()
        self._cache_ok: set[str] = set()
        self._bad_known: set[int] = set()
        if self.normalize == "imagenet":
            self._mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
            self._std = torch.tensor(IMAGENET_STD).view(3, 1, 1)
        else:
            self._mean = self._std = None

    def __getstate__(self) -> dict[str, Any]:
        # Filesystems, pools and locks stay behind; a worker reopens the store from the URL
        # with its own environment's credentials.
        state = self.__dict__.copy()
        for key in ("_fs", "_lock", "_pool", "_cache_pool", "_pending", "_cache_started", "_cache_ok", "_bad_known", "_mean", "_std"):
            state.pop(key, None)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._fs = None
        self._init_runtime()

    @property
    def fs(self) -> Any:
        if self._fs is None:
            self._fs, self._root = filesystem(self.url)
        return self._fs

    def _executor(self) -> ThreadPoolExecutor:
        if self._pool is None:
            self._pool = ThreadPoolExecutor(self.prefetch_threads, thread_name_prefix="shard-read")
        return self._pool

    def close(self) -> None:
        for pool in (self._pool, self._cache_pool):
            if pool is not None:
                pool.shutdown(wait=True, cancel_futures=True)
        self._pool = self._cache_pool = None
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

    # ---------------------------------------------------------------- reading

    def _cached_path(self, name: str) -> str | None:
        if not self.cache_dir or is_local(self.fs):
            return None
        return os.path.join(self.cache_dir, self.fingerprint[:16], *name.split("/"))

    def _cache_ready(self, name: str) -> str | None:
        path = self._cached_path(name)
        if path is None:
            return None
        if name in self._cache_ok:
            return path
        expected = self.manifest.get("shards", {}).get(name, {}).get("size")
        if os.path.exists(path) and (expected is None or os.path.getsize(path) == expected):
            self._cache_ok.add(name)
            return path
        return None

    def _schedule_cache(self, name: str) -> None:
        with self._lock:
            if name in self._cache_started:
                return
            self._cache_started.add(name)
            if self._cache_pool is None:
                self._cache_pool = ThreadPoolExecutor(1, thread_name_prefix="shard-cache")
        self._cache_pool.submit(self._download, name)

    def _download(self, name: str) -> None:
        path = self._cached_path(name)
        assert path is not None
        tmp = f"{path}.tmp-{uuid.uuid4().hex[:12]}"
        try:
            os.makedirs(os.path.dirname(path), exist_ok=True)
            self.fs.get_file(join(self._root, name), tmp)
            expected = self.manifest.get("shards", {}).get(name, {}).get("size")
            if expected is not None and os.path.getsize(tmp) != expected:
                raise OSError(f"downloaded {os.path.getsize(tmp)} bytes, the manifest says {expected}")
            os.replace(tmp, path)
        except Exception as err:  # noqa: BLE001 - the cache is an optimisation; reads go remote
            log.warning("could not cache %s of %s in %s: %s", name, redact(self.url), self.cache_dir, redact(err))
            with self._lock:
                self._cache_started.discard(name)
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)

    def _read(self, shard: int, start: int, end: int) -> bytes:
        name = self.shard_names[shard]
        local = self._cache_ready(name)
        if local is not None:
            with open(local, "rb") as f:
                f.seek(start)
                data = f.read(end - start)
            with self._lock:
                self.stats["cache_reads"] += 1
        else:
            try:
                data = self.fs.cat_file(join(self._root, name), start=start, end=end)
            except FileNotFoundError:
                raise ShardReadError(
                    f"shard object {redact(self.url)}/{name} is missing: the dataset is damaged; "
                    "re-run the ingest with overwrite=True"
                ) from None
            except Exception as err:  # noqa: BLE001 - every backend error becomes a ShardReadError
                raise ShardReadError(
                    f"cannot read bytes {start}-{end} of {redact(self.url)}/{name}: "
                    f"{explain_error(err, self.url, 'read from')}"
                ) from None
            with self._lock:
                self.stats["requests"] += 1
                self.stats["bytes_read"] += len(data)
            if self.cache_dir:
                self._schedule_cache(name)
        if len(data) != end - start:
            raise ShardReadError(
                f"shard {redact(self.url)}/{name} ended early: asked for bytes {start}-{end}, got "
                f"{len(data)}; the dataset is damaged, re-run the ingest with overwrite=True"
            )
        return data

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

    def _rng(self, key: int, sample: int) -> np.random.Generator:
        return np.random.default_rng([self.seed, key, sample])

    def _decode(self, raw: bytes, sample: int, key: int) -> Tensor | _Bad:
        try:
            img = decode(raw, self.in_channels)
        except Exception as err:  # noqa: BLE001 - Pillow raises many types for a bad image
            return _Bad(f"{type(err).__name__}: {err}")
        img = transform(img, self.image_size, self.train, self._rng(key, sample) if self.train else None)
        return to_tensor(img, self._mean, self._std)

    def _load_run(self, run: _Run, key: int) -> list[tuple[int, Tensor | _Bad]]:
        data = self._read(run.shard, run.start, run.end)
        out = []
        for pos, s in run.members:
            a = int(self._offset[s]) - run.start
            out.append((pos, self._decode(data[a : a + int(self._length[s])], s, key)))
        return out

    def _indices(self, indices: Tensor | np.ndarray | list[int]) -> np.ndarray:
        if isinstance(indices, Tensor):
            indices = indices.detach().cpu().numpy()
        idx = np.asarray(indices, dtype=np.int64).reshape(-1)
        if idx.size and (idx.min() < 0 or idx.max() >= len(self)):
            raise IndexError(f"sample indices must lie in 0..{len(self) - 1}, got {idx.min()}..{idx.max()}")
        return idx

    def _submit(self, idx: np.ndarray, key: int) -> _Pending:
        pool = self._executor()
        return _Pending(key, [pool.submit(self._load_run, run, key) for run in self._runs(idx)])

    def prefetch(self, indices: Tensor | np.ndarray | list[int], key: int = 0) -> None:
        """Starts reading and decoding these samples in the background, for a later call with
        the same indices and key."""
        idx = self._indices(indices)
        t = (key, *idx.tolist())
        if t in self._pending:
            return
        self._pending[t] = self._submit(idx, key)
        while len(self._pending) > self.max_pending:
            _, stale = self._pending.popitem(last=False)
            for f in stale.futures:
                f.cancel()

    def read_bytes(self, indices: Tensor | np.ndarray | list[int]) -> list[bytes]:
        """The samples' encoded bytes as stored (what the ingest copied from the source)."""
        idx = self._indices(indices)
        out: list[bytes] = [b""] * idx.size
        runs = self._runs(idx)
        for run, data in zip(runs, self._executor().map(lambda r: self._read(r.shard, r.start, r.end), runs)):
            for pos, s in run.members:
                a = int(self._offset[s]) - run.start
                out[pos] = data[a : a + int(self._length[s])]
        return out

    def __call__(self, indices: Tensor | np.ndarray | list[int], key: int = 0) -> tuple[Tensor, Tensor]:
        idx = self._indices(indices)
        pending = self._pending.pop((key, *idx.tolist()), None) or self._submit(idx, key)
        results: list[Tensor | _Bad | None] = [None] * idx.size
        for future in pending.futures:
            for pos, item in future.result():
                results[pos] = item
        for pos, item in enumerate(results):
            if isinstance(item, _Bad):
                results[pos] = self._replace(int(idx[pos]), item, pending.key)
        images = torch.stack(results) if results else torch.empty(0, self.in_channels, self.image_size, self.image_size)  # type: ignore[arg-type]
        return images, self.labels[torch.from_numpy(idx)]

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

    def _replace(self, s: int, bad: _Bad, key: int) -> Tensor:
        self._record_bad(s, bad.error)
        label = int(self.labels[s])
        members = torch.nonzero(self.labels == label).squeeze(1).tolist()
        start = members.index(s)
        for step in range(1, len(members)):  # the next decodable image of its class in the split
            c = members[(start + step) % len(members)]
            if c in self._bad_known:
                continue
            raw = self._read(int(self._shard[c]), int(self._offset[c]), int(self._offset[c] + self._length[c]))
            item = self._decode(raw, s, key)
            if isinstance(item, Tensor):
                return item
            self._record_bad(c, item.error)
        raise BadSampleError(
            f"no decodable image left in class {self.class_names[label]!r} of {redact(self.url)} "
            f"to replace {self.sample_ids[s]!r}"
        )
