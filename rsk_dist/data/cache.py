"""The node cache: whole shard objects of remote datasets, downloaded to a node-local
directory in the background and read from there once complete (:class:`NodeCache`).

Layout: ``cache_dir/<key>/shards/<version>/shard-00000.bin``, where the key is a digest of the
dataset's URL and fingerprint together. The manifest that declares the fingerprint is written
by whoever can write the dataset's prefix, so a key of the fingerprint alone let another user's
dataset, with a copied manifest, fill the cache that a victim's jobs read; with the URL in the
key each dataset location has its own entries.

Nothing enters the cache unverified: a download is hashed and compared with the sha256 the
manifest records for the shard before it is renamed into place (a shard without a recorded
sha256 is not cached), and its digest is stored beside it (``<shard>.sha256``). Opening a cached
shard checks, cheaply, its size and that stored digest against the manifest.

A file lock in ``cache_dir`` makes the processes of a node download each shard once.
``max_bytes`` bounds the cached shards of all datasets in ``cache_dir``: the least recently read
are removed to make room. A shard that fails to download is not tried again by this cache; a
cache directory that is full, read-only or refuses access (EACCES, EPERM) turns caching off for
the dataset with one warning, and reads go on as ranged reads from the store.
"""
from __future__ import annotations

import contextlib
import errno
import fcntl
import glob
import hashlib
import logging
import os
import threading
import uuid
import warnings
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from rsk_dist.storage import redact

log = logging.getLogger(__name__)

# A local write error that means the cache's directory cannot take more, not that one shard failed.
DISK_ERRORS = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS)
ACCESS_ERRORS = (errno.EACCES, errno.EPERM)
DIGEST = ".sha256"  # the suffix of a cached shard's digest record


