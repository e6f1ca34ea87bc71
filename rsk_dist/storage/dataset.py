"""The ingested-dataset format. A dataset at ``URL`` (written by :mod:`rsk_dist.ingest`)::

    URL/shards/<fingerprint[:16]>/shard-00000.bin
                                 encoded images, concatenated as they were in the source
    URL/shards/<fingerprint[:16]>/index.parquet
                                 one row per (split, sample): INDEX_COLUMNS
    URL/_SUCCESS                 JSON manifest, written last: names the version (fingerprint),
                                 its index (path, size, sha256) and shards (sizes, sha256)

Each content version lives whole in its own folder (shards and index), so an ingest writes
nothing an existing version uses, and switching the ``_SUCCESS`` marker is the single commit
point: an overwrite cut off anywhere before it leaves the old version readable. Datasets of
format version 1 (the index at ``URL/index.parquet``; shards in a version folder or directly
under ``shards/``) are still read.

Readers and :func:`rsk_dist.storage.preflight` accept a dataset only with its ``_SUCCESS``
marker, and check the index against the sha256 the marker records. Storage may be written by
others: every name and fingerprint read from the index or the manifest must have the exact shape
an ingest writes (:data:`SHARD_NAME`, :data:`FINGERPRINT`...) before it is joined into a path,
and anything else is refused with a :class:`StorageError`. The index is bounded before it is
materialised: its size against the manifest's and :data:`MAX_INDEX_FILE_BYTES`, then its
Parquet footer (rows, row groups' sizes) against the manifest's sample count,
:data:`MAX_INDEX_ROWS` and :data:`MAX_INDEX_BYTES`, so a small crafted file cannot expand into
gigabytes in every reader.
"""
from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from rsk_dist.storage.credentials import redact
from rsk_dist.storage.errors import StorageError, explain_error
from rsk_dist.storage.filesystem import filesystem, join

if TYPE_CHECKING:  # pragma: no cover
    import pyarrow as pa
    from fsspec import AbstractFileSystem

MARKER = "_SUCCESS"
INDEX = "index.parquet"
SHARD_DIR = "shards"
PROGRESS = "_ingest_progress.json"
FORMAT = "rsk_dist-shards"
FORMAT_VERSION = 2  # 2: the index inside its version folder; 1 (still read): at the root

# Names read from storage are joined into object paths and local cache paths, and storage may
# be written by others: anything but these exact shapes is refused before any join.
SHARD_NAME = re.compile(rf"{SHARD_DIR}/(?:[0-9a-f]{{16}}/)?shard-[0-9]{{5,9}}\.bin")
VERSION_DIR = re.compile(rf"{SHARD_DIR}(?:/[0-9a-f]{{16}})?")  # where one ingest's shards live
FINGERPRINT = re.compile(r"[0-9a-f]{64}")
SPLIT_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
MAX_OFFSET = 2**48  # 256 TiB into a shard: far beyond any shard, far from int64 overflow
MAX_LENGTH = 2**31  # 2 GiB for one encoded image
# Bounds on an index, checked before it is read whole. 8M rows is twice the largest retrieval
# benchmark (Google Landmarks v2, 4.1M images), at about 1 GiB in memory; a crafted 272 KB file
# claiming 10M constant rows took 1.6 GB to check and 3.8 GB in every worker.
MAX_INDEX_ROWS = 2**23
MAX_INDEX_BYTES = 2**30  # uncompressed, the row groups' total
MAX_INDEX_FILE_BYTES = 2**28

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


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def version_dir(fingerprint: str) -> str:
    """The folder of the shards an ingest with ``fingerprint`` writes: each content version has
    its own, so a re-ingest never changes bytes a running reader is reading."""
    return f"{SHARD_DIR}/{fingerprint[:16]}"


def index_path(fingerprint: str) -> str:
    """Where the index of the version with ``fingerprint`` lives (format version 2)."""
    return f"{version_dir(fingerprint)}/{INDEX}"


