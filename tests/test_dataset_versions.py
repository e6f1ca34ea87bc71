"""Dataset versions and bounded index reads (issue 23, findings 4 and 5).

An ``ingest --overwrite`` cut off before its marker (the process killed while the marker is
being written, or the store answering the marker's PUT with a 500) leaves the old version
readable, by new readers, the pre-start check and gc-dataset, and fails with a clear
StorageError; a crafted index that expands into millions of rows is refused from its footer."""
from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import textwrap

import pytest
import torch

from rsk_dist.data.shards import ShardSource
from rsk_dist.ingest import gc_dataset, ingest
from rsk_dist.storage import MARKER, StorageError, open_dataset, preflight, sha256, version_dir
from tests.images import image_bytes
from tests.s3proxy import Fault, S3Proxy
from tests.test_ingest import make_folders, put

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _two_versions(tmp_path, s3):
    """An ingest at a fresh S3 prefix, and its source changed so that an overwrite is a new version."""
    src, url = tmp_path / "src", s3.url()
    make_folders(src)
    first = ingest(str(src), url, "folders", shard_bytes=500)
    old = {p.relative_to(src).as_posix(): p.read_bytes() for p in src.rglob("*.png")}
    for path in sorted(src.rglob("*.png")):
        put(path, image_bytes(len(path.name) * 37 + int(path.stem) + 7, size=(33, 21)))
    return src, url, first, old


def _old_version_is_whole(url: str, first, old: dict[str, bytes]) -> None:
    assert open_dataset(url).manifest["fingerprint"] == first.fingerprint
    assert preflight(url, need_index=True).manifest["fingerprint"] == first.fingerprint
    reader = ShardSource(url, "train", image_size=8, train=False, in_channels=1)
    assert reader.read_bytes(torch.arange(len(reader))) == [old[sid] for sid in reader.sample_ids]
    reader.close()
    assert gc_dataset(url) == []  # the current (old) version and the overwrite's folder both stay
    assert open_dataset(url).manifest["fingerprint"] == first.fingerprint


def test_overwrite_with_a_500_on_the_marker_keeps_the_old_version(s3, tmp_path, monkeypatch):
    src, url, first, old = _two_versions(tmp_path, s3)
    marker_put = lambda method, path: Fault("status", 500) if method == "PUT" and path.split("?")[0].endswith(f"/{MARKER}") else None  # noqa: E731
    with S3Proxy(s3.endpoint, marker_put) as proxy:
        monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.endpoint)
        with pytest.raises(StorageError) as err:
            ingest(str(src), url, "folders", shard_bytes=500, overwrite=True)
        assert proxy.hit.is_set()
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3.endpoint)
    assert MARKER in str(err.value) and "cannot write to" in str(err.value)
    _old_version_is_whole(url, first, old)
    second = ingest(str(src), url, "folders", shard_bytes=500, overwrite=True)  # the re-run completes it
    assert open_dataset(url).manifest["fingerprint"] == second.fingerprint != first.fingerprint
    assert gc_dataset(url) == [version_dir(first.fingerprint)]


def test_overwrite_killed_while_writing_the_marker_keeps_the_old_version(s3, tmp_path):
    src, url, first, old = _two_versions(tmp_path, s3)
    marker_put = lambda method, path: Fault("hang") if method == "PUT" and path.split("?")[0].endswith(f"/{MARKER}") else None  # noqa: E731
    with S3Proxy(s3.endpoint, marker_put) as proxy:
        code = f"from rsk_dist.ingest import ingest; ingest({str(src)!r}, {url!r}, 'folders', shard_bytes=500, overwrite=True)"
        proc = subprocess.Popen([sys.executable, "-c", code], env={**os.environ, "AWS_ENDPOINT_URL": proxy.endpoint})
        try:
            assert proxy.hit.wait(120), "the ingest never reached its marker"
            assert proc.poll() is None
        finally:
            proc.send_signal(signal.SIGKILL)
            proc.wait()
    _old_version_is_whole(url, first, old)


# --------------------------------------------------------------------------- bounded index reads

BOMB_CHECK = textwrap.dedent("""
    import json, resource, sys, time
    from rsk_dist.storage import StorageError, preflight
    import pyarrow.parquet  # imports are not the check's memory
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    started = time.perf_counter()
    try:
        preflight(sys.argv[1], need_index=True)
        outcome = "accepted"
    except StorageError as err:
        outcome = str(err)
    grown = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before
    print(json.dumps({"outcome": outcome, "rss_growth_kb": grown, "seconds": time.perf_counter() - started}))
""")


@pytest.mark.parametrize("claims", ["own_manifest", "victims_manifest"])
def test_a_ten_million_row_index_is_refused_from_its_footer(tmp_path, claims):
    """272 KB of zstd Parquet holding 10M constant rows took 1.6 GB in the pre-start check."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    src, url = tmp_path / "src", str(tmp_path / "ds")
    make_folders(src)
    ingest(str(src), url, "folders")
    manifest = json.loads((tmp_path / "ds" / MARKER).read_text())
    row = open_dataset(url).index.slice(0, 1).to_pylist()[0]
    n = 10_000_000
    table = pa.table({k: pa.repeat(pa.scalar(v, pa.int64() if isinstance(v, int) else pa.string()), n) for k, v in row.items()})
    buf = io.BytesIO()
    pq.write_table(table, buf, compression="zstd", row_group_size=n)
    del table
    bomb = buf.getvalue()
    (tmp_path / "ds" / manifest["index"]["path"]).write_bytes(bomb)
    manifest["index"].update(size=len(bomb), sha256=sha256(bomb))  # the attacker writes a matching marker
    if claims == "own_manifest":
        manifest["num_samples"] = n
    (tmp_path / "ds" / MARKER).write_text(json.dumps(manifest))

    out = subprocess.run([sys.executable, "-c", BOMB_CHECK, url], capture_output=True, text=True, timeout=300,
                         env={**os.environ, "PYTHONPATH": ROOT})
    assert out.returncode == 0, out.stderr[-2000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    print(f"bomb check ({claims}): {result['seconds']:.2f} s, RSS growth {result['rss_growth_kb'] / 1024:.0f} MB")
    assert "refused before reading it" in result["outcome"] and "10000000 rows" in result["outcome"], result
    assert result["rss_growth_kb"] < 300 * 1024, result