@contextlib.contextmanager
def node_lock(directory: str) -> Iterator[None]:
    """An exclusive lock held by one process of the node at a time (``directory/.lock``)."""
    os.makedirs(directory, exist_ok=True)
    with open(os.path.join(directory, ".lock"), "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def cached_shards(cache_dir: str) -> list[str]:
    """The complete shard files in ``cache_dir``, of every dataset (downloads in progress and
    digest records excluded)."""
    pattern = os.path.join(glob.escape(cache_dir), "*", "shards", "**")
    return [
        p for p in glob.glob(pattern, recursive=True)
        if os.path.isfile(p) and ".tmp-" not in p and not p.endswith(DIGEST)
    ]


def evict(cache_dir: str, limit: int, need: int) -> None:
    """Removes least recently read shards of ``cache_dir`` until ``need`` more bytes fit under
    ``limit`` (a read sets a file's mtime: see :meth:`NodeCache.read`)."""
    files = []
    for path in cached_shards(cache_dir):
        with contextlib.suppress(FileNotFoundError):
            st = os.stat(path)
            files.append((st.st_mtime, st.st_size, path))
    total = sum(size for _, size, _ in files)
    for _, size, path in sorted(files):
        if total + need <= limit:
            break
        for victim in (path, path + DIGEST):
            with contextlib.suppress(FileNotFoundError):
                os.remove(victim)
        total -= size


def cache_key(url: str, fingerprint: str) -> str:
    """The folder of a dataset's entries: its location and its content version together."""
    return hashlib.sha256(f"{str(url).rstrip('/')}\n{fingerprint}".encode()).hexdigest()[:32]


class NodeCache:
    """The cached shards of the dataset at ``url`` with ``manifest`` (validated: its names are
    safe to join), in ``directory``. ``fetch(name, local_path)`` downloads shard ``name``;
    ``stats`` (the source's counters, updated under ``lock``) gets ``cache_reads``,
    ``downloads`` and ``cache_failures``."""

    def __init__(
        self,
        directory: str,
        url: str,
        manifest: dict[str, Any],
        max_bytes: int | None,
        fetch: Callable[[str, str], None],
        stats: dict[str, int],
        lock: threading.Lock,
    ) -> None:
        self.directory, self.url, self.max_bytes = directory, url, max_bytes
        self.shards: dict[str, dict[str, Any]] = manifest.get("shards", {})
        self.root = os.path.join(directory, cache_key(url, str(manifest.get("fingerprint"))))
        self._fetch, self._stats, self._lock = fetch, stats, lock
        self._pool: ThreadPoolExecutor | None = None
        self._started: set[str] = set()
        self._verified: set[str] = set()
        self.off = False

    def path(self, name: str) -> str:
        return os.path.join(self.root, *name.split("/"))

    def _count(self, key: str) -> None:
        with self._lock:
            self._stats[key] += 1

    def _valid(self, path: str, name: str) -> bool:
        """The cheap check: the file has the manifest's size and its stored digest is the
        manifest's sha256 (the download was hashed before it entered the cache)."""
        info = self.shards.get(name, {})
        try:
            with open(path + DIGEST) as f:
                digest = f.read().strip()
            return os.path.getsize(path) == info.get("size") and digest == info.get("sha256")
        except OSError:
            return False

    def read(self, name: str, start: int, end: int) -> bytes | None:
        """Bytes ``start:end`` of shard ``name`` from the cache, or None where it is not there (yet)."""
        path = self.path(name)
        if name not in self._verified:
            if not self._valid(path, name):
                return None
            self._verified.add(name)
        try:
            with open(path, "rb") as f:
                f.seek(start)
                data = f.read(end - start)
            os.utime(path)  # the eviction's "recently read"
        except OSError:  # evicted, by this node's other processes too
            self._verified.discard(name)
            return None
        self._count("cache_reads")
        return data

    def schedule(self, name: str) -> None:
        """Downloads shard ``name`` in the background, once."""
        with self._lock:
            if self.off or name in self._started:
                return
            self._started.add(name)  # for good: a failed download is not retried
            if self._pool is None:
                self._pool = ThreadPoolExecutor(1, thread_name_prefix="shard-cache")
        self._pool.submit(self._download, name)

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
        self._pool = None

    def _download(self, name: str) -> None:
        if self.off:  # queued before the directory refused more
            return
        info = self.shards.get(name, {})
        size, expected = info.get("size"), info.get("sha256")
        if not expected or size is None:
            log.warning("not caching %s of %s: its manifest records no sha256 to verify it by", name, redact(self.url))
            return
        if self.max_bytes is not None and size > self.max_bytes:
            log.warning("not caching %s of %s: %s bytes, over data.cache_max_bytes %s", name, redact(self.url), size, self.max_bytes)
            return
        path = self.path(name)
        tmp = f"{path}.tmp-{uuid.uuid4().hex[:12]}"
        try:
            # One process of the node at a time: the others find the shard there when they get the lock.
            with node_lock(self.directory):
                if self._valid(path, name):
                    return
                if self.max_bytes is not None:
                    evict(self.directory, self.max_bytes, size)
                os.makedirs(os.path.dirname(path), exist_ok=True)
                self._fetch(name, tmp)
                digest = hashlib.sha256()
                with open(tmp, "rb") as f:
                    for block in iter(lambda: f.read(1 << 20), b""):
                        digest.update(block)
                got = os.path.getsize(tmp)
                if got != size or digest.hexdigest() != expected:
                    raise ValueError(
                        f"the download ({got} bytes, sha256 {digest.hexdigest()[:16]}...) is not the shard "
                        f"its manifest records ({size} bytes, sha256 {expected[:16]}...): it changed in "
                        "storage after the ingest"
                    )
                with open(path + DIGEST, "w") as f:  # before the shard: a complete shard has its record
                    f.write(expected)
                os.replace(tmp, path)
            self._count("downloads")
        except Exception as err:  # noqa: BLE001 - the cache is an optimisation; reads go on from the store
            self._count("cache_failures")
            if isinstance(err, OSError) and err.errno in DISK_ERRORS + ACCESS_ERRORS:
                self._turn_off(err)
            else:
                log.warning("could not cache %s of %s in %s: %s", name, redact(self.url), self.directory, redact(err))
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.remove(tmp)

    def _turn_off(self, err: OSError) -> None:
        with self._lock:
            if self.off:
                return
            self.off = True
        if err.errno in ACCESS_ERRORS:
            fix = "make it writable by this user, or set data.cache_dir to a directory that is"
            what = "refuses access"
        else:
            fix = "free space, or set data.cache_max_bytes below the disk's free space"
            what = "cannot take more"
        msg = (
            f"the shard cache {self.directory} {what} ({os.strerror(err.errno)}): caching is off for "
            f"{redact(self.url)} and reads go to the store; {fix}"
        )
        log.warning(msg)
        warnings.warn(msg, RuntimeWarning, stacklevel=2)
