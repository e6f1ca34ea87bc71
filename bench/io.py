"""Images/s delivered to one worker: shards + ranged reads vs one object per image, on an S3
store (a moto server this script starts on 127.0.0.1, in its own process), and local shards.

Each case reads class-balanced batches (the sampler's, B/4 classes x 4 images) and decodes and
augments them the same way (:mod:`rsk_dist.data.shards`: random resized crop + flip, 8
threads); only how the bytes are fetched differs. Data: Omniglot's images_background_small1.zip
(tiny PNGs, about 240 bytes each) and generated JPEGs (about 8 KB each).

    python bench/io.py [--batch 256] [--batches 4] [--threads 8] [--datasets omniglot jpeg]
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
import zipfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from bench.measure import in_subprocess, machine, measure, table  # noqa: E402
from rsk_dist.data.shards import ShardSource, decode, to_tensor, transform  # noqa: E402
from rsk_dist.sampler import ClassBalancedSampler  # noqa: E402
from rsk_dist.storage import filesystem  # noqa: E402

OMNIGLOT_ZIP = Path(__file__).resolve().parents[2] / "shared/data/omniglot/images_background_small1.zip"
BUCKET = "rsk-bench"
SIZES = {"omniglot": (28, 1), "jpeg": (64, 3)}  # image_size, channels


class PerObjectSource:
    """The baseline: every image its own object, one GET each, on a thread pool; decoded and
    augmented as ShardSource does."""

    def __init__(self, prefix: str, sample_ids: list[str], labels: torch.Tensor, image_size: int, in_channels: int, threads: int) -> None:
        self.fs, self.root = filesystem(prefix)
        self.ids, self.labels, self.size, self.channels = sample_ids, labels, image_size, in_channels
        self.pool = ThreadPoolExecutor(threads)
        self.requests = 0

    def _one(self, i: int) -> torch.Tensor:
        raw = self.fs.cat_file(f"{self.root}/{self.ids[i]}")
        rng = np.random.default_rng([0, i])
        return to_tensor(transform(decode(raw, self.channels), self.size, True, rng))

    def __call__(self, indices: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        self.requests += indices.numel()
        return torch.stack(list(self.pool.map(self._one, indices.tolist()))), self.labels[indices]


def run_case(kind: str, dataset: str, root: str, batch: int, batches: int, threads: int) -> dict:
    size, channels = SIZES[dataset]
    shards_url = f"s3://{BUCKET}/{dataset}/shards" if kind != "local" else f"file://{root}/{dataset}-shards"
    src = ShardSource(shards_url, "train", image_size=size, train=True, in_channels=channels, prefetch_threads=threads)
    if kind == "objects":
        src = PerObjectSource(f"s3://{BUCKET}/{dataset}/objects", src.sample_ids, src.labels, size, channels, threads)
    sampler = ClassBalancedSampler(src.labels, batch_size=batch, samples_per_class=4, seed=0)
    steps = [sampler.shard(0, s, 0, 1) for s in range(batches)]

    def run() -> None:
        for idx in steps:
            images, _ = src(idx)
            assert images.shape[0] == batch

    result = measure(run, "cpu", repeats=2)
    requests = src.requests if kind == "objects" else src.stats["requests"]
    calls = 3 * batches  # measure's warm-up + 2 repeats
    result["images_per_s"] = batch * batches / result["seconds"]
    result["requests_per_batch"] = requests / calls
    return result


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start_moto() -> tuple[subprocess.Popen, str]:
    port = _free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.time() + 60
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return proc, f"http://127.0.0.1:{port}"
        except OSError:
            if time.time() > deadline or proc.poll() is not None:
                proc.kill()
                raise RuntimeError("the moto server did not start") from None
            time.sleep(0.2)


def _jpeg_folder(root: Path, classes: int = 96, per_class: int = 8, side: int = 96) -> Path:
    from PIL import Image

    rng = np.random.default_rng(0)
    for c in range(classes):
        base = rng.integers(0, 256, 3)
        for i in range(per_class):
            # smooth gradients plus noise: JPEG sizes like natural thumbnails
            y, x = np.mgrid[0:side, 0:side]
            arr = (base + np.stack([x, y, x + y], -1) * rng.uniform(0.5, 1.5) + rng.normal(0, 12, (side, side, 3))) % 256
            path = root / f"class{c:03d}" / f"{i}.jpg"
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(arr.astype(np.uint8)).save(path, quality=90)
    return root


def prepare(dataset: str, tmp: Path) -> None:
    from rsk_dist.ingest import ingest

    if dataset == "omniglot":
        source = str(OMNIGLOT_ZIP)
        with zipfile.ZipFile(OMNIGLOT_ZIP) as z:
            blobs = {n: z.read(n) for n in z.namelist() if n.endswith(".png")}
    else:
        folder = _jpeg_folder(tmp / "jpeg-src")
        source = str(folder)
        blobs = {str(p.relative_to(folder)): p.read_bytes() for p in folder.rglob("*.jpg")}
    ingest(source, f"s3://{BUCKET}/{dataset}/shards", "folders")
    ingest(source, f"file://{tmp}/{dataset}-shards", "folders")
    fs, _ = filesystem(f"s3://{BUCKET}")
    fs.pipe({f"{BUCKET}/{dataset}/objects/{name}": data for name, data in blobs.items()})
    sizes = [len(b) for b in blobs.values()]
    print(f"{dataset}: {len(blobs)} images, mean {np.mean(sizes) / 1024:.1f} KiB", file=sys.stderr)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--batches", type=int, default=4)
    parser.add_argument("--threads", type=int, default=8)
    parser.add_argument("--datasets", nargs="+", default=["omniglot", "jpeg"], choices=sorted(SIZES))
    parser.add_argument("--case", nargs=6, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.case:
        kind, dataset, root, batch, batches, threads = args.case
        print(json.dumps(run_case(kind, dataset, root, int(batch), int(batches), int(threads))))
        return

    datasets = [d for d in args.datasets if d != "omniglot" or OMNIGLOT_ZIP.is_file()]
    proc, endpoint = _start_moto()
    saved = dict(os.environ)
    os.environ.update(
        AWS_ACCESS_KEY_ID="bench", AWS_SECRET_ACCESS_KEY="bench-secret", AWS_DEFAULT_REGION="us-east-1",
        AWS_ENDPOINT_URL=endpoint, AWS_EC2_METADATA_DISABLED="true",
    )
    rows = []
    try:
        with tempfile.TemporaryDirectory() as tmp:
            filesystem(f"s3://{BUCKET}")[0].mkdir(BUCKET)
            for dataset in datasets:
                prepare(dataset, Path(tmp))
                results = {}
                for kind in ("objects", "shards", "local"):
                    results[kind] = in_subprocess(__file__, [kind, dataset, tmp, str(args.batch), str(args.batches), str(args.threads)])
                    print(f"done {dataset} {kind}: {results[kind]}", file=sys.stderr)
                base = results["objects"].get("images_per_s")
                names = {
                    "objects": "S3, one object per image",
                    "shards": "S3, shards + ranged reads",
                    "local": "local disk, shards + ranged reads",
                }
                for kind, r in results.items():
                    if "error" in r:
                        rows.append([dataset, names[kind], "-", r["error"], "-", "-"])
                        continue
                    ratio = f"{r['images_per_s'] / base:.1f}x" if base else "-"
                    rows.append([
                        dataset, names[kind], f"{r['requests_per_batch']:.1f}", f"{r['images_per_s']:.0f}",
                        ratio, f"{r['peak_growth_mb']:.0f}",
                    ])
    finally:
        os.environ.clear()
        os.environ.update(saved)
        proc.terminate()
        proc.wait(timeout=30)
    print(
        f"Data delivered to one worker, batches of {args.batch} (B/4 classes x 4), {args.batches} batches per run, "
        f"{args.threads} reader threads, decode + random resized crop + flip; S3 = moto server on 127.0.0.1 "
        f"(own process): {machine()}\n"
    )
    print(table(["data", "source", "requests / batch", "images/s", "vs one object per image", "peak MB"], rows))


if __name__ == "__main__":
    main()