def _bad_names(values: list[Any], pattern: re.Pattern[str], limit: int = 3) -> list[str]:
    bad = [v for v in values if not isinstance(v, str) or not pattern.fullmatch(v)]
    return [repr(v)[:80] for v in bad[:limit]] + ([f"(+{len(bad) - limit} more)"] if len(bad) > limit else [])


def validate_manifest(manifest: Any, url: str) -> dict[str, Any]:
    """``manifest`` (the parsed ``_SUCCESS`` JSON) if it is a well-formed dataset manifest whose
    fingerprint, shard names and version folders have the exact shapes the ingest writes;
    raises a StorageError naming every problem otherwise."""
    if not isinstance(manifest, dict):
        problems = [f"a JSON {type(manifest).__name__}, not an object"]
    else:
        problems = []
        if manifest.get("format") != FORMAT:
            problems.append(f"format {str(manifest.get('format'))[:40]!r}, expected {FORMAT!r}")
        version = manifest.get("version", 0)
        if type(version) is not int or version < 0:
            problems.append(f"version {str(version)[:20]!r} is not a non-negative integer")
        elif version > FORMAT_VERSION:
            problems.append(f"version {version} is newer than this reader's {FORMAT_VERSION}")
        fingerprint = manifest.get("fingerprint")
        if not isinstance(fingerprint, str) or not FINGERPRINT.fullmatch(fingerprint):
            problems.append(f"fingerprint {str(fingerprint)[:80]!r} is not 64 lowercase hex digits")
        shards = manifest.get("shards", {})
        if not isinstance(shards, dict):
            problems.append("'shards' is not an object")
        else:
            if bad := _bad_names(list(shards), SHARD_NAME):
                problems.append(f"shard names {', '.join(bad)} are not {SHARD_NAME.pattern}")
            if any(not isinstance(v, dict) or type(v.get("size", 0)) is not int or v.get("size", 0) < 0 for v in shards.values()):
                problems.append("a shard entry is not an object with a non-negative integer size")
        index = manifest.get("index", {})
        if not isinstance(index, dict) or not isinstance(index.get("sha256", ""), str):
            problems.append("'index' is not an object with a sha256 string")
        elif type(index.get("size", 0)) is not int or index.get("size", 0) < 0:
            problems.append(f"index size {str(index.get('size'))[:20]!r} is not a non-negative integer")
        elif isinstance(fingerprint, str) and FINGERPRINT.fullmatch(fingerprint):
            # The index is found through this path: it must be the version's own (or the root's, v1).
            allowed = index_path(fingerprint) if version == FORMAT_VERSION else INDEX
            if index.get("path", INDEX) != allowed:
                problems.append(f"index path {str(index.get('path'))[:80]!r} is not {allowed!r}")
        samples = manifest.get("num_samples", 0)
        if type(samples) is not int or samples < 0:
            problems.append(f"num_samples {str(samples)[:20]!r} is not a non-negative integer")
        versions = manifest.get("versions", [])
        if not isinstance(versions, list):
            problems.append("'versions' is not a list")
        elif bad := _bad_names(versions, VERSION_DIR):
            problems.append(f"versions {', '.join(bad)} are not {VERSION_DIR.pattern}")
    if problems:
        raise StorageError(
            f"{redact(url)}/{MARKER} is not a valid rsk_dist dataset manifest: {'; '.join(problems)}. "
            "Storage may have been written by something else: re-run the ingest with overwrite=True"
        )
    return manifest


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


def exists(fs: AbstractFileSystem, path: str, url: str) -> bool:
    try:
        return bool(fs.exists(path))
    except Exception as err:  # noqa: BLE001
        raise explain_error(err, url, "look into") from None


