"""The one check of a loss's ``gallery`` argument (asymmetric losses: a frozen teacher's
embeddings of the batch, row i the same image as the student's row i)."""
from __future__ import annotations

from torch import Tensor


def check_gallery(asymmetric: bool, gallery: Tensor | None, embeddings: Tensor) -> None:
    """Raises unless a gallery is passed exactly to an asymmetric loss, shaped like ``embeddings``."""
    if asymmetric and gallery is None:
        raise ValueError(
            "an asymmetric loss needs the teacher's embeddings of the batch: loss(embeddings, labels, generator, gallery=...)"
        )
    if not asymmetric and gallery is not None:
        raise ValueError("a gallery was passed to a symmetric loss: construct it with asymmetric=True")
    if gallery is not None and gallery.shape != embeddings.shape:
        raise ValueError(
            f"the gallery must hold one row per embedding of the same dimension, got {tuple(gallery.shape)} for "
            f"{tuple(embeddings.shape)}: teacher and student dims must agree"
        )
    if gallery is not None and gallery.requires_grad:
        raise ValueError("the gallery is a constant (a frozen teacher's embeddings): pass gallery.detach()")
