"""Losses: RS@k with SiMix (the project's own, symmetric or asymmetric) and baselines."""
from rsk_dist.losses import simix
from rsk_dist.losses.baselines import BASELINES, MetricLearningLoss, Regression
from rsk_dist.losses.recall import DEFAULT_K, RecallAtKSurrogate, recall_at_k_surrogate

__all__ = [
    "BASELINES",
    "DEFAULT_K",
    "MetricLearningLoss",
    "RecallAtKSurrogate",
    "Regression",
    "recall_at_k_surrogate",
    "simix",
]
