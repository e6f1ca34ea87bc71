"""Ingest an image dataset into large shard objects plus a byte-offset index (spec §5).

``ingest(source, target_url, layout)`` reads the images of a standard benchmark layout (from a
local folder, an image-folder zip, or any fsspec URL) and writes, at ``target_url``::

    shards/<fingerprint[:16]>/shard-00000.bin
                             the images' encoded bytes (as in the source, not re-encoded),
                             concatenated; about ``shard_bytes`` each
    shards/<fingerprint[:16]>/index.parquet
                             sample_id str, label int64, class_name str, split str,
                             shard str (relative to the target), offset int64, length int64
    _SUCCESS                 JSON manifest (fingerprint, the index's path, size and sha256,
                             shard sizes and sha256, counts), written last

Marker protocol: each content version lives whole in its own folder, named by the fingerprint:
shards first, then the version's index, then the ``_SUCCESS`` marker, which names the version
and its index's sha256. Switching the marker is the single commit point: readers and
:func:`rsk_dist.storage.preflight` accept a dataset only through its marker, so an ingest
interrupted anywhere (killed, or a store that fails the marker's write) is never taken for a
complete one, and an interrupted ``overwrite=True`` leaves the old version readable as it was.
While shards are written, ``_ingest_progress.json`` records the ones done (with the
fingerprint); a re-run of the same ingest skips those whose object is there with the recorded
size and writes the rest. A re-run over a complete ingest with the same fingerprint writes
nothing. A complete ingest of *different* content is replaced only with ``overwrite=True``,
which also rewrites a damaged one of the same content. Every write failure is a
:class:`StorageError` naming the object and the fix.

Versions: ``overwrite=True`` writes the new version beside the old one; a job that opened the
old version keeps reading its unchanged shards. The marker's ``versions`` lists the version
folders newest first; :func:`gc_dataset` (``rsk-dist gc-dataset URL --keep-last N``) deletes the
older ones once no job still reads them. Nothing is deleted otherwise: there is no grace-period
deletion. Datasets written before the index moved into its version folder (format version 1:
``index.parquet`` at the root, shards in a version folder or directly under ``shards/``) stay
readable; a re-ingest over them leaves their files for :func:`gc_dataset`.

The fingerprint is the sha256 of the layout, ``shard_bytes`` and every index row with its
source file's size and version token (a local file's mtime, an object's ETag, a zip member's
CRC-32), so it changes when the source does, without reading the images.
"""
from __future__ import annotations

import io
import json
import logging
import posixpath
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from rsk_dist.ingest.layouts import LAYOUT_FUNCS, LAYOUTS, SPLIT_ORDER, IngestError, Sample, Tree, open_tree
from rsk_dist.storage import (
    FINGERPRINT,
    FORMAT,
    FORMAT_VERSION,
    INDEX,
    MARKER,
    PROGRESS,
    SHARD_DIR,
    SPLIT_NAME,
    StorageError,
    atomic_write,
    exists,
    explain_error,
    filesystem,
    index_path,
    is_local,
    join,
    open_dataset,
    redact,
    sha256,
    validate_manifest,
    version_dir,
)

log = logging.getLogger(__name__)

MAX_VERSIONS = 32  # the manifest's history of shard folders; older ones gc removes anyway


@dataclass
class IngestResult:
    url: str
    fingerprint: str
    num_samples: int  # index rows
    num_images: int  # distinct images stored
    num_classes: int
    num_shards: int
    shards_written: int  # 0 on a re-run over a complete ingest
    skipped: bool  # the target already held this ingest, nothing was written
    splits: dict[str, int] = field(default_factory=dict)


# --------------------------------------------------------------------------- planning


@dataclass
class _Plan:
    rows: list[tuple[str, int, str, str, str]]  # sample_id, label, class_name, split, src
    shards: list[tuple[str, list[tuple[str, int, int]]]]  # name, [(src, offset, length)]
    where: dict[str, tuple[str, int, int]]  # src -> (shard, offset, length)
    fingerprint: str
    num_classes: int


