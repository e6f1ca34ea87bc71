"""ShardSource: ranged reads of class-balanced batches from S3 (moto) and local shards, the
augmentation's determinism, bad samples, read errors, the local cache and pickling."""
from __future__ import annotations

import io
import pickle
import time
import warnings
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

from PIL import Image  # noqa: E402

from tests.images import OMNIGLOT_ZIP, image_bytes  # noqa: E402
from rsk_dist.data.shards import BadSampleError, ShardReadError, ShardSource  # noqa: E402
from rsk_dist.data.sources import Source  # noqa: E402
from rsk_dist.ingest import ingest  # noqa: E402
from rsk_dist.sampler import ClassBalancedSampler  # noqa: E402
from rsk_dist.storage import MARKER, StorageError  # noqa: E402



def make_folders(root: Path, classes: int = 3, per_class: int = 4, bad: dict[str, bytes] | None = None) -> None:
    for c in range(classes):
        for i in range(per_class):
            path = root / f"class{c}" / f"{i}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(image_bytes(100 * c + i, size=(40, 30)))
    for rel, data in (bad or {}).items():
        (root / rel).write_bytes(data)


@pytest.fixture(scope="module")
def omniglot_s3(s3) -> str:
    if not OMNIGLOT_ZIP.is_file():
        pytest.skip(f"{OMNIGLOT_ZIP} is absent")
    url = s3.url("omniglot-shards")
    ingest(str(OMNIGLOT_ZIP), url, "folders", shard_bytes=128 * 1024)
    return url


def test_omniglot_from_s3_is_byte_identical_to_the_zip(omniglot_s3):
    size = 92  # round(92 * 256 / 224) = 105, Omniglot's own size: the test transform only crops
    src = ShardSource(omniglot_s3, "train", image_size=size, train=False, in_channels=1)
    assert isinstance(src, Source) and len(src) == 2720 and len(src.class_names) == 136
    assert src.class_names[0] == "Balinese/character01"
    idx = ClassBalancedSampler(src.labels, batch_size=64, samples_per_class=4, seed=3).shard(0, 0, 0, 1)
    images, labels = src(idx)
    assert images.shape == (64, 1, size, size) and images.dtype == torch.float32
    assert torch.equal(labels, src.labels[idx]) and labels.view(16, 4).unique(dim=1).shape[1] == 1
    with zipfile.ZipFile(OMNIGLOT_ZIP) as z:
        for k, (raw, i) in enumerate(zip(src.read_bytes(idx), idx.tolist())):
            member = src.sample_ids[i]
            assert raw == z.read(member)  # the stored bytes are the zip's
            assert src.class_names[labels[k]] == "/".join(member.split("/")[1:3])
            pixels = np.asarray(Image.open(io.BytesIO(z.read(member))).convert("L"), dtype=np.float32)
            assert torch.equal(images[k, 0], torch.from_numpy(pixels[6:98, 6:98] / 255.0))
    # Ranged reads grouped by shard: far fewer requests than images.
    assert 0 < src.stats["requests"] < len(idx) // 2


def test_prefetch_and_deterministic_augmentation(omniglot_s3):
    a = ShardSource(omniglot_s3, "train", image_size=32, train=True, in_channels=1, seed=7)
    b = ShardSource(omniglot_s3, "train", image_size=32, train=True, in_channels=1, seed=7)
    idx = ClassBalancedSampler(a.labels, batch_size=32, samples_per_class=4).shard(1, 2, 0, 1)
    a.prefetch(idx)
    x1, y1 = a(idx)  # served by the prefetch
    x2, y2 = b(idx)  # a fresh process's view: same seed and indices, same augmentation
    assert torch.equal(x1, x2) and torch.equal(y1, y2)
    assert a.stats["requests"] == b.stats["requests"] > 0
    x3, _ = ShardSource(omniglot_s3, "train", image_size=32, train=True, in_channels=1, seed=8)(idx)
    assert not torch.equal(x1, x3)  # another seed, other crops
    # Two images of one class are cropped differently.
    assert not torch.equal(x1[0], x1[1])
    assert 0.0 <= float(x1.min()) and float(x1.max()) <= 1.0
    # A sample's crop depends on the step's key and on the sample alone: split between two
    # workers, the batch is augmented as it is in one piece; another step's key crops otherwise.
    a.prefetch(idx, key=5)
    whole, _ = a(idx, key=5)
    halves = torch.cat([b(idx[:12], key=5)[0], b(idx[12:], key=5)[0]])
    assert torch.equal(whole, halves)
    assert not torch.equal(whole, x1)


