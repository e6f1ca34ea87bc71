"""ShardSource: ranged reads of class-balanced batches from S3 (moto) and local shards, the
augmentation's determinism, bad samples, read errors, the local cache and pickling."""
from __future__ import annotations

import io
import os
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
from rsk_dist.data.feeder import Feeder  # noqa: E402
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
    assert images.shape == (64, 1, size, size) and images.dtype == torch.uint8
    assert torch.equal(labels, src.labels[idx]) and labels.view(16, 4).unique(dim=1).shape[1] == 1
    with zipfile.ZipFile(OMNIGLOT_ZIP) as z:
        for k, (raw, i) in enumerate(zip(src.read_bytes(idx), idx.tolist())):
            member = src.sample_ids[i]
            assert raw == z.read(member)  # the stored bytes are the zip's
            assert src.class_names[labels[k]] == "/".join(member.split("/")[1:3])
            pixels = np.asarray(Image.open(io.BytesIO(z.read(member))).convert("L"), dtype=np.uint8)
            assert torch.equal(images[k, 0], torch.from_numpy(pixels[6:98, 6:98].copy()))
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
    # A sample's crop depends on the step's key and on the sample alone: split between two
    # workers, the batch is augmented as it is in one piece; another step's key crops otherwise.
    a.prefetch(idx, key=5)
    whole, _ = a(idx, key=5)
    halves = torch.cat([b(idx[:12], key=5)[0], b(idx[12:], key=5)[0]])
    assert torch.equal(whole, halves)
    assert not torch.equal(whole, x1)


def test_local_rgb_source_is_uint8_normalised_by_the_feeder(tmp_path):
    make_folders(tmp_path / "src", classes=4)
    ingest(str(tmp_path / "src"), f"file://{tmp_path}/ds", "folders", shard_bytes=4000)
    src = ShardSource(f"file://{tmp_path}/ds", "train", image_size=24, train=False, in_channels=3)
    images, labels = src(torch.tensor([0, 1, 4, 5]))
    assert images.shape == (4, 3, 24, 24) and images.dtype == torch.uint8 and labels.tolist() == [0, 0, 1, 1]
    raw = np.asarray(Image.open(io.BytesIO(src.read_bytes([0])[0])).convert("RGB"), dtype=np.float32) / 255
    assert abs(float(images[0].float().mean()) / 255 - raw.mean()) < 0.05  # resize/crop keeps the overall level
    feeder = Feeder(src)
    fed, fed_labels = feeder(torch.tensor([0, 1, 4, 5]))
    assert torch.equal(fed, images) and torch.equal(fed_labels, labels)  # uint8 to the device
    floats = feeder.normalize(fed)
    mean = torch.tensor([0.485, 0.456, 0.406]).view(3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(3, 1, 1)
    assert floats.dtype == torch.float32
    torch.testing.assert_close(floats * std + mean, images.float() / 255)
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
    with pytest.raises(BadSampleError, match=r"'class2/0.png'.*shards/[0-9a-f]{16}/shard-00000.bin offset \d+ length 14"):
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


# --------------------------------------------------------------------------- issue 11: the data path at scale


def _jpeg_dataset(tmp_path: Path, classes: int = 6, per_class: int = 4) -> str:
    for c in range(classes):
        for i in range(per_class):
            path = tmp_path / "src" / f"class{c}" / f"{i}.jpg"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(image_bytes(100 * c + i, fmt="JPEG", size=(48, 36)))
    url = f"file://{tmp_path}/ds"
    ingest(str(tmp_path / "src"), url, "folders", shard_bytes=6000)
    return url


def test_augmentation_is_identical_whatever_decoders_prefetch_depth_and_workers(tmp_path):
    url = _jpeg_dataset(tmp_path)
    labels = ShardSource(url, "train", image_size=16, train=True).labels
    sampler = ClassBalancedSampler(labels, batch_size=8, samples_per_class=4, seed=1)
    steps, epochs = 3, 2

    def run(decoders: int, depth: int, world: int) -> torch.Tensor:
        feeders = [
            Feeder(ShardSource(url, "train", image_size=16, train=True, seed=5, decoders=decoders, max_pending=depth + 1))
            for _ in range(world)
        ]
        batches = []
        for e in range(epochs):
            for s in range(steps):
                parts = []
                for rank, feeder in enumerate(feeders):
                    feeder.prefetch_ahead(sampler, e, s, steps, epochs * steps, depth, rank, world)
                    parts.append(feeder(sampler.shard(e, s, rank, world), sampler.augment_key(e, s))[0])
                batches.append(torch.cat(parts))
        for feeder in feeders:
            assert feeder.source.stats["prefetch_misses"] == (1 if depth else epochs * steps)
            feeder.source.close()
        return torch.stack(batches)

    reference = run(decoders=1, depth=0, world=1)
    assert reference.dtype == torch.uint8 and not torch.equal(reference[0], reference[1])
    for decoders, depth, world in ((3, 0, 1), (1, 6, 1), (2, 2, 2), (3, 6, 4)):
        assert torch.equal(run(decoders, depth, world), reference), (decoders, depth, world)


def test_decoder_processes_give_the_in_process_augmentation_and_survive_a_kill(tmp_path):
    import signal

    from rsk_dist.data.decode import Decoder

    url = _jpeg_dataset(tmp_path)
    src = ShardSource(url, "train", image_size=16, train=True, seed=3, decoders=2)
    idx = ClassBalancedSampler(src.labels, batch_size=24, samples_per_class=4, seed=0).shard(0, 0, 0, 1)
    images, _ = src(idx, key=9)  # 3 chunks: both processes start
    # Decoded in other processes, the pixels are what this process's own decoding gives.
    for k, (raw, s) in enumerate(zip(src.read_bytes(idx), idx.tolist())):
        assert torch.equal(images[k], torch.from_numpy(src.augment(raw, s, 9)).permute(2, 0, 1))
    # Decoder processes killed between batches (as the OS does under memory pressure): they
    # are started again and the next batches come out the same.
    pids = Decoder.shared(2).pids
    assert len(pids) == 2
    for pid in pids:
        os.kill(pid, signal.SIGKILL)
    src.prefetch(idx, key=9)
    assert torch.equal(src(idx, key=9)[0], images)
    assert torch.equal(src(idx, key=9)[0], images)
    assert len(set(Decoder.shared(2).pids) - set(pids)) == 2
    src.close()


def test_a_decoder_process_that_dies_decoding_is_a_clear_error_and_is_replaced():
    from rsk_dist.data.decode import Augment, Decoder, DecoderDied

    from tests.images import KillsItsDecoder

    decoder = Decoder(1)
    with pytest.raises(DecoderDied, match="killed by signal 9.*out of memory.*data.decoders"):
        decoder.submit(KillsItsDecoder(), 0, [(0, 0, b"")])[0].result(timeout=60)
    [(pos, image)] = decoder.submit(Augment(1, 8, False, 0), 0, [(3, 0, image_bytes(1))])[0].result(timeout=60)
    assert pos == 3 and image.shape == (8, 8, 1) and image.dtype == np.uint8
    decoder.shutdown()
    assert decoder.pids == []


def test_decoder_processes_start_without_torch():
    import subprocess
    import sys

    code = "import sys, rsk_dist.data.decode; assert 'torch' not in sys.modules, 'torch imported'"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=Path(__file__).parents[1])
    assert proc.returncode == 0, proc.stderr


