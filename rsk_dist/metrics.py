"""Retrieval evaluation (spec §7): exact k-NN, Recall@k, MAP@R, R-precision, VehicleID and
Revisited Oxford/Paris mAP.

Needs torch alone. The k-NN search runs on the embeddings' device: a chunked matrix product
(memory ``chunk_size x N``), or faiss. :func:`plan_search` chooses: on the CPU faiss when
importable; on CUDA the matrix product, which stays on the device, and faiss-gpu only when asked
or when a chunk of similarities does not fit in free device memory. Both rank by inner product,
larger first, equal similarities in increasing gallery index, so results are reproducible
whatever the backend and chunking.
"""
from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from typing import Literal, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from rsk_dist.grouping import LabelGroups

# Extra faiss candidates beyond k, so that a tie straddling the k-th place can usually be
# resolved by index without a second search (rows where it can't are redone by matmul).
_FAISS_MARGIN = 16
# Largest k a faiss GPU index accepts in older releases; beyond it we fall back to matmul.
_FAISS_GPU_MAX_K = 2048
# Device bytes per query-gallery similarity on the matmul path: the float32 similarity, _top_k's
# two boolean masks, and the int64 cumsum of rows whose tie group straddles the k-th place,
# counted as if every row did.
_MATMUL_BYTES_PER_SIM = 16
# faiss-gpu's scratch memory. Its default (about 1.5 GiB, and 256 MiB of pinned host memory)
# would be allocated beside PyTorch's cache, which still holds the training step's memory.
_FAISS_GPU_TEMP_BYTES = 256 << 20
_faiss_gpu_resources = None  # one StandardGpuResources for the process, made on first use


def _faiss():
    try:
        import faiss  # noqa: PLC0415 - optional dependency, imported only when used
    except ImportError:
        return None
    return faiss


def _has_faiss_gpu(faiss) -> bool:
    return faiss is not None and hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0


def _gpu_resources(faiss):
    """The process's one faiss GPU resource object, with bounded scratch memory; our inputs are
    already on the device, so it needs no pinned staging memory either."""
    global _faiss_gpu_resources
    if _faiss_gpu_resources is None:
        resources = faiss.StandardGpuResources()
        resources.setTempMemory(_FAISS_GPU_TEMP_BYTES)
        resources.setPinnedMemory(0)
        _faiss_gpu_resources = resources
    return _faiss_gpu_resources


def free_device_bytes(device: torch.device) -> int | None:
    """Memory a new allocation on ``device`` can use: the driver's free memory plus what PyTorch's
    cache holds unused. None on the CPU (not the limit there)."""
    if device.type != "cuda":
        return None
    free, _ = torch.cuda.mem_get_info(device)
    return free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)


class SearchPlan(NamedTuple):
    backend: Literal["matmul", "faiss"]
    chunk_size: int  # queries per chunk


