"""Images/s handed to one training worker at paper scale, ours beside the usual PyTorch recipe.

Data: generated JPEGs of 500x375 (about 40 KB each, like SOP's and CUB's photos), 16 per class,
ingested into shards on a moto S3 server (its own process, on 127.0.0.1) and on local disk.
Every case draws the same class-balanced batches of 512 (the sampler's: 128 classes x 4) and
augments as the paper does: random resized crop to 224 and a horizontal flip.

- baseline: a map-style Dataset that reads one local file per image with Pillow and applies
  torchvision's RandomResizedCrop(224), RandomHorizontalFlip, ToTensor and Normalize, through
  ``DataLoader`` with 1 and 2 worker processes: float32 batches.
- ours: :class:`rsk_dist.data.shards.ShardSource` with 1 and 2 decoder processes, prefetching two
  batches ahead as training does, from S3 behind a TCP proxy (written here) that holds every
  request for 30 ms before passing it on, and from local disk: uint8 batches; and from local
  disk with ``draft`` (JPEGs decoded at reduced size where the crop allows; off by default).

    python bench/io.py [--images 2048] [--batches 4] [--latency-ms 30]
    python bench/io.py --train 12     # acceptance 2: a CPU training run from the slowed S3

Each case runs in a fresh process (bench.measure.in_subprocess) pinned to as many cores as it
has decoders or DataLoader workers (``sched_setaffinity``, inherited by the processes it starts),
so that "n decoders" means n cores; ratios are ours / baseline at the same number of cores. The
moto server and the latency proxy are pinned to the cores the case does not use, where there
are any (on 2 cores: at n = 1 only; at n = 2 they share the case's cores).
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from bench.measure import in_subprocess, machine, table  # noqa: E402

BUCKET = "rsk-bench"
PER_CLASS = 16
BATCH = 512
SIZE = 224
SHARD_BYTES = 1 << 20
CORES = sorted(os.sched_getaffinity(0))


# --------------------------------------------------------------------------- data


def generate(root: Path, images: int, seed: int = 0) -> Path:
    """``images`` JPEGs of 500x375, about 40 KB each (smooth colour fields, texture and noise
    at quality 85), ``PER_CLASS`` per class folder."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:375, 0:500].astype(np.float32)
    noise = rng.normal(0, 7, (375, 1000, 3)).astype(np.float32)
    for i in range(images):
        path = root / f"class{i // PER_CLASS:04d}" / f"{i % PER_CLASS:02d}.jpg"
        path.parent.mkdir(parents=True, exist_ok=True)
        low = Image.fromarray(rng.integers(0, 256, (6, 8, 3), dtype=np.uint8)).resize((500, 375), Image.Resampling.BICUBIC)
        fx, fy = rng.uniform(0.05, 0.3, 2)
        shift = int(rng.integers(0, 500))
        arr = np.asarray(low, dtype=np.float32) + (20 * np.sin(fx * x + fy * y))[..., None] + noise[:, shift : shift + 500]
        Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8)).save(path, quality=85)
    return root


def batches(labels: torch.Tensor, count: int) -> list[torch.Tensor]:
    from rsk_dist.sampler import ClassBalancedSampler

    sampler = ClassBalancedSampler(labels, batch_size=BATCH, samples_per_class=4, seed=0)
    return [sampler.shard(0, s, 0, 1) for s in range(count)]


# --------------------------------------------------------------------------- the latency proxy


