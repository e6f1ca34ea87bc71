"""Losses: RS@k with SiMix (the project's own) and pytorch-metric-learning baselines."""
from rsk_dist.losses import simix
from rsk_dist.losses.baselines import BASELINES, MetricLearningLoss
from rsk_dist.losses.recall import DEFAULT_K, RecallAtKSurrogate, recall_at_k_surrogate

__all__ = [
    "BASELINES",
    "DEFAULT_K",
    "MetricLearningLoss",
    "RecallAtKSurrogate",
    "recall_at_k_surrogate",
    "simix",
]
