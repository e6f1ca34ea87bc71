"""Samples grouped by label: the one grouping that the loss, SiMix, the sampler and the metrics use.

Sorting once by label (stable, so ties keep ascending sample index) turns every per-class
question into slicing: class ``c`` owns ``order[starts[c] : starts[c] + counts[c]]``. Nothing of
size N x N is built, and nothing here syncs a device except where a Python list is asked for.
"""
from __future__ import annotations

import torch
from torch import Tensor


class LabelGroups:
    """``labels`` grouped by value. Classes are in ascending label order; a class's members are
    in ascending sample index."""

    def __init__(self, labels: Tensor) -> None:
        self.labels = labels.reshape(-1).long()
        sorted_labels, self.order = torch.sort(self.labels, stable=True)
        self.classes, self.counts = torch.unique_consecutive(sorted_labels, return_counts=True)
        self.starts = torch.cumsum(self.counts, 0) - self.counts
        self.class_of = torch.searchsorted(self.classes, self.labels)

    def __len__(self) -> int:
        return self.classes.numel()

    def members(self) -> list[Tensor]:
        """Each class's sample indices, one tensor per class."""
        return list(self.order.split(self.counts.tolist()))

    def num_positives(self, samples: Tensor) -> Tensor:
        """For each sample, how many others share its label."""
        return self.counts[self.class_of[samples]] - 1

    def count_of(self, labels: Tensor) -> Tensor:
        """How many grouped samples carry each of ``labels`` (0 for a label not grouped here)."""
        labels = labels.reshape(-1).long()
        if not len(self):
            return torch.zeros_like(labels)
        pos = torch.searchsorted(self.classes, labels).clamp(max=len(self) - 1)
        return torch.where(self.classes[pos] == labels, self.counts[pos], 0)
