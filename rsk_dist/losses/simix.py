"""SiMix: similarity mixup (spec §2).

Every unordered pair {i, j} of same-class real samples adds one virtual sample
``v = a * e_i + (1 - a) * e_j`` with ``a ~ U(0, 1)``. Pairs are enumerated class by class in
ascending label order, and within a class by ascending sample index (i < j, lexicographic); the
weights are drawn in that order with one ``torch.rand`` call on ``generator``. That convention is
what makes two processes holding the same batch and generator state draw identical weights.

Every sample, real or virtual, is described by a triple ``(i, j, a)``: real sample ``r`` is
``(r, r, 1)``. Mixing rows of any matrix indexed by real samples is then one formula,
``a * X[i] + (1 - a) * X[j]``, with no special case for the real part.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from rsk_dist.grouping import LabelGroups


@dataclass(frozen=True)
class Mixing:
    """The sparse mixing matrix ``A`` (rows: real then virtual samples) as index/weight triples."""

    first: Tensor  # long, (N_ext,)
    second: Tensor  # long, (N_ext,)
    weight: Tensor  # float, (N_ext,): the weight of ``first``
    labels: Tensor  # long, (N_ext,)
    num_real: int  # the first num_real samples are the real ones

    def rows(self, x: Tensor, rows: Tensor | None = None) -> Tensor:
        """``(A x)[rows]``: mixes rows of ``x`` (indexed by real samples)."""
        i, j, a = self.first, self.second, self.weight
        if rows is not None:
            i, j, a = i[rows], j[rows], a[rows]
        # lerp is x_j + a (x_i - x_j) in one pass; for a real row (i = j, a = 1) it is exactly x_i.
        # index_select, not x[i]: its backward is index_add_, not a sort-based index_put_.
        return torch.lerp(x.index_select(0, j), x.index_select(0, i), a.to(x.dtype).unsqueeze(1))

    def columns(self, x: Tensor, out: Tensor, tmp: Tensor) -> Tensor:
        """``x A^T`` into ``out``: mixes the columns of ``x`` (indexed by real samples). ``out`` and
        ``tmp`` are len(x) x N_ext buffers that the caller reuses (fresh ones cost page faults)."""
        torch.index_select(x, 1, self.second, out=out)
        torch.index_select(x, 1, self.first, out=tmp)
        return out.lerp_(tmp, self.weight.to(x.dtype))

    def columns_adjoint(self, g: Tensor, out: Tensor, tmp: Tensor) -> Tensor:
        """``g A`` into ``out`` (len(g) x N_real): the gradient of :meth:`columns` with respect to
        its input. ``tmp`` is a buffer shaped like ``g``."""
        a = self.weight.to(g.dtype)
        out.zero_().index_add_(1, self.first, torch.mul(g, a, out=tmp))
        return out.index_add_(1, self.second, torch.mul(g, 1 - a, out=tmp))

    def add_rows_adjoint(self, out: Tensor, rows: Tensor, g: Tensor) -> None:
        """Adds to ``out`` the gradient of ``self.rows(x, rows)`` for an upstream ``g``."""
        a = self.weight[rows].to(g.dtype).unsqueeze(1)
        out.index_add_(0, self.first[rows], g * a)
        out.index_add_(0, self.second[rows], g * (1 - a))


def same_class_pairs(groups: LabelGroups) -> tuple[Tensor, Tensor]:
    """All unordered same-class pairs ``(i, j)``, ``i < j``, in the order documented above.

    Classes of one size share one upper-triangle pattern, so the pairs are built size by size
    (a handful of sizes in a class-balanced batch), each placed at its class's offset: memory
    is the pairs themselves, never N x N."""
    device = groups.order.device
    pairs_per_class = groups.counts * (groups.counts - 1) // 2
    offsets = torch.cumsum(pairs_per_class, 0) - pairs_per_class
    total = int(pairs_per_class.sum())
    first = torch.empty(total, dtype=torch.long, device=device)
    second = torch.empty(total, dtype=torch.long, device=device)
    for size in torch.unique(groups.counts).tolist():
        if size < 2:
            continue
        classes = torch.nonzero(groups.counts == size).squeeze(1)
        members = groups.order[groups.starts[classes, None] + torch.arange(size, device=device)]
        a, b = torch.triu_indices(size, size, 1, device=device)  # row-major: i, then j
        at = (offsets[classes, None] + torch.arange(a.numel(), device=device)).reshape(-1)
        first[at] = members[:, a].reshape(-1)
        second[at] = members[:, b].reshape(-1)
    return first, second


def mixing(labels: Tensor, generator: torch.Generator | None = None) -> Mixing:
    """Draws the mixing of one batch. ``generator`` decides the weights (spec §2: seeded, so
    every worker draws the same ones); its device decides where they are drawn."""
    labels = labels.reshape(-1).long()
    n = labels.numel()
    i, j = same_class_pairs(LabelGroups(labels))
    rand_device = generator.device if generator is not None else torch.device("cpu")
    a = torch.rand(i.numel(), generator=generator, dtype=torch.float64, device=rand_device)
    real = torch.arange(n, device=labels.device)
    first, second = torch.cat([real, i]), torch.cat([real, j])
    weight = torch.cat([torch.ones(n, dtype=torch.float64, device=labels.device), a.to(labels.device)])
    return Mixing(first, second, weight, labels[first], n)


def mix(
    embeddings: Tensor, labels: Tensor, generator: torch.Generator | None = None
) -> tuple[Tensor, Tensor]:
    """Real samples followed by the virtual ones (not re-normalised), and their labels."""
    m = mixing(labels.to(embeddings.device), generator)
    return m.rows(embeddings), m.labels
