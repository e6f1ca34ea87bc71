"""One optimizer step of the global batch, as every worker runs it (spec §3, §4).

The thin loop that wires the components: the sampler picks the worker's shard, the data
source fetches it, the two-pass step leaves this worker's share of the gradient, the workers'
shares are summed, and the optimizer steps (skipped on every worker alike when float16 gradients
overflowed). The same function runs in a plain process, under torch.distributed, and inside Ray Train.
"""
from __future__ import annotations

import time
from collections.abc import Callable

import torch
from torch import Tensor

from rsk_dist.distributed import rank_and_world, sum_gradients
from rsk_dist.engine import LargeBatchStep
from rsk_dist.sampler import ClassBalancedSampler

Fetch = Callable[[Tensor, int], tuple[Tensor, Tensor]]


def train_step(
    step: LargeBatchStep,
    optimizer: torch.optim.Optimizer,
    sampler: ClassBalancedSampler,
    fetch: Fetch,
    epoch: int,
    step_in_epoch: int,
    group: torch.distributed.ProcessGroup | None = None,
) -> dict[str, float]:
    """Runs one step, ``fetch(indices, augment_key)`` giving the images (a data source, see
    rsk_dist.data.sources); returns its metrics (loss, images/s, seconds per phase, bytes sent).
    ``data_wait_s`` is how long the step waited for its batch; ``data_s`` how long fetching the
    batch took (``fetch.fetch_s`` where prefetching ran it earlier, see rsk_dist.data.feeder)."""
    rank, world = rank_and_world(group)
    torch.manual_seed(sampler.worker_seed(epoch, step_in_epoch, rank))
    t0 = time.perf_counter()
    images, labels = fetch(sampler.shard(epoch, step_in_epoch, rank, world), sampler.augment_key(epoch, step_in_epoch))
    t1 = time.perf_counter()
    optimizer.zero_grad(set_to_none=True)
    result = step.step(images, labels, generator=sampler.mixing_generator(epoch, step_in_epoch))
    t2 = time.perf_counter()
    grad_bytes = sum_gradients(step.model, group)
    t3 = time.perf_counter()
    stepped = step.optimizer_step(optimizer)
    t4 = time.perf_counter()
    loss_stats = getattr(step.loss_fn, "stats", {})
    comm_s = loss_stats.get("comm_s", 0.0) + (t3 - t2)
    return {
        "loss": result.loss,
        "lr": optimizer.param_groups[0]["lr"],
        "images_per_s": sampler.batch_size / (t4 - t0),
        "data_s": getattr(fetch, "fetch_s", t1 - t0),
        "data_wait_s": t1 - t0,
        "embed_s": result.timings["embed_s"],
        "loss_s": result.timings["loss_s"] - loss_stats.get("comm_s", 0.0),
        "backward_s": result.timings["backward_s"],
        **({"teacher_s": result.timings["teacher_s"]} if "teacher_s" in result.timings else {}),
        "comm_s": comm_s,
        "step_s": t4 - t0,
        "bytes_received": loss_stats.get("bytes_received", 0.0) + grad_bytes * (world - 1) / world,
        "skipped": float(not stepped),  # float16: a step with inf/NaN gradients is not applied
    }