def start_proxy(target_port: int, latency_s: float) -> tuple[int, int]:
    """A TCP proxy on 127.0.0.1 (a daemon thread with its own event loop) to ``target_port``
    that holds the first bytes of every request for ``latency_s``: a request starts when the
    client sends after the server has answered (HTTP keep-alive reuses the connection).
    Returns its port and its thread's native id (to pin it to cores)."""
    ready: list[int] = []
    started = threading.Event()

    async def pump(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, state: dict, upstream: bool) -> None:
        try:
            while data := await reader.read(65536):
                if upstream and state["new_request"]:
                    state["new_request"] = False
                    await asyncio.sleep(latency_s)
                elif not upstream:
                    state["new_request"] = True
                writer.write(data)
                await writer.drain()
        except (ConnectionError, asyncio.CancelledError):
            pass
        finally:
            writer.close()

    async def handle(client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        server_r, server_w = await asyncio.open_connection("127.0.0.1", target_port)
        state = {"new_request": True}
        await asyncio.gather(pump(client_r, server_w, state, True), pump(server_r, client_w, state, False))

    async def main() -> None:
        server = await asyncio.start_server(handle, "127.0.0.1", 0, backlog=1024)
        ready.extend((server.sockets[0].getsockname()[1], threading.get_native_id()))
        started.set()
        async with server:
            await server.serve_forever()

    threading.Thread(target=lambda: asyncio.run(main()), daemon=True).start()
    started.wait(10)
    return ready[0], ready[1]


def store_cpu_s(moto_pid: int) -> float:
    """CPU seconds used so far by the moto server and by this process (the proxy's thread; the
    rest of this process only waits for the cases)."""
    with open(f"/proc/{moto_pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK") + time.process_time()


def start_moto() -> tuple[subprocess.Popen, int]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    deadline = time.time() + 60
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return proc, port
        except OSError:
            if time.time() > deadline or proc.poll() is not None:
                proc.kill()
                raise RuntimeError("the moto server did not start") from None
            time.sleep(0.2)


# --------------------------------------------------------------------------- the cases


class FileDataset(torch.utils.data.Dataset):
    """The usual recipe: one local file per image, Pillow, torchvision's transforms."""

    def __init__(self, paths: list[str]) -> None:
        from torchvision import transforms

        self.paths = paths
        self.transform = transforms.Compose([
            transforms.RandomResizedCrop(SIZE), transforms.RandomHorizontalFlip(), transforms.ToTensor(),
            transforms.Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
        ])

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> torch.Tensor:
        from PIL import Image

        with Image.open(self.paths[i]) as img:
            return self.transform(img.convert("RGB"))


def run_baseline(root: str, workers: int, count: int) -> dict:
    from rsk_dist.data.shards import ShardSource

    local = ShardSource(f"file://{root}/shards", "train", image_size=SIZE, train=True)
    paths = [f"{root}/images/{sid}" for sid in local.sample_ids]
    steps = [b.tolist() for b in batches(local.labels, count)]
    loader = torch.utils.data.DataLoader(FileDataset(paths), batch_sampler=steps, num_workers=workers)
    t0 = time.perf_counter()
    out = [images for images in loader]
    seconds = time.perf_counter() - t0
    return {"images_per_s": BATCH * count / seconds, "bytes_per_image": out[0][0].nbytes, "requests_per_batch": BATCH}


def run_ours(url: str, decoders: int, count: int, draft: bool = False) -> dict:
    from rsk_dist.data.decode import CHUNK
    from rsk_dist.data.shards import ShardSource

    src = ShardSource(url, "train", image_size=SIZE, train=True, decoders=decoders, max_pending=3, draft=draft)
    steps = batches(src.labels, count)
    # The decoder processes start once in a run (each imports numpy and Pillow): started before
    # the clock, as the baseline's forked workers need no start.
    src(np.arange(decoders * CHUNK))
    requests = src.stats["requests"]
    t0 = time.perf_counter()
    for s, idx in enumerate(steps):
        for ahead in steps[s + 1 : s + 3]:  # as training prefetches, prefetch_steps = 2
            src.prefetch(ahead)
        images, _ = src(idx)
    seconds = time.perf_counter() - t0
    src.close()
    return {
        "images_per_s": BATCH * count / seconds, "bytes_per_image": images[0].nbytes,
        "requests_per_batch": (src.stats["requests"] - requests) / count,
    }


def run_training(url: str, root: str, steps: int) -> dict:
    """A CPU training run of ResNet-50 at 64 px, batches of 64 from ``url``: per step, how long
    it waited for its batch against the step's time."""
    from rsk_dist.config import load_config
    from rsk_dist.train import Trainer

    config = load_config({
        "model": {"name": "resnet50", "dim": 128},
        "data": {"train": {"kind": "shards", "url": url, "split": "train"}, "image_size": 64, "prefetch_steps": 2},
        "sampler": {"batch_size": 64, "samples_per_class": 4},
        "train": {"epochs": 1, "steps_per_epoch": steps, "chunk_size": 64},
        "scaling": {"cpus_per_worker": 1},
        "run": {"storage_path": f"file://{root}/runs"},
    })
    trainer = Trainer(config, torch.device("cpu"))
    per_step: list[dict] = []
    log_step = trainer.monitor.log_step  # every step's metrics pass here (reports carry checkpoints)
    trainer.monitor.log_step = lambda step, metrics: (per_step.append(dict(metrics)), log_step(step, metrics))
    trainer.run(lambda metrics, state: None)
    return {"steps": [{k: m[k] for k in ("data_wait_s", "data_s", "step_s")} for m in per_step]}


# --------------------------------------------------------------------------- main


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=2048)
    parser.add_argument("--batches", type=int, default=4)
    parser.add_argument("--latency-ms", type=float, default=30.0)
    parser.add_argument("--train", type=int, default=0, help="steps of a training run from the slowed S3 instead")
    parser.add_argument("--case", nargs=4, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.case:
        kind, where, n, count = args.case
        if kind != "train":
            os.sched_setaffinity(0, CORES[: int(n)])
            torch.set_num_threads(int(n))  # as Ray sets OMP_NUM_THREADS to a worker's CPUs
        if kind == "baseline":
            result = run_baseline(where, int(n), int(count))
        elif kind == "train":
            result = run_training(where, n, int(count))
        else:
            result = run_ours(where, int(n), int(count), draft=kind == "ours-draft")
        print(json.dumps(result))
        return

    from rsk_dist.ingest import ingest
    from rsk_dist.storage import filesystem

    load = os.getloadavg()[0]
    moto, port = start_moto()
    proxy_port, proxy_thread = start_proxy(port, args.latency_ms / 1000)
    saved = dict(os.environ)
    os.environ.update(
        AWS_ACCESS_KEY_ID="bench", AWS_SECRET_ACCESS_KEY="bench-secret", AWS_DEFAULT_REGION="us-east-1",
        AWS_ENDPOINT_URL=f"http://127.0.0.1:{port}", AWS_EC2_METADATA_DISABLED="true",
    )
    try:
        with tempfile.TemporaryDirectory() as tmp:
            t0 = time.perf_counter()
            images = generate(Path(tmp) / "images", args.images)
            sizes = [p.stat().st_size for p in images.rglob("*.jpg")]
            filesystem(f"s3://{BUCKET}")[0].mkdir(BUCKET)
            # Shards of 1 MB: moto copies a whole object for every ranged GET (real S3 does not),
            # which with 64 MB shards would measure moto's copying, not the reader.
            ingest(str(images), f"s3://{BUCKET}/shards", "folders", shard_bytes=SHARD_BYTES)
            ingest(str(images), f"file://{tmp}/shards", "folders", shard_bytes=SHARD_BYTES)
            print(f"{len(sizes)} JPEGs of 500x375, mean {np.mean(sizes) / 1024:.1f} KiB, "
                  f"{len(sizes) // PER_CLASS} classes; made and ingested in {time.perf_counter() - t0:.0f} s", file=sys.stderr)
            os.environ["AWS_ENDPOINT_URL"] = f"http://127.0.0.1:{proxy_port}"  # the cases read through the proxy
            if args.train:
                result = in_subprocess(__file__, ["train", f"s3://{BUCKET}/shards", tmp, str(args.train)])
                print(json.dumps(result))
                steps = result["steps"][1:]
                ratio = [m["data_wait_s"] / m["step_s"] for m in steps]
                print(f"after the first step: data_wait_s / step_s max {max(ratio):.3f} mean {np.mean(ratio):.3f}; "
                      f"step_s mean {np.mean([m['step_s'] for m in steps]):.2f}; data_s (fetch) mean "
                      f"{np.mean([m['data_s'] for m in steps]):.2f}")
                return
            cases = {}
            for n in (1, 2):
                cases[("baseline", n)] = ["baseline", tmp, str(n)]
                cases[("s3", n)] = ["ours", f"s3://{BUCKET}/shards", str(n)]
                cases[("disk", n)] = ["ours", f"file://{tmp}/shards", str(n)]
                cases[("draft", n)] = ["ours-draft", f"file://{tmp}/shards", str(n)]
            results = {}
            for key, case in cases.items():
                store_cores = CORES[key[1] :] or CORES
                for pid in (moto.pid, proxy_thread):
                    os.sched_setaffinity(pid, store_cores)
                cpu = store_cpu_s(moto.pid)
                results[key] = in_subprocess(__file__, [*case, str(args.batches)])
                results[key]["store_cpu_s"] = (store_cpu_s(moto.pid) - cpu) / args.batches
                print(f"done {key}: {results[key]}", file=sys.stderr)
    finally:
        os.environ.clear()
        os.environ.update(saved)
        moto.terminate()
        moto.wait(timeout=30)

    names = {
        "baseline": "baseline: DataLoader, one local file per image",
        "s3": f"ours: S3 (+{args.latency_ms:.0f} ms per request), shards",
        "disk": "ours: local disk, shards",
        "draft": "ours: local disk, shards, data.draft",
    }
    rows = []
    for (kind, n), r in results.items():
        if "error" in r:
            rows.append([names[kind], str(n), "-", r["error"], "-", "-", "-", "-"])
            continue
        base = results[("baseline", n)].get("images_per_s")
        one = results[(kind, 1)].get("images_per_s")
        rows.append([
            names[kind], str(n), f"{r['requests_per_batch']:.0f}", f"{r['images_per_s']:.0f}",
            f"{r['images_per_s'] / base:.2f}x" if base else "-", f"{r['images_per_s'] / one:.2f}x" if one else "-",
            f"{r['bytes_per_image']:,}", f"{r['store_cpu_s']:.1f}" if kind == "s3" else "-",
        ])
    print(
        f"Batches of {BATCH} (128 classes x 4), {args.batches} per case, random resized crop {SIZE} + flip, "
        f"{len(sizes)} JPEGs 500x375 (mean {np.mean(sizes) / 1024:.0f} KiB); load average at the start "
        f"{load:.1f}: {machine()}\n"
    )
    print(table(["source", "decoders / workers", "requests / batch", "images/s", "vs baseline, same cores",
                 "vs 1 decoder / worker", "bytes / image to trainer", "moto + proxy CPU s / batch"], rows))


if __name__ == "__main__":
    main()