def _plan(tree: Tree, samples: list[Sample], layout: str, shard_bytes: int) -> _Plan:
    if not samples:
        raise IngestError(f"{layout}: no images found in {tree.name}")
    missing = sorted({s.src for s in samples if s.src not in tree.files})
    if missing:
        more = f" (+{len(missing) - 5} more)" if len(missing) > 5 else ""
        raise IngestError(
            f"{layout}: {len(missing)} images named by the layout's files are missing from "
            f"{tree.name}: {', '.join(missing[:5])}{more}"
        )
    keys = sorted({s.class_key for s in samples})
    label_of = {k: i for i, k in enumerate(keys)}
    names: dict[Any, str] = {}
    for s in samples:
        if names.setdefault(s.class_key, s.class_name) != s.class_name:
            raise IngestError(f"{layout}: class {s.class_key!r} has two names, {names[s.class_key]!r} and {s.class_name!r}")
    seen = set()
    for s in samples:
        if (s.split, s.sample_id) in seen:
            raise IngestError(f"{layout}: sample {s.sample_id!r} is listed twice in split {s.split!r}")
        seen.add((s.split, s.sample_id))
    ordered = sorted(
        samples,
        key=lambda s: (SPLIT_ORDER.get(s.split, 9), s.split, label_of[s.class_key], posixpath.basename(s.src), s.sample_id),
    )
    bad_splits = sorted({s.split for s in samples if not SPLIT_NAME.fullmatch(s.split)})
    if bad_splits:
        raise IngestError(f"{layout}: split names {bad_splits[:3]} are not {SPLIT_NAME.pattern}: rename them")
    groups: list[list[tuple[str, int, int]]] = []
    where: dict[str, tuple[str, int, int]] = {}
    current: list[tuple[str, int, int]] = []
    used = 0
    for s in ordered:
        if s.src in where:
            continue
        size = tree.files[s.src][0]
        if current and used + size > shard_bytes:
            groups.append(current)
            current, used = [], 0
        current.append((s.src, used, size))
        used += size
    if current:
        groups.append(current)
    rows = [(s.sample_id, label_of[s.class_key], s.class_name, s.split, s.src) for s in ordered]
    digest = {
        "format": FORMAT,
        "version": FORMAT_VERSION,
        "layout": layout,
        "shard_bytes": shard_bytes,
        "rows": rows,
        "files": [(src, *tree.files[src]) for members in groups for src, _, _ in members],
    }
    fingerprint = sha256(json.dumps(digest, separators=(",", ":")).encode())
    shards = [(f"{version_dir(fingerprint)}/shard-{i:05d}.bin", members) for i, members in enumerate(groups)]
    for name, members in shards:
        for src, offset, size in members:
            where[src] = (name, offset, size)
    return _Plan(rows, shards, where, fingerprint, len(keys))


def _index_bytes(plan: _Plan) -> bytes:
    import pyarrow as pa
    import pyarrow.parquet as pq

    shard, offset, length = zip(*(plan.where[r[4]] for r in plan.rows))
    table = pa.table(
        {
            "sample_id": pa.array([r[0] for r in plan.rows], pa.string()),
            "label": pa.array([r[1] for r in plan.rows], pa.int64()),
            "class_name": pa.array([r[2] for r in plan.rows], pa.string()),
            "split": pa.array([r[3] for r in plan.rows], pa.string()),
            "shard": pa.array(shard, pa.string()),
            "offset": pa.array(offset, pa.int64()),
            "length": pa.array(length, pa.int64()),
        }
    )
    buf = io.BytesIO()
    pq.write_table(table, buf, compression="zstd")
    return buf.getvalue()


# --------------------------------------------------------------------------- ingest


def _read_json(fs: Any, path: str, url: str) -> dict[str, Any] | None:
    try:
        raw = fs.cat_file(path)
    except FileNotFoundError:
        return None
    except Exception as err:  # noqa: BLE001
        raise explain_error(err, url, "read") from None
    try:
        value = json.loads(raw)
        return value if isinstance(value, dict) else {}
    except ValueError:
        return {}


def ingest(
    source: str,
    target_url: str,
    layout: str,
    shard_bytes: int = 64 * 2**20,
    *,
    default_split: str = "train",
    overwrite: bool = False,
    threads: int = 8,
    on_shard_written: Callable[[str, int, int], None] | None = None,
    on_progress: Callable[[int, int, int, int], None] | None = None,
) -> IngestResult:
    """Packs the images of ``source`` (a folder, an image-folder zip or an fsspec URL) in
    ``layout`` into shards plus an index at ``target_url``; see the module docstring.

    ``default_split``: the split of a ``folders`` source without split folders.
    ``overwrite``: replace a complete ingest at the target (of different content, or the same
    content when it was damaged).
    ``on_shard_written(name, done, total)``: called after each shard is stored.
    ``on_progress(files_done, files_total, bytes_done, bytes_total)``: called once before the
    first shard is written (counting those a resumed ingest finds done) and after each shard.
    Returns what was done; raises :class:`IngestError` / :class:`StorageError` naming the
    file and the problem.
    """
    if layout not in LAYOUT_FUNCS:
        raise IngestError(f"unknown layout {layout!r}: use one of {', '.join(LAYOUTS)}")
    if shard_bytes < 1:
        raise IngestError(f"shard_bytes must be positive, got {shard_bytes}")
    tree = open_tree(source)
    try:
        kwargs = {"default_split": default_split} if layout == "folders" else {}
        plan = _plan(tree, LAYOUT_FUNCS[layout](tree, **kwargs), layout, shard_bytes)
        return _write(tree, plan, target_url, layout, shard_bytes, overwrite, threads, on_shard_written, source,
                      on_progress)
    finally:
        tree.close()


