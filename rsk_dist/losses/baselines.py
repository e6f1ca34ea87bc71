"""Baseline losses from pytorch-metric-learning, under the same call as RS@k.

They are the library's own implementations, not rewrites; this module only gives them the
``loss(embeddings, labels, generator=None)`` signature that the training step uses.

Asymmetric metric learning (Budnik & Avrithis, CVPR 2021), where a student's embeddings are
trained against a frozen teacher's embeddings of the same batch (``gallery=``, supplied by the
step): a library loss with ``asymmetric=True`` compares each student embedding with the
teacher's (the library's ``ref_emb``/``ref_labels``), the teacher's embedding of the same image
a positive when ``self_positive`` (the asymmetric contrastive loss is then the paper's Contr+,
without it its Contr); and :class:`Regression` pulls each student embedding onto its teacher's.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from rsk_dist.losses.gallery import check_gallery

BASELINES = ("contrastive", "multi_similarity", "triplet_margin", "ntxent")


class MetricLearningLoss(nn.Module):
    """A pytorch-metric-learning loss by name, e.g. ``MetricLearningLoss("contrastive")``."""

    def __init__(self, name: str, asymmetric: bool = False, self_positive: bool = True, **options: Any) -> None:
        super().__init__()
        try:
            from pytorch_metric_learning import losses
        except ImportError as err:
            raise ImportError(
                f"the {name!r} baseline comes from pytorch-metric-learning: "
                "pip install 'rsk_dist[baselines]'"
            ) from err
        classes = {
            "contrastive": losses.ContrastiveLoss,
            "multi_similarity": losses.MultiSimilarityLoss,
            "triplet_margin": losses.TripletMarginLoss,
            "ntxent": losses.NTXentLoss,
        }
        if name not in classes:
            raise ValueError(f"unknown baseline loss {name!r}; choose one of {BASELINES}")
        self.name = name
        self.asymmetric, self.self_positive = asymmetric, self_positive
        self.loss = classes[name](**options)

    def forward(
        self,
        embeddings: Tensor,
        labels: Tensor,
        generator: torch.Generator | None = None,
        gallery: Tensor | None = None,
    ) -> Tensor:
        # generator is accepted for a uniform call; these losses draw no random numbers.
        check_gallery(self.asymmetric, gallery, embeddings)
        if gallery is None:
            return self.loss(embeddings, labels)
        # The pairs are explicit: the library tells a student-teacher pair of one image from
        # others only by whether ref_labels is the very tensor labels is.
        same = labels[:, None] == labels[None, :]
        a2, n = torch.nonzero(~same, as_tuple=True)
        if not self.self_positive:
            same.fill_diagonal_(False)
        a1, p = torch.nonzero(same, as_tuple=True)
        return self.loss(embeddings, labels, indices_tuple=(a1, p, a2, n), ref_emb=gallery, ref_labels=labels)


class Regression(nn.Module):
    """Regression onto a frozen teacher: the mean over the batch of minus the cosine of each
    student embedding with the teacher's embedding of the same image. Labels are not used."""

    asymmetric = True

    def forward(
        self,
        embeddings: Tensor,
        labels: Tensor,
        generator: torch.Generator | None = None,
        gallery: Tensor | None = None,
    ) -> Tensor:
        check_gallery(True, gallery, embeddings)
        return -F.cosine_similarity(embeddings, gallery.to(embeddings.dtype), dim=1).mean()

