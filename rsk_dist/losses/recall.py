"""Recall@k surrogate loss, RS@k (spec §1), exact and memory-bounded.

For query ``q`` and positive ``x``, the surrogate rank ``r_q(x) = 1 + sum_z sigmoid((s_qz -
s_qx) / tau2)`` sums over all N samples, so the loss touches O(N^2 * P) terms. Autograd
through that would keep every term; instead :class:`_RecallSurrogateFunction` walks over
chunks of queries, computes their similarity rows from the embeddings and, when a gradient is
wanted, the analytic gradient in the same pass. Extra memory is a few block buffers of
``queries x N`` similarities, one sub-chunk of ``chunk x P x N`` terms and the N x d embedding
gradient: no N x N matrix is ever held.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from rsk_dist.grouping import LabelGroups
from rsk_dist.losses.gallery import check_gallery
from rsk_dist.losses.simix import Mixing, mixing
from rsk_dist.numerics import loss_matmul_precision

DEFAULT_K: tuple[int, ...] = (1, 2, 4, 8, 16)


@dataclass(frozen=True)
class LossBudget:
    """How the loss cuts its O(N^2 P) work (see :func:`plan_blocks`). ``chunk_elements``: the
    one (queries x positives x samples) sigmoid buffer when ``chunk_size`` is None.
    ``block_elements`` and ``min_block_queries``: queries per similarity block, whose four
    ``queries x N`` row buffers come from one matmul."""

    chunk_elements: int
    block_elements: int
    min_block_queries: int


# CPU: a 16 MB sigmoid buffer in float32; larger sub-chunks were slower (each pass then streams
# from main memory). Each block reads the N x d embeddings (and updates their gradient) three
# times, so a block that shrank like 1/N would make the loss time grow as N^3; at least 512
# queries keeps it N^2 P, at the price of block buffers of 512 x N, which grow with N like the
# N x d embeddings themselves. With 128, that streaming was already 15% of the loss at N = 16384
# + SiMix (204 queries a block, d = 512): 512 took it from 32-36 s to 29-30 s there, for 170 MB
# more buffers.
CPU_BUDGET = LossBudget(chunk_elements=2**22, block_elements=2**23, min_block_queries=512)
# CUDA: the CPU budget would launch ~53 small kernels per sub-chunk, 81,920 sub-chunks at
# N = 65536 with SiMix (4.3 million launches, 20-40 s of launch overhead a step). A GPU wants few
# large kernels, so the buffers take a fixed share of the device's memory, 1/32 for the sigmoid
# buffer and 1/32 for the four block buffers (0.75 GiB each on a 24 GiB card), up to these caps
# (1 GiB each). Total memory, not free memory: PyTorch's cache counts as used, and a plan that
# changed from run to run would change the loss's summation order with it.
CUDA_MEMORY_SHARE = 32
CUDA_MAX_CHUNK_ELEMENTS = 2**28
CUDA_MAX_BLOCK_ELEMENTS = 2**26


def cuda_budget(total_bytes: int) -> LossBudget:
    """The budget on a CUDA device of ``total_bytes`` of memory (never below the CPU's); a pure
    function, so a CUDA plan can be worked out anywhere."""
    share = total_bytes // CUDA_MEMORY_SHARE // 4  # float32 elements
    return LossBudget(
        chunk_elements=max(CPU_BUDGET.chunk_elements, min(CUDA_MAX_CHUNK_ELEMENTS, share)),
        block_elements=max(CPU_BUDGET.block_elements, min(CUDA_MAX_BLOCK_ELEMENTS, share // 4)),
        min_block_queries=CPU_BUDGET.min_block_queries,
    )


def loss_budget(device: torch.device) -> LossBudget:
    """The budget the loss uses for embeddings on ``device``."""
    if device.type == "cuda":
        return cuda_budget(torch.cuda.get_device_properties(device).total_memory)
    return CPU_BUDGET


# On x86 CPUs an operation that reads or yields a subnormal float32 (below 1.2e-38) takes a
# microcode assist, ~100x a normal one. Trained embeddings put most (query, positive) rows there:
# s_qx - s_qz = 0.8 gives sigmoid(-80) = 2e-35, whose square in sigmoid' is subnormal, and the
# loss ran 14x slower than on random embeddings. The floors keep every intermediate normal:
# sigmoid >= sigmoid(-40) = 4e-18 (squared, 2e-35) and dL/d rank >= 1e-20 or 0 (times sigmoid',
# >= 4e-38). A rank then moves by under N x 4e-18, and the gradient by under 1e-8 of its largest
# entry (measured), below float32 resolution. GPUs take subnormals at full speed: CPU only.
SIGMOID_ARG_FLOOR = -40.0
RANK_GRAD_FLOOR = 1e-20


def _positives(groups: LabelGroups, queries: Tensor, p: int, self_positive: bool) -> tuple[Tensor, Tensor]:
    """(C x p) indices of each query's positives and a validity mask; ``p`` is the most
    positives any of the queries has. A query's positives are its class members, itself among
    them only when ``self_positive`` (asymmetric RS@k: its own gallery embedding). Padding slots
    point at the query itself and are masked out."""
    cls = groups.class_of[queries]
    size = groups.counts[cls]
    width = p if self_positive else p + 1
    offsets = torch.arange(width, device=queries.device)
    slot = (groups.starts[cls, None] + offsets).clamp(max=groups.order.numel() - 1)
    members = groups.order[slot]
    valid = offsets < size[:, None]
    if not self_positive:
        # The query is one of its class members: move the valid ones first, drop one column.
        valid &= members != queries[:, None]
        front = torch.argsort((~valid).to(torch.int8), dim=1, stable=True)[:, :-1]
        members, valid = members.gather(1, front), valid.gather(1, front)
    return torch.where(valid, members, queries[:, None]), valid


SubChunk = tuple[int, int, int]  # start, stop (within the block), positives per query


Block = tuple[int, int, list[SubChunk]]  # start, stop (in the sorted queries), its sub-chunks


def plan_blocks(num_positives: Sequence[int], num_samples: int, budget: LossBudget, chunk_size: int | None = None) -> list[Block]:
    """Blocks ``(start, stop, sub-chunks)`` over queries sorted by descending positive count
    (``num_positives``, queries without a positive left out), for a batch of ``num_samples``
    samples (virtual ones included). Worked out on the host, so that the loop over them never
    waits for the device. A block's similarity rows come from one matmul; its sub-chunks bound
    the sigmoid buffer: ``chunk_size`` queries each, or ``budget.chunk_elements`` terms."""
    block = max(budget.min_block_queries, budget.block_elements // num_samples)
    blocks = []
    for b0 in range(0, len(num_positives), block):
        b1 = min(b0 + block, len(num_positives))
        subs, c0 = [], b0
        while c0 < b1:
            p = num_positives[c0]  # the sub-chunk's largest: sorted descending
            size = chunk_size or max(1, budget.chunk_elements // (p * num_samples))
            c1 = min(c0 + size, b1)
            subs.append((c0 - b0, c1 - b0, p))
            c0 = c1
        blocks.append((b0, b1, subs))
    return blocks


def plan_for_labels(labels: Tensor, budget: LossBudget, chunk_size: int | None = None) -> list[Block]:
    """The plan of the loss over all queries of a batch whose labels (SiMix's virtual samples
    included: ``rsk_dist.losses.simix.mixing(labels, generator).labels``) are ``labels``, e.g.
    ``sum(len(subs) for _, _, subs in plan_for_labels(labels, cuda_budget(80 << 30)))``
    sub-chunks on an 80 GB GPU."""
    classes = LabelGroups(labels.reshape(-1).long())
    counts = classes.num_positives(torch.arange(labels.numel(), device=labels.device)).tolist()
    return plan_blocks(sorted((p for p in counts if p > 0), reverse=True), labels.numel(), budget, chunk_size)


class _RecallSurrogateFunction(torch.autograd.Function):
    """Sum of the per-query losses of ``queries``, divided by ``normalizer``, as a function of
    the real embeddings. With SiMix, ``mixed`` describes the virtual samples: each block's
    similarity rows are mixed from real ones, and their gradient flows back through the mixing.
    With a ``gallery`` (asymmetric RS@k) the queries rank the gallery's rows, a constant, instead
    of the embeddings themselves; ``self_positive`` then makes a query's own gallery row one of
    its positives. Nothing of size N x N outlives a block: memory is the block plus the N x d
    gradient."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx,
        embeddings: Tensor,
        gallery: Tensor | None,
        self_positive: bool,
        mixed: Mixing | None,
        queries: Tensor,
        classes: LabelGroups,
        ks: tuple[int, ...],
        tau1: float,
        tau2: float,
        rank_includes_query: bool,
        chunk_size: int | None,
        normalizer: int,
    ) -> Tensor:
        # The loss is almost always differentiated right after it is computed, so the gradient
        # is built in the same pass over the block: recomputing it in backward instead would
        # double the O(N^2 P) work for the same memory bound.
        want_grad = ctx.needs_input_grad[0]
        emb = embeddings
        keys = emb if gallery is None else gallery  # the real samples of the retrieval set
        n = classes.class_of.numel()
        npos = classes.num_positives(queries) + int(self_positive)
        # Largest classes first, so that each sub-chunk pads its positives little; queries
        # without a positive sort last and are dropped. The one host transfer of the loss.
        order = torch.argsort(npos, descending=True, stable=True)
        sorted_npos = [p for p in npos[order].tolist() if p > 0]
        queries = queries[order[: len(sorted_npos)]]
        plan = plan_blocks(sorted_npos, n, loss_budget(emb.device), chunk_size)
        grad = torch.zeros_like(emb) if want_grad else None
        kk = torch.tensor(ks, dtype=emb.dtype, device=emb.device)
        total = emb.new_zeros(())
        floors = emb.device.type == "cpu" and emb.dtype == torch.float32
        # Buffers reused by every block and sub-chunk: fresh large tensors cost a page fault per
        # page, 10-16% of the loss's time on the CPU. The arithmetic is that of fresh tensors,
        # bit for bit (1 / tau2 stays on the Q x N rows, not moved to the Q x d ones).
        buffer = emb.new_empty(max(((c1 - c0) * p * n for _, _, subs in plan for c0, c1, p in subs), default=0))
        q_max = max((b1 - b0 for b0, b1, _ in plan), default=0)
        s_buf = emb.new_empty(q_max, n)
        g_buf = emb.new_empty(q_max, n) if grad is not None else None
        if mixed is not None:
            real_buf, mix_buf = emb.new_empty(q_max, emb.shape[0]), emb.new_empty(q_max, n)
        for b0, b1, subs in plan:
            qb = queries[b0:b1]
            m = b1 - b0
            rows = emb.index_select(0, qb) if mixed is None else mixed.rows(emb, qb)  # Q x d
            if mixed is None:
                s = torch.mm(rows, keys.T, out=s_buf[:m]).div_(tau2)  # Q x N
            else:
                sim_real = torch.mm(rows, keys.T, out=real_buf[:m])  # Q x N_real
                s = mixed.columns(sim_real, s_buf[:m], mix_buf[:m]).div_(tau2)  # Q x N
            g_sim = g_buf[:m] if g_buf is not None else None
            for c0, c1, p in subs:
                q, sq = qb[c0:c1], s[c0:c1]
                pos, valid = _positives(classes, q, p, self_positive)
                diff = buffer[: q.numel() * p * n].view(q.numel(), p, n)
                torch.sub(sq[:, None, :], sq.gather(1, pos)[:, :, None], out=diff)  # (s_qz - s_qx) / tau2
                if floors:
                    diff.clamp_(min=SIGMOID_ARG_FLOOR)
                ranks_itself = rank_includes_query or self_positive
                excluded = pos[:, :, None] if ranks_itself else torch.stack([pos, q[:, None].expand_as(pos)], 2)
                diff.scatter_(2, excluded, float("-inf"))  # z != x, and z != q unless it ranks itself
                sig = diff.sigmoid_()
                rank = 1 + sig.sum(2)
                soft_hits = torch.sigmoid((kk - rank[:, :, None]) / tau1) * valid[:, :, None]
                hits = soft_hits.sum(1)  # C x K
                denom = torch.minimum(kk, valid.sum(1, keepdim=True).to(emb.dtype))
                recall = torch.minimum(hits, kk) / denom
                total = total + (1 - recall.mean(1)).sum()
                if g_sim is None:
                    continue
                # dL/d rank_qx, the clamp min(k, .) passing gradient only below k.
                clamp_open = (hits < kk).to(emb.dtype) / denom
                g_rank = (soft_hits * (1 - soft_hits) * clamp_open[:, None, :]).sum(2)
                g_rank = g_rank / (tau1 * len(ks) * normalizer * tau2)
                if floors:
                    g_rank.masked_fill_(g_rank < RANK_GRAD_FLOOR, 0)
                dsig = sig.addcmul_(sig, sig, value=-1)  # sigmoid' = s - s^2, in place; masked terms give 0
                g_sub = torch.bmm(g_rank[:, None, :], dsig).squeeze(1)  # through s_qz, z != x
                g_sim[c0:c1] = g_sub.scatter_add_(1, pos, -g_rank * dsig.sum(2))  # through s_qx
            if grad is None:
                continue
            # Back through sim_real = rows @ keys.T (and the mixing, with SiMix) to the embeddings:
            # through both factors, unless the keys are a gallery (constant).
            g_real = g_sim if mixed is None else mixed.columns_adjoint(g_sim, real_buf[:m], mix_buf[:m])
            if gallery is None:
                grad.addmm_(g_real.T, rows)
            g_rows = g_real @ keys
            if mixed is None:
                grad.index_add_(0, qb, g_rows)
            else:
                mixed.add_rows_adjoint(grad, qb, g_rows)
        if grad is not None:
            ctx.save_for_backward(grad)
        return total / normalizer

    @staticmethod
    def backward(ctx, grad_output: Tensor):  # type: ignore[override]
        (grad,) = ctx.saved_tensors
        if not bool(grad_output == 1):
            grad = grad * grad_output
        return (grad,) + (None,) * 11


