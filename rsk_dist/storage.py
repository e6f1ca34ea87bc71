"""Object storage: fsspec filesystems from URLs, the ingested-dataset format, and a preflight
check that fails fast, before any worker starts, with a message naming the problem and its fix.

URLs: ``s3://bucket/prefix``, ``gs://bucket/prefix``, ``file:///abs/path``, ``memory://name``
or a plain local path.

S3 settings come from the standard AWS sources only, never from a config field, so no saved
config, manifest or checkpoint can carry a secret: credentials from ``AWS_ACCESS_KEY_ID`` /
``AWS_SECRET_ACCESS_KEY`` / ``AWS_SESSION_TOKEN`` or the profile ``AWS_PROFILE`` (botocore's
usual chain: environment, shared credentials/config files, instance roles); the region from
``AWS_DEFAULT_REGION`` (botocore's own) or else ``AWS_REGION`` (which botocore does not read, so
it is passed on); the endpoint of an S3-compatible store (MinIO, Ceph, moto...) from
``AWS_ENDPOINT_URL_S3`` or ``AWS_ENDPOINT_URL``, which botocore >= 1.31 honours itself (and
a profile's ``endpoint_url`` with it); nothing is passed for them.

An ingested dataset at ``URL`` (written by :mod:`rsk_dist.ingest`)::

    URL/shards/shard-00000.bin   encoded images, concatenated as they were in the source
    URL/index.parquet            one row per (split, sample): INDEX_COLUMNS
    URL/_SUCCESS                 JSON manifest, written last: the dataset is complete

Readers and :func:`preflight` accept a dataset only with its ``_SUCCESS`` marker, and check the
index against the sha256 the marker records.

Secrets never appear in what this module raises, logs or returns: messages are built from
fixed text, error codes and the server's message, all passed through :func:`redact`, and
errors are raised ``from None`` so no library exception (which may quote a request) is chained.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import uuid
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # pragma: no cover
    import pyarrow as pa
    from fsspec import AbstractFileSystem

log = logging.getLogger(__name__)

MARKER = "_SUCCESS"
INDEX = "index.parquet"
SHARD_DIR = "shards"
PROGRESS = "_ingest_progress.json"
FORMAT = "rsk_dist-shards"
FORMAT_VERSION = 1

# name -> (pyarrow type test, description)
INDEX_COLUMNS: dict[str, str] = {
    "sample_id": "string",
    "label": "int64",
    "class_name": "string",
    "split": "string",
    "shard": "string",
    "offset": "int64",
    "length": "int64",
}

# Preflight fails in seconds: one attempt, short timeouts.
FAST_CONNECT_TIMEOUT_S = 3
FAST_READ_TIMEOUT_S = 10
# Normal I/O: botocore's standard retry mode, a few attempts.
CONNECT_TIMEOUT_S = 10
READ_TIMEOUT_S = 60

_SECRET_ENV = ("AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN")


class StorageError(ValueError):
    """Storage that cannot be used as configured; the message names the problem and the fix."""


# --------------------------------------------------------------------------- secrets


def redact(text: str) -> str:
    """``text`` with the values of the secret AWS variables and any ``user:password@`` of a
    URL replaced by ``***``."""
    text = str(text)
    for name in _SECRET_ENV:
        value = os.environ.get(name)
        if value and len(value) >= 4:
            text = text.replace(value, "***")
    return re.sub(r"(?P<scheme>[a-zA-Z][a-zA-Z0-9+.-]*://)[^/@\s:]*:[^/@\s]*@", r"\g<scheme>***@", text)


# --------------------------------------------------------------------------- filesystems


def protocol_of(url: str) -> str:
    m = re.match(r"^([a-zA-Z][a-zA-Z0-9+.-]*)://", str(url))
    return m.group(1).lower() if m else "file"


def s3_endpoint() -> tuple[str | None, str | None]:
    """``(endpoint, variable)``: the S3 endpoint the environment sets and the variable that
    set it, or ``(None, None)`` for AWS's own."""
    for name in ("AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL"):
        if os.environ.get(name):
            return os.environ[name], name
    return None, None