def plan_search(
    device_type: str,
    n_gallery: int,
    k: int,
    chunk_size: int,
    free_bytes: int | None,
    use_faiss: bool | None,
    have_faiss: bool,
    faiss_gpu: bool,
) -> SearchPlan:
    """How to search ``n_gallery`` embeddings on a ``device_type`` device with ``free_bytes``
    free there. ``use_faiss``: None chooses, True asks for faiss, False for the matmul path.

    On the CPU faiss serves whenever importable. On CUDA the matmul path is the default (exact,
    on the device, in PyTorch's memory), and faiss-gpu serves when asked or when even one chunk of
    similarities does not fit; without faiss-gpu the chunk shrinks to fit instead."""
    if use_faiss and not have_faiss:
        raise ImportError("use_faiss=True but faiss is not installed")
    if use_faiss is False or not have_faiss:
        backend = "matmul"
    elif device_type != "cuda":
        backend = "faiss"
    elif faiss_gpu and k + _FAISS_MARGIN + 1 > _FAISS_GPU_MAX_K:
        backend = "matmul"
    elif use_faiss:
        backend = "faiss"
    else:
        fits = free_bytes is None or chunk_size * n_gallery * _MATMUL_BYTES_PER_SIM <= free_bytes
        backend = "matmul" if fits or not faiss_gpu else "faiss"
    if backend == "matmul" and device_type == "cuda" and free_bytes is not None:
        chunk_size = max(1, min(chunk_size, free_bytes // (max(n_gallery, 1) * _MATMUL_BYTES_PER_SIM)))
    return SearchPlan(backend, chunk_size)


def _top_k(sims: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """Top k of each row, larger first; equal values in increasing column order.

    torch.topk gives no guarantee on ties, so it only finds the k-th value; the columns are then
    chosen from the strictly larger ones plus the leftmost of those equal to it."""
    kth = sims.topk(k, dim=1).values[:, -1:]
    take = sims > kth
    tied = sims == kth
    missing = k - take.sum(1, keepdim=True)
    over = tied.sum(1, keepdim=True) > missing
    rows = over.squeeze(1).nonzero().squeeze(1)
    take |= tied
    if len(rows):  # rare: only rows whose tie group straddles the k-th place pay for a cumsum
        take[rows] &= ~tied[rows] | (tied[rows].cumsum(1) <= missing[rows])
    cols = take.nonzero()[:, 1].view(len(sims), k)  # nonzero is row-major: columns ascend
    vals = sims.gather(1, cols)
    order = vals.argsort(dim=1, descending=True, stable=True)
    return vals.gather(1, order), cols.gather(1, order)


def _check_knn_args(queries: Tensor, gallery: Tensor, k: int, exclude_self: bool) -> None:
    if queries.dim() != 2 or gallery.dim() != 2 or queries.shape[1] != gallery.shape[1]:
        raise ValueError(
            f"queries and gallery must be 2-d with the same width, got {tuple(queries.shape)} "
            f"and {tuple(gallery.shape)}"
        )
    if exclude_self and len(queries) != len(gallery):
        raise ValueError("exclude_self needs the queries to be the gallery (same length)")
    available = len(gallery) - int(exclude_self)
    if not 1 <= k <= available:
        raise ValueError(
            f"k={k} is out of range: each query has {available} candidate neighbours"
            + (" (itself excluded)" if exclude_self else "")
        )
    if not (torch.isfinite(queries).all() and torch.isfinite(gallery).all()):
        raise ValueError("embeddings contain NaN or infinite values")


def _matmul_chunks(
    queries: Tensor, gallery: Tensor, k: int, exclude_self: bool, chunk_size: int
) -> Iterator[tuple[int, Tensor, Tensor]]:
    for start in range(0, len(queries), chunk_size):
        sims = queries[start : start + chunk_size] @ gallery.T
        if exclude_self:
            rows = torch.arange(len(sims), device=sims.device)
            sims[rows, rows + start] = -math.inf  # finite embeddings: never among the top k
        yield start, *_top_k(sims, k)


def _faiss_chunks(
    faiss, queries: Tensor, gallery: Tensor, k: int, exclude_self: bool, chunk_size: int
) -> Iterator[tuple[int, Tensor, Tensor]]:
    n = len(gallery)
    m = min(n, k + int(exclude_self) + _FAISS_MARGIN)
    index = faiss.IndexFlatIP(gallery.shape[1])
    on_device = gallery.is_cuda and _has_faiss_gpu(faiss)
    if on_device:
        import faiss.contrib.torch_utils  # noqa: F401, PLC0415 - lets a GPU index take CUDA tensors

        device = gallery.device.index if gallery.device.index is not None else torch.cuda.current_device()
        index = faiss.index_cpu_to_gpu(_gpu_resources(faiss), device, index)

    def as_input(x: Tensor):
        x = x.detach().float()
        return x.contiguous() if on_device else x.cpu().numpy()

    index.add(as_input(gallery))
    for start in range(0, len(queries), chunk_size):
        chunk = queries[start : start + chunk_size]
        d, i = index.search(as_input(chunk), m)
        d, i = torch.as_tensor(d, device=queries.device), torch.as_tensor(i, device=queries.device)
        cand, order = i.sort(dim=1)  # columns in gallery-index order, as _top_k breaks ties
        sims = d.to(queries.dtype).gather(1, order)
        if exclude_self:
            own = torch.arange(start, start + len(chunk), device=queries.device)
            sims[cand == own[:, None]] = -math.inf
        vals, cols = _top_k(sims, k)
        idx = cand.gather(1, cols)
        # A tie at the k-th place that reaches faiss's last candidate may go on beyond it, where
        # faiss chose arbitrarily: redo those rows by matmul.
        rows = ((d[:, -1].to(vals.dtype) == vals[:, -1]) & (m < n)).nonzero().squeeze(1)
        if len(rows):
            sub = chunk[rows] @ gallery.T
            if exclude_self:
                sub[torch.arange(len(rows), device=sub.device), rows + start] = -math.inf
            vals[rows], idx[rows] = _top_k(sub.to(vals.dtype), k)
        yield start, vals, idx


def _knn_chunks(
    queries: Tensor,
    gallery: Tensor,
    k: int,
    exclude_self: bool,
    chunk_size: int,
    use_faiss: bool | None,
) -> Iterator[tuple[int, Tensor, Tensor]]:
    _check_knn_args(queries, gallery, k, exclude_self)
    faiss = None if use_faiss is False else _faiss()
    plan = plan_search(
        gallery.device.type, len(gallery), k, chunk_size, free_device_bytes(gallery.device),
        use_faiss, faiss is not None, _has_faiss_gpu(faiss),
    )
    if plan.backend == "matmul":
        return _matmul_chunks(queries, gallery, k, exclude_self, plan.chunk_size)
    return _faiss_chunks(faiss, queries, gallery, k, exclude_self, plan.chunk_size)


def knn(
    queries: Tensor,
    gallery: Tensor,
    k: int,
    exclude_self: bool,
    chunk_size: int = 4096,
    use_faiss: bool | None = None,
) -> tuple[Tensor, Tensor]:
    """Exact inner-product k-NN: (sims, indices), each ``len(queries) x k``, larger first and
    equal similarities in increasing gallery index. With ``exclude_self`` the queries are the
    gallery and a query is never its own neighbour. Normalise first for cosine similarity.
    ``use_faiss``: None lets :func:`plan_search` choose, True asks for faiss, False for the
    matrix product."""
    parts = list(_knn_chunks(queries, gallery, k, exclude_self, chunk_size, use_faiss))
    return torch.cat([p[1] for p in parts]), torch.cat([p[2] for p in parts])


def _check_labels(emb: Tensor, labels: Tensor, name: str) -> None:
    if labels.dim() != 1 or len(labels) != len(emb):
        raise ValueError(
            f"{name}: {len(emb)} embeddings but labels of shape {tuple(labels.shape)}"
        )


def _metrics(
    queries: Tensor,
    query_labels: Tensor,
    gallery: Tensor,
    gallery_labels: Tensor,
    ks: Sequence[int],
    exclude_self: bool,
    chunk_size: int,
    use_faiss: bool | None,
) -> dict[str, float]:
    _check_labels(queries, query_labels, "queries")
    _check_labels(gallery, gallery_labels, "gallery")
    ks = sorted({int(k) for k in ks})
    if not ks or ks[0] < 1:
        raise ValueError(f"ks must be positive integers, got {ks}")
    available = len(gallery) - int(exclude_self)
    if not len(queries) or ks[-1] > available:
        raise ValueError(
            f"Recall@{ks[-1]} needs {ks[-1]} neighbours but each of the {len(queries)} queries "
            f"has only {available}"
        )
    # R: relevant gallery items per query (the query itself, when in the gallery, is not one).
    r = LabelGroups(gallery_labels).count_of(query_labels) - int(exclude_self)
    width = max(ks[-1], int(r.max()))
    # Like pytorch-metric-learning's AccuracyCalculator, queries with no relevant item (R = 0:
    # singleton classes when the gallery is the query set) are dropped from every metric,
    # Recall@k included: they could never score a hit. All of them dropped gives NaN.
    hits = {k: 0 for k in ks}
    ap_sum = rp_sum = 0.0
    for start, _, idx in _knn_chunks(queries, gallery, width, exclude_self, chunk_size, use_faiss):
        rr = r[start : start + len(idx)]
        keep = rr > 0
        rel = (gallery_labels[idx] == query_labels[start : start + len(idx), None])[keep]
        rr = rr[keep]
        for k in ks:
            hits[k] += int(rel[:, :k].any(1).sum())
        # MAP@R (Musgrave et al. 2020): mean over the first R places of precision@i at hits.
        in_r = torch.arange(width, device=idx.device) < rr[:, None]
        rel_r = (rel & in_r).double()
        prec = rel_r.cumsum(1) / torch.arange(1, width + 1, device=idx.device)
        ap_sum += float(((prec * rel_r).sum(1) / rr).sum())
        rp_sum += float((rel_r.sum(1) / rr).sum())
    n = int((r > 0).sum())
    out = {f"recall@{k}": hits[k] / n if n else math.nan for k in ks}
    out["map@r"] = ap_sum / n if n else math.nan
    out["r_precision"] = rp_sum / n if n else math.nan
    return out


def retrieval_metrics(
    embeddings: Tensor,
    labels: Tensor,
    ks: Sequence[int] = (1, 2, 4, 8),
    chunk_size: int = 4096,
    use_faiss: bool | None = None,
    gallery: Tensor | None = None,
) -> dict[str, float]:
    """Recall@k, MAP@R and R-precision of every sample against all the others, by cosine
    similarity (spec §7). Keys ``recall@<k>``, ``map@r``, ``r_precision``; queries whose class
    has no other sample are left out (see :func:`_metrics`). ``gallery``: another model's
    embeddings of the same samples (asymmetric retrieval: row i the same image as query i,
    still left out of its own results)."""
    emb = F.normalize(embeddings.detach(), dim=1)
    other = emb if gallery is None else F.normalize(gallery.detach(), dim=1)
    return _metrics(emb, labels, other, labels, ks, True, chunk_size, use_faiss)


def retrieval_metrics_qg(
    query_emb: Tensor,
    query_labels: Tensor,
    gallery_emb: Tensor,
    gallery_labels: Tensor,
    ks: Sequence[int] = (1, 5),
    chunk_size: int = 4096,
    use_faiss: bool | None = None,
) -> dict[str, float]:
    """Same metrics for separate query and gallery sets (nothing excluded); R counts the
    gallery items sharing the query's label, and queries with none are left out."""
    q = F.normalize(query_emb.detach(), dim=1)
    g = F.normalize(gallery_emb.detach(), dim=1)
    return _metrics(q, query_labels, g, gallery_labels, ks, False, chunk_size, use_faiss)


def vehicleid_split(
    labels: Tensor, generator: torch.Generator | None = None
) -> tuple[Tensor, Tensor]:
    """VehicleID protocol: one image per identity, drawn at random, is the gallery; the others
    are the queries. Returns (query_idx, gallery_idx), each in increasing order."""
    perm = torch.randperm(len(labels), generator=generator)
    # A stable sort by label keeps the random order inside each identity: take its first.
    order = perm[torch.sort(labels.cpu()[perm], stable=True).indices]
    sorted_labels = labels.cpu()[order]
    first = torch.ones(len(labels), dtype=torch.bool)
    first[1:] = sorted_labels[1:] != sorted_labels[:-1]
    return order[~first].sort().values, order[first].sort().values


def vehicleid_metrics(
    embeddings: Tensor,
    labels: Tensor,
    ks: Sequence[int] = (1, 5),
    generator: torch.Generator | None = None,
    chunk_size: int = 4096,
) -> dict[str, float]:
    """Recall@k (and MAP@R, R-precision; all equal to Recall@1's hit rate per query when R = 1)
    of the VehicleID queries against its one-image-per-identity gallery."""
    q, g = vehicleid_split(labels, generator)
    q, g = q.to(labels.device), g.to(labels.device)
    return retrieval_metrics_qg(
        embeddings[q], labels[q], embeddings[g], labels[g], ks, chunk_size
    )


def _revisited_ap(ranking_pos: Tensor, positives: list[int], junk: list[int]) -> float:
    """AP as revisitop's compute_map/compute_ap: junk removed from the ranking, then the
    trapezoid between precision before and after each positive, over len(positives)."""
    pos = ranking_pos[torch.as_tensor(positives, dtype=torch.long)].sort().values
    bad = ranking_pos[torch.as_tensor(junk, dtype=torch.long)].sort().values
    ranks = (pos - torch.searchsorted(bad, pos)).double()  # places once junk ahead is gone
    j = torch.arange(len(ranks), dtype=torch.float64)
    before = torch.where(ranks == 0, 1.0, j / ranks.clamp(min=1))
    after = (j + 1) / (ranks + 1)
    return float(((before + after) / 2).sum() / len(positives))


def revisited_map(
    query_emb: Tensor, gallery_emb: Tensor, ground_truth: list[dict]
) -> dict[str, float]:
    """mAP in [0, 1] for the Revisited Oxford/Paris medium and hard protocols (Radenović et al.
    2018). ``ground_truth[i]`` holds gallery index lists ``easy``, ``hard``, ``junk`` (the gnd of
    revisitop's .pkl). Medium: positives easy+hard, junk ignored. Hard: positives hard, junk and
    easy ignored. Queries without positives in a protocol are skipped, as revisitop does."""
    if len(ground_truth) != len(query_emb):
        raise ValueError(
            f"{len(query_emb)} queries but ground truth for {len(ground_truth)}"
        )
    if query_emb.dim() != 2 or gallery_emb.dim() != 2 or query_emb.shape[1] != gallery_emb.shape[1]:
        raise ValueError("query and gallery embeddings must be 2-d with the same width")
    sims = F.normalize(query_emb.detach(), dim=1) @ F.normalize(gallery_emb.detach(), dim=1).T
    order = sims.sort(dim=1, descending=True, stable=True).indices.cpu()
    places = torch.empty_like(order)
    places.scatter_(1, order, torch.arange(order.shape[1]).expand_as(order))
    aps: dict[str, list[float]] = {"medium": [], "hard": []}
    for place, gt in zip(places, ground_truth):
        easy, hard, junk = list(gt["easy"]), list(gt["hard"]), list(gt["junk"])
        for name, positives, ignored in (
            ("medium", easy + hard, junk),
            ("hard", hard, junk + easy),
        ):
            if positives:
                aps[name].append(_revisited_ap(place, positives, ignored))
    return {name: sum(v) / len(v) if v else math.nan for name, v in aps.items()}