def recall_at_k_surrogate(
    embeddings: Tensor,
    labels: Tensor,
    k: Sequence[int] = DEFAULT_K,
    tau1: float = 1.0,
    tau2: float = 0.01,
    simix: bool = False,
    rank_includes_query: bool = False,
    chunk_size: int | None = None,
    generator: torch.Generator | None = None,
    query_shard: tuple[int, int] | None = None,
    gallery: Tensor | None = None,
    self_positive: bool = True,
    tf32: bool = False,
) -> Tensor:
    """RS@k of a batch (spec §1), with SiMix virtual samples when ``simix`` (spec §2).

    Asymmetric RS@k when a ``gallery`` is given (N x d, row i another model's embedding of
    sample i, e.g. a frozen teacher's): query ``q`` (a row of ``embeddings``) ranks the
    gallery's rows instead of the other embeddings. Its retrieval set is every gallery row, its
    positives the rows of its class; its own row ``q`` is one of them when ``self_positive``,
    else it is left out of the retrieval set (as the query is in symmetric RS@k). With SiMix the
    gallery is mixed with the same pairs and weights as the queries. The gallery is a constant:
    no gradient flows into it.

    ``embeddings`` (N x d) are L2-normalised by the caller; ``labels`` are N integers in any
    order; fp16 and bf16 embeddings are computed with in float32 (so is the returned value).
    ``query_shard=(i, n)`` keeps only the terms of the queries of the i-th of n shards
    (contiguous, sized by rsk_dist.sampler.shard_bounds; with SiMix also the i-th of n
    contiguous parts of the virtual samples) while still dividing by the number of valid
    queries in the whole batch: the n parts add up to the full loss, which is how workers
    share the loss (spec §4). In asymmetric RS@k a virtual query goes instead with the shard
    that holds its first real sample, so that a shard holding whole classes needs no other
    shard's rows. Its float32 matmuls run in full float32 on CUDA whatever torch's global
    precision, unless ``tf32`` (faster on Ampere and later, similarities off by ~1e-3).
    """
    ks = tuple(int(v) for v in k)
    if not ks or min(ks) < 1:
        raise ValueError(f"k must be positive integers, got {tuple(k)}")
    if embeddings.ndim != 2 or labels.numel() != embeddings.shape[0]:
        raise ValueError(
            f"expected embeddings N x d and N labels, got {tuple(embeddings.shape)} and "
            f"{tuple(labels.shape)}"
        )
    if chunk_size is not None and chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1 or None, got {chunk_size}")
    if embeddings.dtype in (torch.float16, torch.bfloat16):
        # (s_qz - s_qx) / tau2 in half precision loses the ranking between close samples: work
        # in float32. Autograd casts the gradient back to the input's dtype.
        embeddings = embeddings.float()
    labels = labels.reshape(-1).to(embeddings.device).long()
    if gallery is not None:
        check_gallery(True, gallery, embeddings)
        if rank_includes_query:
            raise ValueError(
                "rank_includes_query is for symmetric RS@k; in asymmetric RS@k the query's own gallery row is "
                "ranked (as a positive) or left out by self_positive"
            )
        gallery = gallery.to(embeddings.device, embeddings.dtype)
    mix = mixing(labels, generator) if simix else None
    if mix is not None:
        labels = mix.labels
    all_queries = torch.arange(labels.numel(), device=labels.device)
    if query_shard is None:
        queries = all_queries
    else:
        index, count = query_shard
        if not 0 <= index < count:
            raise ValueError(f"query_shard must be (index, count) with 0 <= index < count, got {query_shard}")
        # tensor_split sizes its parts as rsk_dist.sampler.shard_bounds does: worker i's real
        # queries are exactly its own shard's rows. The virtual samples are split the same way
        # (symmetric), or go with their first real sample (asymmetric).
        n_real = embeddings.shape[0]
        real, virtual = all_queries[:n_real], all_queries[n_real:]
        own = real.tensor_split(count)[index]
        if gallery is None or mix is None:
            virtual = virtual.tensor_split(count)[index]
        else:
            in_shard = torch.zeros(n_real, dtype=torch.bool, device=labels.device)
            in_shard[own] = True
            virtual = virtual[in_shard[mix.first[n_real:]]]
        queries = torch.cat([own, virtual])
    classes = LabelGroups(labels)
    self_positive = gallery is not None and bool(self_positive)
    # With its own gallery row as a positive, every query has one.
    normalizer = labels.numel() if self_positive else int((classes.num_positives(all_queries) > 0).sum())
    if normalizer == 0:
        raise ValueError(
            "the batch has no positive pair (every label is unique), so RS@k is undefined: "
            "sample at least two images per class (a class-balanced sampler does this)"
        )
    with loss_matmul_precision(tf32):
        return _RecallSurrogateFunction.apply(
            embeddings, gallery, self_positive, mix, queries, classes, ks, float(tau1), float(tau2),
            bool(rank_includes_query), chunk_size, normalizer,
        )


