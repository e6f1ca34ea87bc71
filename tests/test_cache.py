"""The node cache against a hostile neighbour (issue 23, finding 1) and an unwritable cache
directory (finding 11): on a real S3 endpoint (moto's server), two datasets, one cache."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from rsk_dist.data.cache import DIGEST, cached_shards
from rsk_dist.data.shards import ShardSource
from rsk_dist.ingest import ingest
from rsk_dist.storage import MARKER, filesystem, join
from tests.images import image_bytes
from tests.test_ingest import make_folders, put

ROOT = str(Path(__file__).resolve().parents[1])


def bmp_folders(root: Path, seed: int) -> None:
    """3 classes of 4 BMP images: the same sizes (and so shard offsets) for every seed."""
    for c in range(3):
        for i in range(4):
            put(root / f"class{c}" / f"{i}.bmp", image_bytes(seed + 10 * c + i, fmt="BMP", size=(20, 16)))


def read_all(url: str, cache: str | None, rounds: int = 2) -> tuple[torch.Tensor, ShardSource]:
    """Every image of the dataset, read ``rounds`` times (the later rounds partly from the cache:
    close() waits for the download in flight and drops the queued ones); the last round's pixels."""
    src = ShardSource(url, "train", image_size=16, train=False, cache_dir=cache)
    for _ in range(rounds):
        images, _ = src(torch.arange(len(src)))
        src.close()
    return images, src


def test_a_neighbour_with_a_copied_manifest_cannot_poison_the_victims_cache(s3, tmp_path):
    victim_url, attacker_url, cache = s3.url(), s3.url(), str(tmp_path / "cache")
    bmp_folders(tmp_path / "victim", seed=0)
    bmp_folders(tmp_path / "attacker", seed=1000)
    ingest(str(tmp_path / "victim"), victim_url, "folders", shard_bytes=2000)
    staging = s3.url()
    ingest(str(tmp_path / "attacker"), staging, "folders", shard_bytes=2000)

    # The attack: the victim's public marker and index copied into the attacker's prefix, and
    # shards of equal size there holding the attacker's images.
    fs, _ = filesystem(victim_url)
    victim_root, attacker_root, staging_root = (u.removeprefix("s3://") for u in (victim_url, attacker_url, staging))
    manifest = json.loads(fs.cat_file(join(victim_root, MARKER)))
    theirs = json.loads(fs.cat_file(join(staging_root, MARKER)))
    fs.pipe_file(join(attacker_root, MARKER), fs.cat_file(join(victim_root, MARKER)))
    fs.pipe_file(join(attacker_root, manifest["index"]["path"]), fs.cat_file(join(victim_root, manifest["index"]["path"])))
    assert len(manifest["shards"]) == len(theirs["shards"]) > 1
    for name, their_name in zip(sorted(manifest["shards"]), sorted(theirs["shards"])):
        data = fs.cat_file(join(staging_root, their_name))
        assert len(data) == manifest["shards"][name]["size"] and data != fs.cat_file(join(victim_root, name))
        fs.pipe_file(join(attacker_root, name), data)

    truth, _ = read_all(victim_url, None, rounds=1)
    attacker_pixels, attacker = read_all(attacker_url, cache)  # fills the shared cache, if it can
    assert not torch.equal(attacker_pixels, truth)  # the attacker's own images, read from the store
    # Its downloads fail the manifest's sha256: nothing of it entered the cache.
    assert attacker.stats["downloads"] == 0 and attacker.stats["cache_failures"] >= 1 and cached_shards(cache) == []

    pixels, victim = read_all(victim_url, cache)
    assert torch.equal(pixels, truth) and victim.bad_samples == 0
    assert victim.stats["downloads"] >= 1 and victim.stats["cache_reads"] > 0  # its own cache works

    # A cached shard whose stored digest is not the manifest's is not served: read from the store.
    for path in cached_shards(cache):
        Path(path + DIGEST).write_text("0" * 64)
    again = ShardSource(victim_url, "train", image_size=16, train=False, cache_dir=cache)
    images, _ = again(torch.arange(len(again)))
    assert torch.equal(images, truth) and again.stats["cache_reads"] == 0 and again.stats["requests"] > 0
    again.close()


CACHE_READER = """
import os, resource, signal, sys, warnings, torch
from rsk_dist.data.shards import ShardSource
warm = ShardSource(sys.argv[1], None, image_size=16, train=False)
warm(torch.arange(len(warm)))  # every module imported and the decoders started, no cache
if sys.argv[3] == "full":
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (1000, 1000))  # larger files fail with EFBIG, as on a full disk
elif os.geteuid() == 0:
    # Root writes anywhere: drop the capabilities that let it (CAP_DAC_OVERRIDE, _READ_SEARCH),
    # so the directory's mode applies, as it does to a job's user. Switching to another user
    # instead would lose the venv too where it sits in a 0700 directory (CI's mktemp -d).
    import ctypes
    header = (ctypes.c_uint32 * 2)(0x20080522, 0)  # _LINUX_CAPABILITY_VERSION_3, this process
    data = (ctypes.c_uint32 * 6)()  # effective, permitted, inheritable, for bits 0-31 and 32-63
    libc = ctypes.CDLL(None, use_errno=True)
    assert libc.capget(header, data) == 0, os.strerror(ctypes.get_errno())
    for i in (0, 1):
        data[i] &= ~0b110  # bit 1 CAP_DAC_OVERRIDE, bit 2 CAP_DAC_READ_SEARCH
    assert libc.capset(header, data) == 0, os.strerror(ctypes.get_errno())
src = ShardSource(sys.argv[1], None, image_size=16, train=False, cache_dir=sys.argv[2])
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    for _ in range(3):
        src(torch.arange(len(src)))
        src.close()  # lets the background downloads run
print(len([w for w in caught if sys.argv[4] in str(w.message)]), src.stats["cache_failures"],
      src.stats["downloads"], src.stats["requests"])
"""


@pytest.mark.parametrize("fault, warning", [("full", "cannot take more"), ("unwritable", "refuses access")])
def test_a_cache_directory_that_refuses_writes_turns_caching_off_with_one_warning(s3, tmp_path, fault, warning):
    """A full disk (EFBIG here), or a directory that refuses access (EACCES; issue 23, 11)."""
    make_folders(tmp_path / "src", classes=4)
    url = s3.url()
    ingest(str(tmp_path / "src"), url, "folders", shard_bytes=3000)
    cache = tmp_path / "cache"
    if fault == "unwritable":
        cache.mkdir()
        cache.chmod(0o555)
    out = subprocess.run([sys.executable, "-c", CACHE_READER, url, str(cache), fault, warning], capture_output=True,
                         text=True, env={**os.environ, "PYTHONPATH": ROOT, "HOME": str(tmp_path)}, timeout=120, cwd="/")
    assert out.returncode == 0, out.stderr[-2000:]
    warned, failures, downloads, requests = map(int, out.stdout.split())
    # Several shards, yet one failure and one warning; every read still served from the store.
    assert (warned, failures, downloads) == (1, 1, 0) and requests > 0
