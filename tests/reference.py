"""Naive float64 references written directly from the spec's formulas (no code shared with
the package): loops over queries, positives and samples, autograd for the gradients."""
from __future__ import annotations

import torch
from torch import Tensor


def naive_rsk(
    emb: Tensor,
    labels: list[int],
    k: tuple[int, ...] = (1, 2, 4, 8, 16),
    tau1: float = 1.0,
    tau2: float = 0.01,
    rank_includes_query: bool = False,
    queries: list[int] | None = None,
) -> Tensor:
    """Spec §1: mean over queries with a positive of 1 - mean_k R_k(q). With ``queries``, only
    their terms are summed (still divided by the count of all queries with a positive)."""
    n = len(labels)
    return _naive_recall_loss(
        emb @ emb.T, labels, k, tau1, tau2, queries,
        ranked=lambda q: [z for z in range(n) if rank_includes_query or z != q],
        positives=lambda q: [x for x in range(n) if x != q and labels[x] == labels[q]],
    )


def naive_asymmetric_rsk(
    student: Tensor,
    teacher: Tensor,
    labels: list[int],
    k: tuple[int, ...] = (1, 2, 4, 8, 16),
    tau1: float = 1.0,
    tau2: float = 0.01,
    self_positive: bool = True,
    queries: list[int] | None = None,
) -> Tensor:
    """Asymmetric RS@k: student query q ranks the teacher embeddings t_z, s_qz = e_q . t_z.
    Retrieval set: every t_z (without t_q unless ``self_positive``); positives: the t_x of q's
    class in it. The rest is spec §1."""
    n = len(labels)
    retrieval = lambda q: [z for z in range(n) if self_positive or z != q]
    return _naive_recall_loss(
        student @ teacher.T, labels, k, tau1, tau2, queries, ranked=retrieval,
        positives=lambda q: [x for x in retrieval(q) if labels[x] == labels[q]],
    )


def _naive_recall_loss(sim, labels, k, tau1, tau2, queries, ranked, positives) -> Tensor:
    """Spec §1 for similarities ``sim[q, z]``: ``ranked(q)`` are the samples a positive's rank
    counts (itself aside), ``positives(q)`` the query's positives."""
    per_query, counted = [], 0
    for q in range(len(labels)):
        pos = positives(q)
        if not pos:
            continue
        counted += 1
        if queries is not None and q not in queries:
            continue
        ranks = []
        for x in pos:
            others = [z for z in ranked(q) if z != x]
            ranks.append(1 + torch.sigmoid((sim[q, others] - sim[q, x]) / tau2).sum())
        recalls = []
        for kv in k:
            soft = sum(torch.sigmoid((kv - r) / tau1) for r in ranks)
            recalls.append(torch.clamp(soft, max=kv) / min(kv, len(pos)))
        per_query.append(1 - sum(recalls) / len(k))
    return sum(per_query) / counted


def naive_simix(emb: Tensor, labels: list[int], generator: torch.Generator) -> tuple[Tensor, list[int]]:
    """Spec §2 with explicit virtual embeddings; pairs class by class (ascending label), then
    by ascending sample index, weights drawn in that order in one torch.rand call."""
    pairs = []
    for c in sorted(set(labels)):
        members = [i for i, y in enumerate(labels) if y == c]
        pairs += [(i, j, c) for a, i in enumerate(members) for j in members[a + 1 :]]
    weights = torch.rand(len(pairs), generator=generator, dtype=torch.float64)
    virtual = [w * emb[i] + (1 - w) * emb[j] for (i, j, _), w in zip(pairs, weights)]
    extended = torch.cat([emb, torch.stack(virtual)]) if virtual else emb
    return extended, labels + [c for _, _, c in pairs]


def naive_contrastive(
    emb: Tensor, labels: list[int], pos_margin: float = 0.0, neg_margin: float = 1.0,
    ref: Tensor | None = None, self_positive: bool = False,
) -> Tensor:
    """Contrastive loss as pytorch-metric-learning defines it: over ordered pairs i != j of
    L2-normalised embeddings at Euclidean distance d, positives cost max(0, d - pos_margin) and
    negatives max(0, neg_margin - d); each kind is averaged over its non-zero terms, then summed.
    With ``ref`` (asymmetric: a teacher's embeddings of the same samples) pair (i, j) is
    emb[i] and ref[j], and (i, i) is a positive when ``self_positive``."""
    emb = emb / emb.norm(dim=1, keepdim=True)
    other = emb if ref is None else ref / ref.norm(dim=1, keepdim=True)
    pos, neg = [], []
    for i in range(len(labels)):
        for j in range(len(labels)):
            if i == j and not (ref is not None and self_positive):
                continue
            d = (emb[i] - other[j]).norm()
            if labels[i] == labels[j]:
                pos.append(torch.clamp(d - pos_margin, min=0))
            else:
                neg.append(torch.clamp(neg_margin - d, min=0))
    return sum(_mean_non_zero(terms) for terms in (pos, neg))


def _mean_non_zero(terms: list[Tensor]) -> Tensor:
    non_zero = [t for t in terms if t > 0]
    return sum(non_zero) / len(non_zero) if non_zero else torch.zeros((), dtype=torch.float64)


def naive_multi_similarity(
    emb: Tensor, labels: list[int], alpha: float = 2.0, beta: float = 50.0, base: float = 0.5
) -> Tensor:
    """Multi-similarity loss (Wang et al. 2019) on cosine similarities, mean over every anchor:
    log(1 + sum_p exp(-alpha (s_ip - base))) / alpha + log(1 + sum_n exp(beta (s_in - base))) / beta."""
    emb = emb / emb.norm(dim=1, keepdim=True)
    per_anchor = []
    for i in range(len(labels)):
        pos = [emb[i] @ emb[p] for p in range(len(labels)) if p != i and labels[p] == labels[i]]
        neg = [emb[i] @ emb[n] for n in range(len(labels)) if labels[n] != labels[i]]
        zero = torch.zeros((), dtype=torch.float64)
        pos_term = torch.log(1 + sum((torch.exp(-alpha * (s - base)) for s in pos), zero)) / alpha
        neg_term = torch.log(1 + sum((torch.exp(beta * (s - base)) for s in neg), zero)) / beta
        per_anchor.append(pos_term + neg_term)
    return sum(per_anchor) / len(per_anchor)


# The tolerance of the equivalence tests (float64). W workers and one process (or a resume)
# differ only in the order of sums: the gradient's all-reduce over W shares, and the loss's sums
# split across workers. A reordered sum of n terms moves by at most n * eps * sum|terms|; over
# the steps of a job SGD carries such differences on, amplified by the step's Jacobian. On an AMD
# EPYC the float32 run of test_ray_train's 2-worker job ended 5.95e-6 apart after 4 steps, about
# 50 float32 eps (1.2e-7). The same arithmetic in float64 scales that by eps64 / eps32 = 2^-29:
# about 1.1e-14. 1e-9 leaves five orders of magnitude for other CPUs' orderings and is still six
# below what one wrong step moves a weight (lr * |g|, about 1e-3).
EXACT = 1e-9
