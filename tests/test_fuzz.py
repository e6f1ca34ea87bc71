"""Fuzzing the readers of untrusted input with hypothesis: a dataset's ``index.parquet`` rows and
``_SUCCESS`` manifest, checkpoint manifests, job-config YAML (and ``--set`` overrides) and image
bytes. Every input must give a valid result or one of the project's own errors, with a message;
any other exception fails the test (and hypothesis shrinks it to a minimal input), and nothing
may be written outside the reader's own directories.

CI runs a fixed, bounded set of examples (``derandomize=True``). ``RSK_FUZZ_SCALE=10`` runs ten
times as many; ``RSK_FUZZ_REPORT=out.json`` writes the outcomes counted by input kind and result
(docs/reliability.md records such a run).
"""
from __future__ import annotations

import collections
import io
import json
import os
import uuid
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

import pyarrow as pa
import pyarrow.parquet as pq
import torch
import yaml
from hypothesis import HealthCheck, Phase, example, given, settings
from hypothesis import strategies as st

from rsk_dist.checkpoint import MANIFEST, STATE, CheckpointError, load_state, save_state
from rsk_dist.config import ConfigError, load_config
from rsk_dist.data.shards import BadSampleError, ShardReadError, ShardSource
from rsk_dist.storage import (
    FORMAT,
    FORMAT_VERSION,
    INDEX,
    MARKER,
    StorageError,
    filesystem,
    open_dataset,
    preflight,
    sha256,
)
from tests.images import image_bytes

PROJECT_ERRORS = (StorageError, ShardReadError, BadSampleError, CheckpointError, ConfigError)
SCALE = int(os.environ.get("RSK_FUZZ_SCALE", "1"))
OUTCOMES: collections.Counter[tuple[str, str]] = collections.Counter()
FINGERPRINT = "0123456789abcdef" * 4
SHARDS = [f"shards/{FINGERPRINT[:16]}/shard-{i:05d}.bin" for i in range(3)] + ["shards/shard-00000.bin"]
HOSTILE_NAMES = [
    "shards/../../../../escape.bin", "/etc/passwd", "shards/shard-00000.bin/../../x", "",
    "shards\\..\\x.bin", "shards/shard-00000.bin\x00", "s3://other-bucket/x", "~/x", "shards/./shard-00001.bin",
]


def fuzz(examples: int) -> settings:
    return settings(
        max_examples=examples * SCALE, derandomize=True, deadline=None, database=None,
        phases=[Phase.explicit, Phase.generate],  # no shrinking: a failure shows its input as found
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture,
                               HealthCheck.data_too_large],
    )


def outcome(kind: str, read: Callable[[], Any]) -> Any:
    """``read()``'s result, or None when it raised one of the project's errors (counted);
    any other exception propagates and fails the example."""
    try:
        result = read()
    except PROJECT_ERRORS as err:
        assert str(err).strip(), f"{type(err).__name__} without a message"
        OUTCOMES[(kind, type(err).__name__)] += 1
        return None
    OUTCOMES[(kind, "valid")] += 1
    return result


@pytest.fixture(scope="module", autouse=True)
def report():
    yield
    path = os.environ.get("RSK_FUZZ_REPORT")
    if path:
        rows = [{"kind": k, "outcome": o, "count": n} for (k, o), n in sorted(OUTCOMES.items())]
        Path(path).write_text(json.dumps({"scale": SCALE, "outcomes": rows}, indent=1))


@pytest.fixture(scope="module")
def sandbox(tmp_path_factory) -> Path:
    """The only local directory the readers may write to (the shard cache, checkpoints)."""
    return tmp_path_factory.mktemp("fuzz")


def files_under(root: Path) -> set[Path]:
    return {p for p in root.rglob("*") if p.is_file()}