class RecallAtKSurrogate(nn.Module):
    """RS@k as a module, called as ``loss(embeddings, labels, generator=None)``; asymmetric
    RS@k (``asymmetric=True``) as ``loss(embeddings, labels, generator, gallery=teacher_embeddings)``."""

    def __init__(
        self,
        k: Sequence[int] = DEFAULT_K,
        tau1: float = 1.0,
        tau2: float = 0.01,
        simix: bool = False,
        rank_includes_query: bool = False,
        chunk_size: int | None = None,
        asymmetric: bool = False,
        self_positive: bool = True,
        tf32: bool = False,
    ) -> None:
        super().__init__()
        self.k = tuple(int(v) for v in k)
        self.tau1, self.tau2 = float(tau1), float(tau2)
        self.simix = simix
        self.rank_includes_query = rank_includes_query
        self.chunk_size = chunk_size
        self.asymmetric, self.self_positive = asymmetric, self_positive
        self.tf32 = tf32

    def forward(
        self,
        embeddings: Tensor,
        labels: Tensor,
        generator: torch.Generator | None = None,
        query_shard: tuple[int, int] | None = None,
        gallery: Tensor | None = None,
    ) -> Tensor:
        check_gallery(self.asymmetric, gallery, embeddings)
        return recall_at_k_surrogate(
            embeddings, labels, k=self.k, tau1=self.tau1, tau2=self.tau2, simix=self.simix,
            rank_includes_query=self.rank_includes_query, chunk_size=self.chunk_size,
            generator=generator, query_shard=query_shard, gallery=gallery, self_positive=self.self_positive,
            tf32=self.tf32,
        )

    def extra_repr(self) -> str:
        return (
            f"k={self.k}, tau1={self.tau1}, tau2={self.tau2}, simix={self.simix}, "
            f"rank_includes_query={self.rank_includes_query}, chunk_size={self.chunk_size}, tf32={self.tf32}"
            + (f", asymmetric=True, self_positive={self.self_positive}" if self.asymmetric else "")
        )