def _write(
    tree: Tree,
    plan: _Plan,
    url: str,
    layout: str,
    shard_bytes: int,
    overwrite: bool,
    threads: int,
    on_shard_written: Callable[[str, int, int], None] | None,
    source: str,
    on_progress: Callable[[int, int, int, int], None] | None = None,
) -> IngestResult:
    fs, root = filesystem(url)
    splits: dict[str, int] = {}
    for r in plan.rows:
        splits[r[3]] = splits.get(r[3], 0) + 1
    result = IngestResult(
        url=redact(url),
        fingerprint=plan.fingerprint,
        num_samples=len(plan.rows),
        num_images=len(plan.where),
        num_classes=plan.num_classes,
        num_shards=len(plan.shards),
        shards_written=0,
        skipped=False,
        splits=splits,
    )
    marker = _read_json(fs, join(root, MARKER), url)
    repairing = False
    if marker is not None:
        if marker.get("fingerprint") == plan.fingerprint and not overwrite:
            log.info("%s already holds this ingest (fingerprint %s): nothing to do", redact(url), plan.fingerprint[:12])
            result.skipped = True
            return result
        if not overwrite:
            raise IngestError(
                f"{redact(url)} already holds a complete ingest of different content (fingerprint "
                f"{str(marker.get('fingerprint'))[:12]}, this source {plan.fingerprint[:12]}): pass "
                "overwrite=True to replace it, or choose another target"
            )
        # The old version stays readable: new content goes to its own shard folder and the
        # index and marker switch last. Only a repair of this same version rewrites its shards.
        repairing = marker.get("fingerprint") == plan.fingerprint

    progress = {} if repairing else _read_json(fs, join(root, PROGRESS), url) or {}
    done = progress.get("shards", {}) if progress.get("fingerprint") == plan.fingerprint else {}
    done = done if isinstance(done, dict) else {}
    try:
        existing = {
            k[len(root.rstrip("/")) + 1:]: int(v.get("size") or 0)
            for k, v in fs.find(join(root, SHARD_DIR), detail=True).items()
        }
    except FileNotFoundError:
        existing = {}
    except Exception as err:  # noqa: BLE001
        raise explain_error(err, url, "list the shards of") from None
    shard_info: dict[str, dict[str, Any]] = {}
    for name, members in plan.shards:
        size = sum(m[2] for m in members)
        info = done.get(name)
        if isinstance(info, dict) and info.get("size") == size and existing.get(name) == size:
            shard_info[name] = {"size": size, "sha256": str(info.get("sha256", ""))}
    if shard_info:
        log.info("resuming the ingest into %s: %d of %d shards already written", redact(url), len(shard_info), len(plan.shards))

    totals = (len(plan.where), sum(size for _, members in plan.shards for _, _, size in members))
    files_done = sum(len(members) for name, members in plan.shards if name in shard_info)
    bytes_done = sum(info["size"] for info in shard_info.values())
    if on_progress is not None:
        on_progress(files_done, totals[0], bytes_done, totals[1])
    pool = ThreadPoolExecutor(max(1, threads)) if tree.parallel_reads and threads > 1 else None
    try:
        for number, (name, members) in enumerate(plan.shards, start=1):
            if name in shard_info:
                continue
            srcs = [m[0] for m in members]
            blobs = list(pool.map(tree.read, srcs)) if pool else [tree.read(s) for s in srcs]
            for (src, _, size), blob in zip(members, blobs):
                if len(blob) != size:
                    raise IngestError(
                        f"{src} in {tree.name} is {len(blob)} bytes, but {size} when listed: the "
                        "source changed during the ingest; re-run it"
                    )
            data = b"".join(blobs)
            atomic_write(fs, join(root, name), data, url=f"{redact(url)}/{name}")
            shard_info[name] = {"size": len(data), "sha256": sha256(data)}
            result.shards_written += 1
            atomic_write(
                fs,
                join(root, PROGRESS),
                json.dumps({"fingerprint": plan.fingerprint, "shards": shard_info}).encode(),
                url=f"{redact(url)}/{PROGRESS}",
            )
            log.info("ingest %s: wrote %s (%d/%d)", redact(url), name, number, len(plan.shards))
            if on_shard_written is not None:
                on_shard_written(name, number, len(plan.shards))
            files_done, bytes_done = files_done + len(members), bytes_done + len(data)
            if on_progress is not None:
                on_progress(files_done, totals[0], bytes_done, totals[1])
    finally:
        if pool:
            pool.shutdown(wait=True)

    index = _index_bytes(plan)
    atomic_write(fs, join(root, index_path(plan.fingerprint)), index, url=f"{redact(url)}/{index_path(plan.fingerprint)}")
    manifest = {
        "format": FORMAT,
        "version": FORMAT_VERSION,
        "fingerprint": plan.fingerprint,
        "layout": layout,
        "source": redact(source),
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "shard_bytes": shard_bytes,
        "num_samples": result.num_samples,
        "num_images": result.num_images,
        "num_classes": result.num_classes,
        "splits": splits,
        "index": {"path": index_path(plan.fingerprint), "size": len(index), "sha256": sha256(index)},
        "shards": {name: shard_info[name] for name, _ in plan.shards},
        "versions": _versions(marker, url, version_dir(plan.fingerprint)),
    }
    # The commit point. Failing here leaves the previous marker, and so the previous version.
    atomic_write(fs, join(root, MARKER), json.dumps(manifest, indent=1).encode(), url=f"{redact(url)}/{MARKER}")
    _remove(fs, [join(root, PROGRESS)], url, f"remove {PROGRESS} of")
    return result


