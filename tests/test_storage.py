"""Filesystems from URLs, atomic writes, secret redaction, and preflight's errors: unreachable
endpoint, missing bucket, bad credentials (real InvalidAccessKeyId / SignatureDoesNotMatch /
AccessDenied from moto in IAM-auth mode), missing, incomplete and malformed index."""
from __future__ import annotations

import io
import json
import os
import re
import time
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest


from rsk_dist.storage import (  # noqa: E402
    INDEX,
    MARKER,
    StorageError,
    atomic_write,
    filesystem,
    preflight,
    redact,
    sha256,
    storage_options,
)

from tests.conftest import free_ports  # noqa: E402

FINGERPRINT = "0123456789abcdef" * 4


def test_filesystem_from_urls(tmp_path):
    fs, path = filesystem(f"file://{tmp_path}/a")
    assert "file" in fs.protocol and path == f"{tmp_path}/a"
    fs, path = filesystem(str(tmp_path / "b"))
    assert "file" in fs.protocol and path == str(tmp_path / "b")
    fs, path = filesystem("memory://bucket/x/")
    assert "memory" in fs.protocol and path.endswith("bucket/x")
    with pytest.raises(StorageError, match="nosuchproto"):
        filesystem("nosuchproto://x/y")


def test_s3_filesystem_uses_aws_environment(s3, monkeypatch):
    fs, path = filesystem(s3.url("p/q"))
    assert path == f"{s3.bucket}/p/q"
    assert fs.s3.meta.endpoint_url == s3.endpoint  # botocore honours AWS_ENDPOINT_URL itself
    monkeypatch.delenv("AWS_DEFAULT_REGION")
    monkeypatch.setenv("AWS_REGION", "eu-west-3")
    assert storage_options("s3://b/k")["client_kwargs"] == {"region_name": "eu-west-3"}
    assert filesystem("s3://b/k")[0].s3.meta.region_name == "eu-west-3"
    # No credential is ever passed as an option (so none is pickled or logged with one).
    assert s3.secret_key not in repr(storage_options("s3://b/k"))


def test_atomic_write_local_leaves_no_temporary(tmp_path):
    fs, _ = filesystem(str(tmp_path))
    target = str(tmp_path / "deep/dir/obj.bin")
    atomic_write(fs, target, b"old")
    atomic_write(fs, target, b"new contents")
    assert open(target, "rb").read() == b"new contents"
    assert os.listdir(tmp_path / "deep/dir") == ["obj.bin"]


def test_redact_hides_secrets_and_url_passwords(monkeypatch):
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "SuperSecretValue123")
    monkeypatch.setenv("AWS_SESSION_TOKEN", "TokenValue456")
    text = redact("key SuperSecretValue123 token TokenValue456 url s3://user:pa55word@host/b")
    assert "SuperSecretValue123" not in text and "TokenValue456" not in text and "pa55word" not in text
    assert "s3://***@host/b" in text
    assert redact("s3://AKIAONLYKEY@bucket/x and s3://bucket/a@b") == "s3://***@bucket/x and s3://bucket/a@b"


# --------------------------------------------------------------------------- preflight: reachability


def test_preflight_ok_on_a_bucket(s3):
    assert preflight(s3.url(), need_index=False, writable=True) is None


def test_preflight_unreachable_endpoint_fails_fast(s3, monkeypatch):
    closed = f"http://127.0.0.1:{free_ports(1)[0]}"
    monkeypatch.setenv("AWS_ENDPOINT_URL", closed)
    t0 = time.perf_counter()
    with pytest.raises(StorageError) as err:
        preflight(s3.url(), need_index=True)
    assert time.perf_counter() - t0 < 10
    msg = str(err.value)
    assert "cannot reach the S3 endpoint" in msg and closed in msg and "AWS_ENDPOINT_URL" in msg
    assert s3.secret_key not in msg


def test_service_endpoint_variable_takes_precedence(s3, monkeypatch):
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{free_ports(1)[0]}")  # closed
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", s3.endpoint)
    assert preflight(s3.url(), need_index=False) is None
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", "http://no-such-host.invalid:9000")
    with pytest.raises(StorageError, match="no-such-host.invalid.*set by AWS_ENDPOINT_URL_S3"):
        preflight(s3.url(), need_index=False)


def test_preflight_missing_bucket(s3):
    with pytest.raises(StorageError) as err:
        preflight("s3://no-such-bucket-rsk/data", need_index=True)
    msg = str(err.value)
    assert "bucket 'no-such-bucket-rsk' does not exist" in msg and s3.endpoint in msg
    assert s3.secret_key not in msg


# --------------------------------------------------------------------------- preflight: credentials


def _set_moto_auth(endpoint: str, count: str) -> None:
    """moto's server-mode switch: after ``count`` more requests, every request is
    authenticated against moto's IAM (``inf``: never)."""
    req = urllib.request.Request(
        f"{endpoint}/moto-api/reset-auth", data=count.encode(), method="POST", headers={"Content-Type": "text/plain"}
    )
    with urllib.request.urlopen(req, timeout=10) as resp:
        assert resp.status == 200