def _s3_endpoint_words() -> str:
    endpoint, var = s3_endpoint()
    if endpoint:
        return f"{redact(endpoint)} (set by {var})"
    region = os.environ.get("AWS_DEFAULT_REGION") or os.environ.get("AWS_REGION") or "us-east-1"
    return f"AWS S3 in region {region} (no AWS_ENDPOINT_URL_S3 / AWS_ENDPOINT_URL set)"


def _credential_source() -> str:
    if os.environ.get("AWS_ACCESS_KEY_ID"):
        return "the AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY environment variables"
    if os.environ.get("AWS_PROFILE"):
        return f"the AWS profile {os.environ['AWS_PROFILE']!r} (AWS_PROFILE)"
    return "the default AWS credential chain (~/.aws/credentials, ~/.aws/config, instance role)"


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


def atomic_write(fs: AbstractFileSystem, path: str, data: bytes) -> None:
    """Writes ``data`` to ``path`` so that readers see the old object or the whole new one:
    locally a temporary file in the same folder renamed over the target; on object stores a
    single upload (a PUT, or a multipart upload, appears only when complete)."""
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


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# --------------------------------------------------------------------------- error translation


def _exception_chain(err: BaseException) -> list[BaseException]:
    chain, seen = [], set()
    while err is not None and id(err) not in seen:
        chain.append(err)
        seen.add(id(err))
        err = err.__cause__ or err.__context__
    return chain


def _error_code(err: BaseException) -> str | None:
    for e in _exception_chain(err):
        response = getattr(e, "response", None)
        if isinstance(response, dict) and response.get("Error", {}).get("Code"):
            return str(response["Error"]["Code"])
    return None


def _is_unreachable(err: BaseException) -> bool:
    names = {cls.__name__ for e in _exception_chain(err) for cls in type(e).__mro__}
    return bool(
        names
        & {
            "EndpointConnectionError",
            "ConnectTimeoutError",
            "ConnectionClosedError",
            "ReadTimeoutError",
            "ClientConnectorError",
            "ServerDisconnectedError",
            "ConnectionRefusedError",
            "gaierror",
            "FSTimeoutError",
            "TimeoutError",
        }
    )


def explain_s3_error(err: BaseException, url: str, bucket: str, action: str) -> StorageError:
    """A :class:`StorageError` that names the S3 problem behind ``err`` and its fix."""
    where = _s3_endpoint_words()
    names = {cls.__name__ for e in _exception_chain(err) for cls in type(e).__mro__}
    code = _error_code(err)
    if "NoCredentialsError" in names or "PartialCredentialsError" in names:
        return StorageError(
            f"no AWS credentials for {redact(url)}: set AWS_ACCESS_KEY_ID and "
            "AWS_SECRET_ACCESS_KEY (plus AWS_SESSION_TOKEN for temporary keys), or AWS_PROFILE"
        )
    if code is None and _is_unreachable(err):
        var = s3_endpoint()[1] or "AWS_ENDPOINT_URL"
        return StorageError(
            f"cannot reach the S3 endpoint {where} while trying to {action} ({type(err).__name__}: "
            f"connection refused, name not resolved or timed out). Start the object store or fix "
            f"the address in {var} (AWS_ENDPOINT_URL_S3 takes precedence over AWS_ENDPOINT_URL)."
        )
    if code in ("NoSuchBucket",):
        return StorageError(
            f"bucket {bucket!r} does not exist at {where} (for {redact(url)}): create it, or fix "
            "the bucket name in the URL or the endpoint"
        )
    if code in ("InvalidAccessKeyId", "InvalidClientTokenId", "UnrecognizedClientException"):
        return StorageError(
            f"the store at {where} does not know the access key id from {_credential_source()} "
            f"({code}): fix AWS_ACCESS_KEY_ID / AWS_PROFILE, or check that AWS_ENDPOINT_URL points "
            "at the store these keys belong to"
        )
    if code == "SignatureDoesNotMatch":
        return StorageError(
            f"the secret key from {_credential_source()} does not match its access key id at "
            f"{where} ({code}): fix AWS_SECRET_ACCESS_KEY (or the profile's secret)"
        )
    if code in ("ExpiredToken", "InvalidToken", "TokenRefreshRequired"):
        return StorageError(
            f"the session token from {_credential_source()} is expired or invalid ({code}): "
            "refresh the temporary credentials (AWS_SESSION_TOKEN)"
        )
    if code in ("AccessDenied", "AllAccessDisabled", "403", "Forbidden"):
        return StorageError(
            f"access denied to {action} {redact(url)} at {where} with {_credential_source()} "
            f"({code}): grant these credentials s3:ListBucket, s3:GetObject (and s3:PutObject "
            "to write) on the bucket, or use credentials that have them"
        )
    if code in ("PermanentRedirect", "AuthorizationHeaderMalformed", "IllegalLocationConstraintException"):
        return StorageError(
            f"bucket {bucket!r} is in another region than the one configured ({code}): set "
            "AWS_DEFAULT_REGION to the bucket's region"
        )
    if code in ("404", "NoSuchKey", "NotFound") or isinstance(err, FileNotFoundError):
        return StorageError(f"{redact(url)} not found at {where}: {redact(err)}")
    detail = f"{code}: {redact(err)}" if code else f"{type(err).__name__}: {redact(err)}"
    return StorageError(f"cannot {action} {redact(url)} at {where} ({detail})")


