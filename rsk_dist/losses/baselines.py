"""Baseline losses from pytorch-metric-learning, under the same call as RS@k.

They are the library's own implementations, not rewrites; this module only gives them the
``loss(embeddings, labels, generator=None)`` signature that the training step uses.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

BASELINES = ("contrastive", "multi_similarity", "triplet_margin", "ntxent")


class MetricLearningLoss(nn.Module):
    """A pytorch-metric-learning loss by name, e.g. ``MetricLearningLoss("contrastive")``."""

    def __init__(self, name: str, **options: Any) -> None:
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
        self.loss = classes[name](**options)

    def forward(
        self, embeddings: Tensor, labels: Tensor, generator: torch.Generator | None = None
    ) -> Tensor:
        # generator is accepted for a uniform call; these losses draw no random numbers.
        return self.loss(embeddings, labels)