def test_exclude_classes_reaches_shards_from_the_config(tmp_path):
    from rsk_dist.config import DataConfig
    from rsk_dist.train import open_source

    make_folders(tmp_path / "src", classes=3)
    ingest(str(tmp_path / "src"), str(tmp_path / "ds"), "folders")
    data = DataConfig.model_validate({
        "train": {"kind": "shards", "url": str(tmp_path / "ds"), "split": "train", "exclude_classes": ["class1"]},
        "image_size": 16,
    })
    fed = open_source(data.train, data, train=False, in_channels=3)
    assert fed.source.class_names == ["class0", "class2"] and len(fed) == 8
    images, labels = fed(torch.arange(8))
    assert images.dtype == torch.uint8 and labels.tolist() == [0] * 4 + [1] * 4


def test_prefetch_of_six_steps_serves_every_step_after_the_first_across_epochs(tmp_path):
    from rsk_dist.config import load_config
    from rsk_dist.train import Trainer
    from tests.test_monitor import scalars

    url = _jpeg_dataset(tmp_path, classes=4, per_class=6)
    config = load_config({
        "model": {"name": "small_cnn", "dim": 8, "in_channels": 1},
        "data": {"train": {"kind": "shards", "url": url, "split": "train"}, "image_size": 16, "prefetch_steps": 6},
        "sampler": {"batch_size": 8, "samples_per_class": 4},
        "train": {"epochs": 2, "steps_per_epoch": 5, "chunk_size": 8},
        "run": {"storage_path": f"file://{tmp_path}/runs"},
    })
    trainer = Trainer(config, torch.device("cpu"))
    trainer.run(lambda metrics, state: None)
    source = trainer.train_data.source
    # Six ahead with five steps an epoch: the second epoch's steps are prefetched in the first.
    assert source.stats["prefetch_misses"] == 1 and source.stats["prefetch_hits"] == 9
    # Every step's wait and fetch time reach the monitor's TensorBoard events.
    tags = scalars(tmp_path / "runs" / config.run.name / "tensorboard")
    assert set(tags["time/data_wait_s"]) == set(range(1, 11)) and min(tags["time/data_wait_s"].values()) >= 0
    assert set(tags["time/data_s"]) == set(range(1, 11)) and min(tags["time/data_s"].values()) > 0


