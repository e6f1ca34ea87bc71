"""Data loading. The in-memory loaders here need torch, numpy and pillow only.

Imported lazily, so that decoder processes (:mod:`rsk_dist.data.decode`) start without torch.
"""
from __future__ import annotations

from typing import Any

__all__ = ["IMAGE_EXTENSIONS", "load_digits", "load_image_folder_zip"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        from rsk_dist.data import omniglot

        return getattr(omniglot, name)
    raise AttributeError(f"module 'rsk_dist.data' has no attribute {name!r}")