def explain_error(err: BaseException, url: str, action: str) -> StorageError:
    protocol = protocol_of(url)
    if protocol in ("s3", "s3a"):
        bucket = re.sub(r"^[a-zA-Z0-9+.-]+://", "", url).split("/", 1)[0]
        return explain_s3_error(err, url, bucket, action)
    return StorageError(f"cannot {action} {redact(url)} ({type(err).__name__}: {redact(err)})")


# --------------------------------------------------------------------------- the dataset format


@dataclass(frozen=True)
class Dataset:
    """An opened, complete ingested dataset: its filesystem, root path, manifest and index."""

    url: str
    fs: Any
    root: str
    manifest: dict[str, Any]
    index: pa.Table

    def __repr__(self) -> str:  # the fs may hold client settings: keep it out of reprs
        return f"Dataset(url={redact(self.url)!r}, rows={self.index.num_rows})"


def _read_bytes(fs: AbstractFileSystem, path: str, url: str, what: str) -> bytes | None:
    """Bytes of ``path``, ``None`` when it does not exist, a StorageError otherwise."""
    try:
        return fs.cat_file(path)
    except FileNotFoundError:
        return None
    except Exception as err:  # noqa: BLE001 - any backend error becomes a clear StorageError
        if isinstance(err, IsADirectoryError):
            return None
        raise explain_error(err, url, f"read {what} of") from None


def _exists(fs: AbstractFileSystem, path: str, url: str) -> bool:
    try:
        return bool(fs.exists(path))
    except Exception as err:  # noqa: BLE001
        raise explain_error(err, url, "look into") from None


def _missing_dataset(fs: AbstractFileSystem, root: str, url: str) -> StorageError:
    partial = [
        name for name in (PROGRESS, INDEX, SHARD_DIR) if _exists(fs, join(root, name), url)
    ]
    if partial:
        return StorageError(
            f"incomplete ingest at {redact(url)}: it has {', '.join(partial)} but no {MARKER} "
            "marker, so an ingest was interrupted (or is still running). Re-run the same ingest "
            "(rsk_dist.ingest.ingest with the same source and layout) to complete it."
        )
    return StorageError(
        f"no ingested dataset at {redact(url)} (no {MARKER} marker or {INDEX}): ingest one first "
        "with rsk_dist.ingest.ingest(source, url, layout), or fix the URL"
    )