@pytest.fixture
def iam_auth(s3) -> Iterator[dict[str, str]]:
    """An IAM user with no policies and its real key pair; moto authenticates every request
    while the fixture is active."""
    import boto3

    iam = boto3.client("iam", endpoint_url=s3.endpoint)
    user = f"nopolicy-{uuid.uuid4().hex[:8]}"
    iam.create_user(UserName=user)
    key = iam.create_access_key(UserName=user)["AccessKey"]
    _set_moto_auth(s3.endpoint, "0")
    try:
        yield {"id": key["AccessKeyId"], "secret": key["SecretAccessKey"]}
    finally:
        _set_moto_auth(s3.endpoint, "inf")


@pytest.mark.parametrize(
    "case, expected",
    [
        ("unknown key", r"does not know the access key id from the AWS_ACCESS_KEY_ID.*InvalidAccessKeyId.*fix AWS_ACCESS_KEY_ID"),
        ("wrong secret", r"secret key from the AWS_ACCESS_KEY_ID.*SignatureDoesNotMatch.*fix AWS_SECRET_ACCESS_KEY"),
        ("no permission", r"access denied to list .*AccessDenied.*s3:ListBucket"),
    ],
)
def test_preflight_bad_credentials(s3, iam_auth, monkeypatch, case, expected):
    secret = {"unknown key": "Unknown-Secret-Value-0001", "wrong secret": "Wrong-Secret-Value-0002"}.get(case, iam_auth["secret"])
    key_id = "AKIAUNKNOWNKEY000001" if case == "unknown key" else iam_auth["id"]
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", key_id)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", secret)
    with pytest.raises(StorageError, match=expected) as err:
        preflight(s3.url(), need_index=True)
    assert secret not in str(err.value) and s3.secret_key not in str(err.value)
    assert err.value.__cause__ is None  # no library exception (and request) chained


def test_preflight_no_credentials(s3, monkeypatch):
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    with pytest.raises(StorageError, match="no AWS credentials.*AWS_ACCESS_KEY_ID"):
        preflight(s3.url(), need_index=False)


# --------------------------------------------------------------------------- preflight: the index


def _write_dataset(url: str, table, shards: dict[str, bytes], marker: dict | None = None) -> None:
    import pyarrow.parquet as pq

    from rsk_dist.storage import FORMAT, sha256

    fs, root = filesystem(url)
    for name, data in shards.items():
        atomic_write(fs, f"{root}/{name}", data)
    buf = io.BytesIO()
    pq.write_table(table, buf)
    atomic_write(fs, f"{root}/{INDEX}", buf.getvalue())
    # Format version 1 (the index at the root): still read.
    manifest = {"format": FORMAT, "version": 1, "fingerprint": FINGERPRINT, "index": {"sha256": sha256(buf.getvalue())}}
    atomic_write(fs, f"{root}/{MARKER}", json.dumps(marker or manifest).encode())


def _table(**overrides):
    import pyarrow as pa

    cols = {
        "sample_id": pa.array(["a.png", "b.png"]),
        "label": pa.array([0, 1], pa.int64()),
        "class_name": pa.array(["x", "y"]),
        "split": pa.array(["train", "train"]),
        "shard": pa.array(["shards/shard-00000.bin", "shards/shard-00001.bin"]),
        "offset": pa.array([0, 0], pa.int64()),
        "length": pa.array([4, 4], pa.int64()),
    }
    cols.update(overrides)
    return pa.table({k: v for k, v in cols.items() if v is not None})


def test_preflight_missing_index(s3):
    url = s3.url()
    with pytest.raises(StorageError, match=r"no ingested dataset at s3://.*ingest\(source, url, layout\)") as err:
        preflight(url, need_index=True)
    assert s3.secret_key not in str(err.value)


def test_preflight_index_without_marker_is_incomplete(s3):
    url = s3.url()
    _write_dataset(url, _table(), {"shards/shard-00000.bin": b"1234", "shards/shard-00001.bin": b"5678"})
    filesystem(url)[0].rm_file(f"{url}/{MARKER}")
    with pytest.raises(StorageError, match="incomplete ingest.*index.parquet.*Re-run the same ingest"):
        preflight(url, need_index=True)


def test_preflight_accepts_a_well_formed_dataset(s3):
    url = s3.url()
    _write_dataset(url, _table(), {"shards/shard-00000.bin": b"1234", "shards/shard-00001.bin": b"5678"})
    assert preflight(url, need_index=True, split="train").manifest["fingerprint"] == FINGERPRINT
    with pytest.raises(StorageError, match="split 'test' is not in the dataset.*train"):
        preflight(url, need_index=True, split="test")


def test_preflight_malformed_index_columns(s3):
    import pyarrow as pa

    url = s3.url()
    _write_dataset(
        url,
        _table(offset=pa.array(["0", "0"]), length=None),
        {"shards/shard-00000.bin": b"1234", "shards/shard-00001.bin": b"5678"},
    )
    with pytest.raises(StorageError) as err:
        preflight(url, need_index=True)
    msg = str(err.value)
    assert "malformed index" in msg and "missing column 'length'" in msg and "column 'offset' is string" in msg


