"""One optimizer step of the global batch, as every worker runs it (spec §3, §4).

The thin loop that wires the components: the sampler picks the worker's shard, the data
source fetches it, the two-pass step leaves this worker's share of the gradient, the workers'
shares are summed, and the optimizer steps (skipped on every worker alike when float16 gradients
overflowed). The same function runs in a plain process, under torch.distributed, and inside Ray Train.
"""
from __future__ import annotations

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
    rsk_dist.data.sources); returns its metrics (loss, images/s, seconds per phase, bytes sent),
    the phases timed by ``step.clock``.
    ``data_wait_s`` is how long the step waited for its batch; ``data_s`` how long fetching the
    batch took (``fetch.fetch_s`` where prefetching ran it earlier, see rsk_dist.data.feeder)."""
    rank, world = rank_and_world(group)
    torch.manual_seed(sampler.worker_seed(epoch, step_in_epoch, rank))
    clock = step.clock  # every phase boundary through it: on CUDA, each waits for the device
    clock.start()
    indices = sampler.shard(epoch, step_in_epoch, rank, world)
    images, labels = fetch(indices, sampler.augment_key(epoch, step_in_epoch))
    clock.mark("data")
    optimizer.zero_grad(set_to_none=True)
    result = step.step(images, labels, generator=sampler.mixing_generator(epoch, step_in_epoch), ids=indices)
    grad_bytes = sum_gradients(step.model, group)
    clock.mark("comm")
    stepped = step.optimizer_step(optimizer)
    clock.mark("optimizer")
    s = clock.stop()
    loss_stats = getattr(step.loss_fn, "stats", {})
    return {
        "loss": result.loss,
        "lr": optimizer.param_groups[0]["lr"],
        "images_per_s": sampler.batch_size / s["total"],
        "data_s": getattr(fetch, "fetch_s", s["data"]),
        "data_wait_s": s["data"],
        "embed_s": s["embed"],
        "loss_s": s["loss"],
        "backward_s": s["backward"],
        **({"teacher_s": s["teacher"]} if "teacher" in s else {}),
        # the share of this worker's rows whose teacher embedding was cached
        **({"teacher_cached": step.teacher_cache.last_hit_rate} if step.teacher_cache is not None else {}),
        "comm_s": s["comm"],  # the loss's exchange of embeddings too, when it shares the clock
        "optimizer_s": s["optimizer"],
        "step_s": s["total"],
        "bytes_received": loss_stats.get("bytes_received", 0.0) + grad_bytes * (world - 1) / world,
        "skipped": float(not stepped),  # float16: a step with inf/NaN gradients is not applied
    }
