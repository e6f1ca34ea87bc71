"""Many workers, one global batch (spec §4): the gradient exchange, on torch.distributed only.

Each worker embeds its shard; :class:`GlobalBatchLoss` all-gathers the embeddings so that every
worker holds the global N x d matrix, computes the global loss (``replicated``: all of it;
``sharded``: the terms of 1/W of the queries, embedding gradients then summed across workers)
and returns, as the gradient of the worker's own rows, exactly what the global loss gives them.
:func:`sum_gradients` then adds the workers' parameter gradients.

An asymmetric loss (a frozen teacher's ``gallery`` of the batch) all-gathers the gallery too. In
``sharded`` mode a worker's queries are then its own rows, whose loss terms need no other
worker's student rows and give them no gradient: the student embeddings are neither gathered
nor their gradients exchanged. SiMix keeps that when no class is split between workers (its
virtual queries go with their class's worker); otherwise the exchange is as in symmetric mode.
"""
from __future__ import annotations

from typing import Literal

import torch
import torch.distributed as dist
from torch import Tensor, nn

from rsk_dist.clock import Clock
from rsk_dist.grouping import LabelGroups
from rsk_dist.sampler import shard_bounds

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


class ShardLayout:
    """Where each worker's shard sits in the global batch, and how the collectives, which need
    equal shapes, carry shards of unequal size: each is padded to the largest, sent, and the
    padding dropped. Every worker's size must follow :func:`rsk_dist.sampler.shard_bounds`, so that
    the sharded loss's query split (by the same bounds) gives a worker exactly its own rows."""

    def __init__(self, rows: int, device: torch.device, group: dist.ProcessGroup | None = None) -> None:
        self.rank, self.world = rank_and_world(group)
        self.group = group
        sizes = all_gather_rows(torch.tensor([rows], device=device), group).tolist()
        self.bounds = shard_bounds(sum(sizes), self.world)
        expected = [b - a for a, b in zip(self.bounds, self.bounds[1:])]
        if sizes != expected:
            raise ValueError(
                f"workers passed shards of sizes {sizes}, but a global batch of {sum(sizes)} over "
                f"{self.world} workers splits as {expected}: take each worker's shard with "
                "rsk_dist.sampler.shard_bounds (ClassBalancedSampler.shard does)"
            )
        self.padded_rows = expected[0]  # the first shards are the larger ones
        # Row r of the global batch sits at padded_index[r] of the W x padded_rows layout.
        owner = torch.repeat_interleave(torch.arange(self.world), torch.tensor(expected))
        starts = torch.tensor(self.bounds[:-1])
        self.padded_index = (owner * self.padded_rows + torch.arange(sum(sizes)) - starts[owner]).to(device)

    @property
    def own_rows(self) -> slice:
        return slice(self.bounds[self.rank], self.bounds[self.rank + 1])

    def gather(self, x: Tensor) -> Tensor:
        """Every worker's ``x`` (its shard's rows), concatenated in rank order."""
        padded = x.new_zeros((self.padded_rows, *x.shape[1:]))
        padded[: x.shape[0]] = x
        return all_gather_rows(padded, self.group).index_select(0, self.padded_index)

    def sum_own_rows(self, grad: Tensor) -> Tensor:
        """The sum over workers of ``grad`` (global rows), this worker's rows of it."""
        padded = grad.new_zeros((self.world * self.padded_rows, *grad.shape[1:]))
        padded.index_copy_(0, self.padded_index, grad)
        out = grad.new_empty((self.padded_rows, *grad.shape[1:]))
        _reduce_scatter(out, padded, group=self.group)
        return out[: self.own_rows.stop - self.own_rows.start]

    def splits_a_class(self, labels: Tensor) -> bool:
        """Whether some class of the global ``labels`` has members in two shards."""
        groups = LabelGroups(labels)
        bounds = torch.tensor(self.bounds[1:-1], device=labels.device)
        first = groups.order[groups.starts]
        last = groups.order[groups.starts + groups.counts - 1]  # members ascend within a class
        return bool((torch.bucketize(first, bounds, right=True) != torch.bucketize(last, bounds, right=True)).any())

    def bytes_received(self, row_bytes: int) -> float:
        """Bytes a worker receives in one gather (or, ring algorithms, one reduce-scatter) of
        rows of ``row_bytes``: the other workers' padded shards."""
        return (self.world - 1) * self.padded_rows * row_bytes


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

    Every worker passes its shard of the global batch, sized by
    :func:`rsk_dist.sampler.shard_bounds` (unequal when W does not divide B), and a generator in
    the same state (SiMix draws its weights from it, and all workers must draw the same ones).
    With one process, or without an initialised process group, it is the wrapped loss itself.
    ``sharded`` needs a loss that accepts ``query_shard`` (RS@k does). ``stats``: the last call's
    ``comm_s``, ``loss_s`` and ``bytes_received``, timed by ``clock`` (shared with the two-pass
    step, its record then holds the ``comm`` phases; by default the wrapper's own).
    """

    def __init__(
        self, loss: nn.Module, mode: Mode = "replicated", group: dist.ProcessGroup | None = None,
        clock: Clock | None = None,
    ) -> None:
        super().__init__()
        if mode not in ("replicated", "sharded"):
            raise ValueError(f"mode must be 'replicated' or 'sharded', got {mode!r}")
        self.loss, self.mode, self.group, self.clock = loss, mode, group, clock
        self.stats: dict[str, float] = {}

    def forward(
        self,
        embeddings: Tensor,
        labels: Tensor,
        generator: torch.Generator | None = None,
        gallery: Tensor | None = None,
    ) -> Tensor:
        """``gallery``: this worker's rows of a frozen teacher's embeddings, for an asymmetric loss."""
        rank, world = rank_and_world(self.group)
        with_gallery = {} if gallery is None else {"gallery": gallery.detach()}
        if world == 1:
            return self.loss(embeddings, labels, generator=generator, **with_gallery)
        if generator is None and getattr(self.loss, "simix", False):
            raise ValueError(
                "SiMix across workers needs a generator: without one each worker draws its own "
                "mixing weights. Pass loss(embeddings, labels, generator) with a generator in the "
                "same state on every worker, e.g. ClassBalancedSampler.mixing_generator(epoch, step)"
            )
        clock = self.clock or Clock(embeddings.device)
        timing_alone = not clock.running
        if timing_alone:
            clock.start()
        t0 = clock.mark("loss")
        layout = ShardLayout(embeddings.shape[0], embeddings.device, self.group)
        global_labels = layout.gather(labels.to(embeddings.device))
        row_bytes = embeddings[0].numel() * embeddings.element_size()
        received = 0.0
        if gallery is not None:
            with_gallery = {"gallery": layout.gather(gallery.detach())}
            received += layout.bytes_received(gallery[0].numel() * gallery.element_size())
        own_rows_only = gallery is not None and self.mode == "sharded" and not (
            getattr(self.loss, "simix", False) and layout.splits_a_class(global_labels)
        )
        if own_rows_only:
            # The other workers' rows are never read: zeros stand in for them.
            global_emb = embeddings.new_zeros((layout.bounds[-1], *embeddings.shape[1:]))
            global_emb[layout.own_rows] = embeddings.detach()
        else:
            global_emb = layout.gather(embeddings.detach())
            received += layout.bytes_received(row_bytes)  # the others' embeddings
        global_emb.requires_grad_()
        t1 = clock.mark("comm")
        shard = {} if self.mode == "replicated" else {"query_shard": (rank, world)}
        with torch.enable_grad():
            value = self.loss(global_emb, global_labels, generator=generator, **shard, **with_gallery)
            (grad,) = torch.autograd.grad(value, global_emb)
        t2 = clock.mark("loss")
        value = value.detach()
        if own_rows_only:
            own = grad[layout.own_rows]
            dist.all_reduce(value, group=self.group)
        elif self.mode == "sharded":
            own = layout.sum_own_rows(grad)
            dist.all_reduce(value, group=self.group)
            received += layout.bytes_received(row_bytes)
        else:
            own = grad[layout.own_rows]
        t3 = clock.mark("comm")
        if timing_alone:
            clock.stop()
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