# --------------------------------------------------------------------------- strategies

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=12),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=4),
    max_leaves=16,
)
any_int = st.one_of(st.integers(-3, 3000), st.integers(-(2**63), 2**63 - 1))
shard_names = st.one_of(st.sampled_from(SHARDS), st.sampled_from(HOSTILE_NAMES), st.text(max_size=24))
split_names = st.one_of(st.sampled_from(["train", "test", "test_800"]), st.text(max_size=10))
IMAGES = [image_bytes(seed, size=(10, 9)) for seed in range(4)]
IMAGE_AT = [(sum(len(b) for b in IMAGES[:i]), len(IMAGES[i])) for i in range(4)]  # in SHARDS[0]
hostile_row = st.fixed_dictionaries({
    "sample_id": st.text(max_size=10), "label": any_int, "class_name": st.text(max_size=10),
    "split": split_names, "shard": shard_names, "offset": any_int, "length": any_int,
})
# A row as an ingest writes it: one of the images stored in SHARDS[0].
plain_row = st.builds(
    lambda i, label: {"sample_id": f"{i}.png", "label": label, "class_name": f"c{label}", "split": "train",
                      "shard": SHARDS[0], "offset": IMAGE_AT[i][0], "length": IMAGE_AT[i][1]},
    st.integers(0, 3), st.integers(0, 2),
)
index_rows = st.lists(st.one_of(plain_row, plain_row, hostile_row), min_size=1, max_size=8)
# A damaged column: dropped, of another type, or with nulls.
column_damage = st.one_of(
    st.none(),
    st.tuples(st.sampled_from(["drop", "as_string", "nulls"]),
              st.sampled_from(["sample_id", "label", "class_name", "split", "shard", "offset", "length"])),
)


def index_table(rows: list[dict[str, Any]], damage: tuple[str, str] | None) -> pa.Table:
    types = {"sample_id": pa.string(), "label": pa.int64(), "class_name": pa.string(), "split": pa.string(),
             "shard": pa.string(), "offset": pa.int64(), "length": pa.int64()}
    columns = {name: pa.array([r[name] for r in rows], t) for name, t in types.items()}
    if damage is not None:
        how, name = damage
        if how == "drop":
            del columns[name]
        elif how == "as_string":
            columns[name] = pa.array([str(r[name]) for r in rows], pa.string())
        else:
            columns[name] = pa.array([None] * len(rows), types[name])
    return pa.table(columns)


def put_dataset(url: str, index: bytes, manifest: bytes, shards: dict[str, bytes]) -> None:
    fs, root = filesystem(url)
    fs.pipe_file(f"{root}/{INDEX}", index)
    fs.pipe_file(f"{root}/{MARKER}", manifest)
    for name, data in shards.items():
        try:
            fs.pipe_file(f"{root}/{name}", data)
        except OSError:  # a name no object can have (a folder's, ...): the index names it anyway
            pass


def parquet(table: pa.Table) -> bytes:
    buf = io.BytesIO()
    pq.write_table(table, buf)
    return buf.getvalue()


def manifest_for(index: bytes, shards: dict[str, bytes], changes: dict[str, Any] | None = None) -> bytes:
    # Format version 1 (the index at the root), which readers still accept.
    manifest = {"format": FORMAT, "version": 1, "fingerprint": FINGERPRINT,
                "index": {"path": INDEX, "sha256": sha256(index)},
                "shards": {n: {"size": len(d)} for n, d in shards.items()}}
    return json.dumps({**manifest, **(changes or {})}).encode()


def read_everything(url: str, cache: Path) -> int:
    """What a training worker does with a dataset: preflight, open it with a local cache and
    read and decode every sample."""
    preflight(url, need_index=True)
    src = ShardSource(url, None, image_size=8, train=True, in_channels=1, cache_dir=str(cache), decoders=2)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # undecodable images are skipped with a warning
            images, _ = src(torch.arange(len(src)))
    finally:
        src.close()
    assert torch.isfinite(images).all()
    return len(src)


def memory_url() -> str:
    return f"memory://fuzz-{uuid.uuid4().hex[:12]}"


def forget(url: str) -> None:
    fs, root = filesystem(url)
    fs.rm(root, recursive=True)


# --------------------------------------------------------------------------- dataset index


@fuzz(60)
@given(rows=index_rows, damage=column_damage, blobs=st.lists(st.binary(max_size=400), min_size=4, max_size=4),
       listed=st.booleans())
@example(rows=[{"sample_id": "a", "label": 0, "class_name": "x", "split": "train", "shard": SHARDS[0],
                "offset": 0, "length": 2**31}], damage=None, blobs=[b""] * 4, listed=True)
@example(rows=[{"sample_id": "a", "label": 0, "class_name": "x", "split": "train",
                "shard": "shards/../../../../escape.bin", "offset": 0, "length": 10}],
         damage=None, blobs=[b"0123456789"] * 4, listed=True)
def test_fuzz_index_rows(sandbox, rows, damage, blobs, listed):
    url, cache = memory_url(), sandbox / "cache"
    before = files_under(sandbox)
    # Every name the rows use gets an object, hostile ones included, as an attacker would.
    shards = {name: blobs[i % 4] for i, name in enumerate(sorted({r["shard"] for r in rows}))}
    shards[SHARDS[0]] = b"".join(IMAGES)
    index = parquet(index_table(rows, damage))
    put_dataset(url, index, manifest_for(index, shards if listed else {}), shards)
    try:
        outcome("index.parquet rows", lambda: read_everything(url, cache))
    finally:
        forget(url)
    assert all(cache in p.parents for p in files_under(sandbox) - before), "a write outside the cache"


