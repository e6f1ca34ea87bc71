"""Many workers, one global batch (spec §4): the gradient exchange, on torch.distributed only.

Each worker embeds its shard; :class:`GlobalBatchLoss` all-gathers the embeddings so that every
worker holds the global N x d matrix, computes the global loss (``replicated``: all of it;
``sharded``: the terms of 1/W of the queries, embedding gradients then summed across workers)
and returns, as the gradient of the worker's own rows, exactly what the global loss gives them.
:func:`sum_gradients` then adds the workers' parameter gradients.
"""
from __future__ import annotations

import time
from typing import Literal

import torch
import torch.distributed as dist
from torch import Tensor, nn

Mode = Literal["replicated", "sharded"]

# torch 2.13 renamed the tensor collectives; keep working on the older releases we support.
_all_gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
_reduce_scatter = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor


def rank_and_world(group: dist.ProcessGroup | None = None) -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(group), dist.get_world_size(group)
    return 0, 1


def all_gather_rows(x: Tensor, group: dist.ProcessGroup | None = None) -> Tensor:
    """Concatenation of every worker's ``x`` along dim 0, in rank order (equal shapes)."""
    _, world = rank_and_world(group)
    out = x.new_empty((world * x.shape[0], *x.shape[1:]))
    _all_gather(out, x.contiguous(), group=group)
    return out


def _sum_own_rows(grad: Tensor, rank: int, world: int, group: dist.ProcessGroup | None) -> tuple[Tensor, float]:
    """Sum of every worker's ``grad`` (global rows), keeping this worker's rows; and the bytes
    this worker receives for it (ring algorithms: a reduce-scatter receives (W-1)/W of the
    tensor, an all-reduce twice that)."""
    rows = grad.shape[0] // world
    share = grad.numel() * grad.element_size() * (world - 1) / world
    if dist.get_backend(group) == dist.Backend.NCCL:
        out = grad.new_empty((rows, *grad.shape[1:]))
        _reduce_scatter(out, grad.contiguous(), group=group)
        return out, share
    dist.all_reduce(grad, group=group)  # gloo has no reduce-scatter
    return grad[rank * rows : (rank + 1) * rows], 2 * share


class _WithGradient(torch.autograd.Function):
    """A value whose gradient with respect to ``x`` was computed already."""

    @staticmethod
    def forward(ctx, x: Tensor, value: Tensor, grad: Tensor) -> Tensor:  # type: ignore[override]
        ctx.save_for_backward(grad)
        return value.clone()

    @staticmethod
    def backward(ctx, grad_output: Tensor):  # type: ignore[override]
        (grad,) = ctx.saved_tensors
        return grad * grad_output, None, None


class GlobalBatchLoss(nn.Module):
    """Makes ``loss(embeddings, labels, generator)`` on a worker's shard the global-batch loss.

    Every worker must pass shards of equal size and a generator in the same state (SiMix draws
    its weights from it, and all workers must draw the same ones). With one process, or
    without an initialised process group, it is the wrapped loss itself.
    ``sharded`` needs a loss that accepts ``query_shard`` (RS@k does).
    """

    def __init__(
        self, loss: nn.Module, mode: Mode = "replicated", group: dist.ProcessGroup | None = None
    ) -> None:
        super().__init__()
        if mode not in ("replicated", "sharded"):
            raise ValueError(f"mode must be 'replicated' or 'sharded', got {mode!r}")
        self.loss, self.mode, self.group = loss, mode, group
        self.stats: dict[str, float] = {}

    def forward(
        self, embeddings: Tensor, labels: Tensor, generator: torch.Generator | None = None
    ) -> Tensor:
        rank, world = rank_and_world(self.group)
        if world == 1:
            return self.loss(embeddings, labels, generator=generator)
        t0 = time.perf_counter()
        global_emb = all_gather_rows(embeddings.detach(), self.group).requires_grad_()
        global_labels = all_gather_rows(labels.to(embeddings.device), self.group)
        t1 = time.perf_counter()
        shard = {} if self.mode == "replicated" else {"query_shard": (rank, world)}
        with torch.enable_grad():
            value = self.loss(global_emb, global_labels, generator=generator, **shard)
            (grad,) = torch.autograd.grad(value, global_emb)
        t2 = time.perf_counter()
        value = value.detach()
        # Bytes this worker receives: the others' embeddings, and in sharded mode its share of
        # the gradient sum.
        received = global_emb.numel() * global_emb.element_size() * (world - 1) / world
        if self.mode == "sharded":
            own, summed = _sum_own_rows(grad, rank, world, self.group)
            dist.all_reduce(value, group=self.group)
            received += summed
        else:
            rows = embeddings.shape[0]
            own = grad[rank * rows : (rank + 1) * rows]
        t3 = time.perf_counter()
        self.stats = {"comm_s": (t1 - t0) + (t3 - t2), "loss_s": t2 - t1, "bytes_received": received}
        return _WithGradient.apply(embeddings, value, own.contiguous())


@torch.no_grad()
def sum_gradients(model: nn.Module, group: dist.ProcessGroup | None = None) -> int:
    """Adds every worker's parameter gradients in place; returns the bytes reduced.

    Each worker's gradient is its own rows' share of the gradient of the *global* loss (already
    a mean over the global batch), so the full-batch gradient is the plain SUM over workers.
    DistributedDataParallel would AVERAGE, dividing by W, so it is not used: the two-pass step
    also runs several backward passes per step, which DDP would synchronise each time.
    """
    _, world = rank_and_world(group)
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    if world == 1 or not grads:
        return 0
    flat = torch.cat([g.reshape(-1) for g in grads])  # one collective instead of one per tensor
    dist.all_reduce(flat, group=group)
    offset = 0
    for g in grads:
        g.copy_(flat[offset : offset + g.numel()].view_as(g))
        offset += g.numel()
    return flat.numel() * flat.element_size()
