"""Object storage: credentials and URLs, fsspec filesystems, error translation, the
ingested-dataset format and a preflight check that fails fast, before any worker starts, with a
message naming the problem and its fix. One module per concept; this package exposes their
public names."""
from rsk_dist.storage.credentials import protocol_of, redact, refuse_credentials, s3_endpoint
from rsk_dist.storage.dataset import (
    FINGERPRINT,
    FORMAT,
    FORMAT_VERSION,
    INDEX,
    INDEX_COLUMNS,
    MARKER,
    PROGRESS,
    SHARD_DIR,
    SHARD_NAME,
    SPLIT_NAME,
    VERSION_DIR,
    Dataset,
    exists,
    index_path,
    open_dataset,
    sha256,
    validate_index,
    validate_manifest,
    version_dir,
)
from rsk_dist.storage.errors import StorageError, explain_error, explain_s3_error
from rsk_dist.storage.filesystem import atomic_write, filesystem, is_local, join, storage_options
from rsk_dist.storage.preflight import preflight

__all__ = [
    "FINGERPRINT", "FORMAT", "FORMAT_VERSION", "INDEX", "INDEX_COLUMNS", "MARKER", "PROGRESS", "SHARD_DIR",
    "SHARD_NAME", "SPLIT_NAME", "VERSION_DIR", "Dataset", "StorageError", "atomic_write", "exists", "index_path", "explain_error", "explain_s3_error", "filesystem",
    "is_local", "join", "open_dataset", "preflight", "protocol_of", "redact", "refuse_credentials", "s3_endpoint",
    "sha256", "storage_options", "validate_index", "validate_manifest", "version_dir",
]