# --------------------------------------------------------------------------- dataset manifest


valid_index_rows = [{"sample_id": f"{i}.png", "label": i // 2, "class_name": f"c{i // 2}", "split": "train",
                     "shard": SHARDS[0], "offset": 0, "length": 1} for i in range(4)]
manifest_changes = st.dictionaries(
    st.sampled_from(["format", "version", "fingerprint", "shards", "index", "versions", "extra"]),
    st.one_of(json_values, st.sampled_from([FINGERPRINT, FORMAT, FORMAT_VERSION, 2**70, float("inf")]),
              st.dictionaries(shard_names, st.one_of(json_values, st.builds(dict, size=any_int)), max_size=3),
              st.lists(st.one_of(shard_names, json_values), max_size=3)),
    max_size=4,
)


@fuzz(80)
@given(raw=st.one_of(st.binary(max_size=200), json_values.map(lambda v: json.dumps(v).encode()),
                     manifest_changes.map(lambda c: ("changes", c))))
@example(raw=b"[" * 100_000)
@example(raw=b"\xff\xfe not utf-8")
def test_fuzz_dataset_manifest(sandbox, raw):
    url = memory_url()
    shards = {SHARDS[0]: image_bytes(1)}
    index = parquet(index_table(valid_index_rows, None))
    manifest = manifest_for(index, shards, raw[1]) if isinstance(raw, tuple) else raw
    put_dataset(url, index, manifest, shards)
    try:
        dataset = outcome("dataset manifest", lambda: open_dataset(url))
        # Accepted only as the dataset that was written: its index whole, its one shard listed.
        assert dataset is None or (dataset.index.num_rows == len(valid_index_rows) and SHARDS[0] in dataset.manifest["shards"])
    finally:
        forget(url)


# --------------------------------------------------------------------------- image bytes


def damaged_image(seed: int, cut: int, flips: list[tuple[int, int]]) -> bytes:
    data = bytearray(image_bytes(seed, fmt="PNG" if seed % 2 else "JPEG", size=(10, 9)))
    for pos, value in flips:
        data[pos % len(data)] = value
    return bytes(data[: max(1, len(data) - cut)])


image_blobs = st.one_of(
    st.builds(image_bytes, st.integers(0, 50)),
    st.binary(min_size=1, max_size=300),
    st.builds(damaged_image, st.integers(0, 50), st.integers(0, 200),
              st.lists(st.tuples(st.integers(0, 10_000), st.integers(0, 255)), max_size=4)),
    st.builds(image_bytes, st.integers(0, 50)),
)


@fuzz(50)
@given(images=st.lists(image_blobs, min_size=4, max_size=4))
def test_fuzz_image_bytes(sandbox, images):
    url = memory_url()
    offsets = [sum(len(b) for b in images[:i]) for i in range(len(images))]
    rows = [{"sample_id": f"{i}.png", "label": i // 2, "class_name": f"c{i // 2}", "split": "train",
             "shard": SHARDS[0], "offset": offsets[i], "length": len(b)} for i, b in enumerate(images)]
    shards = {SHARDS[0]: b"".join(images)}
    index = parquet(index_table(rows, None))
    put_dataset(url, index, manifest_for(index, shards), shards)
    before = files_under(sandbox)
    try:
        # Undecodable images are replaced, never dropped: every sample comes back.
        assert outcome("image bytes", lambda: read_everything(url, sandbox / "cache")) in (None, len(images))
        assert all(sandbox / "cache" in p.parents for p in files_under(sandbox) - before), "a write outside the cache"
    finally:
        forget(url)


# --------------------------------------------------------------------------- checkpoint manifests


checkpoint_manifests = st.one_of(
    st.just("matching"),
    st.binary(max_size=120),
    json_values.map(lambda v: json.dumps(v).encode()),
    st.fixed_dictionaries({"bytes": st.one_of(any_int, json_values), "sha256": st.one_of(st.text(max_size=64), json_values)})
    .map(lambda v: json.dumps(v).encode()),
    st.just("matching"),
)
state_bytes = st.one_of(st.sampled_from(["kept", "missing"]), st.binary(max_size=300), st.just(b"PK\x03\x04" + b"\x00" * 60))


