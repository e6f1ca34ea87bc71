"""fsspec filesystems from URLs: ``s3://bucket/prefix``, ``gs://bucket/prefix``,
``file:///abs/path``, ``memory://name`` or a plain local path; and atomic writes.
"""
from __future__ import annotations

import os
import uuid
from typing import TYPE_CHECKING, Any

from rsk_dist.storage.credentials import protocol_of, redact, s3_endpoint
from rsk_dist.storage.errors import StorageError, explain_error

if TYPE_CHECKING:  # pragma: no cover
    from fsspec import AbstractFileSystem

# Preflight fails in seconds: one attempt, short timeouts.
FAST_CONNECT_TIMEOUT_S = 3
FAST_READ_TIMEOUT_S = 10
# Normal I/O: botocore's standard retry mode, a few attempts.
CONNECT_TIMEOUT_S = 10
READ_TIMEOUT_S = 60


def storage_options(url: str, fast: bool = False, pool: int | None = None) -> dict[str, Any]:
    """fsspec options for ``url``: for S3 the timeouts/retries, the region from ``AWS_REGION``
    (no credentials: botocore reads them itself) and, with ``pool``, a connection pool of that
    many connections (for as many concurrent requests)."""
    protocol = protocol_of(url)
    if protocol in ("s3", "s3a"):
        config: dict[str, Any] = {
            "connect_timeout": FAST_CONNECT_TIMEOUT_S if fast else CONNECT_TIMEOUT_S,
            "read_timeout": FAST_READ_TIMEOUT_S if fast else READ_TIMEOUT_S,
            "retries": {"max_attempts": 1 if fast else 4, "mode": "standard"},
        }
        if pool is not None:
            config["max_pool_connections"] = pool
        client: dict[str, Any] = {}
        if not os.environ.get("AWS_DEFAULT_REGION") and os.environ.get("AWS_REGION"):
            client["region_name"] = os.environ["AWS_REGION"]
        return {"config_kwargs": config, "client_kwargs": client, "skip_instance_cache": True}
    if protocol in ("gs", "gcs"):
        return {"skip_instance_cache": True}
    return {}


def filesystem(url: str, fast: bool = False, pool: int | None = None) -> tuple[AbstractFileSystem, str]:
    """``(fs, path)`` for any fsspec URL or local path; ``fast`` gives S3 one attempt and short
    timeouts (for checks that must fail in seconds); ``pool``: see :func:`storage_options`."""
    import fsspec

    url = str(url)
    try:
        if protocol_of(url) in ("s3", "s3a"):
            s3_endpoint()  # refuses an endpoint variable that carries credentials
        fs, path = fsspec.core.url_to_fs(url, **storage_options(url, fast, pool))
    except ImportError as err:
        raise StorageError(
            f"no filesystem for {redact(url)!r}: {redact(err)} (install the fsspec backend, "
            "e.g. s3fs for s3://, gcsfs for gs://)"
        ) from None
    except ValueError as err:
        raise StorageError(f"cannot use storage URL {redact(url)!r}: {redact(err)}") from None
    if protocol_of(url) in ("s3", "s3a"):
        fs.retries = 1 if fast else 3  # s3fs's own retry loop, on top of botocore's
    return fs, path.rstrip("/") if path not in ("/", "") else path


def join(root: str, *parts: str) -> str:
    return "/".join([root.rstrip("/"), *[p.strip("/") for p in parts]])


def is_local(fs: AbstractFileSystem) -> bool:
    protocol = fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]
    return protocol in ("file", "local")


def url_of(fs: AbstractFileSystem, path: str) -> str:
    """``path`` of ``fs`` as a URL (for messages: names the store, never holds credentials)."""
    protocol = fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]
    return path if protocol in ("file", "local") else f"{protocol}://{path}"


def atomic_write(fs: AbstractFileSystem, path: str, data: bytes, url: str | None = None) -> None:
    """Writes ``data`` to ``path`` so that readers see the old object or the whole new one:
    locally a temporary file in the same folder renamed over the target; on object stores a
    single upload (a PUT, or a multipart upload, appears only when complete). Any failure is a
    :class:`StorageError` naming ``url`` (default: the path's own URL) and the fix."""
    try:
        if is_local(fs):
            parent = os.path.dirname(path)
            os.makedirs(parent or ".", exist_ok=True)
            tmp = os.path.join(parent, f".{os.path.basename(path)}.tmp-{uuid.uuid4().hex[:12]}")
            try:
                with open(tmp, "wb") as f:
                    f.write(data)
                    f.flush()
                    os.fsync(f.fileno())
                os.replace(tmp, path)
            finally:
                if os.path.exists(tmp):
                    os.remove(tmp)
        else:
            fs.pipe_file(path, data)
    except Exception as err:  # noqa: BLE001 - every backend error becomes a clear StorageError
        raise explain_error(err, url or url_of(fs, path), "write to") from None
