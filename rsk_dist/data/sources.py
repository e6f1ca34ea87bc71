"""Data sources: what the training loop asks of data, and the in-memory ones.

A source has ``labels`` (one per sample, what the sampler draws from) and is called with a
tensor of sample indices to return ``(images, labels)`` for them, float images N x C x H x W.
It may also offer ``prefetch(indices)``, a hint that those samples come soon (the streaming
reader reads them ahead); in-memory sources need none.
"""
from __future__ import annotations

from typing import Protocol, runtime_checkable

import torch
import torch.nn.functional as F
from torch import Tensor

from rsk_dist.data.omniglot import load_digits, load_image_folder_zip


@runtime_checkable
class Source(Protocol):
    labels: Tensor

    def __call__(self, indices: Tensor) -> tuple[Tensor, Tensor]: ...


def random_shift(images: Tensor, generator: torch.Generator, pad: int) -> Tensor:
    """Training augmentation for small in-memory images: a random translation by up to
    ``pad`` pixels (reflect-padded), one offset per image."""
    n, _, h, w = images.shape
    padded = F.pad(images, (pad, pad, pad, pad), mode="reflect")
    dy = torch.randint(0, 2 * pad + 1, (n,), generator=generator)
    dx = torch.randint(0, 2 * pad + 1, (n,), generator=generator)
    rows = (dy[:, None] + torch.arange(h))[:, None, :, None].expand(n, images.shape[1], h, w + 2 * pad)
    out = padded.gather(2, rows)
    cols = (dx[:, None] + torch.arange(w))[:, None, None, :].expand(n, images.shape[1], h, w)
    return out.gather(3, cols)


class MemorySource:
    """Images held in memory. With ``augment_seed`` set, each call shifts the images randomly,
    the randomness a pure function of the seed and the indices' first element and length, so
    that a replayed or resumed step sees the same augmentation."""

    def __init__(self, images: Tensor, labels: Tensor, augment_seed: int | None = None) -> None:
        if images.shape[0] != labels.shape[0]:
            raise ValueError(f"{images.shape[0]} images but {labels.shape[0]} labels")
        self.images, self.labels = images, labels.long()
        self.augment_seed = augment_seed

    def __call__(self, indices: Tensor) -> tuple[Tensor, Tensor]:
        images = self.images[indices]
        if self.augment_seed is not None:
            key = hash((self.augment_seed, tuple(indices[:8].tolist()), indices.numel())) & (2**62 - 1)
            images = random_shift(images, torch.Generator().manual_seed(key), pad=max(1, images.shape[-1] // 14))
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
