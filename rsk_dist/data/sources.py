"""Data sources: what the training loop asks of data, and the in-memory ones.

A source has ``labels`` (one per sample, what the sampler draws from) and is called as
``source(indices, key)`` to return ``(images, labels)`` for those samples, images N x C x H x W:
uint8 (0-255) from sources that decode images, which then name the normalisation the float
conversion applies (``mean`` and ``std``, or None for [0, 1]); or floats ready for the model
from in-memory sources, which hold them so. :class:`rsk_dist.data.feeder.Feeder` turns either
into floats on the model's device. ``key`` is the step's augmentation key: a sample's random augmentation is a
function of (key, its index) alone, so it is the same whichever worker fetches it and however
the batch is split, and a resumed step sees what the uninterrupted one saw. A source may also
offer ``prefetch(indices, key)``, a hint that those samples come soon (the streaming reader
reads them ahead); in-memory sources need none.
"""
from __future__ import annotations

from typing import Protocol, runtime_checkable

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from rsk_dist.data.omniglot import load_digits, load_image_folder_zip


@runtime_checkable
class Source(Protocol):
    labels: Tensor

    def __call__(self, indices: Tensor, key: int = 0) -> tuple[Tensor, Tensor]: ...


def sample_hashes(key: int, indices: Tensor) -> np.ndarray:
    """64 random-looking bits per sample from (key, index): splitmix64 of their combination."""
    with np.errstate(over="ignore"):
        x = indices.cpu().numpy().astype(np.uint64) + np.uint64(key % 2**64) * np.uint64(0x9E3779B97F4A7C15)
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return x ^ (x >> np.uint64(31))


def random_shift(images: Tensor, hashes: np.ndarray, pad: int) -> Tensor:
    """Training augmentation for small in-memory images: a translation by up to ``pad``
    pixels (reflect-padded), each image's offset drawn from its hash."""
    n, _, h, w = images.shape
    padded = F.pad(images, (pad, pad, pad, pad), mode="reflect")
    span = np.uint64(2 * pad + 1)
    dy = torch.from_numpy((hashes % span).astype(np.int64))
    dx = torch.from_numpy(((hashes >> np.uint64(32)) % span).astype(np.int64))
    rows = (dy[:, None] + torch.arange(h))[:, None, :, None].expand(n, images.shape[1], h, w + 2 * pad)
    out = padded.gather(2, rows)
    cols = (dx[:, None] + torch.arange(w))[:, None, None, :].expand(n, images.shape[1], h, w)
    return out.gather(3, cols)


class MemorySource:
    """Images held in memory; with ``augment_seed`` set, training images are randomly shifted."""

    def __init__(self, images: Tensor, labels: Tensor, augment_seed: int | None = None) -> None:
        if images.shape[0] != labels.shape[0]:
            raise ValueError(f"{images.shape[0]} images but {labels.shape[0]} labels")
        self.images, self.labels = images, labels.long()
        self.augment_seed = augment_seed

    def __call__(self, indices: Tensor, key: int = 0) -> tuple[Tensor, Tensor]:
        images = self.images[indices]
        if self.augment_seed is not None:
            hashes = sample_hashes(key ^ self.augment_seed, indices)
            images = random_shift(images, hashes, pad=max(1, images.shape[-1] // 14))
        return images, self.labels[indices]

    def __len__(self) -> int:
        return self.labels.numel()


def digits_split(split: str, seed: int = 0) -> MemorySource:
    """scikit-learn's digits, two thirds of each class for ``train`` and the rest for ``test``."""
    images, labels = load_digits()
    g = torch.Generator().manual_seed(seed)
    order = torch.randperm(labels.numel(), generator=g)
    rank_in_class = torch.empty_like(order)
    for c in labels.unique():
        members = order[labels[order] == c]
        rank_in_class[members] = torch.arange(members.numel())
    counts = torch.bincount(labels)
    is_train = rank_in_class < (2 * counts[labels]) // 3
    keep = is_train if split == "train" else ~is_train
    idx = torch.nonzero(keep).squeeze(1)
    return MemorySource(images[idx], labels[idx])


def zip_source(url: str, size: int, exclude_classes: tuple[str, ...] = ()) -> MemorySource:
    """An image-folder zip (Omniglot layout) in memory, less the classes named in
    ``exclude_classes`` (by class name or by its first path component)."""
    images, labels, names = load_image_folder_zip(url.removeprefix("file://"), size=size)
    dropped = {i for i, name in enumerate(names) if name in exclude_classes or name.split("/")[0] in exclude_classes}
    if dropped:
        keep = torch.tensor([int(y) not in dropped for y in labels])
        images, labels = images[keep], labels[keep]
    return MemorySource(images, labels)
