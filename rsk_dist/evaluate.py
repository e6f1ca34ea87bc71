"""Retrieval evaluation inside a training job (spec §7): each worker embeds its share of the
test set, the embeddings are gathered, and every worker computes the same metrics."""
from __future__ import annotations

import contextlib

import torch
import torch.distributed as dist
from torch import Tensor, nn

from rsk_dist.data.sources import Source
from rsk_dist.distributed import all_gather_rows, rank_and_world
from rsk_dist.metrics import retrieval_metrics
from rsk_dist.preprocess import to_float


def _eager() -> contextlib.AbstractContextManager:
    # torch.compiler.set_stance is torch >= 2.6; older releases build the eval graphs too.
    stance = getattr(torch.compiler, "set_stance", None)
    return stance("force_eager") if stance is not None else contextlib.nullcontext()


@torch.no_grad()
def embed_source(
    model: nn.Module,
    source: Source,
    chunk_size: int = 256,
    group: dist.ProcessGroup | None = None,
) -> tuple[Tensor, Tensor]:
    """Embeddings and labels of the whole source, each worker embedding a contiguous 1/W. uint8
    images are converted chunk by chunk with the source's ``mean`` and ``std``. A compiled model
    runs eagerly here: eval mode would be another graph (and its ragged last chunk one more), on
    top of training's two, and past dynamo's recompile limit it silently falls back to eager anyway."""
    rank, world = rank_and_world(group)
    n = source.labels.numel()
    per = -(-n // world)  # all_gather needs equal shares: the last worker pads with index 0
    mine = torch.arange(rank * per, (rank + 1) * per)
    valid = mine < n
    mine = torch.where(valid, mine, torch.zeros_like(mine))
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    chunks = mine.split(chunk_size)
    prefetch = getattr(source, "prefetch", None)
    parts = []
    # a feeder's, which also casts to the model's dtype; a bare source's normalisation otherwise
    normalize = getattr(source, "normalize", None) or (
        lambda x: to_float(x, getattr(source, "mean", None), getattr(source, "std", None))
    )
    try:
        with _eager():
            for i, idx in enumerate(chunks):
                if prefetch is not None and i + 1 < len(chunks):
                    prefetch(chunks[i + 1])  # read and decode the next chunk while this one is embedded
                parts.append(model(normalize(source(idx)[0].to(device))).float())
    finally:
        model.train(was_training)
    emb = torch.cat(parts) if parts else torch.empty(0, device=device)
    if world > 1:
        emb = all_gather_rows(emb, group)
    return emb[:n], source.labels[:n].to(emb.device)


def evaluate(
    model: nn.Module,
    source: Source,
    ks: tuple[int, ...] = (1, 2, 4, 8),
    chunk_size: int = 256,
    group: dist.ProcessGroup | None = None,
    teacher: nn.Module | None = None,
) -> dict[str, float]:
    """Recall@k, MAP@R and R-precision of ``model`` on ``source`` (query excluded). With a
    ``teacher`` (asymmetric training), in three settings: symmetric (``model`` on both sides:
    the plain keys), asymmetric (``model``'s queries against the teacher's gallery: keys
    prefixed ``asymmetric_``) and the teacher's own (``teacher_``)."""
    emb, labels = embed_source(model, source, chunk_size, group)
    if teacher is None:
        return retrieval_metrics(emb, labels, ks=ks)
    return three_settings(emb, embed_source(teacher, source, chunk_size, group)[0], labels, ks)


def three_settings(student: Tensor, teacher: Tensor, labels: Tensor, ks: tuple[int, ...] = (1, 2, 4, 8)) -> dict[str, float]:
    """Metrics of a student and a teacher's embeddings of the same images: symmetric (plain
    keys), student queries against the teacher's gallery (``asymmetric_``), teacher alone (``teacher_``)."""
    metrics = retrieval_metrics(student, labels, ks=ks)
    for prefix, queries in (("asymmetric_", student), ("teacher_", teacher)):
        settings = retrieval_metrics(queries, labels, ks=ks, gallery=teacher)
        metrics.update({prefix + key: value for key, value in settings.items()})
    return metrics