def test_preflight_index_naming_missing_or_short_shards(s3):
    url = s3.url()
    _write_dataset(url, _table(), {"shards/shard-00000.bin": b"12"})
    with pytest.raises(StorageError) as err:
        preflight(url, need_index=True)
    msg = str(err.value)
    assert "missing shard objects shards/shard-00001.bin" in msg
    assert "shards/shard-00000.bin (2 < 4 bytes)" in msg


def test_preflight_not_a_parquet_index(tmp_path):
    url = str(tmp_path / "ds")
    _write_dataset(url, _table(), {"shards/shard-00000.bin": b"1234", "shards/shard-00001.bin": b"5678"})
    (tmp_path / "ds" / INDEX).write_bytes(b"not parquet at all")
    manifest = json.loads((tmp_path / "ds" / MARKER).read_text())
    manifest["index"]["sha256"] = sha256(b"not parquet at all")  # written by the same hand
    (tmp_path / "ds" / MARKER).write_text(json.dumps(manifest))
    with pytest.raises(StorageError, match="malformed index.*not a readable parquet file"):
        preflight(url, need_index=True)


def test_preflight_index_changed_after_ingest(tmp_path):
    import pyarrow as pa

    url = str(tmp_path / "ds")
    _write_dataset(url, _table(), {"shards/shard-00000.bin": b"1234", "shards/shard-00001.bin": b"5678"})
    marker = json.loads((tmp_path / "ds" / MARKER).read_text())
    _write_dataset(url, _table(label=pa.array([5, 6], pa.int64())), {}, marker=marker)
    with pytest.raises(StorageError, match="does not match the sha256"):
        preflight(url, need_index=True)


# --------------------------------------------------------------------------- names from storage


def _cached_files_outside(root: Path, cache: Path) -> list[Path]:
    return [p for p in root.rglob("*") if p.is_file() and cache not in p.parents]


def test_traversal_shard_name_is_refused_before_any_path_join(tmp_path):
    """An index naming a shard ``shards/../../../escape.bin`` made a worker with ``cache_dir``
    download that object outside its cache. Now the dataset is refused when opened."""
    import pyarrow as pa
    import torch

    from rsk_dist.data.shards import ShardSource
    from tests.images import image_bytes

    url = f"memory://traversal-{uuid.uuid4().hex[:8]}"
    evil = "shards/../../../../escape.bin"
    blob = image_bytes(1, size=(16, 16))
    table = _table(
        sample_id=pa.array(["a.png"]), label=pa.array([0], pa.int64()), class_name=pa.array(["x"]),
        split=pa.array(["train"]), shard=pa.array([evil]), offset=pa.array([0], pa.int64()),
        length=pa.array([len(blob)], pa.int64()),
    )
    _write_dataset(url, table, {evil: blob})
    cache = tmp_path / "work" / "cache"
    with pytest.raises(StorageError, match=r"shard names '.*escape.bin' are not shards/"):
        src = ShardSource(url, "train", image_size=8, train=False, in_channels=1, cache_dir=str(cache))
        src(torch.tensor([0]))
        src.close()  # waits for the background download
    with pytest.raises(StorageError, match="shard names"):
        preflight(url, need_index=True)
    assert _cached_files_outside(tmp_path, cache) == []


@pytest.mark.parametrize(
    "change, problem",
    [
        ({"fingerprint": "../../../../tmp/x"}, "fingerprint '../../../../tmp/x' is not 64"),
        ({"shards": {"shards/x/../../../y.bin": {"size": 1}}}, "shard names"),
        ({"versions": ["shards/../.."]}, "versions"),
        ({"version": "1"}, "not a non-negative integer"),
        ({"shards": {"shards/shard-00000.bin": {"size": "big"}}}, "non-negative integer size"),
    ],
)
def test_manifest_names_are_validated(tmp_path, change, problem):
    url = str(tmp_path / "ds")
    _write_dataset(url, _table(), {"shards/shard-00000.bin": b"1234", "shards/shard-00001.bin": b"5678"})
    marker = json.loads((tmp_path / "ds" / MARKER).read_text())
    (tmp_path / "ds" / MARKER).write_text(json.dumps({**marker, **change}))
    with pytest.raises(StorageError, match=f"not a valid rsk_dist dataset manifest: .*{re.escape(problem)}"):
        preflight(url, need_index=True)


def test_index_split_names_and_ranges_are_validated(tmp_path):
    import pyarrow as pa

    url = str(tmp_path / "ds")
    _write_dataset(
        url,
        _table(split=pa.array(["../train", "train"]), offset=pa.array([0, 2**62], pa.int64())),
        {"shards/shard-00000.bin": b"1234", "shards/shard-00001.bin": b"5678"},
    )
    with pytest.raises(StorageError) as err:
        preflight(url, need_index=True)
    assert "split names '../train'" in str(err.value) and "offsets outside" in str(err.value)
