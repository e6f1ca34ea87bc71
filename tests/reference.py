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
    n = emb.shape[0]
    sim = emb @ emb.T
    per_query, counted = [], 0
    for q in range(n):
        positives = [x for x in range(n) if x != q and labels[x] == labels[q]]
        if not positives:
            continue
        counted += 1
        if queries is not None and q not in queries:
            continue
        ranks = []
        for x in positives:
            others = [z for z in range(n) if z != x and (rank_includes_query or z != q)]
            terms = torch.sigmoid((sim[q, others] - sim[q, x]) / tau2)
            ranks.append(1 + terms.sum())
        recalls = []
        for kv in k:
            soft = sum(torch.sigmoid((kv - r) / tau1) for r in ranks)
            recalls.append(torch.clamp(soft, max=kv) / min(kv, len(positives)))
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
