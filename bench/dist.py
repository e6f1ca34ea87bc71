"""The global-batch loss across W workers (spec §4): per-worker loss seconds, exchange seconds and
bytes, ``replicated`` (every worker computes the whole loss) beside ``sharded`` (each computes
the terms of 1/W of the queries, then the embedding gradients are summed).

W gloo processes (torch.multiprocessing, tcp://127.0.0.1) each build the same N x d random unit
embeddings from one seed, 4 per class, and keep their shard's rows (``shard_bounds(N, W)``: unequal
when W does not divide N). Each step is
``GlobalBatchLoss(RecallAtKSurrogate(simix=True), mode)(shard, labels, generator).backward()``,
after a barrier so that all workers start together; it reads the wrapper's ``stats``:
``loss_s`` (the global loss and its gradient with respect to the gathered embeddings),
``comm_s`` (all-gather, and in sharded mode the gradient reduce-scatter; it includes waiting at
those collectives for the slowest worker) and ``bytes_received`` (per worker: the other W - 1
shards, padded to the largest, once for the all-gather and in sharded mode once more for the
reduce-scatter, which gloo has as well as NCCL). Labels (N int64) and the
parameter-gradient sum (model-dependent) are not in the bytes. Figures are the max over
workers of a step, the median over ``--repeats`` steps after one warm-up. At W = 1 there is no
exchange: both modes are the plain loss, timed around the call and its backward.

Each worker runs ``cores // W`` threads, so the W workers share the machine's cores without
oversubscribing them; at a given W both modes get the same threads, so the loss-time ratio
replicated / sharded at that W is the figure to read (across W, threads per worker differ).

    python bench/dist.py [--n 4096] [--dim 512] [--workers 1 2 3 4] [--repeats 3] [--cores C]
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
import torch.multiprocessing as mp  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from bench.measure import machine, table  # noqa: E402
from rsk_dist.distributed import GlobalBatchLoss  # noqa: E402
from rsk_dist.losses import RecallAtKSurrogate  # noqa: E402
from rsk_dist.sampler import shard_bounds  # noqa: E402

PER_CLASS = 4
MODES = ("replicated", "sharded")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def one_step(loss: torch.nn.Module, shard: torch.Tensor, labels: torch.Tensor, world: int) -> dict[str, float]:
    shard.grad = None
    if world > 1:
        dist.barrier()
    t0 = time.perf_counter()
    # The same seed on every worker and every step: all draw the same SiMix weights (spec §2).
    loss(shard, labels, generator=torch.Generator().manual_seed(0)).backward()
    if shard.is_cuda:
        torch.cuda.synchronize()  # kernels are asynchronous: time their completion
    elapsed = time.perf_counter() - t0
    if world == 1:  # no process group: the wrapper is the plain loss and keeps no stats
        return {"loss_s": elapsed, "comm_s": 0.0, "bytes_received": 0.0}
    return dict(loss.stats)


def worker(rank: int, world: int, port: int, n: int, dim: int, repeats: int, threads: int, out_dir: str,
           device: str = "cpu") -> None:
    """``device``: where the embeddings live; every worker on the same one (gloo can share a GPU
    between processes, NCCL cannot)."""
    torch.set_num_threads(threads)
    if world > 1:
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        g = torch.Generator().manual_seed(0)
        emb = F.normalize(torch.randn(n, dim, generator=g), dim=1).to(device)
        labels = torch.arange(n // PER_CLASS, device=device).repeat_interleave(PER_CLASS)
        bounds = shard_bounds(n, world)
        rows = slice(bounds[rank], bounds[rank + 1])
        shard, shard_labels = emb[rows].clone().requires_grad_(), labels[rows].clone()
        results = {}
        for mode in MODES if world > 1 else MODES[:1]:
            loss = GlobalBatchLoss(RecallAtKSurrogate(simix=True), mode)
            results[mode] = [one_step(loss, shard, shard_labels, world) for _ in range(repeats + 1)][1:]
        (Path(out_dir) / f"rank{rank}.json").write_text(json.dumps(results))
    finally:
        if world > 1:
            dist.destroy_process_group()


def run_world(world: int, n: int, dim: int, repeats: int, threads: int, device: str = "cpu") -> dict[str, dict[str, float]]:
    """Per mode: each stat's max over workers in each step, then its median over steps."""
    with tempfile.TemporaryDirectory() as out_dir:
        mp.spawn(worker, args=(world, free_port(), n, dim, repeats, threads, out_dir, device), nprocs=world)
        per_rank = [json.loads((Path(out_dir) / f"rank{r}.json").read_text()) for r in range(world)]
    summary = {}
    for mode, steps in per_rank[0].items():
        summary[mode] = {
            key: statistics.median(max(ranks[mode][s][key] for ranks in per_rank) for s in range(len(steps)))
            for key in steps[0]
        }
    return summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=4096, help="global batch size (a multiple of 4)")
    parser.add_argument("--dim", type=int, default=512, help="embedding dimension")
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2, 3, 4], help="values of W to run")
    parser.add_argument("--repeats", type=int, default=3, help="timed steps per mode, after one warm-up")
    parser.add_argument("--cores", type=int, default=len(os.sched_getaffinity(0)),
                        help="cores to share among the W workers (default: this process's CPUs)")
    args = parser.parse_args()
    if args.n % PER_CLASS:
        parser.error(f"--n {args.n} must be a multiple of {PER_CLASS}")

    rows = []
    for w in args.workers:
        threads = max(1, args.cores // w)
        summary = run_world(w, args.n, args.dim, args.repeats, threads)
        for mode, s in summary.items():
            ratio = summary["replicated"]["loss_s"] / s["loss_s"]
            rows.append([
                str(w), str(threads), mode if w > 1 else "either (plain loss)", f"{s['loss_s']:.3f}",
                f"{s['comm_s']:.3f}", f"{s['bytes_received'] / 2**20:.1f}", f"{ratio:.2f}x",
            ])
        print(f"done W={w}", file=sys.stderr)
    print(f"Global-batch RS@k + SiMix, N={args.n}, d={args.dim}, {PER_CLASS} per class, gloo on one machine, "
          f"{args.cores} cores shared: each worker runs max(1, {args.cores} // W) threads; median of "
          f"{args.repeats} steps of the max over workers: {machine()}\n")
    print(table(["W", "threads/worker", "mode", "loss s (per worker)", "comm s", "MB received per worker",
                 "loss-time ratio (replicated / this)"], rows))


if __name__ == "__main__":
    main()