@fuzz(60)
@given(manifest=checkpoint_manifests, state=state_bytes)
@example(manifest="matching", state="missing")
@example(manifest="matching", state="kept")
def test_fuzz_checkpoint_manifest(sandbox, manifest, state):
    directory = sandbox / "checkpoints" / uuid.uuid4().hex[:12]
    save_state(directory, {"epoch": 1, "step": 3, "w": torch.ones(2)})
    before = files_under(sandbox)
    if isinstance(state, bytes):
        (directory / STATE).write_bytes(state)
    if manifest == "matching":  # a manifest that matches whatever state is there
        data = (directory / STATE).read_bytes()
        manifest = json.dumps({"bytes": len(data), "sha256": sha256(data)}).encode()
    if state == "missing":  # a manifest whose state never arrived
        (directory / STATE).unlink()
        before.discard(directory / STATE)
    (directory / MANIFEST).write_bytes(manifest)
    outcome("checkpoint manifest", lambda: load_state(directory))
    assert files_under(sandbox) <= before | {directory / STATE, directory / MANIFEST}


# --------------------------------------------------------------------------- job-config YAML


MINIMAL = {"data": {"train": {"kind": "digits", "split": "train"}}, "sampler": {"batch_size": 40}}
CONFIG_PATHS = ["model.name", "model.dim", "loss.k", "loss.name", "data.train.url", "data.train.kind",
                "data.eval", "data.image_size", "sampler.batch_size", "sampler.samples_per_class",
                "optim.lr", "optim.lr_steps", "train.epochs", "train.autocast", "scaling.num_workers",
                "scaling.use_gpu", "run.name", "run.storage_path", "run.resume_from", "nosuch.key", "model"]


def with_change(tree: dict[str, Any], dotted: str, value: Any) -> dict[str, Any]:
    tree = json.loads(json.dumps(tree))
    node = tree
    *head, last = dotted.split(".")
    for key in head:
        node = node.setdefault(key, {})
    node[last] = value
    return tree


GOOD_CHANGES = st.sampled_from([("train.epochs", 2), ("model.dim", 64), ("scaling.num_workers", 2),
                                ("run.storage_path", "s3://bucket/runs"), ("sampler.samples_per_class", 5),
                                ("loss.k", [1, 4]), ("optim.lr", 0.01)])
def _apply(tree: dict[str, Any], changes: list[tuple[str, Any]]) -> dict[str, Any]:
    for dotted, value in changes:
        tree = with_change(tree, dotted, value)
    return tree


yaml_texts = st.one_of(
    st.lists(GOOD_CHANGES, max_size=3).map(lambda cs: yaml.safe_dump(_apply(MINIMAL, cs))),
    st.text(max_size=200),
    json_values.map(lambda v: yaml.safe_dump(v)),
    st.builds(with_change, st.just(MINIMAL), st.sampled_from(CONFIG_PATHS),
              st.one_of(json_values, st.sampled_from(["s3://KEY:SECRET@bucket/x", "resnet50", "bf16", -1, 0, 10**30])))
    .map(lambda t: yaml.safe_dump(t)),
)


@fuzz(100)
@given(text=yaml_texts)
@example(text="a: 2001-13-45\n")  # yaml's constructors raise ValueError
@example(text="[" * 5000)
def test_fuzz_job_config_yaml(sandbox, text):
    path = sandbox / "configs" / f"{uuid.uuid4().hex[:12]}.yaml"
    path.parent.mkdir(exist_ok=True)
    path.write_text(text, encoding="utf-8", errors="surrogatepass")
    config = outcome("job-config YAML", lambda: load_config(path))
    # A batch need no longer split evenly (shard_bounds), but every accepted config can run.
    assert config is None or (config.sampler.batch_size % config.sampler.samples_per_class == 0
                              and 1 <= config.scaling.worker_range[0] <= config.scaling.worker_range[1])


@fuzz(50)
@given(overrides=st.lists(st.one_of(GOOD_CHANGES.map(lambda c: f"{c[0]}={json.dumps(c[1])}"), st.text(max_size=30),
                                    st.builds("{}={}".format, st.sampled_from(CONFIG_PATHS), st.text(max_size=20))),
                          max_size=3))
@example(overrides=["train.epochs=2001-13-45"])
@example(overrides=["model.dim=[[[[["])
def test_fuzz_config_overrides(overrides):
    config = outcome("--set overrides", lambda: load_config(MINIMAL, overrides))
    assert config is None or 1 <= config.scaling.worker_range[0] <= config.scaling.worker_range[1]
