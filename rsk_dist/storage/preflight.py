"""Preflight: checks, in seconds and before any worker starts, that a storage URL can be used,
failing with a message naming the problem and its fix."""
from __future__ import annotations

import os
import uuid
from typing import TYPE_CHECKING

from rsk_dist.storage.credentials import protocol_of, redact
from rsk_dist.storage.dataset import SHARD_DIR, Dataset, exists, open_dataset, shard_ends
from rsk_dist.storage.errors import StorageError, explain_error, explain_s3_error
from rsk_dist.storage.filesystem import filesystem, is_local, join

if TYPE_CHECKING:  # pragma: no cover
    from fsspec import AbstractFileSystem


def _check_s3_bucket(fs: AbstractFileSystem, root: str, url: str, writable: bool) -> None:
    bucket, _, prefix = root.partition("/")
    try:
        fs.call_s3("list_objects_v2", Bucket=bucket, Prefix=prefix, MaxKeys=1)
    except Exception as err:  # noqa: BLE001
        raise explain_s3_error(err, url, bucket, "list") from None
    if writable:
        probe = join(root, f"_preflight-{uuid.uuid4().hex[:12]}")
        try:
            fs.pipe_file(probe, b"")
            fs.rm_file(probe)
        except Exception as err:  # noqa: BLE001
            raise explain_s3_error(err, url, bucket, "write to") from None


def preflight(
    url: str, need_index: bool, split: str | None = None, writable: bool = False
) -> Dataset | None:
    """Checks, in seconds and before any worker starts, that ``url`` can be used.

    Always: the storage answers (S3: the endpoint is reachable, the bucket exists, the
    credentials are accepted and may list it). ``writable``: a probe object can be written
    and deleted. ``need_index``: a complete ingested dataset is there (marker, a well-formed
    index, ``split`` among its splits, and every shard it names present and long enough).
    Returns the opened dataset (``need_index``: its manifest and index, read once) or None;
    raises :class:`StorageError`.
    """
    fs, root = filesystem(url, fast=True)
    if protocol_of(url) in ("s3", "s3a"):
        _check_s3_bucket(fs, root, url, writable)
    elif not is_local(fs) and protocol_of(url) != "memory":
        exists(fs, root, url)  # reachability and credentials of other object stores
    if writable and protocol_of(url) not in ("s3", "s3a"):
        probe = join(root, f"_preflight-{uuid.uuid4().hex[:12]}")
        try:
            if is_local(fs):
                os.makedirs(root, exist_ok=True)
            fs.pipe_file(probe, b"")
            fs.rm_file(probe)
        except Exception as err:  # noqa: BLE001
            raise explain_error(err, url, "write to") from None
    if not need_index:
        return None

    dataset = open_dataset(url, fast=True, fs_root=(fs, root))
    table = dataset.index
    splits = sorted(set(table.column("split").to_pylist()))
    if split is not None and split not in splits:
        raise StorageError(
            f"split {split!r} is not in the dataset at {redact(url)} (it has: {', '.join(splits)}): "
            "fix data.*.split"
        )
    try:
        listing = fs.find(join(root, SHARD_DIR), detail=True)
    except Exception as err:  # noqa: BLE001
        raise explain_error(err, url, "list the shards of") from None
    prefix = root.rstrip("/") + "/"
    sizes = {
        (name[len(prefix):] if name.startswith(prefix) else name): int(info.get("size") or 0)
        for name, info in listing.items()
    }
    ends = shard_ends(table)
    missing = sorted(s for s in ends if s not in sizes)
    short = sorted(s for s in ends if s in sizes and sizes[s] < ends[s])
    if missing or short:
        parts = []
        if missing:
            more = f" (+{len(missing) - 5} more)" if len(missing) > 5 else ""
            parts.append(f"missing shard objects {', '.join(missing[:5])}{more}")
        if short:
            parts.append(
                "shards shorter than the index says: "
                + ", ".join(f"{s} ({sizes[s]} < {ends[s]} bytes)" for s in short[:5])
            )
        raise StorageError(
            f"malformed dataset at {redact(url)}: the index names {'; '.join(parts)}. The dataset "
            "is damaged: re-run the ingest with overwrite=True."
        )
    return dataset