def _missing_dataset(fs: AbstractFileSystem, root: str, url: str) -> StorageError:
    partial = [
        name for name in (PROGRESS, INDEX, SHARD_DIR) if exists(fs, join(root, name), url)
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
    """Raises a StorageError naming every missing or mistyped index column and bad value;
    ``url``: the index's own location."""
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
            f"malformed index {redact(url)}: {'; '.join(problems)} (expected columns "
            f"{', '.join(f'{k}: {v}' for k, v in INDEX_COLUMNS.items())}). Re-run the ingest "
            "with overwrite=True."
        )
    for name in INDEX_COLUMNS:
        if table.column(name).null_count:
            problems.append(f"column {name!r} has {table.column(name).null_count} nulls")
    if problems:
        raise StorageError(
            f"malformed index {redact(url)}: {'; '.join(problems)}. Re-run the ingest "
            "with overwrite=True."
        )
    if table.num_rows:
        offset, length = pc.min_max(table.column("offset")).as_py(), pc.min_max(table.column("length")).as_py()
        if offset["min"] < 0 or offset["max"] > MAX_OFFSET:
            problems.append(f"offsets outside 0..{MAX_OFFSET}")
        if length["min"] <= 0 or length["max"] > MAX_LENGTH:
            problems.append(f"lengths outside 1..{MAX_LENGTH}")
        if pc.min(table.column("label")).as_py() < 0:
            problems.append("negative labels")
        if bad := _bad_names(pc.unique(table.column("shard")).to_pylist(), SHARD_NAME):
            problems.append(f"shard names {', '.join(bad)} are not {SHARD_NAME.pattern}")
        if bad := _bad_names(pc.unique(table.column("split")).to_pylist(), SPLIT_NAME):
            problems.append(f"split names {', '.join(bad)} are not {SPLIT_NAME.pattern}")
    else:
        problems.append("no rows")
    if problems:
        raise StorageError(
            f"malformed index {redact(url)}: {'; '.join(problems)}. Re-run the ingest "
            "with overwrite=True."
        )


def shard_ends(table: pa.Table) -> dict[str, int]:
    """Each shard the index names -> the end of its last sample (offset + length) in bytes."""
    import pyarrow as pa
    import pyarrow.compute as pc

    per_shard = (
        pa.table({"shard": table.column("shard"), "end": pc.add(table.column("offset"), table.column("length"))})
        .group_by("shard")
        .aggregate([("end", "max")])
    )
    return dict(zip(per_shard.column("shard").to_pylist(), per_shard.column("end_max").to_pylist()))


def _check_against_manifest(table: pa.Table, manifest: dict[str, Any], url: str) -> None:
    """Every shard the index names is one the manifest lists, and no sample ends past its
    shard's recorded size (so no read asks for more bytes than a shard holds)."""
    sizes = {name: info.get("size") for name, info in manifest.get("shards", {}).items()}
    if not sizes:
        return  # a manifest without shard sizes (written by hand, or by an early ingest)
    ends = shard_ends(table)
    unknown = sorted(s for s in ends if s not in sizes)
    beyond = sorted(s for s in ends if s in sizes and isinstance(sizes[s], int) and ends[s] > sizes[s])
    if unknown or beyond:
        parts = [f"shards not in the manifest: {', '.join(unknown[:3])}"] if unknown else []
        parts += [f"samples past the end of {s} ({ends[s]} > {sizes[s]} bytes)" for s in beyond[:3]]
        raise StorageError(
            f"malformed index {redact(url)}: {'; '.join(parts)}. Re-run the ingest with "
            "overwrite=True."
        )


def _index_url(url: str, manifest: dict[str, Any]) -> str:
    return f"{url.rstrip('/')}/{manifest.get('index', {}).get('path', INDEX)}"


def _read_index_bytes(fs: AbstractFileSystem, root: str, url: str, manifest: dict[str, Any]) -> bytes:
    """The index file named by the (validated) manifest, read no further than its recorded size
    and :data:`MAX_INDEX_FILE_BYTES` allow."""
    where = _index_url(url, manifest)
    recorded = manifest.get("index", {}).get("size")
    limit = MAX_INDEX_FILE_BYTES if recorded is None else min(recorded, MAX_INDEX_FILE_BYTES)
    try:
        raw = fs.cat_file(join(root, manifest.get("index", {}).get("path", INDEX)), start=0, end=limit + 1)
    except (FileNotFoundError, IsADirectoryError):
        raise StorageError(
            f"{redact(url)} has a {MARKER} marker but no index at {redact(where)}: the dataset is damaged; "
            "re-run the ingest with overwrite=True"
        ) from None
    except Exception as err:  # noqa: BLE001 - any backend error becomes a clear StorageError
        raise explain_error(err, url, "read the index of") from None
    if len(raw) > limit:
        what = f"the {recorded} bytes its {MARKER} manifest records" if recorded is not None and recorded <= MAX_INDEX_FILE_BYTES else f"{MAX_INDEX_FILE_BYTES} bytes, the most an index may have"
        raise StorageError(
            f"index {redact(where)} is larger than {what}: it was changed after the ingest, or was "
            "not written by one; re-run the ingest with overwrite=True"
        )
    return raw