def _remove(fs: Any, paths: list[str], url: str, action: str, recursive: bool = False) -> None:
    """Deletes ``paths`` (those already gone are fine); a failure is a clear StorageError."""
    try:
        fs.rm(paths, recursive=recursive)
    except FileNotFoundError:
        pass
    except Exception as err:  # noqa: BLE001
        raise explain_error(err, url, action) from None


def _versions(marker: dict[str, Any] | None, url: str, current: str) -> list[str]:
    """The shard folders of this and earlier complete ingests, newest first (for
    :func:`gc_dataset`); a damaged old marker contributes none."""
    earlier: list[str] = []
    if marker is not None:
        try:
            old = validate_manifest(marker, url)
            earlier = old.get("versions") or sorted({posixpath.dirname(n) for n in old.get("shards", {})})
        except StorageError:
            log.warning("the previous marker at %s is not valid; its shards are not tracked", redact(url))
    return [current, *[v for v in earlier if v != current]][:MAX_VERSIONS]


def gc_dataset(url: str, keep_last: int = 1) -> list[str]:
    """Deletes the shard folders of replaced ingests at ``url``, keeping the current one and
    the ``keep_last - 1`` before it (and the folder of an ingest in progress). Run it once no
    job that opened an older version is still running: such a job reads those shards.
    Returns the folders removed."""
    if keep_last < 1:
        raise IngestError(f"keep_last must be at least 1 (the current version), got {keep_last}")
    dataset = open_dataset(url)  # a complete, validated dataset: its names are safe to join
    fs, root = dataset.fs, dataset.root
    versions = dataset.manifest.get("versions") or []
    keep = set(versions[:keep_last]) | {posixpath.dirname(n) for n in dataset.index.column("shard").unique().to_pylist()}
    progress = _read_json(fs, join(root, PROGRESS), url) or {}
    if isinstance(progress.get("fingerprint"), str) and FINGERPRINT.fullmatch(progress["fingerprint"]):
        keep.add(version_dir(progress["fingerprint"]))
    try:
        listing = fs.find(join(root, SHARD_DIR))
    except Exception as err:  # noqa: BLE001
        raise explain_error(err, url, "list the shards of") from None
    prefix = root.rstrip("/") + "/"
    stale: dict[str, list[str]] = {}
    for path in listing:
        rel = path[len(prefix):] if path.startswith(prefix) else path
        if posixpath.dirname(rel) not in keep:
            stale.setdefault(posixpath.dirname(rel), []).append(path)
    for folder, paths in sorted(stale.items()):
        _remove(fs, paths, url, f"delete {folder} of")
        if folder != SHARD_DIR and is_local(fs):
            _remove(fs, [join(root, folder)], url, f"delete {folder} of", recursive=True)
        log.info("gc %s: removed %s (%d objects)", redact(url), folder, len(paths))
    # The root index of format version 1 belongs to a replaced version once the current one
    # keeps its index in its own folder: no marker leads to it any more.
    legacy = join(root, INDEX)
    if dataset.manifest["index"].get("path", INDEX) != INDEX and exists(fs, legacy, url):
        _remove(fs, [legacy], url, f"delete {INDEX} of")
        stale[INDEX] = [legacy]
    return sorted(stale)