def validate_index(table: pa.Table, url: str) -> None:
    """Raises a StorageError naming every missing or mistyped index column and bad value."""
    import pyarrow as pa
    import pyarrow.compute as pc

    problems = []
    for name, kind in INDEX_COLUMNS.items():
        if name not in table.column_names:
            problems.append(f"missing column {name!r} ({kind})")
            continue
        t = table.schema.field(name).type
        ok = (
            (pa.types.is_string(t) or pa.types.is_large_string(t))
            if kind == "string"
            else pa.types.is_int64(t)
        )
        if not ok:
            problems.append(f"column {name!r} is {t}, expected {kind}")
    if problems:
        raise StorageError(
            f"malformed index {redact(url)}/{INDEX}: {'; '.join(problems)} (expected columns "
            f"{', '.join(f'{k}: {v}' for k, v in INDEX_COLUMNS.items())}). Re-run the ingest "
            "with overwrite=True."
        )
    for name in INDEX_COLUMNS:
        if table.column(name).null_count:
            problems.append(f"column {name!r} has {table.column(name).null_count} nulls")
    if table.num_rows:
        if pc.min(table.column("offset")).as_py() < 0:
            problems.append("negative offsets")
        if pc.min(table.column("length")).as_py() <= 0:
            problems.append("non-positive lengths")
    else:
        problems.append("no rows")
    if problems:
        raise StorageError(
            f"malformed index {redact(url)}/{INDEX}: {'; '.join(problems)}. Re-run the ingest "
            "with overwrite=True."
        )


def open_dataset(url: str, fast: bool = False, fs_root: tuple[Any, str] | None = None) -> Dataset:
    """The complete dataset at ``url``: requires the marker, a well-formed index matching the
    marker's sha256. Raises StorageError otherwise. ``fs_root``: ``filesystem(url)`` to reuse."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    fs, root = fs_root or filesystem(url, fast=fast)
    raw_marker = _read_bytes(fs, join(root, MARKER), url, "the marker")
    if raw_marker is None:
        raise _missing_dataset(fs, root, url)
    try:
        manifest = json.loads(raw_marker)
        if manifest.get("format") != FORMAT:
            raise ValueError(f"format {manifest.get('format')!r}")
        if int(manifest.get("version", 0)) > FORMAT_VERSION:
            raise ValueError(f"version {manifest.get('version')} is newer than this reader's {FORMAT_VERSION}")
    except (ValueError, AttributeError, TypeError) as err:
        raise StorageError(
            f"{redact(url)}/{MARKER} is not an rsk_dist dataset manifest ({err}): re-run the "
            "ingest with overwrite=True"
        ) from None
    raw_index = _read_bytes(fs, join(root, INDEX), url, "the index")
    if raw_index is None:
        raise StorageError(
            f"{redact(url)} has a {MARKER} marker but no {INDEX}: the dataset is damaged; re-run "
            "the ingest with overwrite=True"
        )
    try:
        table = pq.read_table(pa.BufferReader(raw_index))
    except Exception as err:  # noqa: BLE001 - pyarrow raises several types for a bad file
        raise StorageError(
            f"malformed index {redact(url)}/{INDEX}: not a readable parquet file ({err}). Re-run "
            "the ingest with overwrite=True."
        ) from None
    validate_index(table, url)
    expected = manifest.get("index", {}).get("sha256")
    if expected and sha256(raw_index) != expected:
        raise StorageError(
            f"{redact(url)}/{INDEX} does not match the sha256 its {MARKER} manifest records (it "
            "was changed after the ingest, or another ingest is writing there): re-run the ingest"
        )
    return Dataset(url=str(url), fs=fs, root=root, manifest=manifest, index=table)


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
) -> dict[str, Any] | None:
    """Checks, in seconds and before any worker starts, that ``url`` can be used.

    Always: the storage answers (S3: the endpoint is reachable, the bucket exists, the
    credentials are accepted and may list it). ``writable``: a probe object can be written
    and deleted. ``need_index``: a complete ingested dataset is there (marker, a well-formed
    index, ``split`` among its splits, and every shard it names present and long enough).
    Returns the dataset's manifest (``need_index``) or None; raises :class:`StorageError`.
    """
    fs, root = filesystem(url, fast=True)
    if protocol_of(url) in ("s3", "s3a"):
        _check_s3_bucket(fs, root, url, writable)
    elif not is_local(fs) and protocol_of(url) != "memory":
        _exists(fs, root, url)  # reachability and credentials of other object stores
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
    import pyarrow as pa
    import pyarrow.compute as pc

    per_shard = (
        pa.table({"shard": table.column("shard"), "end": pc.add(table.column("offset"), table.column("length"))})
        .group_by("shard")
        .aggregate([("end", "max")])
    )
    ends = dict(zip(per_shard.column("shard").to_pylist(), per_shard.column("end_max").to_pylist()))
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
    return dataset.manifest