def _check_footer(raw: bytes, manifest: dict[str, Any], where: str) -> None:
    """The index's Parquet footer against the manifest's sample count and the absolute bounds,
    before any row is decoded."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        meta = pq.ParquetFile(pa.BufferReader(raw)).metadata
    except Exception as err:  # noqa: BLE001 - pyarrow raises several types for a bad file
        raise StorageError(
            f"malformed index {redact(where)}: not a readable parquet file ({str(err)[:200]}). Re-run "
            "the ingest with overwrite=True."
        ) from None
    groups = [meta.row_group(i) for i in range(meta.num_row_groups)]
    rows, size = meta.num_rows, sum(g.total_byte_size for g in groups)
    problems = []
    expected = manifest.get("num_samples")
    if expected is not None and rows != expected:
        problems.append(f"{rows} rows where its {MARKER} manifest records {expected} samples")
    if rows > MAX_INDEX_ROWS:
        problems.append(f"{rows} rows, over the {MAX_INDEX_ROWS} an index may have")
    if size > MAX_INDEX_BYTES or any(g.total_byte_size < 0 or g.num_rows < 0 for g in groups):
        problems.append(f"{size} bytes uncompressed, over the {MAX_INDEX_BYTES} an index may have")
    if sum(g.num_rows for g in groups) != rows:
        problems.append("row groups that do not add up to its row count")
    if problems:
        raise StorageError(
            f"index {redact(where)} refused before reading it: {'; '.join(problems)}. It was not written "
            "by this dataset's ingest: re-run the ingest with overwrite=True"
        )


def open_dataset(url: str, fast: bool = False, fs_root: tuple[Any, str] | None = None) -> Dataset:
    """The complete dataset at ``url``: requires the marker, a well-formed index matching the
    marker's sha256 and within the bounds (see the module's docstring). Raises StorageError
    otherwise. ``fs_root``: ``filesystem(url)`` to reuse."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    fs, root = fs_root or filesystem(url, fast=fast)
    raw_marker = _read_bytes(fs, join(root, MARKER), url, "the marker")
    if raw_marker is None:
        raise _missing_dataset(fs, root, url)
    try:
        parsed = json.loads(raw_marker)
    except (ValueError, RecursionError) as err:  # UnicodeDecodeError is a ValueError
        raise StorageError(
            f"{redact(url)}/{MARKER} is not an rsk_dist dataset manifest (not JSON: {str(err)[:200]}): "
            "re-run the ingest with overwrite=True"
        ) from None
    manifest = validate_manifest(parsed, url)
    where = _index_url(url, manifest)
    raw_index = _read_index_bytes(fs, root, url, manifest)
    expected = manifest.get("index", {}).get("sha256")
    if expected and sha256(raw_index) != expected:
        raise StorageError(
            f"{redact(where)} does not match the sha256 its {MARKER} manifest records (it was changed "
            "after the ingest, or was not written by it): re-run the ingest with overwrite=True"
        )
    _check_footer(raw_index, manifest, where)
    try:
        table = pq.read_table(pa.BufferReader(raw_index))
    except Exception as err:  # noqa: BLE001 - pyarrow raises several types for a bad file
        raise StorageError(
            f"malformed index {redact(where)}: not a readable parquet file ({str(err)[:200]}). Re-run "
            "the ingest with overwrite=True."
        ) from None
    validate_index(table, where)
    _check_against_manifest(table, manifest, where)
    return Dataset(url=str(url), fs=fs, root=root, manifest=manifest, index=table)
