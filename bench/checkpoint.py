"""Cost per step of checkpointing every step, synchronous against asynchronous, for a
ResNet-50-sized state with Adam (model + two moment buffers, about 300 MB), to local disk and
to S3 (a moto server this script starts on 127.0.0.1, in its own process).

The step is a 2 s sleep: a GPU-bound step that leaves the host's CPU free, which is what the
background write relies on. Both modes run the service's own code: ``cpu_copy`` of the state
in the step, then ``write_checkpoint`` through the pyarrow filesystem Ray Train is given
(state file, then manifest) — in the step (sync) or in one background thread with at most one
copy in flight (async: what ``run.checkpoint_upload: async`` does in Ray's upload thread).

    python bench/checkpoint.py [--steps 3] [--step-seconds 2]
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
import torchvision  # noqa: E402

from bench.io import start_moto  # noqa: E402
from bench.measure import machine, table  # noqa: E402
from rsk_dist.checkpoint import cpu_copy, load_state, write_checkpoint  # noqa: E402
from rsk_dist.storage import filesystem  # noqa: E402

BUCKET = "rsk-bench-ckpt"


def resnet50_adam_state() -> dict:
    model = torchvision.models.resnet50()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-4)
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    optimizer.step()  # creates Adam's two moment buffers per parameter
    return {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "epoch": 0, "step": 1}


def _tensors(tree) -> list[torch.Tensor]:
    if isinstance(tree, torch.Tensor):
        return [tree]
    items = tree.values() if isinstance(tree, dict) else tree if isinstance(tree, (list, tuple)) else []
    return [t for item in items for t in _tensors(item)]


def run(mode: str, url: str, state: dict, steps: int, step_seconds: float) -> tuple[float, float, float]:
    """Seconds per step, checkpointing after every step (``mode`` none, sync or async); seconds
    per step the training thread spent on checkpoints; seconds per write (copy excluded)."""
    import pyarrow.fs

    fs, root = filesystem(url)
    arrow = pyarrow.fs.PyFileSystem(pyarrow.fs.FSSpecHandler(fs))
    written = threading.Event()
    written.set()
    threads, in_step, writes = [], 0.0, []

    def write(snapshot: dict, path: str) -> None:
        t0 = time.perf_counter()
        try:
            write_checkpoint(arrow, path, snapshot)
        finally:
            writes.append(time.perf_counter() - t0)
            written.set()

    started = time.perf_counter()
    for step in range(steps):
        time.sleep(step_seconds)
        if mode == "none":
            continue
        t0 = time.perf_counter()
        path = f"{root}/{mode}_{step:05d}"
        if mode == "sync":
            write(cpu_copy(state), path)
        else:
            written.wait()
            written.clear()
            threads.append(threading.Thread(target=write, args=(cpu_copy(state), path)))
            threads[-1].start()
        in_step += time.perf_counter() - t0
    per_step = (time.perf_counter() - started) / steps
    for t in threads:
        t.join()
    if mode != "none":
        load_state(url.rstrip("/") + f"/{mode}_{steps - 1:05d}")  # complete and valid
    return per_step, in_step / steps, sum(writes) / max(len(writes), 1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--step-seconds", type=float, default=2.0)
    args = parser.parse_args()
    state = resnet50_adam_state()
    size = sum(t.numel() * t.element_size() for t in _tensors(state)) / 2**20
    proc, port = start_moto()
    endpoint = f"http://127.0.0.1:{port}"
    os.environ.update(
        AWS_ACCESS_KEY_ID="bench", AWS_SECRET_ACCESS_KEY="bench-secret", AWS_DEFAULT_REGION="us-east-1",
        AWS_ENDPOINT_URL=endpoint, AWS_EC2_METADATA_DISABLED="true",
    )
    rows = []
    try:
        filesystem(f"s3://{BUCKET}")[0].mkdir(BUCKET)
        with tempfile.TemporaryDirectory() as tmp:
            for store, url in (("local disk", f"file://{tmp}"), ("S3 (moto)", f"s3://{BUCKET}/run")):
                base = run("none", url, state, args.steps, args.step_seconds)[0]
                for mode in ("sync", "async"):
                    per_step, in_step, write = run(mode, url, state, args.steps, args.step_seconds)
                    added = per_step - base
                    rows.append([store, mode, f"{per_step:.2f}", f"{added:+.2f}", f"{added / base:+.0%}",
                                 f"{in_step:.2f}", f"{write:.2f}"])
                    print(f"done {store} {mode}: {per_step:.2f} s/step", file=sys.stderr)
    finally:
        proc.kill()
    print(f"Checkpoint every step, {size:.0f} MB state (ResNet-50 + Adam), {args.step_seconds:.0f} s steps "
          f"(sleep), {args.steps} steps per case; {machine()}")
    print(table(["store", "upload", "s/step", "added s/step", "added", "s/step in the training thread", "s per write"], rows))


if __name__ == "__main__":
    main()