def test_local_rgb_source_normalises_and_keeps_labels(tmp_path):
    make_folders(tmp_path / "src", classes=4)
    ingest(str(tmp_path / "src"), f"file://{tmp_path}/ds", "folders", shard_bytes=4000)
    src = ShardSource(f"file://{tmp_path}/ds", "train", image_size=24, train=False, in_channels=3)
    images, labels = src(torch.tensor([0, 1, 4, 5]))
    assert images.shape == (4, 3, 24, 24) and labels.tolist() == [0, 0, 1, 1]
    raw = np.asarray(Image.open(io.BytesIO(src.read_bytes([0])[0])).convert("RGB"), dtype=np.float32) / 255
    mean = torch.tensor([0.485, 0.456, 0.406]).view(3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(3, 1, 1)
    unnorm = images[0] * std + mean
    assert float(unnorm.min()) >= -1e-5 and float(unnorm.max()) <= 1 + 1e-5
    assert abs(float(unnorm.mean()) - raw.mean()) < 0.05  # resize/crop keeps the overall level
    assert src.describe(5)["sample_id"] == "class1/1.png"


def test_corrupt_image_is_skipped_and_counted(tmp_path):
    make_folders(tmp_path / "src", bad={"class1/2.png": b"\x89PNG\r\n\x1a\n this is not an image"})
    ingest(str(tmp_path / "src"), str(tmp_path / "ds"), "folders")
    src = ShardSource(str(tmp_path / "ds"), "train", image_size=16, train=False, in_channels=3)
    bad = src.sample_ids.index("class1/2.png")
    batch = torch.tensor([4, 5, bad, 7])  # class1 only
    with pytest.warns(RuntimeWarning, match=r"skipping undecodable image 'class1/2.png'.*shard-00000.bin offset"):
        images, labels = src(batch)
    assert src.bad_samples == 1 and src.bad_sample_ids == ["class1/2.png"]
    assert torch.equal(images[2], images[3])  # replaced by the next good image of its class
    assert labels.tolist() == [1, 1, 1, 1]
    # Alone in its batch: replaced by the next image of its class in the split.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        alone, _ = src(torch.tensor([0, bad]))
    expected, _ = src(torch.tensor([bad + 1]))
    assert torch.equal(alone[1], expected[0]) and src.bad_samples == 2


def test_corrupt_image_fails_naming_it(tmp_path):
    make_folders(tmp_path / "src", bad={"class2/0.png": b"GIF89a garbage"})
    ingest(str(tmp_path / "src"), str(tmp_path / "ds"), "folders")
    src = ShardSource(str(tmp_path / "ds"), "train", image_size=16, train=True, in_channels=1, on_bad_sample="fail")
    bad = src.sample_ids.index("class2/0.png")
    with pytest.raises(BadSampleError, match=r"'class2/0.png'.*shards/shard-00000.bin offset \d+ length 14"):
        src(torch.tensor([0, bad]))


def test_missing_shard_object_raises(tmp_path):
    make_folders(tmp_path / "src")
    ingest(str(tmp_path / "src"), str(tmp_path / "ds"), "folders", shard_bytes=2000)
    src = ShardSource(str(tmp_path / "ds"), None, image_size=16, train=False, in_channels=1)
    victim = src.describe(len(src) - 1)["shard"]
    (tmp_path / "ds" / victim).unlink()
    with pytest.raises(ShardReadError, match=f"{victim} is missing.*re-run the ingest"):
        src(torch.tensor([0, len(src) - 1]))
    (tmp_path / "ds" / victim).write_bytes(b"short")
    with pytest.raises(ShardReadError, match="ended early"):
        src(torch.tensor([len(src) - 1]))


def test_incomplete_or_absent_dataset_is_refused(tmp_path):
    make_folders(tmp_path / "src")
    ingest(str(tmp_path / "src"), str(tmp_path / "ds"), "folders")
    (tmp_path / "ds" / MARKER).unlink()
    with pytest.raises(StorageError, match="incomplete ingest"):
        ShardSource(str(tmp_path / "ds"), "train", image_size=16, train=False)
    with pytest.raises(StorageError, match="no ingested dataset"):
        ShardSource(str(tmp_path / "nothing"), "train", image_size=16, train=False)


def test_unknown_split_and_excluded_classes(tmp_path):
    make_folders(tmp_path / "src", classes=3)
    ingest(str(tmp_path / "src"), str(tmp_path / "ds"), "folders")
    with pytest.raises(StorageError, match="split 'test' is not in the dataset.*train"):
        ShardSource(str(tmp_path / "ds"), "test", image_size=16, train=False)
    src = ShardSource(str(tmp_path / "ds"), "train", image_size=16, train=False, exclude_classes=("class0",))
    assert src.class_names == ["class1", "class2"] and src.labels.tolist() == [0] * 4 + [1] * 4


def test_cache_dir_serves_later_reads_locally(s3, tmp_path):
    make_folders(tmp_path / "src")
    url = s3.url()
    ingest(str(tmp_path / "src"), url, "folders", shard_bytes=3000)
    src = ShardSource(url, "train", image_size=16, train=False, in_channels=1, cache_dir=str(tmp_path / "cache"))
    idx = torch.tensor([0, 1, 5, 9])
    first, _ = src(idx)
    remote = src.stats["requests"]
    deadline = time.time() + 10
    while len(list((tmp_path / "cache").rglob("shard-*.bin"))) < len({src.describe(i)["shard"] for i in idx.tolist()}):
        assert time.time() < deadline, "the background cache download did not finish"
        time.sleep(0.05)
    src.close()  # waits for downloads in flight
    second, _ = src(idx)
    assert torch.equal(first, second)
    assert src.stats["requests"] == remote and src.stats["cache_reads"] > 0
    assert not list((tmp_path / "cache").rglob("*.tmp-*"))


def test_pickled_source_carries_no_secret_and_still_reads(s3, omniglot_s3):
    src = ShardSource(omniglot_s3, "train", image_size=28, train=False, in_channels=1)
    blob = pickle.dumps(src)
    assert s3.secret_key.encode() not in blob and s3.secret_key not in repr(src)
    clone = pickle.loads(blob)
    idx = torch.tensor([3, 4, 40, 41])
    assert torch.equal(clone(idx)[0], src(idx)[0])