SHARED_CACHE_READER = """
import sys, time, torch
from rsk_dist.data.cache import cached_shards
from rsk_dist.data.shards import ShardSource
src = ShardSource(sys.argv[1], None, image_size=16, train=False, cache_dir=sys.argv[2])
src(torch.arange(len(src)))
deadline = time.time() + 60
while len(cached_shards(sys.argv[2])) < len(src.shard_names) and time.time() < deadline:
    time.sleep(0.05)  # this process's or the other's background downloads
src.close()
print(src.stats["downloads"])
"""


def test_two_processes_on_a_node_download_each_shard_once(s3, tmp_path):
    import os
    import subprocess
    import sys

    make_folders(tmp_path / "src", classes=4)
    url = s3.url()
    ingest(str(tmp_path / "src"), url, "folders", shard_bytes=3000)
    shards = len(ShardSource(url, None, image_size=16, train=False).shard_names)
    assert shards >= 3
    cache = tmp_path / "cache"
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    procs = [
        subprocess.Popen([sys.executable, "-c", SHARED_CACHE_READER, url, str(cache)], stdout=subprocess.PIPE, text=True, env=env)
        for _ in range(2)
    ]
    downloads = [int(p.communicate(timeout=120)[0].split()[-1]) for p in procs]
    assert sum(downloads) == shards
    assert len(list(cache.rglob("shard-*.bin"))) == shards and not list(cache.rglob("*.tmp-*"))


def test_eviction_keeps_the_cache_under_its_limit(s3, tmp_path):
    from rsk_dist.data.cache import cached_shards

    make_folders(tmp_path / "src", classes=4)
    url = s3.url()
    ingest(str(tmp_path / "src"), url, "folders", shard_bytes=3000)
    probe = ShardSource(url, None, image_size=16, train=False)
    sizes = [probe.manifest["shards"][n]["size"] for n in probe.shard_names]
    limit = sum(sorted(sizes)[-2:])  # room for any two shards, not for all
    assert len(sizes) >= 3 and limit < sum(sizes)
    cache = str(tmp_path / "cache")
    src = ShardSource(url, None, image_size=16, train=False, cache_dir=cache, cache_max_bytes=limit)
    for shard in range(len(sizes)):  # one shard at a time: each download needs room
        first = int(np.flatnonzero(src._shard == shard)[0])
        src(torch.tensor([first]))
        src.close()
        assert sum(os.path.getsize(p) for p in cached_shards(cache)) <= limit
    assert src.stats["downloads"] == len(sizes) and len(cached_shards(cache)) < len(sizes)
    # The last shard read is the one kept for sure; reads of evicted shards go to the store.
    last = src.shard_names[-1].split("/")[-1]
    assert last in {os.path.basename(p) for p in cached_shards(cache)}
    requests = src.stats["requests"]
    src(torch.arange(len(src)))
    assert src.stats["requests"] > requests


def test_draft_decodes_jpegs_smaller_cropping_the_same_region(tmp_path):
    y, x = np.mgrid[0:150, 0:200]
    for c in range(2):
        for i in range(4):
            arr = np.stack([x * (1 + i) % 256, y * (1 + c), (x + y) // 2], -1).astype(np.uint8)
            path = tmp_path / "src" / f"class{c}" / f"{i}.jpg"
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(arr).save(path, quality=95)
    ingest(str(tmp_path / "src"), str(tmp_path / "ds"), "folders")
    idx = torch.arange(8)
    exact, _ = ShardSource(str(tmp_path / "ds"), "train", image_size=12, train=True)(idx, key=3)
    drafted, _ = ShardSource(str(tmp_path / "ds"), "train", image_size=12, train=True, draft=True)(idx, key=3)
    # Reduced-size decoding changes pixels (hence off by default), not the region cropped.
    assert not torch.equal(exact, drafted)
    assert float((exact.float() - drafted.float()).abs().mean()) < 8
